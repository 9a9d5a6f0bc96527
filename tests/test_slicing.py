"""Slicing a Flash-shaped, quantised official checkpoint down to a smaller config."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import perturb
from einops import rearrange
from safetensors import safe_open
from test_checkpoints import quantize_checkpoint

import v4lens
from v4lens.cli import main as cli_main
from v4lens.model.config import V4Config, preset
from v4lens.weights.slicing import default_layers, make_plan, remap_tid2eid, slice_checkpoint

# Flash's structure at CI size: 2 sliding + alternating CSA / HCA, 3 hash layers, MTP (sliding),
# 4 output groups of 2 heads, rope 16 of 48, indexer 4 × 32.
SOURCE = V4Config(
    name="flash-like", d_vocab=512, d_model=256, n_layers=7, n_heads=8, head_dim=48, rope_head_dim=16,
    q_lora_rank=64, o_lora_rank=32, o_groups=4, window_size=16, compress_ratios=(0, 0, 4, 16, 4, 16, 4, 0),
    index_n_heads=4, index_head_dim=32, index_topk=4, n_routed_experts=12, n_activated_experts=3,
    moe_inter_dim=64, n_hash_layers=3, n_mtp_layers=1, hc_mult=4, original_seq_len=256, rope_factor=4.0,
)  # fmt: skip
TARGET = V4Config(
    name="mini-like", d_vocab=400, d_model=160, n_layers=4, n_heads=6, head_dim=24, rope_head_dim=8,
    q_lora_rank=48, o_lora_rank=24, o_groups=3, window_size=8, compress_ratios=(0, 4, 12, 0, 0),
    index_n_heads=3, index_head_dim=20, index_topk=3, n_routed_experts=5, n_activated_experts=2,
    moe_inter_dim=40, n_hash_layers=1, n_mtp_layers=1, hc_mult=3, original_seq_len=256, rope_factor=4.0,
)  # fmt: skip
HEADS = [2, 3, 0, 1, 7, 6]  # target groups take source groups 1, 0, 3
EXPERTS = [11, 3, 5, 0, 8]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The quantised source checkpoint and the fp32 model holding its dequantised values."""
    from v4lens.weights.loading import build_empty, init_weights

    model = build_empty(SOURCE)
    init_weights(model, seed=4)
    perturb(model, seed=5)
    path = tmp_path_factory.mktemp("flash_like")
    model.save_pretrained(path, format="official", max_shard_size="2MB")
    quantize_checkpoint(path)
    return path, v4lens.load(path)


@pytest.fixture(scope="module")
def sliced(source, tmp_path_factory):
    path, _ = source
    out = tmp_path_factory.mktemp("sliced")
    hidden = torch.randperm(256, generator=torch.Generator().manual_seed(6))[:160]
    plan = slice_checkpoint(path, TARGET, out, heads=HEADS, experts=EXPERTS, hidden=hidden,
                            dtype="float32", progress=False)  # fmt: skip
    return out, plan, hidden


def test_default_layer_map_respects_types_and_hash_routing():
    assert default_layers(SOURCE, TARGET) == [0, 4, 5, 6]  # 2 is hash-routed; 6 (CSA) feeds a sliding layer
    flash, mini = preset("flash"), preset("mini-3b")
    layers = default_layers(flash, mini)
    assert layers[:4] == [0, 1, 4, 5] and layers[-1] == 42 and layers == sorted(set(layers))
    for t, s in enumerate(layers):
        assert mini.layer_type(t) in ("sliding", flash.layer_type(s))
        assert mini.is_hash_layer(t) == flash.is_hash_layer(s)
    plan = make_plan(flash, mini)
    assert plan.rope_pairs[2].tolist() == list(range(0, 32, 2))  # every other pair when the rope dim halves
    assert plan.ape_rows(3).tolist() == torch.linspace(0, 127, 112).round().long().tolist()


def test_every_tensor_is_the_documented_sub_block(source, sliced):
    _, src = source
    out, plan, hidden = sliced
    got = v4lens.load(out).state_dict()
    S = src.state_dict()
    D, V, n, k = hidden, torch.arange(400), 3, 4  # n target streams of k source streams
    nope = torch.arange(16)

    def chans(t, src_nope, tgt_nope):
        pairs = plan.rope_pairs[t]
        return torch.cat([torch.arange(tgt_nope), src_nope + torch.stack([2 * pairs, 2 * pairs + 1], -1).flatten()])

    def mix_rows():
        keep = torch.arange(n)
        return torch.cat([keep, k + keep, 2 * k + (keep[:, None] * k + keep).flatten()])

    def fn(w):  # [M, k·D_src] -> [M_t, n·D_t]
        w = rearrange(w, "m (s d) -> m s d", s=k)[mix_rows() if w.shape[0] != k else torch.arange(n)]
        return rearrange(w[:, :n][:, :, D], "m s d -> m (s d)")

    expected = {
        "embed.weight": S["embed.weight"][V][:, D], "head.weight": S["head.weight"][V][:, D],
        "ln_final.w": S["ln_final.w"][D], "hc_head.fn": fn(S["hc_head.fn"]), "hc_head.base": S["hc_head.base"][:n],
        "hc_head.scale": S["hc_head.scale"],
    }  # fmt: skip
    layer_of = dict(enumerate(plan.layers)) | {4: 7}
    assert plan.layers == [0, 4, 5, 6]
    for t, s in layer_of.items():
        tp, sp = (f"blocks.{t}.", f"blocks.{s}.") if t < 4 else ("mtp.0.", "mtp.0.")
        c = chans(t, 32, 16)
        assert torch.equal(c[:16], nope)
        E = torch.tensor(EXPERTS)
        e = {
            "ln1.w": S[sp + "ln1.w"][D], "ln2.w": S[sp + "ln2.w"][D],
            "attn.wq_a": S[sp + "attn.wq_a"][:48][:, D], "attn.q_norm.w": S[sp + "attn.q_norm.w"][:48],
            "attn.wq_b": rearrange(rearrange(S[sp + "attn.wq_b"], "(h c) r -> h c r", h=8)[HEADS][:, c][:, :, :48],
                                   "h c r -> (h c) r"),
            "attn.wkv": S[sp + "attn.wkv"][c][:, D], "attn.kv_norm.w": S[sp + "attn.kv_norm.w"][c],
            "attn.attn_sink": S[sp + "attn.attn_sink"][HEADS],
            "attn.wo_b": rearrange(rearrange(S[sp + "attn.wo_b"], "d (g r) -> d g r", g=4)[D][:, [1, 0, 3], :24],
                                   "d g r -> d (g r)"),
            "mlp.gate.weight": S[sp + "mlp.gate.weight"][E][:, D],
            "mlp.experts.w1": S[sp + "mlp.experts.w1"][E][:, :40][:, :, D],
            "mlp.experts.w2": S[sp + "mlp.experts.w2"][E][:, D][:, :, :40],
            "mlp.shared_experts.w3": S[sp + "mlp.shared_experts.w3"][:40][:, D],
            "attn_hc.fn": fn(S[sp + "attn_hc.fn"]), "mlp_hc.base": S[sp + "mlp_hc.base"][mix_rows()],
            "mlp_hc.scale": S[sp + "mlp_hc.scale"],
        }  # fmt: skip
        wo_a = rearrange(S[sp + "attn.wo_a"], "(g r) (j c) -> g r j c", g=4, c=48)
        e["attn.wo_a"] = torch.cat([
            rearrange(wo_a[sg, :24][:, local][:, :, c], "r j c -> r (j c)")
            for sg, local in ((1, [0, 1]), (0, [0, 1]), (3, [1, 0]))
        ])  # fmt: skip
        if t == 0 or t == 4:
            assert f"{tp}mlp.gate.bias" in got or t == 0
        if TARGET.layer_type(t) != "sliding":
            ratio = TARGET.compress_ratio(t)
            rows = torch.linspace(0, SOURCE.compress_ratio(s) - 1, ratio).round().long()
            cc = torch.cat([c, 48 + c]) if ratio == 4 else c
            e["attn.compressor.wkv"] = S[sp + "attn.compressor.wkv"][cc][:, D]
            e["attn.compressor.ape"] = S[sp + "attn.compressor.ape"][rows][:, cc]
            e["attn.compressor.norm.w"] = S[sp + "attn.compressor.norm.w"][c]
        else:
            assert not any(name.startswith(tp + "attn.compressor") for name in got)
        if TARGET.layer_type(t) == "csa":
            ic = chans(t, 16, 12)
            e["attn.indexer.wq_b"] = rearrange(
                rearrange(S[sp + "attn.indexer.wq_b"], "(h c) r -> h c r", h=4)[:3][:, ic][:, :, :48],
                "h c r -> (h c) r",
            )
            e["attn.indexer.compressor.wgate"] = S[sp + "attn.indexer.compressor.wgate"][torch.cat([ic, 32 + ic])][:, D]
            e["attn.indexer.weights_proj"] = S[sp + "attn.indexer.weights_proj"][:3][:, D]
        if t < 4 and not TARGET.is_hash_layer(t):
            e["mlp.gate.bias"] = S[sp + "mlp.gate.bias"][E]
        if t == 4:
            e |= {"e_proj": S["mtp.0.e_proj"][D][:, D], "enorm.w": S["mtp.0.enorm.w"][D],
                  "hc_head.fn": fn(S["mtp.0.hc_head.fn"])}  # fmt: skip
        expected |= {tp + name: value for name, value in e.items()}
    assert len(expected) > 80
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    table = got["blocks.0.mlp.gate.tid2eid"]
    assert table.shape == (400, 2) and int(table.min()) >= 0 and int(table.max()) < 5
    assert bool((table[:, 0] != table[:, 1]).all())
    assert torch.equal(table, remap_tid2eid(S["blocks.0.mlp.gate.tid2eid"][:400], EXPERTS, 5, 2))


def test_sliced_checkpoint_runs_and_records_its_provenance(sliced):
    out = sliced[0]
    model = v4lens.load(out)
    tokens = torch.randint(0, 400, (2, 40))
    with torch.no_grad():
        logits, (mtp_logits,) = model(tokens, mtp=True)
    assert logits.shape == (2, 40, 400) and torch.isfinite(logits).all() and torch.isfinite(mtp_logits).all()
    record = json.loads((out / "slice.json").read_text())
    assert record["layers"] == [0, 4, 5, 6] and record["heads"] == HEADS and record["source_format"] == "official"
    assert record["experts"]["2"] == EXPERTS and "mod E_tgt" in record["tid2eid"]
    with safe_open(next(out.glob("*.safetensors")), "pt") as h:
        assert json.loads(h.metadata()["v4lens_slice"])["layers"] == [0, 4, 5, 6]


def test_slicing_to_the_source_config_reproduces_it(source, sliced, tmp_path):
    path, src = source
    slice_checkpoint(path, src.cfg, tmp_path / "same", dtype="float32", progress=False, format="hf")
    same = v4lens.load(tmp_path / "same")
    tokens = torch.randint(0, 512, (2, 50))
    with torch.no_grad():
        assert torch.equal(same(tokens), src(tokens))
    # a transformers-layout source slices to the same tensors as the quantised official one
    out, _, hidden = sliced
    again = slice_checkpoint(tmp_path / "same", TARGET, tmp_path / "again", heads=HEADS, experts=EXPERTS,
                             hidden=hidden, dtype="float32", progress=False)  # fmt: skip
    assert again.layers == [0, 4, 5, 6]
    first, second = v4lens.load(out).state_dict(), v4lens.load(tmp_path / "again").state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_tid2eid_remap_rule():
    table = torch.tensor([[4, 1, 2], [5, 6, 7], [0, 3, 6]])
    # kept source experts 0, 1, 2, 3 -> new ids 0..3
    got = remap_tid2eid(table, [0, 1, 2, 3], n_experts=4, k=3)
    assert got[0].tolist() == [1, 2, 0]  # survivors 1, 2; dropped 4 -> 4 mod 4 = 0
    assert got[1].tolist() == [1, 2, 3]  # all dropped: 5, 6, 7 -> 1, 2, 3
    assert got[2].tolist() == [0, 3, 2]  # 6 -> 2
    assert remap_tid2eid(table, [0, 1, 2, 3], 4, 4)[2].tolist() == [0, 3, 2, 1]  # filled with the lowest unused


def test_bad_slices_are_explained():
    with pytest.raises(ValueError, match="d_model 300 > 256"):
        make_plan(SOURCE, TARGET.replace(d_model=300))
    with pytest.raises(ValueError, match=r"target layer 1 \(csa ratio 4\) cannot come from source layer 3 \(hca"):
        make_plan(SOURCE, TARGET, layers=[0, 3, 5, 6])
    with pytest.raises(ValueError, match="more than one source group"):
        make_plan(SOURCE, TARGET, heads=[0, 2, 1, 3, 4, 5])
    with pytest.raises(ValueError, match="experts .* distinct"):
        make_plan(SOURCE, TARGET, experts=[0, 0, 1, 2, 3])


def test_cli_slice(source, tmp_path):
    path, _ = source
    (tmp_path / "target.json").write_text(json.dumps(TARGET.to_official()))
    out = tmp_path / "cli"
    code = cli_main(["slice", str(path), str(out), "--target", str(tmp_path / "target.json"),
                     "--experts", "0-4", "--format", "hf"])  # fmt: skip
    assert code == 0
    model = v4lens.load(out)
    assert model.cfg.d_model == 160 and json.loads((out / "config.json").read_text())["model_type"] == "deepseek_v4"
    assert cli_main(["slice", str(path), str(tmp_path / "bad"), "--target", "nonsense"]) == 2

"""DSpark checkpoints (V4-Flash-0731 / V4-Pro-0813 layout): the official `mtp.{s}.*` names, loading (FP8 / FP4
dequantised), saving in both layouts bit-exactly, the errors, slicing with the drafter, and `load(..., draft=)`.

SPEC F4 lists the official names: per stage the block's tensors under `mtp.{s}.`, plus `mtp.0.main_proj` (FP8 +
scale), `mtp.0.main_norm`, and on the last stage its `norm`, `hc_head_*`, Markov and confidence heads.
"""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from conftest import perturb
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_checkpoints import _keys

import v4lens
from v4lens.model.config import V4Config, preset
from v4lens.weights.names import canonical_name, official_name
from v4lens.weights.official_layout import official_tensor_count, official_tensor_names
from v4lens.weights.quant import dequantize, quantize_fp4, quantize_fp8
from v4lens.weights.slicing import slice_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

DSPARK = {"d_vocab": 256, "dspark_noise_token_id": 7}  # tiny-dspark with a small vocabulary
TOKENS = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    """tiny-dspark (3 stages tapping layers 1-3), every tensor perturbed off its init. Read-only."""
    return perturb(v4lens.load("tiny-dspark", seed=2, **DSPARK), seed=3, scale=0.2).eval()


@pytest.fixture(scope="module")
def official(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("dspark") / "official"
    model.save_pretrained(path, format="official")
    return path


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _same_draft(a, b, tokens=TOKENS):
    with torch.no_grad():
        (la, da), (lb, db) = a(tokens, draft=True), b(tokens, draft=True)
    assert torch.equal(la, lb)
    for field in ("tokens", "logits", "confidences"):
        assert torch.equal(getattr(da, field), getattr(db, field)), field


def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


# ---------------------------------------------------------------------- names
def test_official_dspark_names_map_both_ways():
    pairs = {
        "mtp.0.main_proj.weight": "dspark.main_proj", "mtp.0.main_norm.weight": "dspark.main_norm.w",
        "mtp.2.norm.weight": "dspark.ln_final.w", "mtp.2.hc_head_fn": "dspark.hc_head.fn",
        "mtp.2.hc_head_scale": "dspark.hc_head.scale", "mtp.2.markov_head.markov_w1.weight": "dspark.markov_w1",
        "mtp.2.markov_head.markov_w2.weight": "dspark.markov_w2",
        "mtp.2.confidence_head.proj.weight": "dspark.confidence_proj",
        "mtp.1.attn.wq_a.weight": "dspark.stages.1.attn.wq_a", "mtp.0.hc_attn_fn": "dspark.stages.0.attn_hc.fn",
        "mtp.2.ffn_norm.weight": "dspark.stages.2.ln2.w", "mtp.1.ffn.gate.bias": "dspark.stages.1.mlp.gate.bias",
        "mtp.0.attn.kv_norm.weight": "dspark.stages.0.attn.kv_norm.w",
    }  # fmt: skip
    for off, ours in pairs.items():
        assert canonical_name(off, dspark_stages=3) == ours
        assert official_name(ours, dspark_stages=3) == off
    assert canonical_name("mtp.1.ffn.experts.5.w2.weight", with_expert=True, dspark_stages=3) == (
        "dspark.stages.1.mlp.experts.w2",
        5,
    )
    assert official_name("dspark.stages.1.mlp.experts.w2", 5, dspark_stages=3) == "mtp.1.ffn.experts.5.w2.weight"
    # the config decides: April's mtp.0.norm is its MTP block's final norm; DSpark's norm sits on the last stage
    assert canonical_name("mtp.0.norm.weight") == "mtp.0.ln_final.w"
    assert canonical_name("mtp.0.norm.weight", dspark_stages=1) == "dspark.ln_final.w"
    assert canonical_name("mtp.1.norm.weight", dspark_stages=2) == "dspark.ln_final.w"
    assert canonical_name("mtp.0.norm.weight", dspark_stages=3) not in (None, "dspark.ln_final.w")  # unexpected
    assert canonical_name("mtp.0.main_proj.weight") == "mtp.0.main_proj.weight"  # not DSpark: an unknown tensor
    with pytest.raises(ValueError, match="dspark_stages"):
        official_name("dspark.markov_w1")


def test_official_save_writes_the_release_names_and_count(model, official):
    """An official-layout save holds official_tensor_names minus the FP8/FP4 scales (the save writes the model's
    dtype, not FP8); quantised as DeepSeek ships it, exactly official_tensor_count(cfg) tensors."""
    names = official_tensor_names(model.cfg)
    assert _keys(official) == {n for n in names if not n.endswith(".scale")}
    assert len(_keys(official)) == official_tensor_count(model.cfg) - sum(n.endswith(".scale") for n in names)


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("format", ["official", "hf"])
def test_round_trip_fp32_is_bit_exact(model, official, tmp_path, format):
    path = official if format == "official" else tmp_path / "hf"
    if format == "hf":
        model.save_pretrained(path, format="hf")
        assert "mtp.2.markov_head.markov_w1.weight" in _keys(path)  # transformers' layout keeps the official name
        assert "model.layers.0.attn.wq_a.weight" in _keys(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the whole model loads, without a warning
        loaded = v4lens.load(path)
    assert loaded.cfg.draft == "dspark" and loaded.cfg.n_mtp_layers == 3
    for field in ("dspark_block_size", "dspark_noise_token_id", "dspark_target_layer_ids", "dspark_markov_rank",
                  "compress_ratios", "n_layers", "d_model"):  # fmt: skip
        assert getattr(loaded.cfg, field) == getattr(model.cfg, field), field
    _same_state(model, loaded)
    _same_draft(model, loaded)


@pytest.mark.parametrize("format", ["official", "hf"])
def test_round_trip_bf16_is_bit_exact(tmp_path, format):
    bf16 = perturb(v4lens.load("tiny-dspark", dtype="bf16", **DSPARK), seed=4)
    bf16.save_pretrained(tmp_path / "out", format=format)
    loaded = v4lens.load(tmp_path / "out", dtype="bf16")
    _same_state(bf16, loaded)
    stored = "mtp.0.main_proj.weight"
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as h:
        assert h.get_tensor(stored).dtype == torch.bfloat16
        assert h.get_tensor("mtp.2.hc_head_fn").dtype == torch.float32  # an fp32 island stays fp32
    _same_draft(bf16, loaded, TOKENS[:1])


def test_transformers_loads_a_dspark_save_and_ignores_the_drafter(model, tmp_path):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert not any("mtp" in n for n in hf.state_dict())


# ---------------------------------------------------------------------- quantised, as released
_FP8 = re.compile(r"\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$|\.indexer\.wq_b\.weight$|shared_experts\.w[123]\.weight$"
                  r"|\.main_proj\.weight$")  # fmt: skip
_FP4 = re.compile(r"\.experts\.\d+\.w[123]\.weight$")


def test_quantised_official_checkpoint_loads_dequantised(model, official, tmp_path):
    path = tmp_path / "fp8"
    path.mkdir()
    (path / "config.json").write_text((official / "config.json").read_text())
    tensors = load_file(official / "model.safetensors")
    for key in [k for k in tensors if _FP8.search(k) or _FP4.search(k)]:
        q, s = (quantize_fp4 if _FP4.search(key) else quantize_fp8)(tensors.pop(key))
        tensors[key], tensors[key.removesuffix(".weight") + ".scale"] = q, s
    save_file(tensors, path / "model.safetensors")
    assert set(tensors) == set(official_tensor_names(model.cfg)) and len(tensors) == official_tensor_count(model.cfg)
    assert tensors["mtp.0.main_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["mtp.1.ffn.experts.3.w2.weight"].dtype == torch.int8

    loaded = v4lens.load(path)
    expected = v4lens.load("tiny-dspark", **DSPARK)  # the same model with the dequantised values, by hand
    expected.load_state_dict(model.state_dict())
    params = dict(expected.named_parameters())
    with torch.no_grad():
        for key in tensors:
            if key.endswith(".weight") and key.removesuffix(".weight") + ".scale" in tensors:
                name, e = canonical_name(key, with_expert=True, dspark_stages=3)
                deq = dequantize(tensors[key], tensors[key.removesuffix(".weight") + ".scale"])
                (params[name][e] if e is not None else params[name]).copy_(deq)
    assert not torch.equal(expected.dspark.main_proj, model.dspark.main_proj)  # FP8 changed it ...
    _same_state(expected, loaded)  # ... and the load holds exactly the dequantised values
    _same_draft(expected, loaded)


# ---------------------------------------------------------------------- errors
def _copy(src, dst):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    return dst


@pytest.mark.parametrize("key", ["mtp.2.markov_head.markov_w1.weight", "mtp.0.main_proj.weight",
                                 "mtp.1.attn.wkv.weight"])  # fmt: skip
def test_a_missing_dspark_tensor_is_named(official, tmp_path, key):
    path = _copy(official, tmp_path / "ckpt")
    _rewrite(path, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=r"missing tensors.*" + re.escape(key)):
        v4lens.load(path)


def test_an_unexpected_dspark_tensor_is_named(official, tmp_path):
    path = _copy(official, tmp_path / "ckpt")
    _rewrite(path, lambda t: t.update({"mtp.1.main_proj.weight": torch.zeros(64, 192),  # only stage 0 has it
                                       "mtp.3.attn.wq_a.weight": torch.zeros(32, 64)}))  # no stage 3  # fmt: skip
    with pytest.raises(ValueError, match=r"unexpected tensors.*mtp\.1\.main_proj\.weight.*mtp\.3\.attn\.wq_a"):
        v4lens.load(path)


def test_a_misshaped_dspark_tensor_names_both_shapes(official, tmp_path):
    path = _copy(official, tmp_path / "ckpt")
    _rewrite(path, lambda t: t.update({"mtp.2.confidence_head.proj.weight": torch.zeros(1, 70)}))
    with pytest.raises(ValueError, match=r"mtp\.2\.confidence_head\.proj\.weight has shape \(1, 70\).*"
                                         r"dspark\.confidence_proj expects \(1, 72\)"):  # fmt: skip
        v4lens.load(path)


def test_april_and_dspark_checkpoints_are_not_confused(official, tmp_path):
    april = v4lens.load("tiny", d_vocab=256)  # one April MTP block
    april.save_pretrained(tmp_path / "april", format="official")
    # April tensors under a 0731 config
    path = _copy(tmp_path / "april", tmp_path / "april_as_0731")
    path.joinpath("config.json").write_text((official / "config.json").read_text())
    with pytest.raises(ValueError, match=r"describes a DSpark drafter.*holds April MTP tensors \(mtp\.0\.e_proj"):
        v4lens.load(path)
    # DSpark tensors under an April config
    path = _copy(official, tmp_path / "0731_as_april")
    path.joinpath("config.json").write_text((tmp_path / "april" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"describes April MTP blocks.*holds the DSpark drafter tensors.*main_proj"):
        v4lens.load(path)


def test_a_transformers_folder_without_mtp_tensors_builds_the_backbone(model, tmp_path):
    """What transformers' own save_pretrained writes (no mtp.*): the backbone, with a warning, as for MTP."""
    model.save_pretrained(tmp_path / "hf")
    _rewrite(tmp_path / "hf", lambda t: [t.pop(k) for k in list(t) if k.startswith("mtp.")])
    with pytest.warns(UserWarning, match="no mtp.* tensors.*without its DSpark drafter"):
        loaded = v4lens.load(tmp_path / "hf")
    assert loaded.cfg.draft is None and not hasattr(loaded, "dspark")
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), model(TOKENS))


# ---------------------------------------------------------------------- slicing
# Flash-0731's structure at test size: 2 sliding + CSA / HCA, hash layer 0, three DSpark stages tapping the
# last three layers.
SOURCE = V4Config(
    name="flash-0731-like", d_vocab=300, d_model=96, n_layers=6, n_heads=4, head_dim=32, rope_head_dim=8,
    q_lora_rank=32, o_lora_rank=16, o_groups=2, window_size=8, compress_ratios=(0, 0, 4, 16, 4, 16, 0, 0, 0),
    index_n_heads=2, index_head_dim=16, index_topk=3, n_routed_experts=6, n_activated_experts=2,
    moe_inter_dim=32, n_hash_layers=1, n_mtp_layers=3, dspark_block_size=5, dspark_noise_token_id=7,
    dspark_target_layer_ids=(3, 4, 5), dspark_markov_rank=12,
)  # fmt: skip
TARGET = SOURCE.replace(
    name="small", d_vocab=200, d_model=64, n_layers=4, n_heads=2, o_groups=1, compress_ratios=(0, 4, 12, 0, 0, 0),
    n_routed_experts=4, moe_inter_dim=24, n_mtp_layers=2, dspark_target_layer_ids=(1, 2, 3), dspark_markov_rank=8,
)  # fmt: skip
EXPERTS = [5, 0, 3, 1]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The Flash-0731-like source, saved in the official layout; the fp32 model holding its values."""
    from v4lens.weights.loading import build_empty, init_weights

    src = build_empty(SOURCE)
    init_weights(src, seed=4)
    perturb(src, seed=5, scale=0.2)
    path = tmp_path_factory.mktemp("src") / "official"
    src.save_pretrained(path, format="official")
    return path, src.eval()


def test_slicing_keeps_the_drafter_and_maps_its_taps(source, tmp_path):
    path, src = source
    hidden = torch.randperm(96, generator=torch.Generator().manual_seed(6))[:64]
    # layers 0, 2, 3, 5: source taps 3 -> target 2, 5 -> 3, and 4 (dropped) -> 2 (fed by 3, the largest kept below 4)
    with pytest.warns(UserWarning, match=r"taps target layers \[2, 3\]"):
        plan = slice_checkpoint(path, TARGET, tmp_path / "out", layers=[0, 2, 3, 5], hidden=hidden, experts=EXPERTS,
                                dtype="float32", progress=False)  # fmt: skip
    assert plan.taps == [2, 2, 3] and plan.tgt.dspark_target_layer_ids == (2, 3)
    out = v4lens.load(tmp_path / "out")
    cfg = out.cfg
    assert cfg.draft == "dspark" and cfg.n_mtp_layers == 2 and cfg.dspark_target_layer_ids == (2, 3)
    assert cfg.dspark_markov_rank == 8 and cfg.compress_ratios == (0, 4, 12, 0, 0, 0)
    record = json.loads((tmp_path / "out" / "slice.json").read_text())
    assert record["dspark"]["taps"] == {"3": 2, "4": 2, "5": 3} and record["dspark"]["target_layer_ids"] == [2, 3]
    assert "largest source layer" in record["dspark"]["tap_rule"]

    S, T = src.state_dict(), out.state_dict()
    D, V, r = hidden, torch.arange(200), torch.arange(8)
    blocks = [S["dspark.main_proj"][D][:, i * 96 + D] for i in range(3)]  # [D_t, D_t] per source tap
    assert torch.equal(T["dspark.main_proj"], torch.cat([blocks[0] + blocks[1], blocks[2]], dim=1))
    assert torch.equal(T["dspark.main_norm.w"], S["dspark.main_norm.w"][D])
    assert torch.equal(T["dspark.ln_final.w"], S["dspark.ln_final.w"][D])
    assert torch.equal(T["dspark.markov_w1"], S["dspark.markov_w1"][V][:, r])
    assert torch.equal(T["dspark.markov_w2"], S["dspark.markov_w2"][V][:, r])
    assert torch.equal(T["dspark.confidence_proj"], S["dspark.confidence_proj"][:, torch.cat([D, 96 + r])])
    assert torch.equal(T["dspark.hc_head.base"], S["dspark.hc_head.base"])
    for s in range(2):  # stage s from source stage s, cut like a block
        t, p = f"dspark.stages.{s}.", f"dspark.stages.{s}."
        assert torch.equal(T[t + "ln1.w"], S[p + "ln1.w"][D])
        assert torch.equal(T[t + "attn.wq_a"], S[p + "attn.wq_a"][:32][:, D])
        assert torch.equal(T[t + "mlp.gate.bias"], S[p + "mlp.gate.bias"][EXPERTS])
        assert torch.equal(T[t + "mlp.experts.w2"], S[p + "mlp.experts.w2"][EXPERTS][:, D][:, :, :24])
        assert torch.equal(T[t + "attn.attn_sink"], S[p + "attn.attn_sink"][[0, 1]])  # the first group's first heads
    with torch.no_grad():
        _, draft = out(torch.randint(0, 200, (1, 9)), draft=True)
    assert draft.tokens.shape == (1, 5) and torch.isfinite(draft.confidences).all()


def test_slicing_a_dspark_checkpoint_to_its_own_config_reproduces_it(source, tmp_path):
    path, src = source
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slice_checkpoint(path, src.cfg, tmp_path / "same", dtype="float32", progress=False, format="hf")
    same = v4lens.load(tmp_path / "same")
    _same_state(src, same)
    _same_draft(src, same, torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(1)))


def test_slicing_refuses_to_turn_dspark_into_mtp(source, tmp_path):
    path, _ = source
    april = TARGET.replace(n_mtp_layers=1, compress_ratios=(0, 4, 12, 0, 0), dspark_block_size=0,
                           dspark_target_layer_ids=())  # fmt: skip
    with pytest.raises(ValueError, match=r"target config has April MTP blocks but the source .* DSpark"):
        slice_checkpoint(path, april, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="taps layer 3.*no target layer can stand in"):
        slice_checkpoint(path, TARGET, tmp_path / "out", layers=[4, 4, 5, 5], progress=False)
    sliced = slice_checkpoint(path, TARGET.without_draft(), tmp_path / "backbone", dtype="float32", progress=False)
    assert sliced.tgt.draft is None and v4lens.load(tmp_path / "backbone").cfg.draft is None


def test_mini_3b_from_flash_0731_taps_the_layers_its_taps_map_to():
    """Config level only: Flash's taps 40, 41, 42; mini-3b keeps 40 (-> 26) and 42 (-> 27) but not 41 (-> 26)."""
    from v4lens.weights.slice_plan import make_plan

    plan = make_plan(preset("flash-0731"), preset("mini-3b", draft="dspark"))
    assert plan.layers[-2:] == [40, 42] and plan.taps == [26, 26, 27]
    assert plan.tgt.dspark_target_layer_ids == (26, 27) and plan.tgt.n_mtp_layers == 3


# ---------------------------------------------------------------------- load(..., draft=)
def test_the_draft_option_builds_either_draft_module():
    dspark = v4lens.load("tiny", draft="dspark", d_vocab=256, dspark_noise_token_id=7)
    assert dspark.cfg.draft == "dspark" and len(dspark.dspark.stages) == 3 and dspark.cfg.name == "tiny"
    assert dspark.cfg.dspark_target_layer_ids == (1, 2, 3) and dspark.cfg.dspark_markov_rank == 8  # tiny-dspark's
    mtp = v4lens.load("tiny-dspark", draft="mtp", d_vocab=256)
    assert mtp.cfg.draft == "mtp" and len(mtp.mtp) == 1 and mtp.cfg.compress_ratios == (0, 4, 6, 4, 0)
    assert v4lens.load("tiny", draft=None, d_vocab=256).cfg.draft is None
    assert v4lens.load("tiny", d_vocab=256).cfg.draft == "mtp"  # default: the preset's own
    # the same backbone weights whatever the draft module (each tensor has its own generator)
    assert torch.equal(dspark.blocks[2].attn.wq_a, v4lens.load("tiny", d_vocab=256).blocks[2].attn.wq_a)
    with pytest.raises(ValueError, match="draft must be one of"):
        v4lens.load("tiny", draft="DSpark")


def test_the_draft_option_on_mini_3b_at_config_level():
    cfg = preset("mini-3b", draft="dspark")
    assert cfg.draft == "dspark" and cfg.n_mtp_layers == 3 and cfg.dspark_block_size == 5
    assert cfg.dspark_noise_token_id == 128799 and cfg.dspark_markov_rank == 256
    assert cfg.dspark_target_layer_ids == (25, 26, 27)  # the last three of 28, as Flash-0731's 40-42 of 43
    assert cfg.compress_ratios == preset("mini-3b").compress_ratios[:28] + (0, 0, 0)
    assert preset("flash", draft="dspark") == preset("flash-0731").replace(name="flash")
    assert preset("mini-3b", draft="dspark", dspark_markov_rank=64).dspark_markov_rank == 64  # overrides win
    with pytest.raises(v4lens.weights.memory.ModelTooLargeError):  # refused before anything is allocated
        v4lens.load("mini-3b", draft="dspark", max_memory="1MB")


def test_a_checkpoint_decides_its_own_draft_module(official):
    with pytest.raises(ValueError, match="draft='dspark'.*checkpoint"):
        v4lens.load(official, draft="dspark")
    with pytest.raises(ValueError, match="draft=None.*checkpoint"):
        v4lens.load("tiny-recall", draft=None)

"""The four DeepSeek-V4 releases (V4-Flash, V4-Flash-0731, V4-Pro, V4-Pro-0813): their configs in both
vocabularies, the presets, DSpark config fields, the official tensor counts, `v4lens info`, and how a
DSpark checkpoint loads and slices (tests/test_dspark_checkpoints.py has the details).

The config fixtures are written from the specification's release tables (DeepSeek's
`inference/config.json` names and the transformers-style `config.json` names).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

import v4lens
from v4lens.cli import main as cli_main
from v4lens.model import HookedV4
from v4lens.model.config import PRESETS, V4Config, preset
from v4lens.weights.official_layout import official_tensor_count, official_tensor_names
from v4lens.weights.saving import layout_tensors

pytestmark = pytest.mark.usefixtures("single_thread")

FLASH_RATIOS = [0, 0] + [4, 128] * 20 + [4]  # 43 backbone layers
PRO_RATIOS = [128, 128] + [4, 128] * 29 + [4]  # 61 backbone layers: 0 and 1 are HCA (and hash-routed)
DSPARK_0731 = {"dspark_block_size": 5, "dspark_noise_token_id": 128799, "dspark_target_layer_ids": [40, 41, 42],
               "dspark_markov_rank": 256}  # fmt: skip
DSPARK_0813 = {"dspark_block_size": 5, "dspark_noise_token_id": 128799, "dspark_target_layer_ids": [58, 59, 60],
               "dspark_markov_rank": 512}  # fmt: skip


def official_config(release: str) -> dict:
    """DeepSeek's inference/config.json (ModelArgs names) of a release."""
    flash = release.startswith("flash")
    d = {
        "vocab_size": 129280, "dim": 4096 if flash else 7168, "moe_inter_dim": 2048 if flash else 3072,
        "n_layers": 43 if flash else 61, "n_hash_layers": 3, "n_mtp_layers": 1, "n_heads": 64 if flash else 128,
        "n_routed_experts": 256 if flash else 384, "n_shared_experts": 1, "n_activated_experts": 6,
        "score_func": "sqrtsoftplus", "route_scale": 1.5 if flash else 2.5, "swiglu_limit": 10.0,
        "q_lora_rank": 1024 if flash else 1536, "head_dim": 512, "rope_head_dim": 64, "norm_eps": 1e-6,
        "o_groups": 8 if flash else 16, "o_lora_rank": 1024, "window_size": 128,
        "compress_ratios": (FLASH_RATIOS if flash else PRO_RATIOS) + [0], "compress_rope_theta": 160000,
        "original_seq_len": 65536, "rope_theta": 10000, "rope_factor": 16, "beta_fast": 32, "beta_slow": 1,
        "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512 if flash else 1024, "hc_mult": 4,
        "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "dtype": "fp8", "scale_fmt": "ue8m0", "expert_dtype": "fp4",
    }  # fmt: skip
    if release in ("flash-0731", "pro-0813"):  # DSpark: three stages, each with ratio 0
        d["n_mtp_layers"] = 3
        d["compress_ratios"] = d["compress_ratios"][:-1] + [0, 0, 0]
        d.update(DSPARK_0731 if flash else DSPARK_0813)
    return d


def hf_config(release: str) -> dict:
    """The transformers-style config.json of a release: legacy compress_ratios, and (DSpark releases)
    the dspark_* keys beside a `num_nextn_predict_layers: 1` that must not be trusted."""
    o = official_config(release)
    d = {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": o["vocab_size"],
        "hidden_size": o["dim"], "moe_intermediate_size": o["moe_inter_dim"], "num_hidden_layers": o["n_layers"],
        "num_attention_heads": o["n_heads"], "num_key_value_heads": 1, "head_dim": 512, "qk_rope_head_dim": 64,
        "q_lora_rank": o["q_lora_rank"], "o_lora_rank": 1024, "o_groups": o["o_groups"],
        "n_routed_experts": o["n_routed_experts"], "n_shared_experts": 1, "num_experts_per_tok": 6,
        "num_hash_layers": 3, "scoring_func": "sqrtsoftplus", "routed_scaling_factor": o["route_scale"],
        "swiglu_limit": 10.0, "sliding_window": 128, "compress_ratios": o["compress_ratios"],
        "compress_rope_theta": 160000, "rope_theta": 10000, "max_position_embeddings": 1048576,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        "index_n_heads": 64, "index_head_dim": 128, "index_topk": o["index_topk"], "hc_mult": 4,
        "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "num_nextn_predict_layers": 1,
        "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
    }  # fmt: skip
    d.update({k: v for k, v in o.items() if k.startswith("dspark_")})
    return d


RELEASES = ["flash", "flash-0731", "pro", "pro-0813"]


# ---------------------------------------------------------------------- configs and presets
@pytest.mark.parametrize("vocabulary", ["official", "hf"])
@pytest.mark.parametrize("release", RELEASES)
def test_release_configs_parse_to_the_presets(release, vocabulary, tmp_path):
    raw = official_config(release) if vocabulary == "official" else hf_config(release)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    build = V4Config.from_official if vocabulary == "official" else V4Config.from_hf
    cfg = build(tmp_path / "config.json", name=release)
    assert cfg == preset(release)
    dspark = release in ("flash-0731", "pro-0813")
    assert cfg.draft == ("dspark" if dspark else "mtp")
    assert cfg.n_mtp_layers == (3 if dspark else 1)  # DSpark: 3 stages whatever num_nextn_predict_layers says
    assert len(cfg.compress_ratios) == cfg.n_layers + cfg.n_mtp_layers
    if dspark:
        assert cfg.dspark_block_size == 5 and cfg.dspark_noise_token_id == 128799
        assert cfg.dspark_target_layer_ids == ((40, 41, 42) if release == "flash-0731" else (58, 59, 60))
        assert cfg.dspark_markov_rank == (256 if release == "flash-0731" else 512)
    else:
        assert cfg.dspark_block_size == 0 and cfg.dspark_target_layer_ids == ()


@pytest.mark.parametrize("release", RELEASES)
def test_configs_write_the_dspark_keys_back(release):
    cfg = preset(release)
    official = cfg.to_official()
    assert V4Config.from_official(official, name=release) == cfg
    hf = cfg.to_hf().to_dict()  # (transformers' layer_types hold no ratio for the draft module's 0s)
    assert V4Config.from_hf(hf, name=release).to_official() == official
    for d in (official, hf):
        keys = {k for k in d if k.startswith("dspark_")}
        if cfg.draft == "dspark":
            assert {k: d[k] for k in keys} == {
                "dspark_block_size": 5, "dspark_noise_token_id": 128799,
                "dspark_target_layer_ids": list(cfg.dspark_target_layer_ids),
                "dspark_markov_rank": cfg.dspark_markov_rank,
            }  # fmt: skip
        else:
            assert not keys  # April configs stay as they were


def test_hf_stage_count_is_inferred_not_read():
    # dspark_* keys with only the 43 backbone ratios: the official code's 3 stages (ratio 0 each)
    d = hf_config("flash-0731")
    d["compress_ratios"] = FLASH_RATIOS
    cfg = V4Config.from_hf(d)
    assert cfg.draft == "dspark" and cfg.n_mtp_layers == 3
    assert [cfg.compress_ratio(43 + s) for s in range(3)] == [0, 0, 0]
    # the trailing ratio entries say how many stages there are
    d["compress_ratios"] = FLASH_RATIOS + [0, 0]
    assert V4Config.from_hf(d).n_mtp_layers == 2
    # an April transformers config keeps its one MTP block
    assert V4Config.from_hf(hf_config("flash")).draft == "mtp"


def test_presets_of_the_releases():
    for name in ("flash-0731", "pro", "pro-0813"):
        assert name in PRESETS
    pro = preset("pro")
    assert (pro.d_model, pro.n_layers, pro.n_heads, pro.q_lora_rank, pro.o_groups) == (7168, 61, 128, 1536, 16)
    assert (pro.n_routed_experts, pro.moe_inter_dim, pro.route_scale, pro.index_topk) == (384, 3072, 2.5, 1024)
    assert pro.layer_types()[:3] == ["hca", "hca", "csa"] and pro.is_hash_layer(0) and pro.is_hash_layer(1)
    assert "sliding" not in pro.layer_types() and pro.layer_types()[-1] == "csa"
    assert len(pro.compress_ratios) == 62 and len(preset("pro-0813").compress_ratios) == 64
    assert preset("flash").draft == "mtp" and preset("tiny-recall").draft is None
    # the drafter's parameters: 3 stages + main_proj/main_norm + stage 2's norm, hc_head, Markov and confidence
    flash, f0731 = preset("flash").param_counts(), preset("flash-0731").param_counts()
    assert f0731["total_without_mtp"] == flash["total_without_mtp"]  # the same backbone
    D, V, hc = 4096, 129280, 4
    stage = (flash["total"] - flash["total_without_mtp"]) - (2 * D * D + 3 * D + hc * hc * D + hc + 1)
    dspark = 3 * stage + 3 * D * D + 2 * D + hc * hc * D + hc + 1 + 2 * V * 256 + D + 256
    assert f0731["total"] - f0731["total_without_mtp"] == dspark


def test_a_pro_shaped_model_builds_hca_hash_layers():
    """Pro's first layers are HCA and hash-routed at once: a shrunk Pro preset builds and runs."""
    shrink = dict(d_vocab=256, d_model=64, n_layers=4, n_heads=4, head_dim=32, rope_head_dim=8, q_lora_rank=32,
                  o_lora_rank=16, o_groups=2, window_size=8, compress_ratios=(8, 8, 4, 8, 0), index_n_heads=2,
                  index_head_dim=16, index_topk=3, n_routed_experts=8, moe_inter_dim=32)  # fmt: skip
    cfg = preset("pro", **shrink)
    assert cfg.layer_types() == ["hca", "hca", "csa", "hca"] and cfg.n_hash_layers == 3
    model = v4lens.load(preset="pro", **shrink)
    tokens = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model(tokens)).all()
    for layer in (0, 1):
        assert model.blocks[layer].mlp.hashed and model.blocks[layer].attn.compressor is not None
        assert model.blocks[layer].attn.indexer is None


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(dspark_block_size=-1), "dspark_block_size"),
        (dict(dspark_block_size="5"), "dspark_block_size"),
        (dict(dspark_block_size=1), "dspark_block_size"),
        (dict(dspark_noise_token_id=129280), "dspark_noise_token_id"),
        (dict(dspark_noise_token_id=True), "dspark_noise_token_id"),
        (dict(dspark_target_layer_ids=(40, 41, 43)), "dspark_target_layer_ids"),
        (dict(dspark_target_layer_ids=(-1, 41, 42)), "dspark_target_layer_ids"),
        (dict(dspark_target_layer_ids=(40, 41, 41)), "dspark_target_layer_ids"),
        (dict(dspark_target_layer_ids=(40, 41.0, 42)), "dspark_target_layer_ids"),
        (dict(dspark_target_layer_ids="40"), "dspark_target_layer_ids"),
        (dict(dspark_target_layer_ids=()), "dspark_target_layer_ids"),
        (dict(dspark_markov_rank=0), "dspark_markov_rank"),
        (dict(dspark_markov_rank=2.5), "dspark_markov_rank"),
        (dict(n_mtp_layers=0, compress_ratios=tuple(FLASH_RATIOS)), "n_mtp_layers"),
        (dict(compress_ratios=tuple(FLASH_RATIOS) + (0, 4, 0)), "compress_ratios"),
        (dict(dspark_block_size=0), "dspark_target_layer_ids"),  # DSpark fields of a config that has no DSpark
    ],
)
def test_dspark_fields_are_validated_by_name(change, message):
    with pytest.raises((TypeError, ValueError), match=message):
        preset("flash-0731", **change)


# ---------------------------------------------------------------------- official tensor counts
def test_official_tensor_counts_of_the_releases():
    assert official_tensor_count(preset("flash-0731")) == 72_317
    assert official_tensor_count(preset("pro-0813")) == 149_782
    names = official_tensor_names(preset("flash-0731"))
    assert len(names) == len(set(names))
    for name in ("mtp.0.main_proj.weight", "mtp.0.main_proj.scale", "mtp.0.main_norm.weight", "mtp.2.norm.weight",
                 "mtp.2.hc_head_fn", "mtp.2.markov_head.markov_w1.weight", "mtp.2.markov_head.markov_w2.weight",
                 "mtp.2.confidence_head.proj.weight", "mtp.1.attn.wq_a.scale", "mtp.1.ffn.experts.255.w2.scale",
                 "layers.0.ffn.gate.tid2eid", "layers.3.attn.wo_a.scale", "layers.2.attn.indexer.wq_b.scale"):
        assert name in names, name
    for name in ("mtp.0.e_proj.weight", "mtp.0.ffn.gate.tid2eid", "mtp.1.main_proj.weight", "mtp.0.norm.weight",
                 "layers.2.attn.compressor.wkv.scale", "embed.scale", "layers.0.ffn.gate.bias"):
        assert name not in names, name


def test_official_tensor_names_match_what_v4lens_writes():
    """Without the `.scale` tensors of the FP8/FP4 matrices, the names are those v4lens writes and reads."""
    for cfg in (preset("tiny", d_vocab=256), preset("tiny", d_vocab=256, n_mtp_layers=0, compress_ratios=(0, 4, 6, 4))):
        with torch.device("meta"):
            model = HookedV4(cfg)
        written = [name for name, _ in layout_tensors(model.state_dict(), "official")]
        names = official_tensor_names(cfg)
        assert sorted(n for n in names if not n.endswith(".scale")) == sorted(written)
        assert all(n[: -len(".scale")] + ".weight" in names for n in names if n.endswith(".scale"))


# ---------------------------------------------------------------------- v4lens info
def test_info_of_flash_0731(capsys):
    assert cli_main(["info", "flash-0731"]) == 0
    out = capsys.readouterr().out
    assert "flash-0731" in out and "72,317" in out
    assert "DSpark" in out and "3 stages" in out
    counts = preset("flash-0731").param_counts()
    assert f"{counts['total']:,}" in out and f"{counts['active']:,}" in out
    assert cli_main(["info", "flash"]) == 0
    out = capsys.readouterr().out
    assert "1 MTP block" in out and "DSpark" not in out


# ---------------------------------------------------------------------- loading a DSpark checkpoint
def _dspark_checkpoint(path, format):
    """A tiny DSpark checkpoint (3 stages tapping layers 1..3) whose transformers-style config says
    `num_nextn_predict_layers: 1` as the released one does; returns the model that wrote it."""
    model = v4lens.load("tiny-dspark", d_vocab=256, dspark_noise_token_id=7)
    model.save_pretrained(path, format=format)
    if format == "hf":
        raw = json.loads((path / "config.json").read_text())
        raw["num_nextn_predict_layers"] = 1  # as the released transformers-style config says
        (path / "config.json").write_text(json.dumps(raw))
    return model


@pytest.mark.parametrize("format", ["official", "hf"])
def test_a_dspark_checkpoint_loads_the_whole_drafter_without_a_warning(tmp_path, format):
    saved = _dspark_checkpoint(tmp_path / "ckpt", format)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = v4lens.load(tmp_path / "ckpt")
    assert model.cfg.draft == "dspark" and len(model.dspark.stages) == 3 and len(model.mtp) == 0  # never MTP blocks
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    (logits, draft), (want, want_draft) = model(tokens, draft=True), saved(tokens, draft=True)
    torch.testing.assert_close(logits, want, rtol=0, atol=0)
    assert torch.equal(draft.tokens, want_draft.tokens) and torch.equal(draft.confidences, want_draft.confidences)


def test_a_dspark_checkpoint_still_refuses_foreign_tensors(tmp_path):
    _dspark_checkpoint(tmp_path / "ckpt", "official")
    save_file({"mtp.3.attn.wq_a.weight": torch.zeros(32, 64)}, str(tmp_path / "ckpt" / "more.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected.*mtp\.3\.attn"):
        v4lens.load(tmp_path / "ckpt")


def test_a_dspark_config_never_builds_mtp_blocks():
    cfg = preset("tiny", d_vocab=256, n_mtp_layers=3, compress_ratios=(0, 4, 6, 4, 0, 0, 0), dspark_block_size=5,
                 dspark_noise_token_id=7, dspark_target_layer_ids=(1, 2, 3), dspark_markov_rank=8)  # fmt: skip
    assert len(HookedV4(cfg).mtp) == 0  # its stages are DSpark stages, never April MTP blocks
    backbone = cfg.without_draft()
    assert backbone.draft is None and backbone.n_mtp_layers == 0 and backbone.compress_ratios == (0, 4, 6, 4)
    assert backbone.dspark_block_size == 0 and backbone.dspark_target_layer_ids == ()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a preset builds the whole DSpark model, without a warning
        model = v4lens.load("tiny", d_vocab=256, n_mtp_layers=3, compress_ratios=(0, 4, 6, 4, 0, 0, 0),
                            dspark_block_size=5, dspark_noise_token_id=7, dspark_target_layer_ids=(1, 2, 3),
                            dspark_markov_rank=8)  # fmt: skip
    assert len(model.mtp) == 0 and model.cfg.draft == "dspark" and len(model.dspark.stages) == 3


def test_slicing_a_dspark_checkpoint_keeps_the_drafter(tmp_path):
    """The DSpark stages are cut as DSpark stages, never as if they were an April MTP block."""
    saved = _dspark_checkpoint(tmp_path / "ckpt", "official")
    target = saved.cfg.replace(name="same")  # slicing to the source's own config
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v4lens.slice_checkpoint(tmp_path / "ckpt", target, tmp_path / "out", dtype="fp32", progress=False)
    model = v4lens.load(tmp_path / "out")
    assert len(model.mtp) == 0 and model.cfg.draft == "dspark" and len(model.dspark.stages) == 3
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(tokens, draft=True)[1].logits, saved(tokens, draft=True)[1].logits, rtol=0, atol=0)

"""V4Config: presets, parameter counts, and conversions from transformers and DeepSeek configs."""

from __future__ import annotations

import pytest
import torch

import v4lens
from v4lens.model.config import V4Config, preset


def test_mini_3b_matches_spec_decision_7():
    cfg = preset("mini-3b")
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.head_dim, cfg.rope_head_dim) == (1536, 28, 24, 64, 32)
    assert cfg.compress_ratios == (0, 0) + (4, 112) * 12 + (4, 0)
    assert [cfg.layer_type(i) for i in (0, 1, 2, 3, 26, 27)] == ["sliding", "sliding", "csa", "hca", "csa", "sliding"]
    assert cfg.layer_type(28) == "sliding"  # the MTP block (SPEC decision 5)
    counts = cfg.param_counts()
    assert round(counts["total"] / 1e9, 2) == 3.17 and round(counts["total_without_mtp"] / 1e9, 2) == 3.07
    assert round(counts["active"] / 1e9, 3) == 1.085


def test_param_counts_agree_with_the_built_model():
    model = v4lens.load("tiny")
    n = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert n == model.cfg.param_counts()["total"]


def test_flash_preset_is_v4_flash():
    cfg = preset("flash")
    assert cfg.n_layers == 43 and len(cfg.compress_ratios) == 44 and cfg.compress_ratios[-1] == 0
    kinds = cfg.layer_types()
    assert (kinds.count("sliding"), kinds.count("csa"), kinds.count("hca")) == (2, 21, 20)
    assert round(cfg.param_counts()["total_without_mtp"] / 1e9, 1) == 284.3


def test_from_hf_explicit_layer_types_and_legacy_ratios():
    from transformers import DeepseekV4Config

    cfg = preset("mini-3b")
    back = V4Config.from_hf(cfg.to_hf())
    for field in ("d_model", "n_layers", "n_heads", "head_dim", "rope_head_dim", "o_groups", "o_lora_rank",
                  "window_size", "index_topk", "n_hash_layers", "rope_factor", "original_seq_len", "route_scale"):
        assert getattr(back, field) == getattr(cfg, field), field
    assert back.compress_ratios == cfg.compress_ratios[:28]  # HF has no MTP entry
    legacy = {"model_type": "deepseek_v4", "num_hidden_layers": 4, "compress_ratios": [0, 4, 112, 4, 0],
              "num_hash_layers": 1, "qk_rope_head_dim": 64, "head_dim": 512}
    converted = V4Config.from_hf(legacy)
    assert converted.compress_ratios == (0, 4, 112, 4, 0) and converted.n_hash_layers == 1
    assert converted.rope_head_dim == 64
    # transformers' own parsing of the legacy list only knows 0/4/128 (SPEC §C8)
    with pytest.raises(KeyError):
        DeepseekV4Config(num_hidden_layers=3, compress_ratios=[0, 4, 112])


def test_from_hf_config_json_file(tmp_path):
    cfg = preset("tiny", d_vocab=512)
    cfg.to_hf().save_pretrained(tmp_path)
    back = V4Config.from_hf(tmp_path / "config.json")
    assert back.compress_ratios == cfg.compress_ratios[:4] and back.d_vocab == 512
    assert back.compress_rope_theta == cfg.compress_rope_theta and back.beta_fast == cfg.beta_fast


def test_from_official_model_args():
    flash_args = {
        "vocab_size": 129280, "dim": 4096, "moe_inter_dim": 2048, "n_layers": 43, "n_hash_layers": 3,
        "n_mtp_layers": 1, "n_heads": 64, "n_routed_experts": 256, "n_shared_experts": 1,
        "n_activated_experts": 6, "score_func": "sqrtsoftplus", "route_scale": 1.5, "swiglu_limit": 10.0,
        "q_lora_rank": 1024, "head_dim": 512, "rope_head_dim": 64, "o_groups": 8, "o_lora_rank": 1024,
        "window_size": 128, "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "compress_rope_theta": 160000,
        "original_seq_len": 65536, "rope_theta": 10000, "rope_factor": 16, "beta_fast": 32, "beta_slow": 1,
        "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-6,
    }  # fmt: skip
    cfg = V4Config.from_official(flash_args)
    flash = preset("flash")
    for field in ("d_model", "n_layers", "compress_ratios", "rope_factor", "original_seq_len", "index_topk",
                  "n_routed_experts", "n_activated_experts", "route_scale", "swiglu_limit", "n_hash_layers"):
        assert getattr(cfg, field) == getattr(flash, field), field
    assert V4Config.from_official(cfg.to_official()).compress_ratios == cfg.compress_ratios


def test_yarn_frequencies_match_spec_a11():
    from v4lens.model.rope import rope_frequencies

    cfg = preset("mini-3b")
    plain = rope_frequencies(cfg, compressed=False)
    yarn = rope_frequencies(cfg, compressed=True)
    base = 1.0 / (160000 ** (torch.arange(0, 32, 2).float() / 32))
    assert torch.allclose(plain, 1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32)))
    # SPEC: mini pairs 0..7 unscaled, 13..15 divided by 16, 8..12 blended
    assert torch.equal(yarn[:8], base[:8])
    assert torch.allclose(yarn[13:], base[13:] / 16)
    assert ((yarn[8:13] < base[8:13]) & (yarn[8:13] > base[8:13] / 16)).all()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(n_heads=6, o_groups=4), "divisible by o_groups"),
        (dict(rope_head_dim=7), "rope_head_dim"),
        (dict(rope_head_dim=64), "rope_head_dim"),
        (dict(n_activated_experts=9), "top-k"),
        (dict(n_hash_layers=5), "n_hash_layers"),
        (dict(compress_ratios=(0, 4)), "compress_ratios"),
        (dict(score_func="relu"), "score_func"),
        (dict(dtype="float16"), "dtype"),
    ],
)
def test_invalid_configs_say_why(change, message):
    with pytest.raises(ValueError, match=message):
        preset("tiny", **change)


def test_unknown_preset_lists_presets():
    with pytest.raises(KeyError, match="mini-3b"):
        preset("mini-7b")

"""Config values are checked field by field: numbers that must be positive and finite, sizes that
must be ints (not strings, floats or bools), and config.json files that are not a JSON object."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import v4lens
from v4lens.model.config import V4Config, preset, resolve_dtype

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    "field, value",
    [
        ("norm_eps", 0.0), ("norm_eps", -1e-6), ("norm_eps", NAN), ("hc_eps", NAN), ("hc_eps", 0),
        ("route_scale", 0.0), ("route_scale", NAN), ("route_scale", -1.5),
        ("rope_theta", -1.0), ("rope_theta", INF), ("compress_rope_theta", NAN), ("compress_rope_theta", 0),
        ("beta_fast", 0.0), ("beta_fast", NAN), ("beta_slow", NAN), ("beta_slow", -1),
        ("initializer_range", 0.0), ("initializer_range", -0.02), ("initializer_range", NAN),
        ("rope_factor", NAN), ("rope_factor", INF), ("swiglu_limit", NAN), ("swiglu_limit", -1.0),
    ],
)  # fmt: skip
def test_bad_numbers_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be"):
        preset("tiny", **{field: value})


@pytest.mark.parametrize(
    "field, value",
    [
        ("d_model", "64"), ("d_vocab", 256.0), ("n_layers", True), ("n_heads", 4.0), ("head_dim", None),
        ("window_size", "8"), ("moe_inter_dim", 32.5), ("index_topk", "3"), ("n_mtp_layers", False),
        ("n_hash_layers", 1.0), ("max_position_embeddings", "1M"), ("original_seq_len", 0.5),
        ("bos_token_id", "0"), ("norm_eps", "1e-6"), ("route_scale", True), ("rope_theta", "10000"),
        ("use_attn_result", "no"), ("use_expert_out", 1), ("score_func", None),
    ],
)  # fmt: skip
def test_wrong_types_name_the_field(field, value):
    with pytest.raises(TypeError, match=rf"{field} must be"):
        preset("tiny", **{field: value})


@pytest.mark.parametrize("ratios", [(0, "4", 6, 4, 0), (0, 4.5, 6, 4, 0), (0, True, 6, 4, 0)])
def test_compress_ratios_must_be_ints(ratios):
    """Today 4.5 became 4 and "4" became 4 without a word."""
    with pytest.raises(TypeError, match="compress_ratios"):
        preset("tiny", compress_ratios=ratios)


def test_valid_numbers_still_pass():
    cfg = preset("tiny", norm_eps=1e-5, route_scale=1, rope_theta=50000, initializer_range=0.01, swiglu_limit=0)
    assert cfg.route_scale == 1 and cfg.swiglu_limit == 0
    cfg = preset("tiny", d_model=np.int64(64), compress_ratios=np.array([0, 4, 6, 4, 0]))  # numpy ints are ints
    assert cfg.d_model == 64 and cfg.compress_ratios == (0, 4, 6, 4, 0)
    assert preset("tiny", n_hash_layers=0, n_mtp_layers=0, compress_ratios=(0, 4, 6, 4)).n_mtp_layers == 0


def test_resolve_dtype_names_the_argument():
    with pytest.raises(TypeError, match="dtype"):
        resolve_dtype(["bf16"])
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float16")
    assert resolve_dtype("bf16") == torch.bfloat16


# ---------------------------------------------------------------------- config.json files
@pytest.mark.parametrize(
    "text, message",
    [("{not json", "not valid JSON"), ("[1, 2, 3]", "JSON object"), ('"hello"', "JSON object"), ("", "not valid JSON")],
)
def test_malformed_config_json_names_the_file(tmp_path, text, message):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"{folder / 'config.json'}.*{message}"):
        v4lens.load(folder)
    with pytest.raises(ValueError, match=rf"{folder / 'config.json'}.*{message}"):
        V4Config.from_hf(folder / "config.json")
    with pytest.raises(ValueError, match=rf"{folder / 'config.json'}.*{message}"):
        V4Config.from_official(folder / "config.json")


def test_bad_value_in_config_json_names_the_file_and_field(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    cfg = preset("tiny", d_vocab=256).to_hf().to_dict()
    cfg["hidden_size"] = "64"
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({"x": torch.zeros(1)}, folder / "model.safetensors")  # the config fails before any tensor is read
    with pytest.raises(TypeError, match=r"config\.json.*d_model must be an int.*'64'"):
        v4lens.load(folder)
    cfg["hidden_size"], cfg["rms_norm_eps"] = 64, -1.0
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json.*norm_eps must be"):
        v4lens.load(folder)

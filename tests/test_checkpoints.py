"""save_pretrained in both layouts, round trips, and FP8/FP4 checkpoints dequantised on load."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import perturb
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import v4lens
from v4lens.weights.quant import FP4_VALUES, dequantize, quantize_fp4, quantize_fp8

TOKENS = torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    """Tiny (sliding, CSA, HCA ratio 6, hash layer, MTP) with every tensor randomised."""
    return perturb(v4lens.load("tiny", d_vocab=512, seed=11), seed=1)


def _keys(directory):
    keys = set()
    for f in directory.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            keys |= set(h.keys())
    return keys


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------- transformers layout
def test_hf_layout_matches_transformers_and_round_trips(model, tmp_path):
    from transformers import AutoModelForCausalLM

    from v4lens.weights.hf import hf_model_like, use_lowest_index_ties

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    model.save_pretrained(ours, max_shard_size="100KB")
    hf_model_like(model).save_pretrained(theirs)
    written = _keys(ours)
    # the same names transformers writes, plus the MTP block it drops
    assert {k for k in written if not k.startswith("mtp.")} == _keys(theirs)
    assert "mtp.0.e_proj.weight" in written and "mtp.0.ffn.experts.3.w2.weight" in written
    index = json.loads((ours / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == written and len(set(index["weight_map"].values())) > 1

    hf = use_lowest_index_ties(AutoModelForCausalLM.from_pretrained(ours)).eval()
    with torch.no_grad():
        ref, got = hf(TOKENS).logits, model(TOKENS)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()

    loaded = v4lens.load(ours)
    _assert_same_state(model, loaded)
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS, mtp=True)[1][0], model(TOKENS, mtp=True)[1][0])


def test_hca_ratio_112_config_loads_in_transformers(tmp_path):
    from transformers import AutoConfig

    from v4lens.weights.saving import write_config

    cfg = v4lens.preset("mini-3b")
    write_config(tmp_path, cfg, "hf")
    hf_cfg = AutoConfig.from_pretrained(tmp_path)
    assert hf_cfg.compress_rates["heavily_compressed_attention"] == 112
    back = v4lens.V4Config.from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert back.layer_types() == cfg.layer_types() and back.compress_ratios[:28] == cfg.compress_ratios[:28]
    assert back.param_counts() == cfg.param_counts()


# ---------------------------------------------------------------------- official layout
def test_official_layout_names_and_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path, format="official")
    keys = _keys(tmp_path)
    for name in ("embed.weight", "head.weight", "norm.weight", "hc_head_fn", "layers.0.hc_attn_fn",
                 "layers.1.attn.wq_a.weight", "layers.1.attn.kv_norm.weight", "layers.1.attn.compressor.ape",
                 "layers.1.attn.indexer.wq_b.weight", "layers.1.attn.indexer.compressor.norm.weight",
                 "layers.0.ffn.gate.tid2eid", "layers.2.ffn.gate.bias", "layers.2.ffn.experts.7.w3.weight",
                 "layers.2.ffn.shared_experts.w2.weight", "mtp.0.e_proj.weight", "mtp.0.hc_head_base",
                 "mtp.0.norm.weight"):  # fmt: skip
        assert name in keys, name
    assert not any(k.startswith(("model.", "blocks.")) for k in keys)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["dim"] == 64 and raw["compress_ratios"] == [0, 4, 6, 4, 0] and raw["n_hash_layers"] == 1
    with safe_open(tmp_path / "model.safetensors", "pt") as h:
        assert h.get_tensor("layers.0.ffn.gate.tid2eid").dtype == torch.int32
    loaded = v4lens.load(tmp_path)
    _assert_same_state(model, loaded)


def test_bf16_round_trip_is_bit_exact_in_both_layouts(model, tmp_path):
    bf16 = v4lens.load("tiny", d_vocab=512, seed=11, dtype=torch.bfloat16)
    for fmt in ("hf", "official"):
        bf16.save_pretrained(tmp_path / fmt, format=fmt)
        loaded = v4lens.load(tmp_path / fmt, dtype=torch.bfloat16)
        _assert_same_state(bf16, loaded)
    with safe_open(tmp_path / "official" / "model.safetensors", "pt") as h:
        assert h.get_tensor("layers.1.attn.wq_b.weight").dtype == torch.bfloat16
        assert h.get_tensor("layers.1.hc_attn_fn").dtype == torch.float32  # an fp32 island stays fp32


def test_save_dtype_casts_matrices_only(model, tmp_path):
    model.save_pretrained(tmp_path, format="official", dtype=torch.bfloat16)
    with safe_open(tmp_path / "model.safetensors", "pt") as h:
        assert h.get_tensor("layers.2.ffn.experts.0.w1.weight").dtype == torch.bfloat16
        assert h.get_tensor("layers.2.attn.attn_sink").dtype == torch.float32


# ---------------------------------------------------------------------- FP8 / FP4
def test_fp8_dequantisation_is_exact_with_partial_blocks():
    w = torch.randn(300, 260, generator=torch.Generator().manual_seed(2))
    for fmt, scale_dtype in (("e8m0", torch.float8_e8m0fnu), ("fp32", torch.float32)):
        q, scale = quantize_fp8(w, scale_format=fmt)
        assert q.dtype == torch.float8_e4m3fn and scale.dtype == scale_dtype and scale.shape == (3, 3)
        expected = torch.empty(300, 260)
        for i in range(3):
            for j in range(3):
                block = (slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1)))
                expected[block] = q[block].float() * scale[i, j].float()
        assert torch.equal(dequantize(q, scale), expected)
        assert (expected - w).abs().max() <= w.abs().max() / 8  # e4m3 keeps 3 mantissa bits
    q, scale = quantize_fp8(w)
    assert torch.equal(torch.exp2(torch.log2(scale.float()).round()), scale.float())  # powers of two


def test_fp4_packing_order_and_values():
    # byte 0x2B: low nibble 0xB (code 11 = -1.5) is the even column, high nibble 0x2 (= 1.0) the odd one
    packed = torch.tensor([[0x2B, 0x7F]], dtype=torch.uint8).view(torch.int8)
    scale = torch.tensor([[4.0]]).to(torch.float8_e8m0fnu)
    assert dequantize(packed, scale).tolist() == [[-6.0, 4.0, -24.0, 24.0]]
    w = torch.randn(5, 96, generator=torch.Generator().manual_seed(3))
    q, s = quantize_fp4(w)
    assert q.shape == (5, 48) and s.shape == (5, 3) and s.dtype == torch.float8_e8m0fnu
    codes = torch.stack([q.view(torch.uint8) & 15, q.view(torch.uint8) >> 4], -1).flatten(-2).long()
    expected = FP4_VALUES[codes] * s.float().repeat_interleave(32, dim=1)
    assert torch.equal(dequantize(q, s), expected)
    # the quantiser picks the nearest grid value of w/scale
    grid = FP4_VALUES[:8]
    scaled = (w / s.float().repeat_interleave(32, dim=1)).clamp(-6, 6)
    err = (scaled.abs()[..., None] - grid).abs().min(-1).values
    assert torch.allclose(
        (expected / s.float().repeat_interleave(32, dim=1)).abs(), scaled.abs(), atol=float(err.max()) + 1e-6
    )


_FP8 = re.compile(r"\.(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$|shared_experts\.w[123]\.weight$")
_FP4 = re.compile(r"\.experts\.\d+\.w[123]\.weight$")


def quantize_checkpoint(directory, scale_format="e8m0"):
    """Rewrite an official-layout checkpoint the way DeepSeek ships V4: FP8 linears, FP4 routed experts."""
    for file in directory.glob("*.safetensors"):
        tensors = load_file(file)
        for key in [k for k in tensors if _FP8.search(k) or _FP4.search(k)]:
            w = tensors.pop(key)
            if _FP4.search(key):
                q, s = quantize_fp4(w)
                s = s.float() if scale_format == "fp32" else s  # the same powers of two, stored as fp32
            else:
                q, s = quantize_fp8(w, scale_format=scale_format)
            tensors[key], tensors[key.removesuffix(".weight") + ".scale"] = q, s
        save_file(tensors, file)


@pytest.mark.parametrize("scale_format", ["e8m0", "fp32"])
def test_quantised_official_checkpoint_loads_dequantised(model, tmp_path, scale_format):
    model.save_pretrained(tmp_path, format="official")
    quantize_checkpoint(tmp_path, scale_format)
    stored = load_file(tmp_path / "model.safetensors")
    assert stored["layers.1.attn.wq_b.weight"].dtype == torch.float8_e4m3fn
    assert stored["layers.2.ffn.experts.3.w2.weight"].dtype == torch.int8
    scale_dtype = torch.float32 if scale_format == "fp32" else torch.float8_e8m0fnu
    assert stored["layers.1.attn.wq_b.scale"].dtype == stored["layers.2.ffn.experts.3.w2.scale"].dtype == scale_dtype

    loaded = v4lens.load(tmp_path)
    # the same model built from the dequantised values, by hand
    expected = v4lens.load("tiny", d_vocab=512, seed=11)
    expected.load_state_dict(model.state_dict())
    params = dict(expected.named_parameters())
    with torch.no_grad():
        for key, value in stored.items():
            if not key.endswith(".weight") or (key.removesuffix(".weight") + ".scale") not in stored:
                continue
            name, e = v4lens.canonical_name(key, with_expert=True)
            deq = dequantize(value, stored[key.removesuffix(".weight") + ".scale"])
            (params[name][e] if e is not None else params[name]).copy_(deq)
            assert not torch.equal(deq, model.state_dict()[name][e] if e is not None else model.state_dict()[name])
    _assert_same_state(expected, loaded)
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), expected(TOKENS))


def test_quantised_weight_without_scale_is_an_error(model, tmp_path):
    model.save_pretrained(tmp_path, format="official")
    quantize_checkpoint(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors.pop("layers.1.attn.wkv.scale")
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"without a `\.scale`.*layers\.1\.attn\.wkv\.weight"):
        v4lens.load(tmp_path)


def test_loading_straight_to_bf16_keeps_islands_fp32(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = v4lens.load(tmp_path, dtype=torch.bfloat16)
    assert loaded.blocks[1].attn.wq_b.dtype == torch.bfloat16
    assert loaded.blocks[1].attn_hc.fn.dtype == torch.float32
    assert torch.equal(loaded.blocks[1].attn.wq_b, model.blocks[1].attn.wq_b.to(torch.bfloat16))


def test_safetensors_writer_is_read_by_safetensors(tmp_path):
    from v4lens.weights.safetensors_io import write_file

    stacked = torch.randn(3, 4, 6)
    tensors = [
        ("bf16", torch.randn(5, 7).to(torch.bfloat16)), ("row", stacked[1]), ("strided", stacked[:, :, 1]),
        ("fp8", torch.randn(4, 4).to(torch.float8_e4m3fn)), ("e8m0", torch.tensor([0.5, 8.0]).to(torch.float8_e8m0fnu)),
        ("i8", torch.tensor([-3, 7], dtype=torch.int8)), ("i64", torch.arange(5)), ("empty", torch.zeros(0, 3)),
        ("scalar", torch.tensor(2.5)),
    ]  # fmt: skip
    write_file(tmp_path / "x.safetensors", tensors, {"k": "v"})
    back = load_file(tmp_path / "x.safetensors")
    for name, t in tensors:
        assert back[name].dtype == t.dtype and torch.equal(back[name].float(), t.float()), name
    with safe_open(tmp_path / "x.safetensors", "pt") as h:
        assert h.metadata() == {"k": "v"}

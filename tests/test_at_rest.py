"""Weights kept as stored (FP8 matrices, FP4 experts) and dequantised at use: `load(path, keep_quantized=True)`
gives bit for bit the outputs of the dequantised-on-load model, in a fraction of the memory."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from conftest import two_chunks
from safetensors.torch import load_file, save_file

import v4lens
from v4lens.weights.at_rest import QuantizedWeight
from v4lens.weights.memory import model_bytes
from v4lens.weights.quant import quantize_fp4, quantize_fp8

pytestmark = pytest.mark.usefixtures("single_thread")

_FP8 = re.compile(r"\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$|\.indexer\.wq_b\.weight$|shared_experts\.w[123]\.weight$"
                  r"|\.(main_proj|e_proj|h_proj)\.weight$")  # fmt: skip
_FP4 = re.compile(r"\.experts\.\d+\.w[123]\.weight$")
SMALL = {"d_vocab": 512, "dspark_noise_token_id": 7}  # a small vocabulary: the experts dominate the bytes


def _quantised_checkpoint(root, name: str, scale_format: str = "e8m0"):
    """`name` (seeded, bf16) saved in the official layout, then quantised as DeepSeek ships it."""
    model = v4lens.load(name, dtype=torch.bfloat16, **SMALL)
    model.save_pretrained(root / "dense", format="official")
    tensors = load_file(root / "dense" / "model.safetensors")
    for key in [k for k in tensors if _FP8.search(k) or _FP4.search(k)]:
        w = tensors.pop(key).float()
        q, s = quantize_fp4(w) if _FP4.search(key) else quantize_fp8(w, scale_format=scale_format)
        tensors[key], tensors[key.removesuffix(".weight") + ".scale"] = q, s
    (root / "q").mkdir()
    save_file(tensors, root / "q" / "model.safetensors")
    shutil.copy(root / "dense" / "config.json", root / "q" / "config.json")
    return root / "q", tensors


@pytest.fixture(scope="module", params=["tiny", "tiny-dspark"])
def checkpoint(request, tmp_path_factory):
    return _quantised_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_hooks_and_decoding_are_bit_identical(checkpoint, dtype):
    path, _ = checkpoint
    ref = v4lens.load(path, dtype=dtype)
    kept = v4lens.load(path, dtype=dtype, keep_quantized=True)
    assert isinstance(kept.blocks[1].mlp.experts.w1, QuantizedWeight) and kept.blocks[1].mlp.experts.w1.dtype == dtype
    assert isinstance(kept.blocks[0].attn.wq_a, QuantizedWeight)
    tokens = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(0))
    extra = {"draft": True} if ref.cfg.draft == "dspark" else {"mtp": True}
    with torch.no_grad():
        out_ref, cache_ref = ref.run_with_cache(tokens, **extra)
        out_kept, cache_kept = kept.run_with_cache(tokens, **extra)
    assert torch.equal(out_ref[0], out_kept[0])
    assert set(cache_ref.keys()) == set(cache_kept.keys())
    for name in cache_ref:
        assert torch.equal(cache_ref[name], cache_kept[name]), name
    plain = ref.generate(tokens[:1, :6], max_new_tokens=8, stop_at_eos=False)
    assert torch.equal(plain, kept.generate(tokens[:1, :6], max_new_tokens=8, stop_at_eos=False))
    if ref.cfg.draft == "dspark":
        spec = kept.generate(tokens[:1, :6], max_new_tokens=8, stop_at_eos=False, speculative=True)
        assert torch.equal(spec, ref.generate(tokens[:1, :6], max_new_tokens=8, stop_at_eos=False, speculative=True))
    with torch.no_grad():  # the decoding cache binds to a kept-quantised model like to any other
        chunked = two_chunks(kept, tokens, 7)
        assert torch.equal(two_chunks(ref, tokens, 7), chunked)
    with torch.inference_mode():  # views and experts of a kept weight inside inference mode, with a cache
        assert torch.equal(two_chunks(kept, tokens, 7), chunked)


def test_memory_is_the_stored_size_and_nothing_dense_is_kept(checkpoint):
    path, tensors = checkpoint
    ref = v4lens.load(path, dtype=torch.bfloat16)
    kept = v4lens.load(path, dtype=torch.bfloat16, keep_quantized=True)
    quantised = {k for k in tensors if k.endswith(".scale")}
    stored = sum(t.numel() * t.element_size() for k, t in tensors.items()
                 if k in quantised or k.removesuffix(".weight") + ".scale" in quantised)  # fmt: skip
    dense = sum(p.numel() * p.element_size() for p in ref.parameters() if p.dtype == torch.bfloat16) - sum(
        p.numel() * p.element_size() for n, p in kept.named_parameters() if not isinstance(p, QuantizedWeight)
        and p.dtype == torch.bfloat16)  # fmt: skip
    assert model_bytes(kept) == model_bytes(ref) - dense + stored
    assert model_bytes(kept) < 0.7 * model_bytes(ref)  # tiny: norms, mHC and compressors (unquantised) weigh a lot
    experts = kept.blocks[1].mlp.experts.w2
    assert experts.qdata.dtype == torch.int8 and experts.qdata.shape[-1] * 2 == experts.shape[-1]


def test_official_round_trip_is_byte_identical_and_hf_saves_the_values(checkpoint, tmp_path):
    path, tensors = checkpoint
    kept = v4lens.load(path, dtype=torch.bfloat16, keep_quantized=True)
    kept.save_pretrained(tmp_path / "official", format="official")
    back = load_file(tmp_path / "official" / "model.safetensors")
    assert set(back) == set(tensors)
    for key, t in tensors.items():
        assert back[key].dtype == t.dtype and torch.equal(back[key].view(torch.uint8), t.view(torch.uint8)), key
    kept.save_pretrained(tmp_path / "hf", format="hf")  # transformers' layout has no FP8 here: the values, dense
    ref = v4lens.load(path, dtype=torch.bfloat16)
    again = v4lens.load(tmp_path / "hf", dtype=torch.bfloat16)
    for (name, a), b in zip(ref.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_fp32_scales_are_kept_too(tmp_path):
    path, tensors = _quantised_checkpoint(tmp_path, "tiny", scale_format="fp32")
    assert tensors["layers.0.attn.wq_a.scale"].dtype == torch.float32
    tokens = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(v4lens.load(path)(tokens), v4lens.load(path, keep_quantized=True)(tokens))


def test_edits_in_place_are_refused_and_reading_is_not(checkpoint):
    path, _ = checkpoint
    kept = v4lens.load(path, keep_quantized=True)
    w = kept.blocks[0].attn.wq_a
    for edit in (lambda: w.mul_(2), lambda: w.zero_(), lambda: w.copy_(torch.zeros(w.shape)),
                 lambda: kept.load_state_dict(kept.state_dict())):  # fmt: skip
        with pytest.raises(RuntimeError, match="kept quantised"), torch.no_grad():
            edit()
    dense = w.dequantize()
    assert torch.equal(w * 1, dense) and w.to(torch.float64).__class__ is torch.Tensor  # another dtype: dense
    out = torch.empty(w.shape)
    out.copy_(w)  # reading into another tensor is fine
    assert torch.equal(out, dense)


def test_bad_uses_are_clear_errors(checkpoint, tmp_path):
    path, tensors = checkpoint
    with pytest.raises(ValueError, match="preset"):
        v4lens.load("tiny", keep_quantized=True)
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(path / "config.json", bad / "config.json")
    broken = dict(tensors)
    key = "layers.0.attn.wq_b.weight"
    broken[key], broken[key.removesuffix(".weight") + ".scale"] = quantize_fp8(torch.randn(8, 32))
    save_file(broken, bad / "model.safetensors")
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.wq_b\.weight has shape \(8, 32\)"):
        v4lens.load(bad, keep_quantized=True)
    with pytest.raises(v4lens.weights.memory.ModelTooLargeError):
        v4lens.load(path, keep_quantized=True, max_memory="100KB")


def test_decomposition_and_patching_run_unchanged(checkpoint):
    from v4lens.analysis import decompose
    from v4lens.analysis.patching.sweeps import get_act_patch_attn_out

    path, _ = checkpoint
    ref, kept = v4lens.load(path), v4lens.load(path, keep_quantized=True)
    clean = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(2))
    corrupted = clean.clone()
    corrupted[0, 3] = (corrupted[0, 3] + 1) % 512
    results = []
    for model in (ref, kept):
        d = decompose(model, tokens=clean, target=5, heads=True)
        _, cache = model.run_with_cache(clean)
        sweep = get_act_patch_attn_out(model, corrupted, cache, lambda logits: logits[0, -1, 5])
        results.append((d, sweep))
    (d_ref, s_ref), (d_kept, s_kept) = results
    assert torch.equal(s_ref, s_kept)
    tensors = [(a, b) for a, b in zip(vars(d_ref).values(), vars(d_kept).values()) if isinstance(a, torch.Tensor)]
    assert tensors and all(torch.equal(a, b) for a, b in tensors)


def test_copies_and_moves_stay_quantised(checkpoint):
    import copy

    path, _ = checkpoint
    kept = v4lens.load(path, keep_quantized=True)
    tokens = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = kept(tokens)
        twin = copy.deepcopy(kept)
        assert isinstance(twin.blocks[0].attn.wq_a, QuantizedWeight)
        assert twin.blocks[0].attn.wq_a.qdata.data_ptr() != kept.blocks[0].attn.wq_a.qdata.data_ptr()
        assert torch.equal(twin(tokens), expected)
        moved = kept.to("cpu")
        assert isinstance(moved.blocks[1].mlp.experts.w3, QuantizedWeight) and torch.equal(moved(tokens), expected)


def _dequantize_by_definition(weight, scale):
    """values × their block's scale, in fp32, one element at a time (no broadcasting tricks)."""
    from v4lens.weights.quant import FP4_VALUES

    if weight.dtype == torch.int8:
        b = weight.view(torch.uint8).long()
        values = FP4_VALUES[torch.stack((b & 0xF, b >> 4), -1).flatten(-2)]
    else:
        values = weight.float()
    block_rows, block_cols = (1, 32) if weight.dtype == torch.int8 else (128, 128)  # as DeepSeek ships them
    rows, cols = torch.arange(values.shape[0]) // block_rows, torch.arange(values.shape[1]) // block_cols
    return values * scale.float()[rows[:, None], cols[None, :]]


@pytest.mark.parametrize("kind", ["fp8", "fp8-fp32-scale", "fp4"])
def test_dequantisation_in_bf16_equals_fp32_then_bf16(kind):
    """A weight kept quantised in a bf16 model is dequantised straight to bf16: with e8m0 scales every product
    is exact in bf16, so it must equal the fp32 definition rounded to bf16, also at extreme scales and with
    partial edge blocks."""
    from v4lens.weights.quant import dequantize

    g = torch.Generator().manual_seed(0)
    shape = (300, 160) if kind != "fp4" else (37, 96)
    w = torch.randn(shape, generator=g)
    q, s = quantize_fp4(w) if kind == "fp4" else quantize_fp8(w, scale_format="fp32" if kind.endswith("scale") else "e8m0")
    if s.dtype == torch.float8_e8m0fnu:  # powers of two from 2^-127 to 2^100
        s = torch.exp2(torch.randint(-127, 100, s.shape, generator=g).float()).to(torch.float8_e8m0fnu)
    exact = _dequantize_by_definition(q, s)
    assert torch.equal(dequantize(q, s), exact)
    assert torch.equal(dequantize(q, s, torch.bfloat16), exact.to(torch.bfloat16))

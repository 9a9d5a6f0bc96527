"""benchmarks/roofline.py: the FLOP and byte counts the benchmarks divide by, checked against
what the built tiny models really do.

* FLOPs: a real forward under `torch.utils.flop_counter.FlopCounterMode` (it counts every
  aten mm / bmm, einsums included, since they lower to those) for a few lengths.
* Decode bytes: the weight part against the built model's `named_parameters()`, the cache part
  against a `V4KVCache` filled by a prefill of that many tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import v4lens
from v4lens.model import V4KVCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import roofline

pytestmark = pytest.mark.usefixtures("single_thread")

# tiny has sliding, CSA (ratio 4) and HCA (ratio 6) layers, top-3 picks, window 8, one hash layer;
# the variant moves the layer types around, HCA ratios 8 and 5, top-2, window 4, no hash layer
VARIANTS = {
    "tiny": {},
    "tiny-other-ratios": {"compress_ratios": (4, 8, 0, 5, 0), "index_topk": 2, "window_size": 4, "n_hash_layers": 0},
}


@pytest.fixture(scope="module")
def models():
    """(variant, dtype) -> the built model (vocabulary 256: the head stays a small part of the count)."""
    cache = {}

    def get(variant: str, dtype=torch.float32):
        if (variant, dtype) not in cache:
            cache[variant, dtype] = v4lens.load("tiny", d_vocab=256, seed=0, dtype=dtype, **VARIANTS[variant])
        return cache[variant, dtype]

    return get


def masked_flops(model, tokens) -> int:
    """FLOPs v4lens spends on candidates a query cannot see, which roofline deliberately leaves out.

    v4lens scores every query against a full window of W columns and, on compressed layers, a
    fixed number of entry columns (all entries of the sequence on HCA, min(top-k, entries) picks
    on CSA), masking the ones not (yet) visible: each empty (-1) column of `hook_key_index` costs
    a score and a P·V product, 2·2·H·c FLOPs. The indexer scores every entry of the sequence and
    masks the future ones (-inf in `hook_scores`): 2·H_I·c_I for q·K plus 2·H_I for the head
    weighting each. Counted here from the model's own hook values, independently of roofline.
    """
    cfg = model.cfg
    names = lambda n: n.endswith(("attn.hook_key_index", "indexer.hook_scores"))
    _, cache = model.run_with_cache(tokens, names_filter=names)
    extra = 0
    for layer in range(cfg.n_layers):
        empty = int((cache[f"blocks.{layer}.attn.hook_key_index"] < 0).sum())
        extra += empty * 2 * 2 * cfg.n_heads * cfg.head_dim
        key = f"blocks.{layer}.attn.indexer.hook_scores"
        if key in cache.cache_dict:
            future = int(torch.isinf(cache[key]).sum())
            extra += future * 2 * cfg.index_n_heads * (cfg.index_head_dim + 1)
    return extra


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seq_len", [16, 40])
def test_forward_flops_match_flop_counter(models, variant, seq_len):
    model = models(variant)
    tokens = torch.randint(0, 256, (1, seq_len), generator=torch.Generator().manual_seed(seq_len))
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(tokens)
    counted = counter.get_total_flops()
    masked = masked_flops(model, tokens)
    assert 0 < masked < counted
    # FlopCounterMode counts matmuls only (every mm / bmm: linear, einsum and matmul lower to
    # them), the same thing roofline counts; its only surplus is the masked candidates. With them
    # taken out the two counts are the same integer (the tolerance only absorbs float rounding).
    expected = roofline.forward_flops_per_token(model.cfg, seq_len) * seq_len
    assert counted - masked == pytest.approx(expected, rel=1e-12)


def test_forward_flops_logit_positions(models):
    """Chunked prefill keeps one logits row per chunk: only the head's share changes."""
    cfg = models("tiny").cfg
    full = roofline.forward_flops_per_token(cfg, 40)
    last = roofline.forward_flops_per_token(cfg, 40, logit_positions=1)
    assert full - last == pytest.approx(39 * 2 * cfg.d_model * cfg.d_vocab / 40)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_weight_bytes_match_parameters(models, variant, dtype):
    """All parameters minus what one decoded token does not read: the routed experts it is not
    routed to (E - k of E), the embedding except its row, the MTP block; plus the hash layers'
    tid2eid row (a buffer). In bf16 the fp32 islands keep 4 bytes (element_size says so)."""
    model = models(variant, dtype)
    cfg = model.cfg
    expected = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if name.startswith("mtp."):
            continue
        if name == "embed.weight":
            size = p.shape[1] * p.element_size()
        elif ".mlp.experts." in name:  # w1, w2, w3 stacked [E, ...]
            size = size // cfg.n_routed_experts * cfg.n_activated_experts
        expected += size
    expected += sum(b.shape[1] * b.element_size() for n, b in model.named_buffers() if n.endswith("tid2eid"))
    dtype_bytes = torch.empty(0, dtype=dtype).element_size()
    assert roofline.decode_weight_bytes(cfg, dtype_bytes) == expected


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_cache_bytes_match_kv_cache(models, variant, dtype):
    """Every tensor a prefill of L tokens leaves in the cache (window, compressor states, entries,
    index keys), except that a CSA layer reads only its top-k picked entries."""
    model = models(variant, dtype)
    cfg = model.cfg
    dtype_bytes = torch.empty(0, dtype=dtype).element_size()
    nbytes = lambda t: 0 if t is None else t.numel() * t.element_size()
    for L in (3, 17, 40):
        cache = V4KVCache()
        with torch.inference_mode():
            model(torch.randint(0, 256, (1, L), generator=torch.Generator().manual_seed(L)), past_kv_cache=cache)
        expected = 0
        for layer, state in cache.layers.items():
            expected += nbytes(state.window) + nbytes(state.index_keys)
            for comp in (state.compressor, state.indexer):
                if comp is not None:
                    expected += sum(map(nbytes, (comp.pending_values, comp.pending_logits,
                                                 comp.carry_values, comp.carry_logits)))  # fmt: skip
            if state.entries is not None:
                csa = cfg.layer_type(layer) == "csa"
                expected += nbytes(state.entries[:, : cfg.index_topk] if csa else state.entries)
        assert roofline.decode_cache_bytes(cfg, L, dtype_bytes) == expected, f"context {L}"
    assert roofline.decode_cache_bytes(cfg, 0, dtype_bytes) == 0


def test_decode_bytes_per_step_adds_weights_once_and_cache_per_sequence(models):
    cfg = models("tiny").cfg
    w, c = roofline.decode_weight_bytes(cfg, 2), roofline.decode_cache_bytes(cfg, 40, 2)
    assert roofline.decode_bytes_per_step(cfg, 40) == w + c
    assert roofline.decode_bytes_per_step(cfg, 40, batch=3) == w + 3 * c


def test_measurements_are_positive_rates():
    """The probes themselves, on sizes small enough for a test (the benchmarks use the defaults)."""
    assert roofline.matmul_ceiling("bf16", "cpu", threads=1, size=128) > 1e6
    assert roofline.read_bandwidth("cpu", threads=1, nbytes=2**20) > 1e6
    assert roofline.gemv_rate("cpu", threads=1, nbytes=2**20) > 1e6


def test_gemv_probe_times_the_one_row_product_v4lens_runs(monkeypatch):
    """The probe goes through v4lens.model.linear.linear with one bf16 row and a weight of the asked size."""
    from v4lens.model import linear

    seen, real = [], linear.linear
    monkeypatch.setattr(
        linear, "linear", lambda x, w: seen.append((tuple(x.shape), tuple(w.shape), w.dtype)) or real(x, w)
    )
    rate = roofline.gemv_rate("cpu", threads=1, nbytes=2**21)
    assert rate > 1e6 and len(seen) == 4  # a warm-up and 3 timed calls
    assert set(seen) == {
        ((1, roofline.GEMV_COLS), (2**21 // (2 * roofline.GEMV_COLS), roofline.GEMV_COLS), torch.bfloat16)
    }


@pytest.mark.parametrize("native", [True, False])
def test_bf16_ceiling_times_the_route_v4lens_takes(monkeypatch, native):
    """On a CPU without native bf16 products the bf16 ceiling is an fp32 GEMM of the upcast operands
    (v4lens's route there), not PyTorch's slow bf16 fallback; with them, a bf16 GEMM."""
    from v4lens.model import linear

    monkeypatch.setattr(linear, "native_bf16_products", lambda: native)
    seen, real_mm = [], torch.mm
    monkeypatch.setattr(roofline.torch, "mm", lambda a, b, **kw: seen.append(a.dtype) or real_mm(a, b, **kw))
    assert roofline.bf16_route("cpu") == ("bf16" if native else "fp32")
    assert roofline.matmul_ceiling("bf16", "cpu", threads=1, size=64) > 1e6
    assert set(seen) == {torch.bfloat16 if native else torch.float32}

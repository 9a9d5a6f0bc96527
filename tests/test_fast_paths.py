"""Fast paths must compute exactly what the plain code computes: each is checked bit for bit
(torch.equal) against a reference copy of the plain code kept here, on random inputs including
edge sizes, and through whole forwards."""

from __future__ import annotations

import pytest
import torch

import v4lens.model.hyper_connections as hc
from v4lens.model.kv_cache import V4KVCache

pytestmark = pytest.mark.usefixtures("single_thread")


def sinkhorn_reference(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """The plain Sinkhorn-Knopp (out of place, [..., n, n] layout): row softmax + eps, then column
    first, `iters` column and `iters - 1` row normalisations, eps added to every sum."""
    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


# stream counts 1..6 and token counts from one (a decoding step) to many (a prefill)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("lead", [(1, 1), (2, 7), (1, 31), (1, 32), (3, 45), (1, 600)])
def test_sinkhorn_equals_reference(n, lead):
    gen = torch.Generator().manual_seed(n * 1000 + lead[1])
    for scale in (0.1, 3.0, 30.0):  # near-uniform, typical, saturated softmax
        logits = torch.randn(*lead, n, n, generator=gen) * scale
        for iters, eps in ((20, 1e-6), (1, 1e-6), (3, 0.0), (7, 1e-2)):
            out = hc.sinkhorn(logits, iters, eps)
            assert out.shape == logits.shape and out.is_contiguous()
            assert torch.equal(out, sinkhorn_reference(logits, iters, eps)), (n, lead, scale, iters, eps)
    assert torch.equal(logits, logits.clone())  # the input is left alone (in-place work is on a copy)


def test_sinkhorn_non_contiguous_input_and_autograd():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 40, 4, 4, generator=gen).transpose(-1, -2)  # a non-contiguous view
    assert torch.equal(hc.sinkhorn(logits, 20, 1e-6), sinkhorn_reference(logits, 20, 1e-6))
    # with autograd the plain operations run (in-place ones would break the backward)
    leaf = logits.detach().clone().requires_grad_(True)
    out = hc.sinkhorn(leaf, 20, 1e-6)
    assert torch.equal(out.detach(), sinkhorn_reference(logits, 20, 1e-6))
    out.square().sum().backward()
    ref_leaf = logits.detach().clone().requires_grad_(True)
    sinkhorn_reference(ref_leaf, 20, 1e-6).square().sum().backward()
    assert torch.equal(leaf.grad, ref_leaf.grad)


def test_sinkhorn_bf16_logits():
    logits = torch.randn(1, 64, 4, 4, generator=torch.Generator().manual_seed(9)).bfloat16()
    assert torch.equal(hc.sinkhorn(logits, 20, 1e-6), sinkhorn_reference(logits, 20, 1e-6))


def _logits_and_hooks(model, tokens, cache_chunks=None):
    """Logits and every mHC hook's value: one forward, or chunk by chunk through a V4KVCache."""
    seen = {}

    def keep(t, hook):
        seen.setdefault(hook.name, []).append(t.clone())

    hooks = [(name, keep) for name in model.hook_dict if "_hc." in name or "hc_head" in name]
    with model.hooks(fwd_hooks=hooks):
        if cache_chunks is None:
            logits = model(tokens)
        else:
            cache, parts, s0 = V4KVCache(), [], 0
            for s1 in cache_chunks:
                parts.append(model(tokens[:, s0:s1], past_kv_cache=cache))
                s0 = s1
            logits = torch.cat(parts, dim=1)
    return logits, seen


@pytest.mark.parametrize("chunks", [None, (33, 34, 35, 40)], ids=["forward", "prefill+decode"])
def test_model_with_fast_paths_equals_reference(tiny256, tokens_2x40, monkeypatch, chunks):
    """A whole forward (80 tokens) and decoding steps (2 tokens) give the same logits and mHC hook values,
    bit for bit, as with the plain Sinkhorn."""
    with torch.inference_mode():
        fast = _logits_and_hooks(tiny256, tokens_2x40, chunks)
        monkeypatch.setattr(hc, "sinkhorn", sinkhorn_reference)
        plain = _logits_and_hooks(tiny256, tokens_2x40, chunks)
    assert torch.equal(fast[0], plain[0])
    assert fast[1].keys() == plain[1].keys() and any("hook_comb" in k for k in fast[1])
    for name in plain[1]:
        assert all(torch.equal(a, b) for a, b in zip(fast[1][name], plain[1][name], strict=True)), name


def _general_experts_path(monkeypatch):
    from v4lens.model.moe import Experts

    monkeypatch.setattr(Experts, "_one_token_distinct", lambda self, ids: None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_slot", [False, True])
@pytest.mark.parametrize("ids", [[5, 2, 7], [-1, 3, 0], [-1, -1, -1], [4, 4, 1], [2, -1, 2]])
def test_one_token_experts_equal_the_grouped_path(tiny256, monkeypatch, dtype, per_slot, ids):
    """A single token's experts (a decoding step) skip the sorting and grouping of slots: the same
    products in the same expert order, bit for bit; repeated experts (an edit) take the grouped path."""
    from v4lens.model.moe import Experts

    cfg = tiny256.cfg
    experts = Experts(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    experts = experts.to(dtype)
    x = torch.randn(1, cfg.d_model, generator=gen).to(dtype)
    ids_t = torch.tensor([ids])
    weights = torch.rand(1, 3, generator=gen)
    assert (experts._one_token_distinct(ids_t) is not None) == (
        len({i for i in ids if i >= 0}) == sum(i >= 0 for i in ids)
    )
    with torch.inference_mode():
        fast = experts(x, ids_t, weights, per_slot=per_slot)
        _general_experts_path(monkeypatch)
        grouped = experts(x, ids_t, weights, per_slot=per_slot)
    assert fast.shape == grouped.shape and fast.dtype == grouped.dtype
    assert torch.equal(fast, grouped)
    if per_slot and ids[1] == -1:
        assert not fast[0, 1].any()  # an empty slot's output is zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_with_one_token_experts_equals_the_grouped_path(monkeypatch, dtype):
    """Decoding steps (one token, batch 1) give the same logits and expert hooks bit for bit
    whichever expert path runs."""
    import v4lens

    model = v4lens.load("tiny", d_vocab=256, seed=0, dtype=dtype)
    tokens = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))

    def run():
        cache, parts, seen = V4KVCache(), [], {}
        hooks = [
            (n, lambda t, hook: seen.setdefault(hook.name, []).append(t.clone()))
            for n in model.hook_dict
            if "mlp.hook_" in n
        ]
        with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
            parts.append(model(tokens[:, :36], past_kv_cache=cache))
            for s in range(36, 40):
                parts.append(model(tokens[:, s : s + 1], past_kv_cache=cache))
        return torch.cat(parts, dim=1), seen

    calls = []
    from v4lens.model.moe import Experts

    real = Experts._one_token
    monkeypatch.setattr(Experts, "_one_token", lambda self, *a: calls.append(1) or real(self, *a))
    fast = run()
    assert len(calls) == 4 * model.cfg.n_layers  # every decoding step of every layer took the one-token path
    _general_experts_path(monkeypatch)
    grouped = run()
    assert torch.equal(fast[0], grouped[0])
    assert fast[1].keys() == grouped[1].keys() and fast[1]
    for name in grouped[1]:
        assert all(torch.equal(a, b) for a, b in zip(fast[1][name], grouped[1][name], strict=True)), name


def test_compressor_skips_pooling_when_no_window_completes_and_no_hook_looks(monkeypatch):
    """A decoding step that completes no compressed window builds no empty pooling, norm and RoPE,
    unless a hook on the compressor would see them (hooks still fire, with T = 0 entries)."""
    import v4lens
    from v4lens.model.compressor import Compressor

    model = v4lens.load("tiny", d_vocab=256, seed=0)
    tokens = torch.randint(0, 256, (1, 41), generator=torch.Generator().manual_seed(2))
    pooled = []
    real = Compressor._pool
    monkeypatch.setattr(Compressor, "_pool", lambda self, *a: pooled.append(a[0].shape[1]) or real(self, *a))
    with torch.inference_mode():
        cache = V4KVCache()
        model(tokens[:, :37], past_kv_cache=cache)
        pooled.clear()
        logits = model(tokens[:, 37:38], past_kv_cache=cache)  # position 37: completes no window of 4 or 6
        assert pooled == []
        name = next(n for n in model.hook_dict if n.endswith("compressor.hook_kv"))
        seen = []
        with model.hooks(fwd_hooks=[(name, lambda t, hook: seen.append(tuple(t.shape)))]):
            cache2 = V4KVCache()
            model(tokens[:, :37], past_kv_cache=cache2)
            pooled.clear()
            hooked = model(tokens[:, 37:38], past_kv_cache=cache2)
        assert pooled == [0] and seen[-1][1] == 0  # the hooked compressor pooled its empty window set
        assert torch.equal(logits, hooked)
        pooled.clear()
        model(tokens[:, 38:40], past_kv_cache=cache)  # position 39 completes a window of 4
        assert 1 in pooled


@pytest.fixture
def native_bf16(monkeypatch):
    """Behave as on a CPU with native bf16 products (oneDNN's bf16 kernels), whatever this one has."""
    from v4lens.model import linear, moe

    monkeypatch.setattr(linear, "native_bf16_products", lambda: True)
    monkeypatch.setattr(moe, "native_bf16_products", lambda: True)


def test_expert_product_rows_are_few_sizes_per_octave(native_bf16):
    """bf16 CPU expert products run on rounded row counts (few distinct shapes for oneDNN's caches),
    at most 1/16 more rows; fp32 and small counts run on exactly their tokens."""
    from v4lens.model.moe import product_rows

    bf16, fp32 = torch.empty(0, dtype=torch.bfloat16), torch.empty(0)
    assert [product_rows(c, bf16) for c in range(1, 32)] == list(range(1, 32))
    assert all(product_rows(c, fp32) == c for c in range(1, 5000))
    for low in (32, 64, 1024, 4096):
        rows = [product_rows(c, bf16) for c in range(low, 2 * low)]
        assert all(c <= r <= c * 17 / 16 for c, r in zip(range(low, 2 * low), rows, strict=True))
        assert len(set(rows) - {2 * low}) == 16  # (2 * low is the next octave's first size)
    assert product_rows(1985, bf16) == 2048 and product_rows(2000, bf16) == 2048 and product_rows(2049, bf16) == 2176


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("per_slot", [False, True])
def test_rounded_expert_rows_give_the_exact_products(monkeypatch, native_bf16, threads, per_slot):
    """The extra rows of a rounded expert product change nothing: bf16 expert outputs (mini-3b's
    widths, hundreds of tokens per expert) equal those computed on exactly each expert's tokens."""
    from types import SimpleNamespace

    from v4lens.model import moe

    cfg = SimpleNamespace(n_routed_experts=4, moe_inter_dim=512, d_model=1536, dtype=torch.bfloat16, swiglu_limit=10.0)
    gen = torch.Generator().manual_seed(0)
    experts = moe.Experts(cfg)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.03)
    N = 603
    x = torch.randn(N, cfg.d_model, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(N)])
    ids[::50, 1] = -1  # some empty slots
    weights = torch.rand(N, 2, generator=gen)
    counts = torch.bincount(ids[ids >= 0], minlength=4).tolist()
    assert any(moe.product_rows(c, x) > c for c in counts)  # the rounding really happens here
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            rounded = experts(x, ids, weights, per_slot=per_slot)
            monkeypatch.setattr(moe, "product_rows", lambda count, x: count)
            exact = experts(x, ids, weights, per_slot=per_slot)
    finally:
        torch.set_num_threads(before)
    assert rounded.dtype == exact.dtype and torch.equal(rounded, exact)


def test_expert_rows_are_not_rounded_without_native_bf16(monkeypatch):
    """Where the CPU has no bf16 products, they run in fp32 (no oneDNN primitives): no extra rows."""
    from v4lens.model import moe

    monkeypatch.setattr(moe, "native_bf16_products", lambda: False)
    bf16 = torch.empty(0, dtype=torch.bfloat16)
    assert all(moe.product_rows(c, bf16) == c for c in (32, 33, 1985, 2049))

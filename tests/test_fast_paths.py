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

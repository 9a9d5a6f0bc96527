"""Manifold-constrained hyper-connections (mHC) around each sub-layer, and the final collapse before the head.

The residual is `hc_mult` streams X [b, p, n, d]. Before each sub-layer, `HyperConnection`
reads all streams and produces three mixings: `pre` collapses the streams into the
sub-layer input, `post` spreads the sub-layer output back over the streams, and `comb`
(projected onto doubly-stochastic matrices by Sinkhorn-Knopp) mixes the old streams into
the new ones. Everything here runs in fp32; the streams are cast back once.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from .config import V4Config
from .params import fp32_param


def flat_mixes(streams32: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """Raw mixes μ = (fn · vec(X)) · rsqrt(mean(vec(X)^2) + eps): one RMS statistic over all n·d values.

    streams32 [b, p, n, d] fp32 -> [b, p, rows of fn], fp32. The GEMM runs on the
    un-normalised streams and is scaled afterwards, as the reference kernel does.
    """
    flat = streams32.flatten(-2)
    mean_square = torch.linalg.vector_norm(flat, dim=-1, keepdim=True).square() / flat.shape[-1]
    return torch.nn.functional.linear(flat, fn.float()) * torch.rsqrt(mean_square + eps)


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Row softmax (+eps), then `iters` column and `iters - 1` row normalisations, column first.

    logits [..., n, n] -> comb [..., n, n]: comb[j, k] is the weight of input stream j in
    output stream k. The last pass normalises columns, so columns sum to 1 (up to eps).

    Without autograd the same operations run in place (no tensor allocated per pass): the same
    reductions over the same layout, so the result is bit-identical (tests/test_fast_paths.py).
    """
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return _sinkhorn_in_place(logits, iters, eps)
    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


def _sinkhorn_in_place(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """`sinkhorn`'s operations in the same order, in place on a fresh tensor. [..., n, n] -> [..., n, n]."""
    eps = _fp32_scalar(eps)  # adding a Python float wraps and converts it on every add (40 times here)
    comb = torch.softmax(logits, dim=-1).add_(eps)  # a new tensor: ours to overwrite
    col = comb.sum(dim=-2, keepdim=True).add_(eps)
    comb.div_(col)
    row = comb.sum(dim=-1, keepdim=True)
    for _ in range(iters - 1):
        comb.div_(torch.sum(comb, dim=-1, keepdim=True, out=row).add_(eps))
        comb.div_(torch.sum(comb, dim=-2, keepdim=True, out=col).add_(eps))
    return comb


@functools.lru_cache(maxsize=16)
def _fp32_scalar(value: float) -> torch.Tensor:
    """value as a 0-dim fp32 CPU tensor (what adding the float does, rounded once; a CPU scalar serves any device)."""
    return torch.tensor(value, dtype=torch.float32)


def collapse(streams32: torch.Tensor, pre: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """y = Σ_j pre_j · X_j in fp32, one cast: [b, p, n, d] fp32, [b, p, n] -> [b, p, d]."""
    return torch.einsum("bpn,bpnd->bpd", pre, streams32).to(dtype)


def collapse_and_mix(
    streams32: torch.Tensor, pre: torch.Tensor, comb: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two reads of the streams in one batched GEMM: y = Σ_j pre_j X_j and mixed_k = Σ_j comb[j, k] X_j.

    streams32 [b,p,n,d] fp32, pre [b,p,n], comb [b,p,n,n] -> (y [b,p,d] in `dtype`, mixed [b,p,n,d] fp32).
    `mixed` does not depend on the sub-layer, so it is formed while the streams are at hand.
    """
    weights = torch.cat([pre[..., None, :], comb.transpose(-1, -2)], dim=-2)  # [b,p,1+n,n]
    both = torch.matmul(weights, streams32)  # [b,p,1+n,d]
    return both[:, :, 0].to(dtype), both[:, :, 1:]


def expand(out: torch.Tensor, mixed: torch.Tensor, post: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """hc_post: X'_k = post_k · f + Σ_j comb[j, k] · X_j (comb contracted on its FIRST index), fp32, one cast.

    out [b,p,d] (the sub-layer output f), mixed [b,p,n,d] fp32 (Σ_j comb[j,k] X_j, from
    `collapse_and_mix`), post [b,p,n] -> streams [b,p,n,d] in `dtype`.
    """
    return torch.addcmul(mixed, post[..., None], out.float()[:, :, None, :]).to(dtype)


class HyperConnection(nn.Module):
    """hc_pre of one sub-layer (`attn_hc` or `mlp_hc`).

    Hooks: `hook_mixes` [b,p,(2+n)n], `hook_pre` [b,p,n], `hook_post` [b,p,n],
    `hook_comb` [b,p,n,n] (all fp32) and `hook_out` [b,p,d] (the collapsed sub-layer input).
    Every one is editable: the returned value is what the rest of the forward uses.
    """

    def __init__(self, cfg: V4Config, device=None):
        super().__init__()
        n, d = cfg.hc_mult, cfg.d_model
        self.n, self.iters, self.hc_eps, self.norm_eps = n, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps
        self.fn = fp32_param(torch.empty((2 + n) * n, n * d, device=device))
        self.base = fp32_param(torch.empty((2 + n) * n, device=device))
        self.scale = fp32_param(torch.empty(3, device=device))
        self.hook_mixes = HookPoint()
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()
        self.hook_comb = HookPoint()
        self.hook_out = HookPoint()

    def mixings(self, streams32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams32 [b,p,n,d] fp32 -> (pre [b,p,n], post [b,p,n], comb [b,p,n,n]), fp32, through the hooks."""
        n = self.n
        mixes = self.hook_mixes(flat_mixes(streams32, self.fn, self.norm_eps))
        m_pre, m_post, m_comb = mixes.split([n, n, n * n], dim=-1)
        b_pre, b_post, b_comb = self.base.split([n, n, n * n])
        pre = torch.sigmoid(m_pre * self.scale[0] + b_pre) + self.hc_eps
        post = 2 * torch.sigmoid(m_post * self.scale[1] + b_post)
        comb_logits = (m_comb * self.scale[2] + b_comb).unflatten(-1, (n, n))
        comb = sinkhorn(comb_logits, self.iters, self.hc_eps)
        return self.hook_pre(pre), self.hook_post(post), self.hook_comb(comb)

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [b,p,n,d] -> (collapsed sub-layer input [b,p,d], post [b,p,n], mixed [b,p,n,d] fp32).

        `mixed` = combᵀ·streams, what `expand` adds the post-weighted sub-layer output to.
        """
        streams32 = streams.float()
        pre, post, comb = self.mixings(streams32)
        collapsed, mixed = collapse_and_mix(streams32, pre, comb, streams.dtype)
        return self.hook_out(collapsed), post, mixed


class HyperHead(nn.Module):
    """Final collapse of the streams before the last norm (`hc_head`): sigmoid(+eps) weights, no Sinkhorn.

    Hooks: `hook_pre` [b,p,n] fp32, `hook_out` [b,p,d].
    """

    def __init__(self, cfg: V4Config, device=None):
        super().__init__()
        n, d = cfg.hc_mult, cfg.d_model
        self.hc_eps, self.norm_eps = cfg.hc_eps, cfg.norm_eps
        self.fn = fp32_param(torch.empty(n, n * d, device=device))
        self.base = fp32_param(torch.empty(n, device=device))
        self.scale = fp32_param(torch.empty(1, device=device))
        self.hook_pre = HookPoint()
        self.hook_out = HookPoint()

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        streams32 = streams.float()
        mixes = flat_mixes(streams32, self.fn, self.norm_eps)
        pre = self.hook_pre(torch.sigmoid(mixes * self.scale + self.base) + self.hc_eps)
        return self.hook_out(collapse(streams32, pre, streams.dtype))

"""Weighted RMSNorm: fp32 statistic and fp32 weight, one cast back."""

from __future__ import annotations

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from .params import fp32_param


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last axis, computed in fp32; returns fp32."""
    x = x.float()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """`y = cast_in(w * x_f32 * rsqrt(mean(x_f32^2) + eps))`, weight held in fp32.

    `hook_normalized` ([..., d]) fires on the output (named `ln1`, `ln2`, `ln_final` in a block).
    """

    def __init__(self, dim: int, eps: float, device=None):
        super().__init__()
        self.w = fp32_param(torch.empty(dim, device=device))
        self.eps = eps
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_normalized((self.w * rms_normalize(x, self.eps)).to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.w.shape[0]}, eps={self.eps}"

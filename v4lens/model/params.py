"""Parameter helpers: which tensors are fp32 "islands" (kept fp32 in a bf16 model, as in DeepSeek's reference)
and how they survive `.to(dtype)`.
"""

from __future__ import annotations

import torch
from torch import nn


def fp32_param(t: torch.Tensor) -> nn.Parameter:
    """A parameter that stays fp32 whatever the model dtype (norm weights, mHC, sinks, router bias, ...)."""
    p = nn.Parameter(t.float(), requires_grad=True)
    p._v4_fp32 = True  # HookedV4 records these names at construction; its .to(dtype) keeps them fp32
    return p


def param(shape: tuple[int, ...], dtype: torch.dtype, device=None) -> nn.Parameter:
    """A parameter in the model's runtime dtype (filled later by the initialiser or a checkpoint)."""
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device))


def is_fp32_island(p: torch.Tensor) -> bool:
    return getattr(p, "_v4_fp32", False)


def is_hooked(hook_point: nn.Module) -> bool:
    """Whether any forward or backward hook is attached to this HookPoint right now."""
    return bool(hook_point._forward_hooks or hook_point._backward_hooks)

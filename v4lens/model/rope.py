"""Partial, interleaved rotary embedding on the trailing `rope_head_dim` channels.

Sliding-only layers use plain RoPE with `rope_theta`; CSA/HCA layers (and their compressors
and indexer) use `compress_rope_theta` with YaRN and no mscale. Angles and the rotation are
computed in fp32 and rounded once, as in DeepSeek's reference.
"""

from __future__ import annotations

import math

import torch

from .config import V4Config


def rope_frequencies(cfg: V4Config, compressed: bool) -> torch.Tensor:
    """Per-pair angular frequencies ω'_i, fp32 [rope_head_dim // 2]."""
    dim = cfg.rope_head_dim
    base = cfg.compress_rope_theta if compressed else cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not compressed or cfg.original_seq_len <= 0:
        return freqs

    def correction_dim(rotations: float) -> float:
        return dim * math.log(cfg.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoids a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # pairs below `low` keep their frequency, pairs above `high` are slowed by `factor`
    return freqs / cfg.rope_factor * ramp + freqs * (1 - ramp)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the trailing `2 * len(freqs)` channels of `x` by `exp(±i·p·ω)`.

    x: [b, p, ..., c] (any number of axes between position and channel);
    positions: [p] or [b, p] absolute positions; freqs: [r/2] fp32.
    Adjacent channels (2i, 2i+1) form the complex pair (real, imag).
    """
    r = 2 * freqs.shape[0]
    angles = positions.to(torch.float32)[..., None] * freqs.to(x.device)  # [(b,) p, r/2]
    if positions.ndim == 1:
        angles = angles[None]
    angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[-1:])
    cos, sin = angles.cos(), angles.sin()
    if inverse:
        sin = -sin
    rope = x[..., -r:].float()
    real, imag = rope[..., 0::2], rope[..., 1::2]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(-2)
    return torch.cat([x[..., :-r], rotated.to(x.dtype)], dim=-1)

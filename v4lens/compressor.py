"""KV compressor (SPEC §A5): pools every `m` tokens into one compressed entry.

CSA (m == 4, overlapping): every token carries two feature halves; entry w pools 2m slots,
window w-1's first ("a") halves and window w's second ("b") halves, so windows overlap by m.
Entry 0 has no previous window: those slots get weight 0. HCA (any other m): entry w pools
window w's m tokens. The pooling is a per-channel softmax over the slots of learned gate
logits plus a per-slot position bias `ape`, in fp32. The entry is then RMS-normed and
rotated to the position of its window's first token, w·m.
"""

from __future__ import annotations

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from .config import V4Config
from .norm import RMSNorm
from .params import fp32_param
from .rope import apply_rope


class Compressor(nn.Module):
    """One compressor. `forward(x [b,S,D]) -> entries [b, S//m, dim]` (complete windows only).

    Hooks: `hook_weights` [b,T,slots,dim] fp32 (softmax pooling weights; slots = 2m for CSA,
    m for HCA; editable: entries are the weighted sums of the edited weights) and
    `hook_kv` [b,T,dim] (entries after norm and RoPE).
    """

    def __init__(self, cfg: V4Config, ratio: int, dim: int, device=None):
        super().__init__()
        self.ratio, self.dim = ratio, dim
        self.overlap = ratio == 4
        width = (2 if self.overlap else 1) * dim
        # Held in fp32 like the reference: the projections are an fp32 island (SPEC decision 3).
        self.wkv = fp32_param(torch.empty(width, cfg.d_model, device=device))
        self.wgate = fp32_param(torch.empty(width, cfg.d_model, device=device))
        self.ape = fp32_param(torch.empty(ratio, width, device=device))
        self.norm = RMSNorm(dim, cfg.norm_eps, device=device)
        self.hook_weights = HookPoint()
        self.hook_kv = HookPoint()

    @property
    def slots(self) -> int:
        return 2 * self.ratio if self.overlap else self.ratio

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        b, S, _ = x.shape
        m, d = self.ratio, self.dim
        T = S // m
        x32 = x[:, : T * m].float()
        width = self.wkv.shape[0]  # explicit: `-1` cannot be inferred when T == 0 (S < m)
        values = torch.nn.functional.linear(x32, self.wkv).view(b, T, m, width)  # [b,T,m,width]
        logits = torch.nn.functional.linear(x32, self.wgate).view(b, T, m, width) + self.ape
        if self.overlap:
            # slots 0..m-1: previous window's a-halves (none for window 0: value 0, logit -inf);
            # slots m..2m-1: this window's b-halves.
            # ([:, :T] keeps T == 0 empty: padding an empty window axis would create one)
            prev_values = torch.nn.functional.pad(values[:, :-1, :, :d], (0, 0, 0, 0, 1, 0))[:, :T]
            prev_logits = torch.nn.functional.pad(
                logits[:, :-1, :, :d], (0, 0, 0, 0, 1, 0), value=float("-inf")
            )[:, :T]
            values = torch.cat([prev_values, values[..., d:]], dim=2)  # [b,T,2m,d]
            logits = torch.cat([prev_logits, logits[..., d:]], dim=2)
        weights = self.hook_weights(torch.softmax(logits, dim=2))
        pooled = (weights * values).sum(dim=2).to(x.dtype)  # [b,T,d]
        entries = self.norm(pooled)
        positions = torch.arange(T, device=x.device) * m
        return self.hook_kv(apply_rope(entries, positions, freqs))

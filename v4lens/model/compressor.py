"""KV compressor: pools every `m` tokens into one compressed entry.

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
from .kv_cache import CompressorState
from .norm import RMSNorm
from .params import fp32_param, is_hooked
from .rope import apply_rope


class Compressor(nn.Module):
    """One compressor. `forward(x [b,S,D]) -> (entries [b, S//m, dim], state)` (complete windows
    only; with a state from the previous chunk it continues the sequence as the reference's decode does).

    Hooks: `hook_weights` [b,T,slots,dim] fp32 (softmax pooling weights; slots = 2m for CSA,
    m for HCA; editable: entries are the weighted sums of the edited weights) and
    `hook_kv` [b,T,dim] (entries after norm and RoPE).
    """

    def __init__(self, cfg: V4Config, ratio: int, dim: int, device=None):
        super().__init__()
        self.ratio, self.dim = ratio, dim
        self.overlap = ratio == 4
        width = (2 if self.overlap else 1) * dim
        # Held in fp32 like the reference: the projections are an fp32 island, even in a bf16 model.
        self.wkv = fp32_param(torch.empty(width, cfg.d_model, device=device))
        self.wgate = fp32_param(torch.empty(width, cfg.d_model, device=device))
        self.ape = fp32_param(torch.empty(ratio, width, device=device))
        self.norm = RMSNorm(dim, cfg.norm_eps, device=device)
        self.hook_weights = HookPoint()
        self.hook_kv = HookPoint()

    @property
    def slots(self) -> int:
        return 2 * self.ratio if self.overlap else self.ratio

    def forward(
        self, x: torch.Tensor, freqs: torch.Tensor, state: CompressorState | None = None, commit: int | None = None
    ) -> tuple[torch.Tensor, CompressorState]:
        """x [b,S,D] -> (entries of the windows this chunk completes [b,T,dim], state for the next chunk).

        Without `state` the chunk starts the sequence. The new state keeps only the first
        `commit` tokens of the chunk (default all), while the returned entries use every token.
        """
        b, S, _ = x.shape
        m, d = self.ratio, self.dim
        width = self.wkv.shape[0]
        x32 = x.float()
        values = torch.nn.functional.linear(x32, self.wkv)  # [b,S,width] fp32
        logits = torch.nn.functional.linear(x32, self.wgate)
        if state is None:
            state = CompressorState(values.new_zeros(b, 0, width), values.new_zeros(b, 0, width))
        # the pending tokens start a window, so the windows line up with the reshape below
        r = state.pending_values.shape[1]
        values = torch.cat([state.pending_values, values], dim=1)
        logits = torch.cat([state.pending_logits, logits], dim=1)
        T = (r + S) // m
        win_values = values[:, : T * m].view(b, T, m, width)  # [b,T,m,width]
        win_logits = logits[:, : T * m].view(b, T, m, width) + self.ape
        if T == 0 and not any(map(is_hooked, (self.hook_weights, self.norm.hook_normalized, self.hook_kv))):
            entries = x.new_empty(b, 0, d)  # no window completes (most decoding steps) and no hook looks
        else:
            entries = self._pool(win_values, win_logits, state, x.dtype, freqs)

        kept = r + (S if commit is None else commit)  # tokens (pending + chunk) the next state covers
        T_kept = kept // m
        carry_values, carry_logits = state.carry_values, state.carry_logits
        if self.overlap and T_kept > 0:
            carry_values, carry_logits = win_values[:, T_kept - 1, :, :d], win_logits[:, T_kept - 1, :, :d]
        # clones: a view would keep the whole chunk's projections alive in the cache
        next_state = CompressorState(
            values[:, T_kept * m : kept].clone(), logits[:, T_kept * m : kept].clone(),
            None if carry_values is None else carry_values.clone(),
            None if carry_logits is None else carry_logits.clone(), state.n_entries + T_kept,
        )  # fmt: skip
        return entries, next_state

    def _pool(
        self,
        win_values: torch.Tensor,
        win_logits: torch.Tensor,
        state: CompressorState,
        dtype: torch.dtype,
        freqs: torch.Tensor,
    ) -> torch.Tensor:
        """The windows' projections [b,T,m,width] fp32 (logits with `ape` added) -> entries [b,T,dim]:
        softmax pooling over the slots, norm, RoPE at each window's first token."""
        b, T, m, _ = win_values.shape
        d = self.dim
        if self.overlap:
            # slots 0..m-1: the previous window's a-halves (before the first window: value 0,
            # logit -inf, i.e. weight 0); slots m..2m-1: this window's b-halves
            carry_values, carry_logits = state.carry_values, state.carry_logits
            if carry_values is None:
                carry_values = win_values.new_zeros(b, 1, m, d)
                carry_logits = win_values.new_full((b, 1, m, d), float("-inf"))
            else:
                carry_values, carry_logits = carry_values[:, None], carry_logits[:, None]
            # ([:, :T] keeps T == 0 empty)
            prev_values = torch.cat([carry_values, win_values[:, :-1, :, :d]], dim=1)[:, :T]
            prev_logits = torch.cat([carry_logits, win_logits[:, :-1, :, :d]], dim=1)[:, :T]
            pooled_values = torch.cat([prev_values, win_values[..., d:]], dim=2)  # [b,T,2m,d]
            pooled_logits = torch.cat([prev_logits, win_logits[..., d:]], dim=2)
        else:
            pooled_values, pooled_logits = win_values, win_logits
        weights = self.hook_weights(torch.softmax(pooled_logits, dim=2))
        pooled = (weights * pooled_values).sum(dim=2).to(dtype)  # [b,T,d]
        entries = self.norm(pooled)
        positions = (state.n_entries + torch.arange(T, device=win_values.device)) * m  # each window's first token
        return self.hook_kv(apply_rope(entries, positions, freqs))

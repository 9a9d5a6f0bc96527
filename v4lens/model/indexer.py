"""Lightning Indexer: picks, for each query, the top-k compressed entries of a CSA layer.

It owns a small overlapping compressor (dim = index_head_dim) whose entries are the index
keys. The score of entry w for query t is Σ_h α_{t,h} · ReLU(q_{t,h} · K_w), with head
weights α = weights_proj(x) · index_head_dim^-1/2 · index_n_heads^-1/2. Entries not yet
visible to t (w >= (t+1) // 4) score -inf, and picks that land on them become -1.
"""

from __future__ import annotations

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from .compressor import Compressor
from .config import V4Config
from .kv_cache import CompressorState, append_entries
from .linear import einsum_in_model_dtype, linear
from .params import is_hooked, param
from .rope import apply_rope


def visible_entries(positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """Number of compressed entries query t may see: ⌊(t+1)/m⌋ (an entry is visible from its window's last token)."""
    return torch.div(positions + 1, ratio, rounding_mode="floor")


def topk_lowest_index_first(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest fp32 scores along the last axis, in descending order, equal scores
    in ascending index order. torch.topk breaks ties arbitrarily (differently for different row
    widths), so a chunked forward, whose rows are shorter, could pick another of two tied entries
    (ties are common: ReLU makes a score exactly 0 whenever no head fires). Here the order is
    total: a 64-bit key of (score's order-preserving integer image, -index)."""
    bits = (scores.float() + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the float value
    index = torch.arange(scores.shape[-1], device=scores.device)
    return ((ordered << 32) | (scores.shape[-1] - 1 - index)).topk(k, dim=-1).indices


class Indexer(nn.Module):
    """Hooks: `hook_q` [b,p,H_I,c_I], `hook_kv` [b,T,c_I], `hook_head_weights` [b,p,H_I],
    `hook_scores` [b,p,T] (-inf where not visible), `hook_topk` [b,p,k] int64 (-1 empty).

    Editing `hook_topk` re-selects the entries the attention sees (picks outside the
    query's visible prefix are dropped, so an edit cannot break causality).
    """

    def __init__(self, cfg: V4Config, device=None):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.cfg = cfg
        dtype = cfg.dtype
        self.wq_b = param((cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank), dtype, device)
        self.weights_proj = param((cfg.index_n_heads, cfg.d_model), dtype, device)
        self.compressor = Compressor(cfg, 4, cfg.index_head_dim, device=device)
        self.hook_q = HookPoint()
        self.hook_kv = HookPoint()
        self.hook_head_weights = HookPoint()
        self.hook_scores = HookPoint()
        self.hook_topk = HookPoint()

    def forward(
        self, x: torch.Tensor, q_latent: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor,
        state: tuple[CompressorState, torch.Tensor] | None = None, commit: int | None = None,
    ) -> tuple[torch.Tensor, tuple[CompressorState, torch.Tensor]]:  # fmt: skip
        """x [b,S,D] (attn-normed), q_latent [b,S,R_q] -> (picks [b,S,k] int64 (entry ids, -1 empty),
        (compressor state, keys so far) for the next chunk). `state`: that pair from the previous
        chunk; `hook_kv` then sees only the keys this chunk adds."""
        b, S, _ = x.shape
        comp_state, old_keys = state if state is not None else (None, x.new_zeros(b, 0, self.head_dim))
        new_keys, comp_next = self.compressor(x, freqs, comp_state, commit)
        new_keys = self.hook_kv(new_keys)  # [b,T_new,c_I]
        keys = append_entries(old_keys, new_keys)  # [b,T,c_I]
        n_kept = comp_next.n_entries - (comp_state.n_entries if comp_state is not None else 0)
        next_state = (comp_next, append_entries(old_keys, new_keys[:, :n_kept]))
        T = keys.shape[1]
        q = linear(q_latent, self.wq_b).view(b, S, self.n_heads, self.head_dim)
        q = self.hook_q(apply_rope(q, positions, freqs))
        scale = (self.head_dim * self.n_heads) ** -0.5
        alpha = self.hook_head_weights(linear(x, self.weights_proj) * scale)
        visible = visible_entries(positions, 4)  # [S]
        k = min(self.topk, T)
        if T == 0:  # shorter than one window: nothing to score, but every hook still fires (empty)
            self.hook_scores(torch.zeros((b, S, 0), dtype=torch.float32, device=x.device))
            return self.hook_topk(torch.full((b, S, 0), -1, dtype=torch.long, device=x.device)), next_state
        # The score matrix is [S, T] = S²/4: score in query chunks unless someone hooks it whole.
        chunk = S if is_hooked(self.hook_scores) else self.cfg.attn_chunk_size
        picks = []
        for s0 in range(0, S, chunk):
            s1 = min(S, s0 + chunk)
            # entries no query of this chunk can see yet would score -inf: skip them (half the
            # work of a long prefill); a hooked score tensor keeps its full width
            width = T if chunk == S else min(T, int(visible[s1 - 1]))
            # in the model dtype, like the reference
            dots = einsum_in_model_dtype("bshc,btc->bsht", q[:, s0:s1], keys[:, :width])
            scores = einsum_in_model_dtype("bsh,bsht->bst", alpha[:, s0:s1], torch.relu(dots)).float()
            future = torch.arange(width, device=x.device)[None, :] >= visible[s0:s1, None]  # [s,width]
            scores = self.hook_scores(scores.masked_fill(future, float("-inf")))
            top = topk_lowest_index_first(scores, min(k, width))
            top = torch.where(top >= visible[s0:s1, None], -1, top)
            picks.append(torch.nn.functional.pad(top, (0, k - top.shape[-1]), value=-1))
        return self.hook_topk(torch.cat(picks, dim=1)), next_state

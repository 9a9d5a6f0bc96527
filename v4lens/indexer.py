"""Lightning Indexer (SPEC §A6): picks, for each query, the top-k compressed entries of a CSA layer.

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
from .params import is_hooked, param
from .rope import apply_rope


def visible_entries(positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """Number of compressed entries query t may see: ⌊(t+1)/m⌋ (an entry is visible from its window's last token)."""
    return torch.div(positions + 1, ratio, rounding_mode="floor")


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
        self, x: torch.Tensor, q_latent: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor
    ) -> torch.Tensor:
        """x [b,S,D] (attn-normed), q_latent [b,S,R_q] -> picks [b,S,k] int64 (entry ids, -1 empty)."""
        b, S, _ = x.shape
        keys = self.hook_kv(self.compressor(x, freqs))  # [b,T,c_I]
        T = keys.shape[1]
        q = torch.nn.functional.linear(q_latent, self.wq_b).view(b, S, self.n_heads, self.head_dim)
        q = self.hook_q(apply_rope(q, positions, freqs))
        scale = (self.head_dim * self.n_heads) ** -0.5
        alpha = self.hook_head_weights(torch.nn.functional.linear(x, self.weights_proj) * scale)
        visible = visible_entries(positions, 4)  # [S]
        k = min(self.topk, T)
        if T == 0:  # shorter than one window: nothing to score, but every hook still fires (empty)
            self.hook_scores(torch.zeros((b, S, 0), dtype=torch.float32, device=x.device))
            return self.hook_topk(torch.full((b, S, 0), -1, dtype=torch.long, device=x.device))
        # The score matrix is [S, T] = S²/4: score in query chunks unless someone hooks it whole.
        chunk = S if is_hooked(self.hook_scores) else self.cfg.attn_chunk_size
        picks = []
        for s0 in range(0, S, chunk):
            s1 = min(S, s0 + chunk)
            dots = torch.einsum("bshc,btc->bsht", q[:, s0:s1], keys)  # model dtype, like the reference
            scores = torch.einsum("bsh,bsht->bst", alpha[:, s0:s1], torch.relu(dots)).float()
            future = torch.arange(T, device=x.device)[None, :] >= visible[s0:s1, None]  # [s,T]
            scores = self.hook_scores(scores.masked_fill(future, float("-inf")))
            top = scores.topk(k, dim=-1).indices
            picks.append(torch.where(top >= visible[s0:s1, None], -1, top))
        return self.hook_topk(torch.cat(picks, dim=1))

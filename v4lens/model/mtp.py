"""Multi-token prediction block (input convention in docs/hooks.md).

A full block (layer index n_layers + i: its own attention type, score-routed MoE) fed with
the main model's final streams at position t and the embedding of token t+1; its logits at
t predict token t+2. It has its own hc_head and final norm and shares embed and head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformer_lens.hook_points import HookPoint

from .block import Block
from .config import V4Config
from .head import fp32_logits
from .hyper_connections import HyperHead
from .norm import RMSNorm
from .params import param


class MTPBlock(Block):
    """Hooks: `hook_embed` [b,p,d] (enorm of the next token's embedding), `hook_hidden` [b,p,n,d]
    (hnorm of the incoming streams), the block's own hooks (`hook_streams_pre` = e_proj(embed) +
    h_proj(hidden) per stream, ...), `hc_head.*`, `ln_final.hook_normalized`, `hook_logits`."""

    def __init__(self, cfg: V4Config, index: int, device=None):
        super().__init__(cfg, cfg.n_layers + index, device=device)
        D = cfg.d_model
        self.enorm = RMSNorm(D, cfg.norm_eps, device=device)
        self.hnorm = RMSNorm(D, cfg.norm_eps, device=device)
        self.e_proj = param((D, D), cfg.dtype, device)
        self.h_proj = param((D, D), cfg.dtype, device)
        self.hc_head = HyperHead(cfg, device=device)
        self.ln_final = RMSNorm(D, cfg.norm_eps, device=device)
        self.hook_embed = HookPoint()
        self.hook_hidden = HookPoint()
        self.hook_logits = HookPoint()

    def forward(self, streams: torch.Tensor, next_embed: torch.Tensor, positions: torch.Tensor, cache=None) -> torch.Tensor:
        """streams [b,S,n,d] (previous depth's final streams), next_embed [b,S,d] -> this block's streams."""
        e = self.hook_embed(self.enorm(next_embed))
        h = self.hook_hidden(self.hnorm(streams))
        x = F.linear(e, self.e_proj)[:, :, None, :] + F.linear(h, self.h_proj)
        return super().forward(x, positions, None, cache)

    def logits(self, streams: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        h = self.ln_final(self.hc_head(streams))
        return self.hook_logits(fp32_logits(h, head))

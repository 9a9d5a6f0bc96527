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
from .linear import linear
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
        x = linear(e, self.e_proj)[:, :, None, :] + linear(h, self.h_proj)
        return super().forward(x, positions, None, cache)

    def logits(self, streams: torch.Tensor, head: torch.Tensor, compiled: bool = False) -> torch.Tensor:
        h = self.ln_final(self.hc_head(streams))
        return self.hook_logits(fp32_logits(h, head, compiled=compiled))


def run_mtp(model, streams, tokens, logits, positions, next_tokens, cache=None, keep: int = 0) -> list[torch.Tensor]:
    """The MTP blocks of `model` after its main blocks: streams [b,p,n,d] are the final streams, logits the
    main head's; returns each block's logits [b, keep or p, V]. next_tokens [b, n]: the tokens after the
    last position (else greedy drafts). With a decoding cache, one MTP block (`cached_mtp`)."""
    if not len(model.mtp):
        raise ValueError("this model has no MTP blocks (cfg.n_mtp_layers = 0)")
    if cache is not None and len(model.mtp) > 1:
        raise NotImplementedError("incremental decoding supports one MTP block (V4-Flash and mini-3b have one)")
    S = tokens.shape[1]
    out = []  # next_tokens: checked by forward (inputs.mtp_tokens), [b, n]
    stream, prev_logits, shifted = streams, logits, tokens
    for j, block in enumerate(model.mtp):
        # token t+1+j for every position t: the real one where it exists, else a draft
        if next_tokens is not None and next_tokens.shape[1] > j:
            last = next_tokens[:, j : j + 1]
        else:
            last = prev_logits[:, -1:].argmax(-1)
        shifted = torch.cat([shifted[:, 1:], last], dim=1)
        if cache is None:
            stream = block(stream, F.embedding(shifted, model.embed.weight), positions)
        else:
            stream = cached_mtp(model, block, stream, tokens, shifted, positions, cache)
        prev_logits = block.logits(stream[:, -(keep or S) :], model.head.weight, model.compiled_head)
        out.append(prev_logits)
    return out

def cached_mtp(model, block, streams, tokens, next_ids, positions, cache) -> torch.Tensor:
    """The MTP block on a chunk with a decoding cache. Position t needs token t+1, so the
    previous chunk's last position (whose next token was a draft then) runs again first, now
    with this chunk's first token, and the state keeps every position but this chunk's last
    (a draft again). Its hooks see that extra first position."""
    if cache.mtp_pending is not None:
        streams = torch.cat([cache.mtp_pending, streams], dim=1)
        next_ids = torch.cat([tokens[:, :1], next_ids], dim=1)
        positions = torch.cat([positions[:1] - 1, positions])
    cache.mtp_pending = streams[:, -1:].clone()
    cache.commit = streams.shape[1] - 1
    try:
        return block(streams, F.embedding(next_ids, model.embed.weight), positions, cache)
    finally:
        cache.commit = None

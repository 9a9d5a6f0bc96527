"""One DeepSeek-V4 block: two sub-layers, each wrapped by its own mHC.

The residual is never added directly: each sub-layer reads a `pre`-weighted collapse of the
streams and the streams are rebuilt as post ⊗ output + combᵀ · streams.
"""

from __future__ import annotations

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from .attention import Attention
from .config import V4Config
from .hyper_connections import HyperConnection, expand
from .kv_cache import V4KVCache
from .moe import MoE
from .norm import RMSNorm


class Block(nn.Module):
    """Hooks: `hook_streams_pre/mid/post` [b,p,n,d], `hook_attn_out` and `hook_mlp_out` [b,p,d],
    plus those of `attn_hc`, `ln1`, `attn`, `mlp_hc`, `ln2`, `mlp`."""

    def __init__(self, cfg: V4Config, layer: int, device=None):
        super().__init__()
        self.layer = layer
        self.layer_type = cfg.layer_type(layer)
        self.hook_streams_pre = HookPoint()
        self.attn_hc = HyperConnection(cfg, device=device)
        self.ln1 = RMSNorm(cfg.d_model, cfg.norm_eps, device=device)
        self.attn = Attention(cfg, layer, device=device)
        self.hook_attn_out = HookPoint()
        self.hook_streams_mid = HookPoint()
        self.mlp_hc = HyperConnection(cfg, device=device)
        self.ln2 = RMSNorm(cfg.d_model, cfg.norm_eps, device=device)
        self.mlp = MoE(cfg, layer, device=device)
        self.hook_mlp_out = HookPoint()
        self.hook_streams_post = HookPoint()

    def forward(
        self, streams: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor | None, cache: V4KVCache | None = None
    ) -> torch.Tensor:
        """streams [b,S,n,d], positions [S], tokens [b,S] -> streams [b,S,n,d]; `cache`: the attention's decoding state."""
        dtype = streams.dtype
        streams = self.hook_streams_pre(streams)
        x, post, mixed = self.attn_hc(streams)
        attn_out = self.hook_attn_out(self.attn(self.ln1(x), positions, cache))
        streams = self.hook_streams_mid(expand(attn_out, mixed, post, dtype))
        x, post, mixed = self.mlp_hc(streams)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(x), tokens))
        return self.hook_streams_post(expand(mlp_out, mixed, post, dtype))

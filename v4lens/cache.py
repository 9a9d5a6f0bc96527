"""`V4ActivationCache`: TransformerLens's `ActivationCache` for a model whose residual is 4-D.

Stream tensors (`hook_streams_*`, `*.hook_hidden`) are [b, p, n, d]; compressed-entry tensors
(`compressor.*`, `indexer.hook_kv`) are indexed by entry, not by position; attention scores
and patterns keep TransformerLens's [b, h, p, K].
"""

from __future__ import annotations

import torch
from transformer_lens.ActivationCache import ActivationCache


def is_stream_name(name: str) -> bool:
    """Hooks that carry the n residual streams, [b, p, n, d]."""
    return ".hook_streams_" in name or name.endswith("hook_hidden")


def is_entry_name(name: str) -> bool:
    """Hooks indexed by compressed entry (axis 1 = entry w, not query position)."""
    return ".compressor." in name or name.endswith("indexer.hook_kv")


class V4ActivationCache(ActivationCache):
    """`cache[name]` / `cache["attn_out", 3]` as in TransformerLens, plus stream-aware helpers."""

    def streams(self, layer: int, where: str = "post") -> torch.Tensor:
        """The n streams around block `layer`: where = "pre" | "mid" | "post" -> [b, p, n, d]."""
        return self[f"blocks.{layer}.hook_streams_{where}"]

    def __repr__(self) -> str:
        return f"V4ActivationCache with keys {list(self.cache_dict)[:8]}... ({len(self.cache_dict)} total)"

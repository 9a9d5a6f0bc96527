"""Where the query-position axis of each cached hook is, for a model whose residual is 4-D.

Where the position axis is decides how every slicing operation works (docs/hooks.md lists every
hook's layout):

- almost every hook is `[b, p, ...]`: position is axis 1, including the 4-D stream tensors
  `hook_streams_pre/mid/post`, `mtp.{i}.hook_hidden` [b, p, n, d] and `hc.hook_comb` [b, p, n, n];
- attention scores/patterns `[b, h, p, K]` and `hook_sink` / `hook_sink_logit` `[b, h, p]` keep
  TransformerLens's head-first layout: the query position is axis 2 (the K candidates are not
  positions and are never sliced);
- compressed-entry tensors (`*.compressor.*`, `*.indexer.hook_kv`) are `[b, T, ...]`: axis 1 is the
  entry w, not a position, so position slicing leaves them whole. (HCA entry w pools tokens
  [w·m, (w+1)·m), CSA entry w tokens [w·m − m, w·m + m); a query at p sees the entries complete
  by then, per `hook_key_index`.)

TransformerLens's own caching hooks guess the position axis from the end (-2, or -3 for q/k/v/z),
which lands on the stream axis n of a `[b, p, n, d]` tensor; v4lens's caching uses `position_axis`
instead. Without a batch axis (`remove_batch_dim`) every axis moves down one.
"""

from __future__ import annotations

# hooks laid out [b, h, p, ...] (TransformerLens's attention layout): query position is axis 2
_HEAD_FIRST = ("attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_sink", "attn.hook_sink_logit")


def is_stream_name(name: str) -> bool:
    """Hooks that carry the n residual streams, [b, p, n, d].

    Also a handy `names_filter`: `model.run_with_cache(tokens, names_filter=is_stream_name)`
    caches just what `accumulated_streams` and the logit lens read.
    """
    return ".hook_streams_" in name or name.endswith("hook_hidden")


def is_entry_name(name: str) -> bool:
    """Hooks indexed by compressed entry (axis 1 = entry w, not query position)."""
    return ".compressor." in name or name.endswith("indexer.hook_kv")


def is_draft_block_name(name: str) -> bool:
    """DSpark hooks indexed by draft-block position (the K positions after the input), not by input
    position: everything under `dspark.` except the per-position taps and context vector."""
    return name.startswith("dspark.") and not name.startswith(("dspark.hook_taps", "dspark.hook_main_x"))


def position_axis(name: str, has_batch_dim: bool = True) -> int | None:
    """The query-position axis of the tensor cached under `name`, or None if it has none.

    >>> position_axis("blocks.0.hook_streams_post"), position_axis("blocks.0.attn.hook_pattern")
    (1, 2)
    >>> position_axis("blocks.1.attn.compressor.hook_kv") is None     # entries, not positions
    True
    >>> position_axis("dspark.hook_drafts") is None                   # draft-block positions
    True
    """
    name = name.removesuffix("_grad")  # gradients are cached under name + "_grad", same layout
    if is_entry_name(name) or is_draft_block_name(name):
        return None
    axis = 2 if name.endswith(_HEAD_FIRST) else 1
    return axis if has_batch_dim else axis - 1


def require_hooks(cache, names, why: str) -> dict:
    """The cache's tensors by name (a cache or a plain dict) after checking it holds every one of
    `names`; otherwise a KeyError naming the missing hooks, then `why` (who needs them, how to cache them)."""
    tensors = getattr(cache, "cache_dict", cache)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise KeyError(f"the cache lacks {missing[:6]}{' ...' if len(missing) > 6 else ''}: {why}")
    return tensors

"""Sparse attention read in token space: each head's pattern spread back over the source tokens.

A V4 query attends over K candidates (docs/hooks.md, `attn.hook_key_index`): window tokens and,
on CSA / HCA layers, compressed entries, each entry a pooled mix of m (HCA) or 2m (CSA) source
slots. `token_attention` gives each candidate's probability to the tokens behind it:

- a window token keeps its probability;
- a compressed entry's probability is spread over the tokens it pooled, in proportion to the
  compressor's pooling weights (`attn.compressor.hook_weights` [b, T, slots, c], a softmax over
  the slots for each of the c channels), averaged over the channels: each channel's weights sum
  to 1 over the slots, so the shares of an entry do too. On a CSA layer, slots 0 … m−1 of entry
  w are tokens (w−1)·m … w·m−1 (the previous window) and slots m … 2m−1 tokens w·m … (w+1)·m−1;
  entry 0 gives its previous-window slots weight 0. On an HCA layer slot s is token w·m + s;
- the sink has no token: its mass is returned separately.

So every row sums to 1 − sink mass, and a token reached both through the window and through an
entry (or through two overlapping CSA entries) gets the sum. The result is [b, h, q, S] for the
chosen queries only, never S × S for a long input at once. The spread is an attribution (which
tokens the attended entries are made of), not a decomposition of the attention output: an entry
is RMS-normed and rotated after pooling.

    res = token_attention(model, cache, layer=1, queries=[-1])
    res.pattern   # [b, h, 1, S] fp32, res.sink [b, h, 1]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .layout import require_hooks

MAX_ALL_QUERIES = 512  # queries=None takes every query only up to this many (the result is [b, h, q, S])


class TokenAttention(NamedTuple):
    pattern: torch.Tensor  # [b, h, q, S] fp32: probability each query gives each source token
    sink: torch.Tensor  # [b, h, q] fp32: the sink's mass (rows of pattern sum to 1 - sink)
    queries: torch.Tensor  # [q] int64: the absolute positions of the query rows


def _prefix(model, layer: int | str) -> str:
    if isinstance(layer, str):
        prefix = layer.rstrip(".")
    else:
        n = model.cfg.n_layers
        layer = layer % n if layer < 0 else layer
        prefix = f"blocks.{layer}" if layer < n else f"mtp.{layer - n}"
    if f"{prefix}.attn.hook_pattern" not in model.hook_dict:
        raise ValueError(f"layer {layer!r}: {prefix}.attn is not an attention layer of this model")
    return prefix


def names(model, layer: int | str) -> list[str]:
    """The hooks `token_attention` reads for a layer (a `names_filter` list for run_with_cache)."""
    prefix = _prefix(model, layer)
    found = [f"{prefix}.attn.hook_key_index", f"{prefix}.attn.hook_pattern", f"{prefix}.attn.hook_sink"]
    pooled = f"{prefix}.attn.compressor.hook_weights"
    return found + ([pooled] if pooled in model.hook_dict else [])


def slot_tokens(ratio: int, n_entries: int, overlap: bool, device=None) -> torch.Tensor:
    """The source token of each slot of each compressed entry, [T, slots] int64 (-1: before the
    sequence start). Overlapping (CSA, 2m slots): (w−1)·m + s; HCA (m slots): w·m + s."""
    w = torch.arange(n_entries, device=device)[:, None]
    if overlap:
        tokens = (w - 1) * ratio + torch.arange(2 * ratio, device=device)
        return torch.where(tokens >= 0, tokens, -1)
    return w * ratio + torch.arange(ratio, device=device)


def entry_shares(pool_weights: torch.Tensor) -> torch.Tensor:
    """Pooling weights [b, T, slots, c] -> each slot's share of its entry [b, T, slots] fp32 (the
    mean over channels; sums to 1 over the slots)."""
    return pool_weights.float().mean(-1)


def _query_rows(queries, held: list[int], S: int) -> tuple[list[int], list[int]]:
    if queries is None:
        if len(held) > MAX_ALL_QUERIES:
            raise ValueError(
                f"token_attention: {len(held)} queries would make a [b, h, {len(held)}, {S}] tensor; "
                f"pass queries= (at most {MAX_ALL_QUERIES} at once when none are given)"
            )
        return list(range(len(held))), held
    wanted = [int(q) for q in ([queries] if isinstance(queries, int) else queries)]
    if any(not -S <= q < S for q in wanted):
        raise IndexError(f"queries {wanted} out of range for {S} tokens")
    where = {p: i for i, p in enumerate(held)}
    wanted = [q % S for q in wanted]
    missing = [q for q in wanted if q not in where]
    if missing:
        raise ValueError(f"queries {missing} are not in the cache (it holds positions {held[0]}..{held[-1]})")
    return [where[q] for q in wanted], wanted


@torch.no_grad()
def token_attention(model, source, layer: int | str, queries: int | Sequence[int] | None = None,
                    heads: int | Sequence[int] | None = None) -> TokenAttention:  # fmt: skip
    """Each head's attention of the chosen queries over the source tokens, [b, h, q, S] fp32.

    source: a cache holding the layer's `attn.hook_key_index`, `attn.hook_pattern`,
    `attn.hook_sink` (and `attn.compressor.hook_weights` on a CSA / HCA layer; `names(model,
    layer)` lists them), or tokens / a prompt to run. queries: absolute positions (negative from
    the end; default all, up to MAX_ALL_QUERIES); heads: default all. On a sliding layer the
    result is the raw pattern placed at its key positions.

        res = token_attention(model, tokens, layer=2, queries=[10, -1], heads=[0])
    """
    prefix = _prefix(model, layer)
    need = names(model, prefix)
    cache = source
    if not (hasattr(source, "cache_dict") or isinstance(source, dict)):
        mtp = {"mtp": True} if prefix.startswith("mtp.") else {}  # MTP blocks run only when asked for
        cache = model.run_with_cache(source, names_filter=need, **mtp)[1]
    t = require_hooks(cache, need, f"token_attention needs them; cache with names_filter={need} (or pass tokens)")
    batched = getattr(cache, "has_batch_dim", True)
    key_index, pattern, sink = (t[n] if batched else t[n][None] for n in need[:3])  # [b,p,K] [b,h,p,K] [b,h,p]
    tokens, held = getattr(cache, "tokens", None), getattr(cache, "positions", None)
    if tokens is None and held is not None:
        raise ValueError("token_attention: a position-sliced cache must know its tokens (cache.tokens) to tell S")
    S = tokens.shape[-1] if tokens is not None else key_index.shape[1]
    held = list(range(key_index.shape[1])) if held is None else [int(p) for p in held]
    rows, qpos = _query_rows(queries, held, S)
    H = pattern.shape[1]
    head_list = list(range(H)) if heads is None else [int(h) for h in ([heads] if isinstance(heads, int) else heads)]
    if any(not -H <= h < H for h in head_list):
        raise IndexError(f"heads {head_list} out of range ({H} heads)")

    ki = key_index[:, rows]  # [b,q,K]: token p -> p, compressed entry w -> S + w, -1 empty
    probs = pattern[:, head_list][:, :, rows].float()  # [b,h,q,K]
    b, h, q, K = probs.shape
    out = probs.new_zeros(b, h, q, S)
    raw = (ki >= 0) & (ki < S)
    out.scatter_add_(-1, torch.where(raw, ki, 0)[:, None].expand(b, h, q, K), probs * raw[:, None])
    if len(need) == 4:  # compressed entries: spread each over the tokens it pooled
        compressor = model.get_submodule(f"{prefix}.attn.compressor")
        pool = t[need[3]] if batched else t[need[3]][None]  # [b,T,slots,c]
        T = pool.shape[1]
        entry = ki >= S
        if entry.any() and int(ki.max()) - S >= T:
            raise ValueError(f"{prefix}: a candidate names entry {int(ki.max()) - S}, but {need[3]} holds {T} "
                             "entries (use a cache of one plain forward, or run_with_cache(..., chunk_len=))")  # fmt: skip
        w = torch.where(entry, ki - S, 0)  # [b,q,K]
        src = slot_tokens(compressor.ratio, T, compressor.overlap, ki.device)[w]  # [b,q,K,slots]
        share = entry_shares(pool)[torch.arange(b, device=ki.device)[:, None, None], w]  # [b,q,K,slots]
        share = torch.where(entry[..., None] & (src >= 0), share, 0.0)
        spread = (probs[..., None] * share[:, None]).flatten(3)  # [b,h,q,K·slots]
        out.scatter_add_(-1, src.clamp(min=0).flatten(2)[:, None].expand(b, h, q, -1), spread)
    return TokenAttention(out, sink[:, head_list][:, :, rows].float(), torch.tensor(qpos, dtype=torch.long))

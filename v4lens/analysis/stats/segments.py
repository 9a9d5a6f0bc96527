"""Statistics per part of a conversation: any per-token value averaged over each segment of a
rendered chat (`v4lens.chat.segments`), and three ready-made ones — sink mass, where the Lightning
Indexer's picks land, and expert load — per segment.

    seg = v4lens.chat.segments(messages, model, thinking=True, tools=tools)
    _, cache = model.run_with_cache(seg.tokens())
    stats.per_segment(cache["blocks.2.attn.hook_sink"][0].mean(0), seg)   # a Series: one mean per part
    stats.sink_mass_by_segment(model, cache, seg)          # per layer x part
    stats.indexer_picks_by_segment(model, cache, seg)      # per CSA layer x query part x picked part
    stats.expert_load_by_segment(model, cache, seg)        # per layer x part x expert

`segments`: a `v4lens.chat.Segments` (anything with `labels(field)` and `rows` of spans works), or
one label per token. `field`: what groups the tokens — "part" (default), "role", "turn", "tool",
"message", ... or a function of a row (`lambda r: f"{r.role}:{r.part}"`). Tokens whose label is
None (field="tool" outside tool calls and results, say) belong to no group. Groups come in the
order they first appear in the conversation.

The cache must hold the rendered conversation: row `batch` of `cache.tokens` starts with the
segments' tokens (a right-padded batch is fine: positions past the conversation are left out).
A position-sliced cache (`pos_slice=...`) works too: only the positions it holds are counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .common import _frame, _get, _layer_index, _layers, _row
from .routing import expert_counts


# ----------------------------------------------------------------------------- labels and groups
def token_labels(segments, field: str | Callable = "part") -> list:
    """One label per token of the conversation: `segments.labels(field)`, a function of each row,
    or `segments` itself when it is already a list of labels."""
    if callable(field) and hasattr(segments, "rows"):
        out = [None] * segments.n_tokens
        for r in segments.rows:
            out[r.start : r.stop] = [field(r)] * (r.stop - r.start)
        return out
    if hasattr(segments, "labels"):
        return list(segments.labels(field))
    if isinstance(segments, Sequence) and not isinstance(segments, str):
        return list(segments)
    raise TypeError(f"segments must be v4lens.chat.segments(...) or one label per token, got {type(segments).__name__}")


def token_groups(segments, field: str | Callable = "part") -> tuple[list, torch.Tensor]:
    """(the group labels in order of first appearance, the group of each token: long [S], -1 = none)."""
    labels = token_labels(segments, field)
    order: dict = {}
    for label in labels:
        if label is not None and label not in order:
            order[label] = len(order)
    return list(order), torch.tensor([-1 if l is None else order[l] for l in labels], dtype=torch.long)


def _held(positions, n: int, n_tokens: int, batch: int) -> torch.Tensor:
    """The absolute positions [n] a value axis of length n holds (positions: None = 0..n-1, [n] or per-row [b, n])."""
    if positions is None:
        return torch.arange(n)
    held = torch.as_tensor(positions, dtype=torch.long).cpu()
    held = held[batch] if held.ndim == 2 else held.reshape(-1)
    if held.shape[0] != n:
        raise ValueError(f"positions has {held.shape[0]} entries but the values' last axis has {n}")
    return held % n_tokens if n_tokens else held


def _groups_at(groups: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """The group of each held position; -1 past the conversation (padding of a longer batch)."""
    inside = held < len(groups)
    return torch.where(inside, groups[held.clamp(max=max(len(groups) - 1, 0))], -1)


def _group_means(values: torch.Tensor, at: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """values [..., n], group per position [n] -> (NaN-ignoring mean per group [..., G], count [..., G])."""
    values = values.float()
    ok = ~values.isnan() & (at >= 0)  # [..., n]
    index = torch.where(at >= 0, at, n_groups)  # ungrouped positions -> a spare group
    sums = values.new_zeros(*values.shape[:-1], n_groups + 1).index_add_(-1, index, values.nan_to_num() * ok)
    counts = values.new_zeros(*values.shape[:-1], n_groups + 1).index_add_(-1, index, ok.float())
    sums, counts = sums[..., :n_groups], counts[..., :n_groups]
    return sums / counts, counts  # 0/0 = NaN for a group with no value


def per_segment(values, segments, field: str | Callable = "part", positions=None, index=None):
    """The mean of a per-token value over each segment group: a pandas Series (values [S]) or a
    DataFrame with one row per leading index and one column per group (values [R, S]).

    values: [S] or [R, S], the last axis over the conversation's tokens (NaN entries are ignored:
    a group's mean is over its tokens with a value; NaN where it has none). positions: the
    absolute positions the last axis holds, when it is not 0..S-1 (e.g. `cache.positions` of a
    position-sliced cache). index: labels of the R rows (e.g. layer names).

        recall = stats.indexer_recall(model, cache, 2)[0]       # [S]
        stats.per_segment(recall, seg)                           # part -> mean recall
        stats.per_segment(sink[:, 0].mean(1), seg, "role", index=layers)   # [L, S] -> layers x roles
    """
    import pandas as pd

    values = torch.as_tensor(values).detach().cpu()
    if values.ndim not in (1, 2):
        raise ValueError(f"per_segment: values must be [S] or [R, S], got shape {tuple(values.shape)} "
                         "(reduce the other axes first)")  # fmt: skip
    names, groups = token_groups(segments, field)
    held = _held(positions, values.shape[-1], len(groups), 0)
    if positions is None and values.shape[-1] != len(groups):
        raise ValueError(f"per_segment: values have {values.shape[-1]} positions, the segments {len(groups)} tokens "
                         "(pass positions= for a subset of the tokens)")  # fmt: skip
    means, _ = _group_means(values, _groups_at(groups, held), len(names))
    name = field if isinstance(field, str) else "segment"
    if values.ndim == 1:
        return pd.Series(means.tolist(), index=pd.Index(names, name=name), name="mean")
    return pd.DataFrame(means.tolist(), columns=pd.Index(names, name=name), index=index)


# ----------------------------------------------------------------------------- the cache and the conversation
def _conversation(cache, segments, field, batch: int, stat: str) -> tuple[list, torch.Tensor]:
    """token_groups(segments, field), after checking that row `batch` of the cache is the conversation."""
    if not getattr(cache, "has_batch_dim", True):
        raise ValueError(f"stats.{stat} needs a cache with its batch axis (run_with_cache without remove_batch_dim)")
    names, groups = token_groups(segments, field)
    tokens, ids = getattr(cache, "tokens", None), getattr(segments, "ids", None)
    if tokens is not None and ids is not None:
        row = tokens[batch].tolist() if tokens.ndim == 2 else tokens.tolist()
        if row[: len(ids)] != list(ids):
            raise ValueError(f"stats.{stat}: row {batch} of the cache ({len(row)} tokens) does not start with the "
                             f"segments' {len(ids)} tokens; cache the conversation itself: "
                             "model.run_with_cache(seg.tokens())")  # fmt: skip
    return names, groups


def _query_groups(cache, groups: torch.Tensor, n: int, batch: int) -> torch.Tensor:
    """The group of each cached query position (n of them) of row `batch`."""
    return _groups_at(groups, _held(getattr(cache, "positions", None), n, 0, batch))


# ----------------------------------------------------------------------------- sink mass
@torch.no_grad()
def sink_mass_by_segment(model, cache, segments, field: str | Callable = "part", layers=None, batch: int = 0,
                         per_head: bool = False):  # fmt: skip
    """Mean attention-sink probability per layer and segment group, from `attn.hook_sink` [b,h,p].

    One row per (layer, segment) — per (layer, head, segment) with per_head=True — with layer,
    block, layer_type, segment, tokens (the group's tokens in the cache) and sink_mass (mean over
    those query tokens and the heads).

        df = stats.sink_mass_by_segment(model, cache, seg)
        df.pivot(index="layer", columns="segment", values="sink_mass")
    """
    names, groups = _conversation(cache, segments, field, batch, "sink_mass_by_segment")
    rows = []
    for prefix in _layers(model, cache, layers):
        sink = _get(cache, f"{prefix}.attn.hook_sink", "sink_mass_by_segment")[batch].float().cpu()  # [h,p]
        at = _query_groups(cache, groups, sink.shape[-1], batch)
        means, counts = _group_means(sink if per_head else sink.mean(0), at, len(names))  # [h,G] or [G]
        for g, label in enumerate(names):
            if per_head:
                rows += [{**_row(model, prefix), "head": h, "segment": label, "tokens": int(counts[h, g]),
                          "sink_mass": float(means[h, g])} for h in range(sink.shape[0])]  # fmt: skip
            else:
                rows.append({**_row(model, prefix), "segment": label, "tokens": int(counts[g]),
                             "sink_mass": float(means[g])})  # fmt: skip
    return _frame(rows)


# ----------------------------------------------------------------------------- indexer picks
@torch.no_grad()
def indexer_picks_by_segment(model, cache, segments, field: str | Callable = "part", layers=None, batch: int = 0):
    """Where the Lightning Indexer's picks land: for each CSA layer and query segment, the share of
    its picks that falls in each segment (the tool results, the reasoning, ...).

    Pick w (`attn.indexer.hook_topk`, -1 = none) is compressed entry w, which stands for the
    window of tokens w·m … (w+1)·m − 1 (m = 4, the position it is rotated to); a pick counts for
    each segment by the share of that window's tokens in it, so the shares of one query segment
    sum to 1 over the segments (less where `field` leaves tokens unlabelled). A CSA entry also
    pools half of each token of the window before; this counts its own window only.

    One row per (layer, query segment, picked segment): layer, block, layer_type, query, segment,
    queries (query tokens with at least one pick), selective (those with more visible entries
    than the indexer keeps, where it really chooses), share (picks' share in `segment`, pooled over
    the queries' picks) and baseline (the share picking uniformly among each query's visible
    entries would give: what the segment's size and position alone explain).

        df = stats.indexer_picks_by_segment(model, cache, seg)
        df[df.query == "thinking"].pivot(index="layer", columns="segment", values="share")
    """
    stat = "indexer_picks_by_segment"
    names, groups = _conversation(cache, segments, field, batch, stat)
    G, rows = len(names), []
    for prefix in _layers(model, cache, layers, lambda l: model.cfg.layer_type(l) == "csa"):
        m = model.cfg.compress_ratio(_layer_index(model, prefix))
        picks = _get(cache, f"{prefix}.attn.indexer.hook_topk", stat)[batch].cpu()  # [p,k]
        q_at = _query_groups(cache, groups, picks.shape[0], batch)  # [p]
        held = _held(getattr(cache, "positions", None), picks.shape[0], 0, batch)  # absolute query positions
        # each entry's window as shares over the groups: [T, G] (tokens past the end or unlabelled count for none)
        T = len(groups) // m
        onehot = torch.zeros(T * m, G + 1)
        onehot[torch.arange(T * m), torch.where(groups[: T * m] >= 0, groups[: T * m], G)] = 1
        window = onehot.view(T, m, G + 1).mean(1)[:, :G]  # [T,G]
        valid = (picks >= 0) & (picks < T)
        landed = window[picks.clamp(0, max(T - 1, 0))] * valid[..., None] if T else torch.zeros(*picks.shape, G)
        n_picks = valid.sum(-1).float()  # [p]
        visible = torch.clamp((held + 1) // m, max=T)  # [p]: entries w < (t+1)//m are visible to query t
        cum = torch.cat([torch.zeros(1, G), window.cumsum(0)])  # [T+1,G]
        uniform = cum[visible] / visible.clamp(min=1)[:, None].float()  # [p,G]: mean window over visible entries
        for qg, query in enumerate(names):
            sel = (q_at == qg) & (n_picks > 0)
            total = n_picks[sel].sum()
            share = landed[sel].sum((0, 1)) / total  # [G]
            baseline = (uniform[sel] * n_picks[sel, None]).sum(0) / total
            selective = int((sel & (visible > picks.shape[-1])).sum())
            rows += [{**_row(model, prefix), "query": query, "segment": label, "queries": int(sel.sum()),
                      "selective": selective, "share": float(share[g]), "baseline": float(baseline[g])}
                     for g, label in enumerate(names)]  # fmt: skip
    return _frame(rows)


# ----------------------------------------------------------------------------- expert load
@torch.no_grad()
def expert_load_by_segment(model, cache, segments, field: str | Callable = "part", layers=None, batch: int = 0):
    """The experts each segment group's tokens are routed to, per layer (`mlp.hook_expert_ids`).

    One row per (layer, segment, expert): layer, block, layer_type, routing ("hash" / "learned"),
    segment, expert, count (the group's tokens routed to it), frac (count over the group's
    assignments in the layer) and lift (frac over the expert's share of the whole conversation's
    assignments: above 1, the segment uses the expert more than the conversation does).

        df = stats.expert_load_by_segment(model, cache, seg)
        df[df.layer == 3].pivot(index="segment", columns="expert", values="frac")
    """
    stat = "expert_load_by_segment"
    names, groups = _conversation(cache, segments, field, batch, stat)
    prefixes = _layers(model, cache, layers)
    if not prefixes:
        return _frame([])
    ids = _get(cache, f"{prefixes[0]}.mlp.hook_expert_ids", stat)
    at = _query_groups(cache, groups, ids.shape[1], batch).to(ids.device)
    in_row = torch.zeros(ids.shape[:2], dtype=torch.bool, device=ids.device)
    in_row[batch] = at >= 0  # the conversation's tokens of row `batch`
    everything = expert_counts(model, cache, mask=in_row, layers=prefixes).float().cpu()  # [L,E]
    overall = everything / everything.sum(-1, keepdim=True).clamp(min=1)
    per_group = []  # [L,E] counts of each group's tokens
    for g in range(len(names)):
        mask = torch.zeros_like(in_row)
        mask[batch] = at == g
        per_group.append(expert_counts(model, cache, mask=mask, layers=prefixes).cpu())
    rows = []
    for i, prefix in enumerate(prefixes):
        label = _row(model, prefix)
        label["routing"] = "hash" if model.cfg.is_hash_layer(label["layer"]) else "learned"
        for segment, counts in zip(names, per_group):
            frac = counts[i] / counts[i].sum().clamp(min=1)
            rows += [{**label, "segment": segment, "expert": e, "count": int(counts[i, e]), "frac": float(frac[e]),
                      "lift": float(frac[e] / overall[i, e])} for e in range(counts.shape[1])]  # fmt: skip
    return _frame(rows)

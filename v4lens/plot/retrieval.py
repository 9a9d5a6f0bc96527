"""Retrieval in the compressed layers: what the Lightning Indexer scores and picks (CSA), and what
each compressed entry pools (CSA and HCA).

Each function takes the model and a `source` (a cache from `model.run_with_cache`, or a prompt /
tokens, which are run caching only the hooks the figure reads) and returns a plotly Figure.
Compressed entries are labelled by the tokens they pool, "w3: 8–15 'abc…'":

- CSA (m = 4, overlapping): entry w pools [w·m − m, w·m + m), window w−1's a-halves and window
  w's b-halves (entry 0 only its own window);
- HCA (any other m): entry w pools [w·m, (w+1)·m).

    fig = indexer_scores(model, "The quick brown fox jumps over the lazy dog", layer=1)
    fig = compressed_entries(model, cache, layer=2)

The helpers below (`entry_span`, `entry_labels`, `layer_info`, `one_prompt`, `query_rows`,
`keep_columns`) are shared with `v4lens.plot.attention`.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
import torch

from . import style

MAX_ENTRIES = 256  # default cap on compressed entries (columns or rows) drawn


# ----------------------------------------------------------------------------- shared helpers
def layer_info(model, layer: int | str) -> tuple[str, int, str, int]:
    """(hook prefix, layer index, layer type "sliding" / "csa" / "hca", compress ratio m) of a block."""
    prefix = style.block_prefix(model, layer)
    kind, i = prefix.split(".")
    index = int(i) + (model.cfg.n_layers if kind == "mtp" else 0)
    return prefix, index, model.cfg.layer_type(index), model.cfg.compress_ratio(index)


def layers_of_type(model, kind: str) -> list[int]:
    return [l for l in range(model.cfg.n_layers) if model.cfg.layer_type(l) == kind]


def one_prompt(cache, name: str, batch: int, plot: str) -> torch.Tensor:
    """cache[name] for prompt `batch` (a batch-less cache has just one), on the CPU."""
    t = style.cached(cache, name, plot)
    return (t[batch] if cache.has_batch_dim else t).cpu()


def token_strings(model, cache, batch: int = 0) -> list[str]:
    """The bare token text of every position ("pos·token" labels without the "pos·")."""
    return [label.split("·", 1)[1] for label in style.token_labels(model, cache, batch=batch)]


def snippet(strings: list[str], n: int = 10) -> str:
    """Tokens joined into one short quoted string, cut at n characters."""
    text = "".join(strings)
    return repr(text if len(text) <= n else text[:n] + "…")


def entry_span(ratio: int, w: int) -> tuple[int, int]:
    """Token positions [start, stop) that compressed entry w pools: CSA (ratio 4, overlapping)
    [w·m − m, w·m + m) clipped at 0; HCA [w·m, (w+1)·m)."""
    if ratio == 4:
        return max(0, (w - 1) * ratio), (w + 1) * ratio
    return w * ratio, (w + 1) * ratio


def entry_labels(ratio: int, n_entries: int, strings: list[str]) -> list[str]:
    """Labels "w3: 8–15 'abc…'" for each entry: its index, the token span it pools (inclusive) and those tokens."""
    labels = []
    for w in range(n_entries):
        a, b = entry_span(ratio, w)
        labels.append(f"w{w}: {a}–{b - 1} {snippet(strings[a:b])}")
    return labels


def query_rows(cache, n_rows: int, max_positions: int, focus: int | None = None, positions=None):
    """Which query rows to draw: (indices into the cached position axis, their absolute positions).

    positions: absolute positions to draw (negative counts from the end), else `style.pick_positions`
    chooses at most max_positions ending at `focus` (absolute; default the last). A position-sliced
    cache (`cache.positions`) offers only the positions it holds.
    """
    S = cache.tokens.shape[-1] if cache.tokens is not None else n_rows
    held = list(range(n_rows)) if cache.positions is None else [int(p) for p in cache.positions]
    if positions is not None:
        where = {p: i for i, p in enumerate(held)}
        wanted = [int(p) % S for p in ([positions] if isinstance(positions, int) else positions)]
        missing = [p for p in wanted if p not in where]
        if missing:
            raise ValueError(f"positions {missing} are not in the cache (it holds {held[0]}..{held[-1]})")
        rows = [where[p] for p in wanted]
    else:
        at = None if focus is None else max(0, sum(p <= focus % S for p in held) - 1)
        rows = style.pick_positions(len(held), max_positions, at)
    return rows, [held[r] for r in rows]


def keep_columns(values: torch.Tensor, max_n: int, must: set[int] = frozenset()) -> list[int]:
    """At most max_n column indices of values [rows, N] (NaN = empty), in order: the columns in
    `must` first, then those with the largest value in any row."""
    N = values.shape[1]
    if N <= max_n:
        return list(range(N))
    peak = values.nan_to_num(nan=-math.inf).amax(0) if values.shape[0] else values.new_zeros(N)
    order = sorted(range(N), key=lambda j: (j in must, float(peak[j])), reverse=True)
    return sorted(order[:max_n])


def _height(n_rows: int) -> int:
    return min(2400, max(420, 16 * n_rows + 180))


# ----------------------------------------------------------------------------- figures
@torch.no_grad()
def indexer_scores(model, source, layer: int | str, batch: int = 0, max_positions: int = style.MAX_POSITIONS,
                   focus: int | None = None, max_entries: int = MAX_ENTRIES, segments=None,
                   segment_field="part") -> go.Figure:  # fmt: skip
    """Lightning Indexer scores of a CSA layer, with its top-k picks marked.

    Heatmap: y = query positions ("pos·token", first at the top), x = compressed entries labelled
    "w3: 8–15 'tok…'" by the tokens they pool, z = `indexer.hook_scores` (blank where the entry is
    not yet visible to the query). Open circles mark the entries `indexer.hook_topk` picked (empty
    picks, -1, are not drawn). Hover: query token, entry span and text, score, pick rank. Long
    inputs draw max_positions queries ending at `focus` and at most max_entries entries (the picked
    ones first, then the highest-scoring). Raises ValueError on a sliding or HCA layer.
    segments: `v4lens.chat.segments(...)` of the prompt colours the queries, and each entry by the
    segment most of its own window's tokens (w·m … (w+1)·m − 1) are in, by `segment_field`
    ("part", "role", "turn", ...), with a legend: which parts the picks come from at a glance.

        fig = indexer_scores(model, "The quick brown fox jumps over the lazy dog", layer=1)
        fig = indexer_scores(model, seg.tokens(), layer=2, segments=seg)
    """
    plot = "indexer_scores"
    prefix, _, kind, ratio = layer_info(model, layer)
    if kind != "csa":
        raise ValueError(
            f"{plot}: {prefix} is a {kind} layer; the Lightning Indexer exists only on CSA layers "
            f"(here layers {layers_of_type(model, 'csa')})"
        )
    names = [f"{prefix}.attn.indexer.hook_scores", f"{prefix}.attn.indexer.hook_topk"]
    cache = style.as_cache(model, source, names_filter=names)
    scores = one_prompt(cache, names[0], batch, plot).float()  # [p,T]
    picks = one_prompt(cache, names[1], batch, plot)  # [p,k]
    rows, qpos = query_rows(cache, scores.shape[0], max_positions, focus)
    z = scores[rows].masked_fill(torch.isinf(scores[rows]), math.nan)  # [P,T]
    picks = picks[rows]
    cols = keep_columns(z, max_entries, must={int(w) for w in picks.flatten() if w >= 0})
    z = z[:, cols]

    labels = style.token_labels(model, cache, batch=batch)
    ylabels = [labels[p] for p in qpos]
    elabels = entry_labels(ratio, scores.shape[1], token_strings(model, cache, batch))
    xlabels = [elabels[w] for w in cols]
    rank = {(i, int(w)): r for i in range(len(rows)) for r, w in enumerate(picks[i].tolist()) if w >= 0}
    hover = [
        [f"query {ylabels[i]}<br>entry {xlabels[j]}<br>"
         + ("not visible yet" if math.isnan(z[i, j]) else f"score {float(z[i, j]):.4g}")
         + (f"<br>picked, rank {rank[i, w] + 1}" if (i, w) in rank else "")
         for j, w in enumerate(cols)]
        for i in range(len(rows))
    ]  # fmt: skip

    fig = style.figure(
        f"Indexer scores · {style.layer_label(model, prefix)} · top-{picks.shape[-1]} picks circled",
        height=_height(len(rows)), xaxis_title="compressed entry (tokens it pools)", yaxis_title="query position·token",
    )  # fmt: skip
    fig.add_heatmap(
        z=z.numpy(), x=xlabels, y=ylabels, hovertext=hover, hoverinfo="text", name="score",
        colorscale=style.SEQUENTIAL, colorbar={"title": "score"},
    )  # fmt: skip
    where = {w: j for j, w in enumerate(cols)}
    picked = [(i, int(w), r) for i in range(len(rows)) for r, w in enumerate(picks[i].tolist()) if w in where]
    fig.add_scatter(
        x=[xlabels[where[w]] for _, w, _ in picked], y=[ylabels[i] for i, _, _ in picked], mode="markers",
        name="picked", marker={"symbol": "circle-open", "size": 9, "color": "white", "line": {"width": 2}},
        hovertext=[f"query {ylabels[i]}<br>picks {elabels[w]} (rank {r + 1})" for i, w, r in picked],
        hoverinfo="text", showlegend=False,
    )  # fmt: skip
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category", tickangle=-45)
    fig.update_layout(showlegend=False)
    if segments is not None:
        S = len(labels)
        style.mark_segments(fig, segments, "y", ylabels, qpos, segment_field, n_tokens=S)
        style.mark_segments(fig, segments, "x", xlabels, [(w * ratio, (w + 1) * ratio) for w in cols], segment_field, S)
    return fig


@torch.no_grad()
def compressed_entries(model, source, layer: int | str, batch: int = 0, max_entries: int = MAX_ENTRIES,
                       focus: int | None = None, indexer: bool = False, reduce: str = "mean", segments=None,
                       segment_field="part") -> go.Figure:  # fmt: skip
    """Which tokens each compressed entry pools, and with what weights.

    Heatmap: y = entries ("w3: 8–15 'tok…'", first at the top), x = the entry's source slots, named
    by their offset from the span start ("+0 a" … for CSA: slots 0..m-1 are window w−1's a-halves,
    m..2m-1 window w's b-halves; "+0" … for HCA), z = `compressor.hook_weights` [T, slots, c]
    reduced over channels (`reduce`: "mean" or "max"); blank where a slot has no token (CSA
    entry 0). Each cell shows and hovers the slot's token. indexer=True draws the Lightning
    Indexer's own compressor of a CSA layer instead. Long inputs draw max_entries entries ending
    at the one that holds token `focus` (default: the last). Raises ValueError on a sliding layer.
    segments: `v4lens.chat.segments(...)` of the prompt colours each entry by the segment most of
    its own window's tokens are in (`segment_field`: "part", "role", ...), with a legend.

        fig = compressed_entries(model, cache, layer=2)
    """
    plot = "compressed_entries"
    prefix, _, kind, ratio = layer_info(model, layer)
    if kind == "sliding":
        raise ValueError(f"{plot}: {prefix} is a sliding-window layer and has no compressor (CSA / HCA layers: "
                         f"{layers_of_type(model, 'csa') + layers_of_type(model, 'hca')})")  # fmt: skip
    if indexer and kind != "csa":
        raise ValueError(f"{plot}: indexer=True needs a CSA layer; {prefix} is {kind}")
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    m = 4 if indexer else ratio
    name = f"{prefix}.attn.{'indexer.' if indexer else ''}compressor.hook_weights"
    cache = style.as_cache(model, source, names_filter=[name])
    weights = one_prompt(cache, name, batch, plot).float()  # [T,slots,c]
    T, slots = weights.shape[:2]
    if T == 0:
        raise ValueError(f"{plot}: the input is shorter than one window (m = {m}): no compressed entries yet")
    z_all = weights.mean(-1) if reduce == "mean" else weights.amax(-1)  # [T,slots]
    lo, hi = weights.amin(-1), weights.amax(-1)

    S = cache.tokens.shape[-1]
    at = None if focus is None else min(T - 1, (focus % S) // m)
    entries = style.pick_positions(T, max_entries, at)
    labels = style.token_labels(model, cache, batch=batch)
    strings = token_strings(model, cache, batch)
    elabels = entry_labels(m, T, strings)
    overlap = m == 4
    xlabels = [f"+{s} {'ab'[s // m]}" if overlap else f"+{s}" for s in range(slots)]

    def source_token(w: int, s: int) -> int:  # the token position slot s of entry w reads (-1: none)
        p = (w - 1) * m + s if overlap else w * m + s
        return p if p >= 0 else -1

    z, text, hover = [], [], []
    for w in entries:
        toks = [source_token(w, s) for s in range(slots)]
        z.append([float(z_all[w, s]) if p >= 0 else math.nan for s, p in enumerate(toks)])
        text.append([strings[p] if p >= 0 else "" for p in toks])
        hover.append([
            f"entry {elabels[w]}<br>slot {xlabels[s]}: "
            + (f"token {labels[p]}<br>weight {reduce} {z_all[w, s]:.4f} (channels {lo[w, s]:.3f}–{hi[w, s]:.3f})"
               if p >= 0 else "no token (before the start)")
            for s, p in enumerate(toks)
        ])  # fmt: skip

    owner = "indexer compressor" if indexer else "compressor"
    fig = style.figure(
        f"Compressed entries · {style.layer_label(model, prefix)} (m={m}) · {owner} pooling weights, {reduce} over channels",
        height=_height(len(entries)), xaxis_title="source slot (offset from the span start" + (
            "; a = previous window's a-half, b = own window's b-half)" if overlap else ")"),
        yaxis_title="compressed entry (tokens it pools)",
    )  # fmt: skip
    show_text = len(entries) * slots <= 2048
    fig.add_heatmap(
        z=z, x=xlabels, y=[elabels[w] for w in entries], hovertext=hover, hoverinfo="text", name="weight",
        text=text, texttemplate="%{text}" if show_text else None, colorscale=style.SEQUENTIAL, zmin=0,
        colorbar={"title": "weight"},
    )  # fmt: skip
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    if segments is not None:
        style.mark_segments(fig, segments, "y", [elabels[w] for w in entries], [(w * m, (w + 1) * m) for w in entries],
                            segment_field, n_tokens=S)  # fmt: skip
    return fig

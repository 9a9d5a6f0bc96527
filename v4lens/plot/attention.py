"""Attention figures in V4's sparse view: each query's own candidates, never an S×S matrix.

A query at position t attends over its candidate set only (docs/hooks.md, `attn.hook_key_index`):
the W most recent tokens, then the compressed entries (the indexer's picks on a CSA layer,
every visible entry on an HCA layer), plus the sink, which absorbs the rest of the mass.

    fig = attention_pattern(model, "The quick brown fox jumps over the lazy dog", layer=1, head=0)
    fig = sink_mass(model, cache)
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
import torch

from ..analysis import stats, token_space
from . import style
from .retrieval import MAX_ENTRIES, entry_labels, keep_columns, layer_info, one_prompt, query_rows, token_strings


@torch.no_grad()
def attention_pattern(model, source, layer: int | str, head: int, batch: int = 0, positions=None,
                      max_positions: int = style.MAX_POSITIONS, focus: int | None = None,
                      max_entries: int = MAX_ENTRIES, cell_text: bool | None = None,
                      space: str = "candidates", segments=None, segment_field="part") -> go.Figure:  # fmt: skip
    """One head's attention over each query's candidates: window tokens, compressed entries, sink.

    Heatmap: y = query positions ("pos·token", first at the top); x = candidate columns in three
    groups: "window" (t−W+1 … t, the raw tokens, oldest first), "compressed" ("pick 1" … on a
    CSA layer, the indexer's picks in rank order; "w0" … on an HCA layer, entry w), and "sink";
    z = `attn.hook_pattern` of the head (blank where a candidate slot is empty) and
    `attn.hook_sink` in the sink column, so each row sums to 1. Which token or entry a cell is
    comes from `attn.hook_key_index`; hover shows it ("key 35·tok", "entry w9: 32–39 'abc…'")
    and the probability, and small figures print it in the cell (`cell_text`, default: automatic).
    positions: absolute query positions to draw; else max_positions ending at `focus` (default:
    the last). When a layer has more than max_entries compressed columns, the largest are kept and
    the rest summed into an "other entries" column (rows still sum to 1).

    space="tokens" draws the same attention over the source tokens instead
    (`v4lens.analysis.token_attention`): x = tokens 0 … the last query drawn, each compressed
    entry's probability spread over the tokens it pooled by the compressor's pooling weights, a
    window token's kept; the sink column stays, so rows still sum to 1 (cells after the query are
    blank). More than max_entries token columns: the largest are kept, the rest summed into
    "other tokens".

    segments: `v4lens.chat.segments(...)` of the prompt colours the token labels (the queries, and
    the source tokens with space="tokens") by `segment_field` ("part", "role", "turn", ...), with a
    legend (`style.mark_segments`).

        fig = attention_pattern(model, "The quick brown fox jumps over the lazy dog", layer=1, head=0)
        fig = attention_pattern(model, cache, layer=2, head=0, space="tokens")
        fig = attention_pattern(model, seg.tokens(), layer=2, head=0, segments=seg)
    """
    plot = "attention_pattern"
    prefix, _, kind, ratio = layer_info(model, layer)
    H = model.cfg.n_heads
    if not -H <= head < H:
        raise IndexError(f"{plot}: head {head} out of range ({H} heads)")
    if space not in ("candidates", "tokens"):
        raise ValueError(f"{plot}: space must be 'candidates' or 'tokens', got {space!r}")
    if space == "tokens":
        fig, xcols, ycols, n_tokens = _token_space(model, source, prefix, head % H, batch, positions, max_positions,
                                                   focus, max_entries, cell_text)  # fmt: skip
        if segments is not None:
            style.mark_segments(fig, segments, "y", *ycols, segment_field, n_tokens)
            style.mark_segments(fig, segments, "x", *xcols, segment_field, n_tokens)
        return fig
    names = [f"{prefix}.attn.hook_key_index", f"{prefix}.attn.hook_pattern", f"{prefix}.attn.hook_sink"]
    cache = style.as_cache(model, source, names_filter=names)
    key_index = one_prompt(cache, names[0], batch, plot)  # [p,K]
    pattern = one_prompt(cache, names[1], batch, plot)[head].float()  # [p,K]
    sink = one_prompt(cache, names[2], batch, plot)[head].float()  # [p]
    rows, qpos = query_rows(cache, key_index.shape[0], max_positions, focus, positions)
    key_index, pattern, sink = key_index[rows], pattern[rows], sink[rows]
    probs = pattern.masked_fill(key_index < 0, math.nan)  # [P,K]

    # columns: the window, the compressed candidates (at most max_entries, the rest summed), the sink
    W = min(model.cfg.window_size, key_index.shape[1])
    comp = keep_columns(probs[:, W:], max_entries)
    cols = list(range(W)) + [W + j for j in comp]
    dropped = sorted(set(range(W, key_index.shape[1])) - set(cols))
    parts = [probs[:, cols]] + ([pattern[:, dropped].sum(-1, keepdim=True)] if dropped else []) + [sink[:, None]]
    z = torch.cat(parts, dim=1)  # [P, columns]
    xlabels = [f"t−{W - 1 - j}" if j < W - 1 else "t" for j in range(W)]
    xlabels += [f"pick {j + 1}" if kind == "csa" else f"w{j}" for j in comp]
    xlabels += (["other entries"] if dropped else []) + ["sink"]

    S = cache.tokens.shape[-1]
    labels = style.token_labels(model, cache, batch=batch)
    strings = token_strings(model, cache, batch)
    elabels = entry_labels(ratio, S // ratio, strings) if ratio else []
    ylabels = [labels[p] for p in qpos]

    def describe(idx: int) -> tuple[str, str]:  # (hover text, cell text) of candidate key_index idx
        if idx < 0:
            return "empty slot", ""
        if idx < S:
            return f"key {labels[idx]}", strings[idx]
        return f"entry {elabels[idx - S]}", elabels[idx - S].split(":")[0]

    hover, text = [], []
    for i in range(len(rows)):
        cells = [describe(int(key_index[i, c])) for c in cols]
        cells += [(f"{len(dropped)} entries not drawn, summed", "")] if dropped else []
        cells += [("sink (no key: the mass no candidate takes)", "sink")]
        hover.append([
            f"query {ylabels[i]}<br>{xlabels[j]}: {what}<br>"
            + ("p = –" if math.isnan(z[i, j]) else f"p = {float(z[i, j]):.4f}")
            for j, (what, _) in enumerate(cells)
        ])  # fmt: skip
        text.append([t for _, t in cells])

    fig = style.figure(
        f"Attention pattern · {style.layer_label(model, prefix)} · head {head % H} (window · compressed · sink)",
        height=min(2400, max(420, 16 * len(rows) + 200)), xaxis_title="candidate (per query)",
        yaxis_title="query position·token",
    )  # fmt: skip
    if cell_text is None:
        cell_text = len(rows) * len(xlabels) <= 1200
    fig.add_heatmap(
        z=z.numpy(), x=xlabels, y=ylabels, hovertext=hover, hoverinfo="text", text=text,
        texttemplate="%{text}" if cell_text else None, textfont={"size": 9}, name="probability",
        colorscale=style.SEQUENTIAL, zmin=0, zmax=1, colorbar={"title": "p"},
    )  # fmt: skip
    _group_marks(fig, [("window", 0, W), ("compressed", W, len(xlabels) - 1), ("sink", len(xlabels) - 1, len(xlabels))])
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category", tickangle=-45)
    if segments is not None:
        style.mark_segments(fig, segments, "y", ylabels, qpos, segment_field, n_tokens=S)
    return fig


def _token_space(model, source, prefix: str, head: int, batch: int, positions, max_positions: int,
                 focus: int | None, max_tokens: int, cell_text: bool | None):  # fmt: skip
    """attention_pattern(space="tokens"): one head's `token_attention` over the source tokens, plus the sink.
    Returns (the figure, (x labels, their tokens), (y labels, their tokens), the input's token count)."""
    plot = "attention_pattern"
    cache = style.as_cache(model, source, names_filter=token_space.names(model, prefix))
    n_rows = one_prompt(cache, f"{prefix}.attn.hook_key_index", batch, plot).shape[0]
    _, qpos = query_rows(cache, n_rows, max_positions, focus, positions)
    res = token_space.token_attention(model, cache, prefix, queries=qpos, heads=[head])
    b = batch if getattr(cache, "has_batch_dim", True) else 0
    probs, sink = res.pattern[b, 0].cpu(), res.sink[b, 0].cpu()  # [P,S], [P]
    last = max(qpos)
    future = torch.arange(last + 1)[None, :] > torch.tensor(qpos)[:, None]  # [P, tokens]: after the query
    probs = probs[:, : last + 1].masked_fill(future, math.nan)
    cols = keep_columns(probs, max_tokens)
    dropped = sorted(set(range(last + 1)) - set(cols))
    parts = [probs[:, cols]] + ([probs[:, dropped].nansum(-1, keepdim=True)] if dropped else []) + [sink[:, None]]
    z = torch.cat(parts, dim=1)  # [P, columns]
    labels = style.token_labels(model, cache, batch=batch)
    xlabels = [labels[t] for t in cols] + (["other tokens"] if dropped else []) + ["sink"]
    ylabels = [labels[p] for p in qpos]
    hover = [[f"query {ylabels[i]}<br>{'token ' if j < len(cols) else ''}{x}: "
              + ("–" if math.isnan(z[i, j]) else f"p = {float(z[i, j]):.4f}") for j, x in enumerate(xlabels)]
             for i in range(len(qpos))]  # fmt: skip
    if cell_text is None:
        cell_text = len(qpos) * len(xlabels) <= 1200
    text = [["" if math.isnan(v) else f"{v:.2f}" for v in row] for row in z.tolist()]
    fig = style.figure(
        f"Attention in token space · {style.layer_label(model, prefix)} · head {head} (entries spread over their tokens)",
        height=min(2400, max(420, 16 * len(qpos) + 200)), xaxis_title="source token", yaxis_title="query position·token",
    )  # fmt: skip
    fig.add_heatmap(
        z=z.numpy(), x=xlabels, y=ylabels, hovertext=hover, hoverinfo="text", text=text,
        texttemplate="%{text}" if cell_text else None, textfont={"size": 9}, name="probability",
        colorscale=style.SEQUENTIAL, zmin=0, zmax=1, colorbar={"title": "p"},
    )  # fmt: skip
    _group_marks(fig, [("tokens", 0, len(xlabels) - 1), ("sink", len(xlabels) - 1, len(xlabels))])
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category", tickangle=-45)
    xtokens = list(cols) + [None] * (len(xlabels) - len(cols))  # "other tokens" and "sink" are no token
    return fig, (xlabels, xtokens), (ylabels, list(qpos)), len(labels)


def _group_marks(fig: go.Figure, groups: list[tuple[str, int, int]]) -> None:
    """Name each non-empty column group [start, stop) above the plot and separate groups by lines."""
    for name, start, stop in groups:
        if stop <= start:
            continue
        fig.add_annotation(x=(start + stop - 1) / 2, y=1.0, xref="x", yref="paper", yanchor="bottom",
                           text=f"<b>{name}</b>", showarrow=False)  # fmt: skip
        if start > 0:
            fig.add_vline(x=start - 0.5, line={"color": "#444", "width": 1.5, "dash": "dot"})


@torch.no_grad()
def sink_mass(model, source, layers=None, mask=None, positions=None) -> go.Figure:
    """Mean attention-sink probability per layer and head (`v4lens.stats.sink_mass`).

    Heatmap: y = layers ("L1 csa", …; MTP blocks when the cache has them), x = heads, z = the
    sink's mean probability over the selected tokens (`attn.hook_sink`), printed in each cell.
    layers / mask / positions select as in `v4lens.stats`.

        fig = sink_mass(model, "The quick brown fox")
    """
    cache = style.as_cache(model, source, names_filter=stats.names_filter("sink_mass"))
    prefixes = stats.block_prefixes(model, cache) if layers is None else [style.block_prefix(model, l) for l in layers]
    mass = stats.sink_mass(model, cache, mask=mask, positions=positions, layers=prefixes).float().cpu()  # [L,H]
    rows = [style.layer_label(model, p) for p in prefixes]
    heads = [f"h{h}" for h in range(mass.shape[1])]
    hover = [[f"{rows[l]} · head {h}<br>sink mass {float(mass[l, h]):.4f}" for h in range(len(heads))]
             for l in range(len(rows))]  # fmt: skip
    fig = style.figure("Attention-sink mass per head", height=max(360, 32 * len(rows) + 160),
                       xaxis_title="head", yaxis_title="layer")  # fmt: skip
    fig.add_heatmap(
        z=mass.numpy(), x=heads, y=rows, hovertext=hover, hoverinfo="text", text=[[f"{v:.2f}" for v in r] for r in
        mass.tolist()], texttemplate="%{text}", colorscale=style.SEQUENTIAL, zmin=0, colorbar={"title": "sink"},
    )  # fmt: skip
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    return fig

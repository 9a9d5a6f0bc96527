"""Retrieval, attention and analysis figures (v4lens.plot.retrieval / attention / analysis) on tiny256.

Layers of tiny256: 0 sliding, 1 CSA (top-3, m=4), 2 HCA (m=6), 3 CSA; window 8; 4 heads.
"""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from v4lens import stats
from v4lens.analysis.decomposition import decompose
from v4lens.analysis.patching import get_act_patch_attn_out
from v4lens.plot import analysis, attention, retrieval, style

pytestmark = pytest.mark.usefixtures("single_thread")

W = 8  # tiny256's window


@pytest.fixture(scope="module")
def cache(tiny256, tokens_2x40):
    return tiny256.run_with_cache(tokens_2x40)[1]


@pytest.fixture(scope="module")
def long_cache(tiny256):
    tokens = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(7))
    names = lambda n: (
        n.startswith("blocks.") and ("attn.hook_" in n or "compressor.hook_weights" in n or "indexer.hook_" in n)
    )
    return tiny256.run_with_cache(tokens, names_filter=names)[1]


def z_of(fig: go.Figure) -> np.ndarray:
    return np.asarray(fig.data[0].z, dtype=float)


def total_z(fig: go.Figure) -> int:
    return sum(np.asarray(t.z).size for t in fig.data if getattr(t, "z", None) is not None)


def same(a, b) -> bool:
    return np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), equal_nan=True, atol=1e-6)


def spy_filter(monkeypatch) -> list:
    """Record the names_filter each figure passes to style.as_cache."""
    seen, original = [], style.as_cache

    def as_cache(model, source, names_filter=None):
        seen.append(names_filter)
        return original(model, source, names_filter=names_filter)

    monkeypatch.setattr(style, "as_cache", as_cache)
    return seen


def keeps(names_filter, name: str) -> bool:
    return names_filter(name) if callable(names_filter) else name in names_filter


# ----------------------------------------------------------------------------- indexer scores
@pytest.mark.parametrize("batch", [0, 1])
def test_indexer_scores_heatmap_and_picks(tiny256, cache, batch):
    fig = retrieval.indexer_scores(tiny256, cache, layer=1, batch=batch)
    assert [type(t) for t in fig.data] == [go.Heatmap, go.Scatter]
    scores = cache["blocks.1.attn.indexer.hook_scores"][batch]  # [40, 10]
    z = z_of(fig)
    assert z.shape == (40, 10)
    assert same(z, scores.masked_fill(torch.isinf(scores), math.nan))
    assert np.isnan(z[0]).all() and not np.isnan(z[-1]).any()  # nothing visible at t=0, all at t=39

    picks = cache["blocks.1.attn.indexer.hook_topk"][batch]
    labels = style.token_labels(tiny256, cache, batch=batch)
    xlabels = list(fig.data[0].x)
    expected = {(labels[t], xlabels[int(w)]) for t in range(40) for w in picks[t] if w >= 0}
    marks = list(zip(fig.data[1].y, fig.data[1].x))
    assert len(marks) == int((picks >= 0).sum()) and set(marks) == expected


def test_indexer_entry_labels_and_hover(tiny256, cache):
    fig = retrieval.indexer_scores(tiny256, cache, layer=3)
    strings = [s.split("·", 1)[1] for s in style.token_labels(tiny256, cache)]
    for w, label in enumerate(fig.data[0].x):  # CSA entry w pools [4w-4, 4w+4)
        a, b = max(0, 4 * w - 4), 4 * w + 4
        assert label.startswith(f"w{w}: {a}–{b - 1} ")
        assert label.endswith(retrieval.snippet(strings[a:b]))
    labels = style.token_labels(tiny256, cache)
    for i, row in enumerate(fig.data[0].hovertext):
        assert all(labels[i] in h for h in row)
    assert "w9: 32–39" in fig.data[0].hovertext[39][9] and "score" in fig.data[0].hovertext[39][9]
    assert "not visible" in fig.data[0].hovertext[0][0]


def test_indexer_scores_from_tokens_caches_only_its_hooks(tiny256, cache, tokens_2x40, monkeypatch):
    seen = spy_filter(monkeypatch)
    fig = retrieval.indexer_scores(tiny256, tokens_2x40, layer=1, batch=1)
    assert keeps(seen[0], "blocks.1.attn.indexer.hook_scores") and not keeps(seen[0], "blocks.1.hook_mlp_out")
    assert same(z_of(fig), z_of(retrieval.indexer_scores(tiny256, cache, layer=1, batch=1)))


@pytest.mark.parametrize("layer, kind", [(0, "sliding"), (2, "hca")])
def test_indexer_scores_rejects_non_csa_layers(tiny256, cache, layer, kind):
    with pytest.raises(ValueError, match=f"{kind} layer.*only on CSA layers"):
        retrieval.indexer_scores(tiny256, cache, layer=layer)


# ----------------------------------------------------------------------------- compressed entries
def test_compressed_entries_hca(tiny256, cache, tokens_2x40):
    fig = retrieval.compressed_entries(tiny256, cache, layer=2, batch=1)
    weights = cache["blocks.2.attn.compressor.hook_weights"][1]  # [6, 6, c]
    assert [type(t) for t in fig.data] == [go.Heatmap]
    assert same(z_of(fig), weights.mean(-1))
    assert len(fig.data[0].y) == 6 and list(fig.data[0].x) == [f"+{s}" for s in range(6)]
    strings = [s.split("·", 1)[1] for s in style.token_labels(tiny256, cache, batch=1)]
    for w, label in enumerate(fig.data[0].y):  # HCA entry w pools [6w, 6w+6)
        assert label.startswith(f"w{w}: {6 * w}–{6 * w + 5} ")
        assert list(fig.data[0].text[w]) == strings[6 * w : 6 * w + 6]
    assert same(z_of(retrieval.compressed_entries(tiny256, tokens_2x40, layer=2, batch=1)), z_of(fig))
    assert same(z_of(retrieval.compressed_entries(tiny256, cache, layer=2, batch=1, reduce="max")), weights.amax(-1))


@pytest.mark.parametrize("indexer", [False, True])
def test_compressed_entries_csa_overlap(tiny256, cache, indexer):
    fig = retrieval.compressed_entries(tiny256, cache, layer=1, indexer=indexer)
    name = "blocks.1.attn." + ("indexer." if indexer else "") + "compressor.hook_weights"
    z, mean = z_of(fig), cache[name][0].mean(-1)  # [10, 8]
    assert z.shape == (10, 8) and len(fig.data[0].x) == 8
    assert np.isnan(z[0, :4]).all() and same(z[0, 4:], mean[0, 4:])  # entry 0 has no previous window
    assert same(z[1:], mean[1:])
    strings = [s.split("·", 1)[1] for s in style.token_labels(tiny256, cache)]
    assert list(fig.data[0].text[3]) == strings[8:16]  # slot s of entry w reads token 4(w-1)+s
    assert "token 8·" in fig.data[0].hovertext[3][0] and "before the start" in fig.data[0].hovertext[0][0]


def test_compressed_entries_errors(tiny256, cache):
    with pytest.raises(ValueError, match="no compressor"):
        retrieval.compressed_entries(tiny256, cache, layer=0)
    with pytest.raises(ValueError, match="needs a CSA layer"):
        retrieval.compressed_entries(tiny256, cache, layer=2, indexer=True)


# ----------------------------------------------------------------------------- attention pattern
@pytest.mark.parametrize("layer, n_comp", [(0, 0), (1, 3), (2, 6), (3, 3)])
def test_attention_pattern_sparse_view(tiny256, cache, layer, n_comp):
    head, batch = 2, 1
    fig = attention.attention_pattern(tiny256, cache, layer=layer, head=head, batch=batch)
    z = z_of(fig)
    assert [type(t) for t in fig.data] == [go.Heatmap]
    assert z.shape == (40, W + n_comp + 1) and list(fig.data[0].x)[-1] == "sink"
    assert np.allclose(np.nansum(z, axis=1), 1.0, atol=1e-5)  # window + compressed + sink
    prefix = f"blocks.{layer}.attn"
    key_index = cache[f"{prefix}.hook_key_index"][batch]
    pattern = cache[f"{prefix}.hook_pattern"][batch, head].masked_fill(key_index < 0, math.nan)
    assert same(z[:, :-1], pattern) and same(z[:, -1], cache[f"{prefix}.hook_sink"][batch, head])

    labels = style.token_labels(tiny256, cache, batch=batch)
    hover = fig.data[0].hovertext
    for t in (0, 5, 39):
        assert all(labels[t] in h for h in hover[t])  # the query token on every cell
        for j in range(W):  # window column j holds key t-W+1+j
            key = t - W + 1 + j
            assert (f"key {labels[key]}" in hover[t][j]) if key >= 0 else ("empty" in hover[t][j])
    if n_comp:
        S = 40
        for j in range(W, W + n_comp):
            idx = int(key_index[39, j])
            if idx >= 0:
                ratio = 4 if layer != 2 else 6
                a, b = retrieval.entry_span(ratio, idx - S)
                assert f"entry w{idx - S}: {a}–{b - 1} " in hover[39][j]


def test_attention_pattern_from_tokens_and_positions(tiny256, cache, tokens_2x40, monkeypatch):
    seen = spy_filter(monkeypatch)
    fig = attention.attention_pattern(tiny256, tokens_2x40, layer=1, head=0, positions=[3, 20, -1])
    assert keeps(seen[0], "blocks.1.attn.hook_pattern") and not keeps(seen[0], "blocks.2.attn.hook_pattern")
    labels = style.token_labels(tiny256, cache)
    assert list(fig.data[0].y) == [labels[3], labels[20], labels[39]]
    full = z_of(attention.attention_pattern(tiny256, cache, layer=1, head=0))
    assert same(z_of(fig), full[[3, 20, 39]])
    with pytest.raises(IndexError):
        attention.attention_pattern(tiny256, cache, layer=1, head=4)


def test_sink_mass_heatmap(tiny256, cache, tokens_2x40):
    fig = attention.sink_mass(tiny256, cache)
    expected = stats.sink_mass(tiny256, cache)
    assert z_of(fig).shape == (4, 4) and same(z_of(fig), expected)
    assert list(fig.data[0].y) == [style.layer_label(tiny256, f"blocks.{l}") for l in range(4)]
    assert list(fig.data[0].x) == ["h0", "h1", "h2", "h3"]
    assert same(z_of(attention.sink_mass(tiny256, tokens_2x40)), expected)
    assert same(z_of(attention.sink_mass(tiny256, cache, layers=[1, 3])), expected[[1, 3]])


# ----------------------------------------------------------------------------- long inputs
def test_long_input_is_windowed(tiny256, long_cache):
    S, P = 300, 50
    labels = style.token_labels(tiny256, long_cache)
    figs = [
        retrieval.indexer_scores(tiny256, long_cache, layer=1, max_positions=P),
        retrieval.compressed_entries(tiny256, long_cache, layer=1, max_entries=P),
        retrieval.compressed_entries(tiny256, long_cache, layer=2, max_entries=P),
        attention.attention_pattern(tiny256, long_cache, layer=1, head=0, max_positions=P),
        attention.attention_pattern(tiny256, long_cache, layer=2, head=0, max_positions=P),
    ]
    for fig in figs:
        assert len(fig.data[0].y) <= P
        assert total_z(fig) <= P * 80 < S * S // 20  # rows x (entries or candidates), never S x S
    assert list(figs[0].data[0].y)[-1] == labels[-1] and len(figs[0].data[0].y) == P  # ends at the last query
    assert z_of(figs[0]).shape == (P, S // 4)

    focused = retrieval.indexer_scores(tiny256, long_cache, layer=3, max_positions=20, focus=100)
    assert list(focused.data[0].y) == labels[81:101]

    # too many compressed columns: the largest are kept, the rest summed, rows still sum to 1
    fig = attention.attention_pattern(tiny256, long_cache, layer=2, head=1, max_positions=P, max_entries=5)
    assert list(fig.data[0].x)[-2:] == ["other entries", "sink"] and z_of(fig).shape == (P, W + 5 + 2)
    assert np.allclose(np.nansum(z_of(fig), axis=1), 1.0, atol=1e-5)
    few = retrieval.indexer_scores(tiny256, long_cache, layer=1, max_positions=P, max_entries=12)
    assert z_of(few).shape[1] <= 12 and len(few.data[1].x) > 0


# ----------------------------------------------------------------------------- analysis
def test_logit_lens_table(tiny256, cache, tokens_2x40):
    lens = cache.logit_lens(k=5, per_stream=False)
    fig = analysis.logit_lens_table(lens, tiny256, batch=1, position=7, k=5)
    z = z_of(fig)
    assert list(fig.data[0].y) == lens.labels and list(fig.data[0].x) == [f"top {r}" for r in range(1, 6)] + ["target"]
    assert same(z[:, :5], lens.top_probs[:, 1, 7]) and same(z[:, 5], lens.target_probs[:, 1, 7])
    assert all(lens.top_strs[b][1][7][0][:5] in fig.data[0].text[b][0] for b in range(len(lens.labels)))
    target = tiny256.to_str_tokens(tokens_2x40[1, 8:9], prepend_bos=False)[0]
    assert repr(target) in fig.layout.title.text and "position 7" in fig.layout.title.text

    from_cache = analysis.logit_lens_table(cache, batch=1, position=7, k=3)
    assert same(z_of(from_cache)[:, :3], lens.top_probs[:, 1, 7, :3]) and z_of(from_cache).shape == (5, 4)
    from_tokens = analysis.logit_lens_table(tokens_2x40, tiny256, batch=1, position=7, k=5)
    assert same(z_of(from_tokens), z)
    last = analysis.logit_lens_table(cache, position=-1)  # the last position has no target
    assert "target" not in list(last.data[0].x)


def test_attribution_bars(tiny256, tokens_2x40):
    dec = decompose(tiny256, tokens=tokens_2x40, target=17, heads=True, positions=[10, 39])
    fig = analysis.attribution_bars(dec, batch=1, position=-1, top=6)
    total, components = fig.data[0], fig.data[1]
    assert float(total.x[0]) == pytest.approx(float(dec.total[1, 1]), abs=1e-6)
    assert len(components.y) == 7 and components.y[-1] == f"others ({len(dec.labels) - 6})"
    values = np.asarray(components.x)
    assert np.all(np.diff(np.abs(values[:-1])) <= 1e-9)  # largest |contribution| first
    assert values.sum() == pytest.approx(float(dec.total[1, 1]), abs=1e-4)  # shown + others = total
    assert [l for l, _ in dec.top(6, batch=1, position=-1)] == list(components.y[:6])
    assert "position 39" in fig.layout.title.text and any(s.x0 == pytest.approx(total.x[0]) for s in fig.layout.shapes)


def test_patching_heatmap(tiny256, tokens_2x40):
    clean, corrupted = tokens_2x40[:1, :12], tokens_2x40[1:, :12]
    _, clean_cache = tiny256.run_with_cache(clean)
    metric = lambda logits: logits[0, -1, 5] - logits[0, -1, 9]
    result = get_act_patch_attn_out(tiny256, corrupted, clean_cache, metric)  # [4, 12]
    fig = analysis.patching_heatmap(result, tiny256, corrupted)
    assert z_of(fig).shape == (4, 12) and same(z_of(fig), result)
    labels = style.token_labels(tiny256, tokens=corrupted)
    assert list(fig.data[0].x) == labels and all(labels[3] in row[3] for row in fig.data[0].hovertext)
    trace = fig.data[0]
    assert trace.colorscale == go.Heatmap(colorscale=style.DIVERGING).colorscale
    assert (trace.zmin + trace.zmax) / 2 == pytest.approx(0.0) and trace.zmax >= float(result.abs().max()) - 1e-6

    heads = torch.randn(4, 4, generator=torch.Generator().manual_seed(3)) + 2.0
    fig = analysis.patching_heatmap(heads, x="head", baseline=2.0)
    assert list(fig.data[0].x) == ["h0", "h1", "h2", "h3"]
    assert (fig.data[0].zmin + fig.data[0].zmax) / 2 == pytest.approx(2.0)
    long = analysis.patching_heatmap(torch.randn(4, 300), max_positions=64)
    assert z_of(long).shape == (4, 64) and list(long.data[0].x)[-1] == "299"
    with pytest.raises(ValueError, match="layer, x"):
        analysis.patching_heatmap(torch.randn(4, 12, 4))

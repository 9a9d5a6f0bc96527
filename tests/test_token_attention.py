"""Attention in token space (v4lens.analysis.token_attention) and plot.attention_pattern(space="tokens").

tiny256: block 0 sliding, 1 CSA (m = 4, top-3 picks), 2 HCA (m = 6), 3 CSA; window 8; 4 heads.
The pooling shares are recomputed here from the compressor's own parameters (gate projection
and position bias on the attention input), so the slot -> token mapping is checked independently.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from v4lens.analysis import token_attention, token_space
from v4lens.plot import attention

pytestmark = pytest.mark.usefixtures("single_thread")

S, W = 40, 8


@pytest.fixture(scope="module")
def cache(tiny256, tokens_2x40):
    return tiny256.run_with_cache(tokens_2x40)[1]


def test_sliding_layer_is_the_raw_pattern(tiny256, cache):
    res = token_attention(tiny256, cache, 0)
    key_index, pattern = cache["blocks.0.attn.hook_key_index"], cache["blocks.0.attn.hook_pattern"]
    dense = torch.zeros(2, 4, S, S)
    for b in range(2):
        for q in range(S):
            for j in range(W):
                if key_index[b, q, j] >= 0:
                    dense[b, :, q, key_index[b, q, j]] = pattern[b, :, q, j]
    assert res.pattern.shape == (2, 4, S, S) and torch.equal(res.pattern, dense)
    assert torch.equal(res.sink, cache["blocks.0.attn.hook_sink"]) and res.queries.tolist() == list(range(S))


@torch.no_grad()
def hand_shares(model, cache, layer: int, b: int, w: int) -> dict[int, float]:
    """{token: its share of compressed entry w}, from the compressor's parameters: the per-channel
    softmax over the entry's slots of gate logits + position bias, averaged over the channels."""
    comp = model.blocks[layer].attn.compressor
    m, c = comp.ratio, comp.dim
    logits = cache[f"blocks.{layer}.ln1.hook_normalized"][b].float() @ comp.wgate.T  # [S, width]
    slots = []  # (token, logits over the channels)
    if comp.overlap:  # previous window's first halves, then this window's second halves
        slots += [(t, logits[t, :c] + comp.ape[t % m, :c]) for t in range((w - 1) * m, w * m) if t >= 0]
        slots += [(t, logits[t, c:] + comp.ape[t % m, c:]) for t in range(w * m, (w + 1) * m)]
    else:
        slots += [(t, logits[t] + comp.ape[t % m]) for t in range(w * m, (w + 1) * m)]
    weights = torch.softmax(torch.stack([v for _, v in slots]), dim=0)  # [slots, c]
    return {t: float(weights[i].mean()) for i, (t, _) in enumerate(slots)}


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_compressed_layers_sum_and_spread_by_pooling_weights(tiny256, cache, layer):
    res = token_attention(tiny256, cache, layer)
    sink = cache[f"blocks.{layer}.attn.hook_sink"]
    torch.testing.assert_close(res.pattern.sum(-1), 1 - sink, rtol=0, atol=1e-5)  # rows sum to 1 - sink mass
    future = torch.arange(S)[None, :] > torch.arange(S)[:, None]
    assert (res.pattern[..., future] == 0).all() and (res.pattern >= 0).all()

    # one query, one compressed candidate: compose the value at each of its tokens by hand
    b, q, h = 1, 39, 2
    key_index = cache[f"blocks.{layer}.attn.hook_key_index"][b, q]
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][b, h, q]
    j = next(j for j in range(W, len(key_index)) if key_index[j] >= S)
    entry = int(key_index[j]) - S
    for token, share in hand_shares(tiny256, cache, layer, b, entry).items():
        expected = 0.0  # every candidate of the query that holds this token: its window slot, each entry pooling it
        for jj, idx in enumerate(key_index.tolist()):
            if idx == token:
                expected += float(pattern[jj])
            elif idx >= S:
                expected += float(pattern[jj]) * hand_shares(tiny256, cache, layer, b, idx - S).get(token, 0.0)
        assert math.isclose(float(res.pattern[b, h, q, token]), expected, rel_tol=1e-4, abs_tol=1e-7), token
        assert share > 0


def test_queries_heads_and_sources(tiny256, cache, tokens_2x40, monkeypatch):
    full = token_attention(tiny256, cache, 2)
    some = token_attention(tiny256, tokens_2x40, 2, queries=[-1, 20], heads=[3, 0])
    assert some.pattern.shape == (2, 2, 2, S) and some.queries.tolist() == [39, 20]
    assert torch.equal(some.pattern, full.pattern[:, [3, 0]][:, :, [39, 20]])
    assert torch.equal(some.sink, full.sink[:, [3, 0]][:, :, [39, 20]])
    monkeypatch.setattr(token_space, "MAX_ALL_QUERIES", 10)
    with pytest.raises(ValueError, match="queries="):
        token_attention(tiny256, cache, 2)
    with pytest.raises(IndexError):
        token_attention(tiny256, cache, 2, queries=[40])
    with pytest.raises(KeyError, match="compressor.hook_weights"):
        token_attention(tiny256, {k: v for k, v in cache.items() if "compressor" not in k}, 2, queries=[5])


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_attention_pattern_in_token_space(tiny256, cache, layer):
    fig = attention.attention_pattern(tiny256, cache, layer=layer, head=1, batch=1, space="tokens")
    z = np.array(fig.data[0].z, dtype=float)
    res = token_attention(tiny256, cache, layer, heads=[1])
    assert z.shape == (S, S + 1) and list(fig.data[0].x)[-1] == "sink"
    assert np.allclose(np.nansum(z, axis=1), 1.0, atol=1e-5)
    expected = res.pattern[1, 0].masked_fill(torch.arange(S)[None, :] > torch.arange(S)[:, None], math.nan)
    assert np.allclose(z[:, :-1], expected.numpy(), equal_nan=True) and np.allclose(z[:, -1], res.sink[1, 0])
    few = attention.attention_pattern(tiny256, cache, layer=layer, head=1, positions=[10, 39], max_entries=5,
                                      space="tokens")  # fmt: skip
    assert list(few.data[0].x)[-2:] == ["other tokens", "sink"] and np.array(few.data[0].z).shape == (2, 7)
    assert np.allclose(np.nansum(np.array(few.data[0].z, dtype=float), axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="space"):
        attention.attention_pattern(tiny256, cache, layer=layer, head=1, space="dense")

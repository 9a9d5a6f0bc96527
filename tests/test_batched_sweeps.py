"""Sweeps that run several swept indices per forward: `batch_size=n`
repeats the corrupted batch n times along the batch axis, patches copy k at its own index, and gives
the values of the one-index-per-forward sweep (up to float rounding); `progress=True` shows a bar."""

from __future__ import annotations

import pytest
import torch

from v4lens import patching as P

pytestmark = pytest.mark.usefixtures("single_thread")

S, POS = 12, 6


def metric(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, 17] - logits[:, -1, 18]).mean()


def per_example(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, 17] - logits[:, -1, 18]


@pytest.fixture(scope="module")
def pair(tiny256, tokens_2x40):
    clean = tokens_2x40[:, :S].clone()
    corrupted = clean.clone()
    corrupted[:, POS] = (corrupted[:, POS] + 101) % 256
    with torch.no_grad():
        return corrupted, tiny256.run_with_cache(clean)[1]


# sweeps of every kind of family (per position: the per-example test below): per head, a layer-wide
# fixed value, a target not taken from the cache, integer targets with NaN layers, two hooks per
# layer, and pattern patching (its target reads the live key index of each copy)
CASES = {
    "heads_all_pos": (P.get_act_patch_attn_head_out_all_pos, {}),
    "sink_shift": (P.get_act_patch_sink, {"shift": 0.5}),
    "comb_fixed": (P.get_act_patch_hc_comb_fixed, {"value": "uniform"}),
    "indexer_topk": (P.get_act_patch_indexer_topk, {}),
    "routing": (P.get_act_patch_routing, {}),
    "pattern_all_pos": (P.get_act_patch_attn_head_pattern_all_pos, {}),
}


@pytest.mark.parametrize("key", list(CASES))
def test_batched_sweep_equals_the_one_index_sweep(tiny256, pair, key):
    corrupted, clean_cache = pair
    sweep, kw = CASES[key]
    with torch.no_grad():
        one = sweep(tiny256, corrupted, clean_cache, metric, **kw)
        # 7 divides no sweep's number of indices: the last forward holds fewer copies
        batched = sweep(tiny256, corrupted, clean_cache, metric, batch_size=7, **kw)
    assert batched.shape == one.shape
    assert torch.equal(batched.isnan(), one.isnan())
    assert (one.nan_to_num() - metric(tiny256(corrupted))).abs().max() > 1e-6  # the patches do something
    torch.testing.assert_close(batched, one, atol=2e-6, rtol=1e-5, equal_nan=True)


def test_batched_three_axis_sweeps_equal_single_runs(tiny256, pair):
    """[layer, head, pos] and [layer, pos, stream] sweeps in forwards of 50 copies: sampled cells
    equal the patched run of that one index."""
    corrupted, clean_cache = pair
    with torch.no_grad():
        pattern = P.get_act_patch_attn_head_pattern_by_pos(tiny256, corrupted, clean_cache, metric, missing="drop",
                                                           batch_size=50)  # fmt: skip
        streams = P.get_act_patch_streams(tiny256, corrupted, clean_cache, metric, "mid", True, batch_size=50)
        for l, h, p in [(0, 1, S - 1), (1, 2, S - 1), (3, 0, 9), (2, 3, POS)]:
            hooks = P.pattern_patch_hooks(tiny256, clean_cache, l, heads=[h], queries=[p], missing="drop")
            torch.testing.assert_close(pattern[l, h, p], metric(tiny256.run_with_hooks(corrupted, fwd_hooks=hooks)),
                                       atol=2e-6, rtol=1e-5)  # fmt: skip
        for l, p, n in [(0, POS, 1), (3, S - 1, 3), (2, 8, 0)]:
            name = f"blocks.{l}.hook_streams_mid"

            def one_stream(act, hook, p=p, n=n, name=name):
                act = act.clone()
                act[:, p, n] = clean_cache[name][:, p, n]
                return act

            by_hand = metric(tiny256.run_with_hooks(corrupted, fwd_hooks=[(name, one_stream)]))
            torch.testing.assert_close(streams[l, p, n], by_hand, atol=2e-6, rtol=1e-5)
    assert (pattern - metric(tiny256(corrupted))).abs().max() > 1e-6


def test_batched_per_example_results_metrics_and_baseline(tiny256, pair):
    corrupted, clean_cache = pair
    metrics = {"diff": per_example, "logit": lambda logits: logits[:, -1, 17]}
    with torch.no_grad():
        one = P.get_act_patch_mlp_out(tiny256, corrupted, clean_cache, metrics, reduce="none", baseline=True)
        batched = P.get_act_patch_mlp_out(tiny256, corrupted, clean_cache, metrics, reduce="none", baseline=True,
                                          batch_size=64)  # fmt: skip
    assert batched.values.shape == one.values.shape == (2, tiny256.cfg.n_layers, S, 2)
    torch.testing.assert_close(batched.values, one.values, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(batched.baseline, one.baseline, atol=0, rtol=0)


def test_batch_size_and_progress(tiny256, pair, capsys):
    corrupted, clean_cache = pair
    with torch.no_grad():
        P.get_act_patch_hc_comb_fixed(tiny256, corrupted, clean_cache, metric, batch_size=3, progress=True)
    err = capsys.readouterr().err
    assert "2/2" in err and "forward" in err  # 4 layers, 3 per forward: 2 forwards
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="batch_size"):
            P.get_act_patch_attn_out(tiny256, corrupted, clean_cache, metric, batch_size=bad)

"""Attention-pattern patching keyed by candidate.

The last axis of `attn.hook_pattern` is each query's candidate slots (`attn.hook_key_index` says which
key sits in each); on a CSA layer the corrupted run's indexer picks other entries, or the same ones in
another order. TransformerLens's pattern patch pastes the clean pattern column by column, which puts
clean probabilities onto other keys; v4lens patches by key (`align_pattern`) and refuses TL's paste
where the key indices differ, while equal key indices keep TL's results."""

from __future__ import annotations

from functools import partial

import pandas as pd
import pytest
import torch
from transformer_lens import patching

from v4lens import patching as P

pytestmark = pytest.mark.usefixtures("single_thread")

S, POS = 24, 10  # CSA (top-3 of up to 6 entries) is selective from query 15 on; tokens differ at POS
CSA = (1, 3)
generic = patching.generic_activation_patch  # TransformerLens's sweep over a given index_df


def metric(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, 17] - logits[:, -1, 18]).mean()


@pytest.fixture(scope="module")
def pair(tiny256, tokens_2x40):
    clean = tokens_2x40[:, :S].clone()
    corrupted = clean.clone()
    corrupted[:, POS] = (corrupted[:, POS] + 101) % 256
    with torch.no_grad():
        clean_logits, clean_cache = tiny256.run_with_cache(clean)
        _, corr_cache = tiny256.run_with_cache(corrupted)
    for l in CSA:  # the premise: the corrupted run's indexer holds other keys in some slots
        name = f"blocks.{l}.attn.hook_key_index"
        assert not torch.equal(clean_cache[name], corr_cache[name])
    return clean, corrupted, clean_logits, clean_cache, corr_cache


S_SHORT = 12  # a one-row 12-token pair (position 6 differs) for the single-entry sweep


@pytest.fixture(scope="module")
def short(tiny256, tokens_2x40):
    clean = tokens_2x40[:1, :S_SHORT].clone()
    corrupted = clean.clone()
    corrupted[:, 6] = (corrupted[:, 6] + 101) % 256
    with torch.no_grad():
        return clean, corrupted, tiny256.run_with_cache(clean)[1], tiny256.run_with_cache(corrupted)[1]


@pytest.fixture(scope="module")
def dest_src(tiny256, short):
    _, corrupted, clean_cache, _ = short
    with torch.no_grad():
        return P.get_act_patch_attn_head_pattern_dest_src_pos(tiny256, corrupted, clean_cache, metric, batch_size=512)


def _reverse_picks(picks, hook):
    return picks.flip(-1)  # the same entries, in the other order: other keys in each slot


REVERSED = [(f"blocks.{l}.attn.indexer.hook_topk", _reverse_picks) for l in CSA]


def _paste_columns(pattern, hook, clean_cache):
    """TransformerLens's pattern setter, as a plain function (which v4lens cannot inspect)."""
    return patching.layer_head_pattern_patch_setter(pattern.clone(), [1, slice(None)], clean_cache[hook.name])


# ---------------------------------------------------------------- the trap, reproduced
def test_a_column_paste_puts_clean_probabilities_onto_other_keys(tiny256, pair):
    """A run attending the clean candidates in another slot order computes the clean logits; pasting
    the clean pattern into it column by column changes them, pasting it by key does not."""
    clean, _, clean_logits, clean_cache, _ = pair
    with torch.no_grad():
        reordered = tiny256.run_with_hooks(clean, fwd_hooks=REVERSED)
        torch.testing.assert_close(reordered, clean_logits, atol=1e-5, rtol=0)
        by_column = tiny256.run_with_hooks(clean, fwd_hooks=REVERSED + [
            ("blocks.1.attn.hook_pattern", lambda p, hook: _paste_columns(p, hook, clean_cache))])  # fmt: skip
        by_key = tiny256.run_with_hooks(clean, fwd_hooks=REVERSED + P.pattern_patch_hooks(tiny256, clean_cache, 1))
    assert (by_column - clean_logits).abs().max() > 1e-3
    torch.testing.assert_close(by_key, clean_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("how", ["all_pos", "by_pos_setter", "cache_partial"])
def test_transformer_lens_pattern_patch_raises_where_candidates_differ(tiny256, pair, how):
    _, corrupted, _, clean_cache, _ = pair
    with torch.no_grad(), pytest.raises(ValueError, match=r"v4lens\.patching\.get_act_patch_attn_head_pattern_all_pos"):
        if how == "all_pos":
            patching.get_act_patch_attn_head_pattern_all_pos(tiny256, corrupted, clean_cache, metric)
        elif how == "by_pos_setter":  # TL's own by-position setter, on one CSA cell whose picks differ
            index = pd.DataFrame({"layer": [3], "head_index": [0], "dest_pos": [S - 1]})
            setter = patching.layer_head_pos_pattern_patch_setter
            generic(tiny256, corrupted, clean_cache, metric, setter, "pattern", index_df=index)
        else:  # the tutorial idiom: a partial holding the whole clean cache

            def paste(pattern, hook, cache):
                pattern[:, 0] = cache[hook.name][:, 0]

            hooks = [("blocks.1.attn.hook_pattern", partial(paste, cache=clean_cache))]
            tiny256.run_with_hooks(corrupted, fwd_hooks=hooks)


def test_transformer_lens_is_refused_only_where_the_pasted_slots_differ(tiny256, pair):
    """Queries before the corrupted position have the same picks: TL's by-position patch there runs
    and gives v4lens's value (the refusal looks at the slots written, not the whole tensor)."""
    _, corrupted, _, clean_cache, corr_cache = pair
    ki = "blocks.3.attn.hook_key_index"
    assert torch.equal(clean_cache[ki][:, :POS], corr_cache[ki][:, :POS])
    index = pd.DataFrame({"layer": [3, 3], "head_index": [0, 2], "dest_pos": [POS - 1, POS - 2]})
    with torch.no_grad():
        setter = patching.layer_head_pos_pattern_patch_setter
        tl = generic(tiny256, corrupted, clean_cache, metric, setter, "pattern", index_df=index)
        ours = [metric(tiny256.run_with_hooks(corrupted, fwd_hooks=P.pattern_patch_hooks(
            tiny256, clean_cache, 3, heads=[h], queries=[p]))) for h, p in [(0, POS - 1), (2, POS - 2)]]  # fmt: skip
    torch.testing.assert_close(tl, torch.stack(ours), atol=0, rtol=0)


# ---------------------------------------------------------------- equal key indices: TL's values
def test_equal_key_indices_give_transformer_lens_values(tiny256, pair):
    clean, corrupted, clean_logits, clean_cache, _ = pair
    with torch.no_grad():
        # clean into itself: every key index agrees
        ours = P.get_act_patch_attn_head_pattern_all_pos(tiny256, clean, clean_cache, metric)  # one index a forward
        tl = patching.get_act_patch_attn_head_pattern_all_pos(tiny256, clean, clean_cache, metric)
        torch.testing.assert_close(ours, tl, atol=0, rtol=0)
        torch.testing.assert_close(ours, torch.full_like(ours, float(metric(clean_logits))), atol=1e-5, rtol=0)
        # the corrupted pair on the sliding (0) and HCA (2) layers
        ours = P.get_act_patch_attn_head_pattern_all_pos(tiny256, corrupted, clean_cache, metric)
        index = pd.DataFrame({"layer": [0] * 4 + [2] * 4, "head_index": list(range(4)) * 2})
        setter = patching.layer_head_pattern_patch_setter
        tl = generic(tiny256, corrupted, clean_cache, metric, setter, "pattern", index_df=index)
    torch.testing.assert_close(ours[[0, 2]].flatten(), tl, atol=0, rtol=0)
    assert (tl - metric(tiny256(corrupted))).abs().max() > 1e-5


def test_single_entry_sweep_equals_transformer_lens_on_the_sliding_layer(tiny256, short, dest_src):
    """On the sliding layer slots 0..7 are TL's src_pos 0..7 (K = 8 there); wider layers have more slots."""
    _, corrupted, clean_cache, _ = short
    index = pd.DataFrame([(0, 1, p, j) for p in (S_SHORT - 2, S_SHORT - 1) for j in range(8)],
                         columns=["layer", "head_index", "dest_pos", "src_pos"])  # fmt: skip
    with torch.no_grad():
        tl = patching.generic_activation_patch(tiny256, corrupted, clean_cache, metric,
                                               patching.layer_head_dest_src_pos_pattern_patch_setter, "pattern",
                                               index_df=index)  # fmt: skip
    assert dest_src.shape == (4, 4, S_SHORT, 8 + 3)  # K of the widest layer: a CSA layer's 8 + top-3
    assert dest_src[0, :, :, 8:].isnan().all() and not dest_src[0, :, :, :8].isnan().any()
    assert not dest_src[1].isnan().any()
    torch.testing.assert_close(dest_src[0, 1, S_SHORT - 2 :, :8].flatten(), tl, atol=1e-6, rtol=0)  # batched


def test_the_same_picks_give_transformer_lens_values_on_csa_layers(tiny256, pair):
    """With the corrupted run's picks forced to the clean ones, every key index agrees and TL's
    function runs (on the CSA layers too) with v4lens's values."""
    _, corrupted, _, clean_cache, _ = pair
    same_picks = [(f"blocks.{l}.attn.indexer.hook_topk", lambda t, hook: clean_cache[hook.name].clone()) for l in CSA]
    with torch.no_grad(), tiny256.hooks(fwd_hooks=same_picks):
        tl = patching.get_act_patch_attn_head_pattern_all_pos(tiny256, corrupted, clean_cache, metric)
        ours = P.get_act_patch_attn_head_pattern_all_pos(tiny256, corrupted, clean_cache, metric)
        base = metric(tiny256(corrupted))
    torch.testing.assert_close(ours, tl, atol=0, rtol=0)
    assert (tl[list(CSA)] - base).abs().max() > 1e-5


# ---------------------------------------------------------------- v4lens's sweeps: what a cell is
def test_sweep_cells_are_pattern_patch_hooks_runs(tiny256, pair):
    _, corrupted, _, clean_cache, _ = pair
    with torch.no_grad():
        all_pos = P.get_act_patch_attn_head_pattern_all_pos(tiny256, corrupted, clean_cache, metric, batch_size=16)
        dropped = P.get_act_patch_attn_head_pattern_all_pos(tiny256, corrupted, clean_cache, metric,
                                                            missing="drop", batch_size=16)  # fmt: skip
        for l, h, missing, want in [(3, 1, "renormalize", all_pos), (1, 2, "drop", dropped)]:
            hooks = P.pattern_patch_hooks(tiny256, clean_cache, l, heads=[h], missing=missing)
            torch.testing.assert_close(want[l, h], metric(tiny256.run_with_hooks(corrupted, fwd_hooks=hooks)),
                                       atol=1e-6, rtol=0)  # fmt: skip
        with pytest.raises(ValueError, match="not among the candidates"):
            P.get_act_patch_attn_head_pattern_all_pos(tiny256, corrupted, clean_cache, metric, missing="raise")
    assert (all_pos[list(CSA)] - dropped[list(CSA)]).abs().max() > 1e-6  # some clean mass had no key to go to


def test_single_entry_cell_writes_the_clean_probability_of_the_key_in_that_slot(tiny256, short, dest_src):
    _, corrupted, clean_cache, corr_cache = short
    l, h, p, j = 1, 2, S_SHORT - 1, 8  # a slot holding another entry than in the clean run
    key = int(corr_cache[f"blocks.{l}.attn.hook_key_index"][0, p, j])
    clean_keys = clean_cache[f"blocks.{l}.attn.hook_key_index"][0, p]
    assert key != int(clean_keys[j]) and key in clean_keys.tolist()
    clean_prob = clean_cache[f"blocks.{l}.attn.hook_pattern"][0, h, p, clean_keys.tolist().index(key)]

    def one_entry(pattern, hook):
        pattern = pattern.clone()
        pattern[0, h, p, j] = clean_prob
        return pattern

    with torch.no_grad():
        by_hand = metric(tiny256.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{l}.attn.hook_pattern", one_entry)]))
    torch.testing.assert_close(dest_src[l, h, p, j], by_hand, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- align_pattern on its own
def test_align_pattern_moves_probabilities_with_their_keys():
    clean_keys = torch.tensor([[[3, 4, 10, 11, -1]]])  # [b=1, p=1, K=5]: two tokens, two entries, one empty
    clean = torch.tensor([[[[0.1, 0.2, 0.3, 0.25, 0.0]]]])  # [b, h=1, p, K], sink took 0.15
    here = torch.tensor([[[3, 4, 11, 10, -1]]])  # the same keys, entries swapped
    torch.testing.assert_close(P.align_pattern(clean, clean_keys, here), clean[..., [0, 1, 3, 2, 4]], atol=0, rtol=0)
    other = torch.tensor([[[3, 4, 12, 10, -1]]])  # entry 11 (p = 0.25) is not here, 12 is new
    drop = P.align_pattern(clean, clean_keys, other, missing="drop")
    torch.testing.assert_close(drop, torch.tensor([[[[0.1, 0.2, 0.0, 0.3, 0.0]]]]))
    renorm = P.align_pattern(clean, clean_keys, other)
    torch.testing.assert_close(renorm, drop * 0.85 / 0.6)  # the clean row's total, 1 - sink, is kept
    with pytest.raises(ValueError, match="key 11 probability 0.25"):
        P.align_pattern(clean, clean_keys, other, missing="raise")
    with pytest.raises(ValueError, match="lists key 4 twice"):
        P.align_pattern(clean, clean_keys, torch.tensor([[[3, 4, 4, 10, -1]]]))
    with pytest.raises(ValueError, match="missing must be one of"):
        P.align_pattern(clean, clean_keys, here, missing="zero")

"""Which of transformer_lens.patching runs unchanged on a v4lens model, and which refuses (docs/hooks.md,
"TransformerLens interoperability"; the README's list): attn_out / mlp_out / per-head z and q sweeps and
`generic_activation_patch` on V4 names give the values of v4lens's own sweeps; resid_*, k / v, the
`*_every` and direct-path functions raise (four residual streams, one shared key=value vector)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from transformer_lens import patching

import v4lens
from v4lens.model.tl_versions import TL_VERSION

pytestmark = pytest.mark.usefixtures("single_thread")
# what TransformerLens 4.2 added to its patching: reduce=, PatchingResult, the direct path, the eval-mode check
TL42 = pytest.mark.skipif(TL_VERSION < (4, 2), reason="needs transformer-lens 4.2+ patching")

S = 10
ANSWER = 17


@pytest.fixture(scope="module")
def setup(tiny256):
    g = torch.Generator().manual_seed(7)
    clean_tokens = torch.randint(3, 256, (2, S), generator=g)
    corrupted = clean_tokens.clone()
    corrupted[:, 4] = (corrupted[:, 4] + 101) % 256  # first (and only) differing position: 4
    with torch.no_grad():
        clean_logits, clean_cache = tiny256.run_with_cache(clean_tokens)
        corrupted_logits = tiny256(corrupted)
    return clean_tokens, corrupted, clean_logits, clean_cache, corrupted_logits


def metric(logits: torch.Tensor) -> torch.Tensor:
    """Mean logit of a fixed answer token at the last position."""
    return logits[:, -1, ANSWER].mean()


def per_example(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, ANSWER]


def test_clean_and_corrupted_runs_differ(setup):
    _, _, clean_logits, _, corrupted_logits = setup
    assert abs(metric(clean_logits) - metric(corrupted_logits)) > 1e-3
    # causal: identical before position 4 (up to rounding: expert GEMMs batch different token sets)
    torch.testing.assert_close(clean_logits[:, :4], corrupted_logits[:, :4], atol=1e-6, rtol=1e-5)
    assert (clean_logits[:, 4] - corrupted_logits[:, 4]).abs().max() > 1e-3


@pytest.mark.parametrize("fn", ["get_act_patch_attn_out", "get_act_patch_mlp_out"])
def test_layer_pos_sweeps(tiny256, setup, fn):
    clean_tokens, corrupted, clean_logits, clean_cache, corrupted_logits = setup
    sweep = getattr(patching, fn)
    n_layers = tiny256.cfg.n_layers
    # clean into itself: every cell is the clean metric
    with torch.no_grad():
        same = sweep(tiny256, clean_tokens, clean_cache, metric)
    assert same.shape == (n_layers, S)
    torch.testing.assert_close(same, torch.full((n_layers, S), float(metric(clean_logits))), atol=1e-5, rtol=0)
    with torch.no_grad():
        result = sweep(tiny256, corrupted, clean_cache, metric)
    assert result.shape == (n_layers, S)
    base = float(metric(corrupted_logits))
    # positions before the corruption carry identical activations: patching them is a no-op
    torch.testing.assert_close(result[:, :4], torch.full((n_layers, 4), base), atol=1e-5, rtol=0)
    # patching at the corrupted position or later moves the metric somewhere
    assert (result[:, 4:] - base).abs().max() > 1e-4


def test_head_sweep_all_pos_patches_z_per_head(tiny256, setup):
    clean_tokens, corrupted, clean_logits, clean_cache, corrupted_logits = setup
    cfg = tiny256.cfg
    with torch.no_grad():
        same = patching.get_act_patch_attn_head_out_all_pos(tiny256, clean_tokens, clean_cache, metric)
        heads = patching.get_act_patch_attn_head_out_all_pos(tiny256, corrupted, clean_cache, metric)
    assert same.shape == heads.shape == (cfg.n_layers, cfg.n_heads)
    torch.testing.assert_close(same, torch.full_like(same, float(metric(clean_logits))), atol=1e-5, rtol=0)
    assert (heads - metric(corrupted_logits)).abs().max() > 1e-4
    # patching every head of a layer's z == patching that layer's whole attention output
    def all_heads(act, index, clean_act):
        act[:] = clean_act
        return act

    with torch.no_grad():
        by_z = patching.generic_activation_patch(tiny256, corrupted, clean_cache, metric, all_heads, "z",
                                                 index_axis_names=("layer",))  # fmt: skip
        by_out = patching.generic_activation_patch(tiny256, corrupted, clean_cache, metric, all_heads, "attn_out",
                                                   index_axis_names=("layer",))  # fmt: skip
    torch.testing.assert_close(by_z, by_out, atol=1e-5, rtol=1e-5)


def test_head_sweep_equals_the_per_head_result_sweep(tiny256, setup):
    """The opt-in hook_result [b,p,h,d] decomposes attn_out exactly, so patching head h's result
    equals patching head h's z (the grouped output projection is linear)."""
    clean_tokens, corrupted, _, clean_cache, _ = setup
    optin = v4lens.load("tiny", d_vocab=256, seed=0, use_attn_result=True)
    with torch.no_grad():
        _, cache_r = optin.run_with_cache(clean_tokens)
        by_result = patching.generic_activation_patch(
            optin, corrupted, cache_r, metric, patching.layer_head_vector_patch_setter, "result",
            index_axis_names=("layer", "head"),
        )  # fmt: skip
        by_z = patching.get_act_patch_attn_head_out_all_pos(tiny256, corrupted, clean_cache, metric)
    torch.testing.assert_close(by_result, by_z, atol=1e-5, rtol=1e-5)


def test_generic_patch_on_streams_at_the_last_layer(tiny256, setup):
    """Patching the 4-D streams leaving the last block at the last position restores the clean
    last-position logits exactly; any other position of that layer cannot reach them."""
    _, corrupted, clean_logits, clean_cache, corrupted_logits = setup
    L = tiny256.cfg.n_layers - 1
    index = pd.DataFrame({"layer": [L] * S, "pos": list(range(S))})
    with torch.no_grad():
        result = patching.generic_activation_patch(tiny256, corrupted, clean_cache, metric,
                                                   patching.layer_pos_patch_setter, "streams_post", index_df=index)  # fmt: skip
    assert result.shape == (S,)
    torch.testing.assert_close(result[-1], metric(clean_logits), atol=1e-5, rtol=0)
    torch.testing.assert_close(result[:-1], torch.full((S - 1,), float(metric(corrupted_logits))), atol=1e-6, rtol=0)


def test_generic_patch_flattened_index_matches_the_full_sweep(tiny256, setup):
    _, corrupted, _, clean_cache, _ = setup
    rows = pd.DataFrame({"layer": [0, 1, 3, 2], "pos": [4, 9, 6, 5]})
    with torch.no_grad():
        full = patching.get_act_patch_attn_out(tiny256, corrupted, clean_cache, metric)
        # "attn_out" -> blocks.{layer}.hook_attn_out via transformer_lens.utilities.get_act_name
        flat = patching.generic_activation_patch(tiny256, corrupted, clean_cache, metric,
                                                 patching.layer_pos_patch_setter, "attn_out", index_df=rows)  # fmt: skip
    torch.testing.assert_close(flat, full[rows["layer"].tolist(), rows["pos"].tolist()], atol=1e-6, rtol=0)


@TL42
def test_per_example_results_and_baseline(tiny256, setup):
    _, corrupted, clean_logits, clean_cache, corrupted_logits = setup
    with torch.no_grad():
        res = patching.get_act_patch_mlp_out(tiny256, corrupted, clean_cache, per_example, reduce="none", baseline=True)
    assert res.values.shape == (tiny256.cfg.n_layers, S, 2)
    torch.testing.assert_close(res.baseline, per_example(corrupted_logits))
    torch.testing.assert_close(res.effect()[:, :4], torch.zeros(tiny256.cfg.n_layers, 4, 2), atol=1e-5, rtol=0)


def test_resid_sweeps_refuse_the_4d_streams(tiny256, setup):
    """There is no hook_resid_*: TransformerLens code expecting a [b,p,d] residual fails loudly."""
    _, corrupted, _, clean_cache, _ = setup
    with pytest.raises(KeyError, match="resid_pre"):
        patching.get_act_patch_resid_pre(tiny256, corrupted, clean_cache, metric)


@pytest.mark.parametrize(
    "fn, missing",
    [
        ("get_act_patch_resid_mid", "resid_mid"), ("get_act_patch_block_every", "resid_pre"),
        ("get_act_patch_attn_head_k_all_pos", "hook_k"), ("get_act_patch_attn_head_v_by_pos", "hook_v"),
    ],
)  # fmt: skip
def test_sweeps_over_hooks_v4_lacks_raise(tiny256, setup, fn, missing):
    """V4 has n residual streams (hook_streams_*) and one shared key=value vector (attn.hook_kv):
    TransformerLens's sweeps over [b,p,d] residuals and per-head keys / values refuse by name."""
    _, corrupted, _, clean_cache, _ = setup
    with pytest.raises(KeyError, match=missing):
        getattr(patching, fn)(tiny256, corrupted, clean_cache, metric)


@TL42
def test_direct_path_patching_raises(tiny256, setup):
    """Direct-path patching needs per-head W_O into one [b,p,d] residual; V4 heads write through a
    grouped low-rank projection into n streams: it refuses (AttributeError on W_O today)."""
    _, corrupted, _, clean_cache, _ = setup
    with torch.no_grad():
        corrupted_cache = tiny256.run_with_cache(corrupted)[1]
        with pytest.raises((AttributeError, KeyError, ValueError), match="W_O|hook_q_input|n_key_value_heads"):
            patching.get_act_patch_direct_path(tiny256, corrupted, clean_cache, corrupted_cache, metric, 0, 0)


def test_tl_head_sweeps_by_pos_and_q_equal_v4lens_sweeps(tiny256, setup):
    """TransformerLens's per-head, per-position z sweep is v4lens's; its q sweeps patch attn.hook_q
    [b,p,h,c] per head exactly as a head-vector patch written with v4lens's own sweep machinery."""
    from v4lens import patching as v4_patching

    _, corrupted, _, clean_cache, corrupted_logits = setup
    with torch.no_grad():
        tl_by_pos = patching.get_act_patch_attn_head_out_by_pos(tiny256, corrupted, clean_cache, metric)
        ours = v4_patching.get_act_patch_attn_head_out_by_pos(tiny256, corrupted, clean_cache, metric)
        tl_q = patching.get_act_patch_attn_head_q_all_pos(tiny256, corrupted, clean_cache, metric)
    torch.testing.assert_close(tl_by_pos, ours, atol=1e-6, rtol=0)
    assert (tl_by_pos - metric(corrupted_logits)).abs().max() > 1e-4
    # head h's q of layer l by hand: the clean queries of that head at every position
    l, h = 3, 1
    def patch_q(q, hook):
        q = q.clone()
        q[:, :, h] = clean_cache[hook.name][:, :, h]
        return q

    with torch.no_grad():
        by_hand = metric(tiny256.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{l}.attn.hook_q", patch_q)]))
    torch.testing.assert_close(tl_q[l, h], by_hand, atol=1e-6, rtol=0)


@TL42
def test_patching_requires_eval_mode(setup):
    clean_tokens, corrupted, _, clean_cache, _ = setup
    model = v4lens.load("tiny", d_vocab=256, seed=0).train()
    with pytest.raises(ValueError, match="eval"):
        patching.get_act_patch_attn_out(model, corrupted, clean_cache, metric)

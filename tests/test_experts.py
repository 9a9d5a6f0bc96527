"""Expert-level interventions by expert id (v4lens.analysis.experts) on tiny256.

tiny256: 8 routed experts, top-2, sqrt-softplus scores renormalised over the chosen two; block 0
is hash-routed, blocks 1-3 route by learned top-k. Each intervention is checked against a forward
built another way: a copy of the model with edited weights (zero-ablation, force, forbid), or the
opt-in per-slot hook `mlp.hook_expert_out` edited by hand (patching, mean-ablation).
"""

from __future__ import annotations

import copy

import pytest
import torch

import v4lens
from v4lens.analysis import experts

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def slotted():
    """tiny256's weights with the per-slot hook `mlp.hook_expert_out` [b, p, k, d] on."""
    return v4lens.load("tiny", d_vocab=256, seed=0, use_expert_out=True)


@pytest.fixture(scope="module")
def runs(tiny256, tokens_2x40):
    """(clean tokens, clean cache, corrupted tokens, corrupted cache): every hook cached."""
    corrupted = tokens_2x40.clone()
    corrupted[:, 10:30] = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(7))
    return tokens_2x40, tiny256.run_with_cache(tokens_2x40)[1], corrupted, tiny256.run_with_cache(corrupted)[1]


def with_weights(model, layer: int, edit):
    """A deep copy of the model with edit(mlp) applied to block `layer`'s MoE (the original untouched)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        edit(other.blocks[layer].mlp)
    return other


def cached(model, tokens, hooks, name):
    with model.hooks(fwd_hooks=hooks):
        return model.run_with_cache(tokens, names_filter=[name])[1][name]


# ----------------------------------------------------------------------------- reading by id
def test_expert_output_by_id_is_the_slot_hook_mapped_through_ids(tiny256, slotted, runs):
    _, clean, _, _ = runs
    slot_cache = slotted.run_with_cache(runs[0])[1]
    for layer in (0, 2):
        ids = clean[f"blocks.{layer}.mlp.hook_expert_ids"]
        total = torch.zeros(2, 40, 64)
        for e in range(8):
            out, picked = experts.expert_output(tiny256, clean, layer, e)  # recomputed from ln2 + ids + weights
            slot = slot_cache[f"blocks.{layer}.mlp.hook_expert_out"]  # [b,p,k,d]
            expected = torch.where((ids == e)[..., None], slot.float(), 0.0).sum(2)
            assert torch.equal(picked, (ids == e).any(-1)) and picked.any()
            assert torch.equal(out, expected)  # the same rows through the same kernels
            assert torch.equal(experts.expert_output(slotted, slot_cache, layer, e).out, expected)
            total += out
        shared = clean[f"blocks.{layer}.mlp.hook_shared_out"]
        torch.testing.assert_close(total + shared, clean[f"blocks.{layer}.hook_mlp_out"], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- ablation
@pytest.mark.parametrize("layer, expert", [(0, 3), (1, 2), (2, 5)])
def test_zero_ablation_equals_zeroed_expert_weights(tiny256, runs, layer, expert):
    tokens, clean = runs[0], runs[1]
    hooks = experts.ablate_expert_hooks(tiny256, layer, expert, how="zero")
    got = tiny256.run_with_hooks(tokens, fwd_hooks=hooks)
    reference = with_weights(tiny256, layer, lambda mlp: mlp.experts.w2[expert].zero_())(tokens)
    assert torch.equal(got, reference)  # bit for bit
    assert (got - tiny256(tokens)).abs().max() > 1e-3
    # the router still picks it; the other experts keep their weights (V4 does not renormalise after)
    name = f"blocks.{layer}.mlp.hook_expert_weights"
    weights, ids = cached(tiny256, tokens, hooks, name), clean[f"blocks.{layer}.mlp.hook_expert_ids"]
    assert torch.equal(weights, torch.where(ids == expert, 0.0, clean[name]))


def test_ablation_touches_only_the_chosen_positions(tiny256, runs):
    tokens, clean = runs[0], runs[1]
    picked = experts.expert_output(tiny256, clean, 1, 4).picked
    at = [int(p) for p in picked[0].nonzero()[:2, 0]]
    out = cached(tiny256, tokens, experts.ablate_expert_hooks(tiny256, 1, 4, positions=at), "blocks.1.hook_mlp_out")
    changed = (out != clean["blocks.1.hook_mlp_out"]).any(-1)  # [b,p]
    expected = torch.zeros(2, 40, dtype=torch.bool)
    expected[:, at] = picked[:, at]
    assert torch.equal(changed, expected)


def test_mean_and_resample_ablation(tiny256, slotted, runs):
    (clean_tokens, clean, tokens, corrupted), layer, e = runs, 2, 4
    ref_out, ref_picked = experts.expert_output(tiny256, clean, layer, e)
    mean = ref_out[ref_picked].mean(0)
    ids = corrupted[f"blocks.{layer}.mlp.hook_expert_ids"]

    def mean_slot(slots, hook):  # by hand: expert e's slot holds the mean of its reference outputs
        return torch.where((ids == e)[..., None], mean.to(slots.dtype), slots)

    expected = slotted.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.mlp.hook_expert_out", mean_slot)])
    hooks = experts.ablate_expert_hooks(tiny256, layer, e, how="mean", reference=clean_tokens)
    torch.testing.assert_close(tiny256.run_with_hooks(tokens, fwd_hooks=hooks), expected, rtol=0, atol=1e-5)

    # resample: each token that picked e gets e's output at some reference token that picked it
    name = f"blocks.{layer}.hook_mlp_out"
    own = experts.expert_output(tiny256, corrupted, layer, e)
    hooks = experts.ablate_expert_hooks(tiny256, layer, e, how="resample", reference=clean, seed=3)
    first = cached(tiny256, tokens, hooks, name)
    new = first - corrupted[name] + own.out  # the replacement at each token
    rows = ref_out[ref_picked]  # [n, d]
    distance = torch.cdist(new[own.picked], rows).min(-1).values
    assert distance.max() < 1e-5 and len(set(torch.cdist(new[own.picked], rows).argmin(-1).tolist())) > 1
    assert new[~own.picked].abs().max() < 1e-5
    again = cached(tiny256, tokens, experts.ablate_expert_hooks(tiny256, layer, e, "resample", clean, seed=3), name)
    assert torch.equal(again, first)  # seeded
    with pytest.raises(ValueError, match="reference"):
        experts.ablate_expert_hooks(tiny256, layer, e, how="mean")


# ----------------------------------------------------------------------------- patching
def test_patching_equals_running_with_the_clean_expert_output(tiny256, slotted, runs):
    (_, clean, tokens, corrupted), layer, e = runs, 2, 4
    clean_out = experts.expert_output(tiny256, clean, layer, e).out
    corr_out, corr_picked = experts.expert_output(tiny256, corrupted, layer, e)
    clean_picked = experts.expert_output(tiny256, clean, layer, e).picked
    assert (clean_picked != corr_picked).any()  # the runs route differently: the test sees both cases
    ids = corrupted[f"blocks.{layer}.mlp.hook_expert_ids"]

    def clean_slot(slots, hook):  # by hand: expert e's slot holds the clean run's output of e
        return torch.where((ids == e)[..., None], clean_out[:, :, None].to(slots.dtype), slots)

    # where the corrupted run picked e, its slot is replaced by the clean value (0 where clean did not pick it)
    expected = slotted.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.mlp.hook_expert_out", clean_slot)])
    hooks = experts.patch_expert_hooks(tiny256, layer, e, clean, positions=corr_picked)
    torch.testing.assert_close(tiny256.run_with_hooks(tokens, fwd_hooks=hooks), expected, rtol=0, atol=1e-5)
    # everywhere: the MoE output is the corrupted one with e's output swapped for the clean one
    name = f"blocks.{layer}.hook_mlp_out"
    patched = cached(tiny256, tokens, experts.patch_expert_hooks(tiny256, layer, e, clean), name)
    torch.testing.assert_close(patched, corrupted[name] - corr_out + clean_out, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        tiny256.run_with_hooks(tokens[:, :20], fwd_hooks=experts.patch_expert_hooks(tiny256, layer, e, clean))


# ----------------------------------------------------------------------------- routing
@pytest.mark.parametrize("layer", [1, 3])
def test_forbid_and_force_route_as_the_router_would(tiny256, runs, layer):
    tokens = runs[0]
    gen = torch.Generator().manual_seed(layer)
    # a non-zero router bias (tiny256's is 0), so the test sees the bias steer the choice
    model = with_weights(tiny256, layer, lambda mlp: mlp.gate.bias.copy_(torch.randn(8, generator=gen) * 0.3))
    clean = model.run_with_cache(tokens)[1]
    scores, bias = clean[f"blocks.{layer}.mlp.hook_router_scores"], model.blocks[layer].mlp.gate.bias
    assert not torch.equal((scores + bias).topk(2).indices, scores.topk(2).indices)
    ids_name = f"blocks.{layer}.mlp.hook_expert_ids"
    expert = int(clean[ids_name].flatten().bincount(minlength=8).argmax())  # the busiest expert
    forbid = experts.forbid_expert_hooks(model, layer, expert)
    ids = cached(model, tokens, forbid, ids_name)
    assert not (ids == expert).any()
    # the next-best choice: the router's top-2 of score + bias with e removed
    ranked = (scores + bias).masked_fill(torch.arange(8) == expert, float("-inf"))
    assert torch.equal(ids, ranked.topk(2, dim=-1).indices)
    never = with_weights(model, layer, lambda mlp: mlp.gate.bias.__setitem__(expert, float("-inf")))
    assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=forbid), never(tokens))
    weights = cached(model, tokens, forbid, f"blocks.{layer}.mlp.hook_expert_weights")
    torch.testing.assert_close(weights.sum(-1), torch.full((2, 40), 1.5))  # renormalised over the new pair

    force = experts.force_expert_hooks(model, layer, expert)
    always = with_weights(model, layer, lambda mlp: mlp.gate.bias.__setitem__(expert, float("inf")))
    assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=force), always(tokens))
    assert (cached(model, tokens, force, ids_name)[..., 0] == expert).all()
    # only the chosen positions change
    some = cached(model, tokens, experts.force_expert_hooks(model, layer, expert, positions=[5, -1]), ids_name)
    keep = torch.ones(40, dtype=torch.bool)
    keep[[5, 39]] = False
    assert torch.equal(some[:, keep], clean[ids_name][:, keep]) and (some[:, [5, 39], 0] == expert).all()


def test_hash_layer_forbid_empties_the_slot_and_force_is_refused(tiny256, runs):
    tokens, clean = runs[0], runs[1]
    e = int(clean["blocks.0.mlp.hook_expert_ids"][0, 0, 0])
    forbid = experts.forbid_expert_hooks(tiny256, 0, e)
    ids, before = cached(tiny256, tokens, forbid, "blocks.0.mlp.hook_expert_ids"), clean["blocks.0.mlp.hook_expert_ids"]
    assert torch.equal(ids, torch.where(before == e, -1, before))
    table = with_weights(tiny256, 0, lambda mlp: mlp.gate.tid2eid.masked_fill_(mlp.gate.tid2eid == e, -1))
    assert torch.equal(tiny256.run_with_hooks(tokens, fwd_hooks=forbid), table(tokens))
    with pytest.raises(ValueError, match="hash layer"):
        experts.force_expert_hooks(tiny256, 0, e)


def test_argument_errors(tiny256):
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        experts.ablate_expert_hooks(tiny256, 1, 8)
    with pytest.raises(IndexError, match="out of range"):
        experts.ablate_expert_hooks(tiny256, 9, 0)
    with pytest.raises(ValueError, match="routing slots"):
        experts.force_expert_hooks(tiny256, 1, [0, 1, 2])
    with pytest.raises(ValueError, match="how must be"):
        experts.ablate_expert_hooks(tiny256, 1, 0, how="forbid")


# ----------------------------------------------------------------------------- sweep
def test_expert_sweep_is_nan_where_never_picked(tiny256, runs):
    (_, clean, tokens, corrupted), at = runs, [3]

    def metric(logits):
        return logits[:, -1].log_softmax(-1)[:, 7].mean()

    result = experts.expert_sweep(tiny256, tokens, metric, how="zero", layers=[0, 2], positions=at)
    assert result.shape == (4, 8) and result[[1, 3]].isnan().all()
    for layer in (0, 2):
        ids = corrupted[f"blocks.{layer}.mlp.hook_expert_ids"][:, 3]  # [b,k]: the experts picked at position 3
        picked = torch.zeros(8, dtype=torch.bool)
        picked[ids.flatten()] = True
        assert torch.equal(~result[layer].isnan(), picked)
    e = int(corrupted["blocks.2.mlp.hook_expert_ids"][0, 3, 0])
    one = tiny256.run_with_hooks(tokens, fwd_hooks=experts.ablate_expert_hooks(tiny256, 2, e, positions=at))
    assert float(result[2, e]) == float(metric(one).detach())

    forbid = experts.expert_sweep(tiny256, tokens, metric, how="forbid", layers=[1], experts=[e], positions=at)
    assert forbid.isnan().sum() == 4 * 8 - int((corrupted["blocks.1.mlp.hook_expert_ids"][:, 3] == e).any())
    patch = experts.expert_sweep(tiny256, tokens, metric, how="patch", layers=[2], experts=[e], clean_cache=clean)
    direct = tiny256.run_with_hooks(tokens, fwd_hooks=experts.patch_expert_hooks(tiny256, 2, e, clean))
    assert float(patch[2, e]) == float(metric(direct).detach())
    with pytest.raises(ValueError, match="how must be"):
        experts.expert_sweep(tiny256, tokens, metric, how="double")

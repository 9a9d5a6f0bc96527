"""TransformerLens's `ActivationCache` methods on `V4ActivationCache`: right for n mHC streams, or an
error naming the V4 tool; short keys resolve to V4's names or list the candidates (v4lens.utils too).

Before, `decompose_resid()` summed embed + attention + MLP outputs as if the residual were additive
(tens of % off what hc_head reads), the other residual methods crashed with unrelated errors
(`W_O`, `tokens_to_residual_directions`, IndexError, "post is ambiguous"), and `cache["comb", 1]`
on a cache holding one of the two `hook_comb` silently returned it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import perturb
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.utilities import get_act_name as tl_act_name

import v4lens
from v4lens import V4ActivationCache, decompose
from v4lens.model.norm import rms_normalize
from v4lens.utils import get_act_name

pytestmark = pytest.mark.usefixtures("single_thread")
S = 24


def _load(**overrides):
    # perturbed: norm weights, sinks and biases away from their symmetric initial values (a missed norm weight shows)
    return perturb(v4lens.load("tiny", d_vocab=256, seed=3, **overrides), seed=4)


@pytest.fixture(scope="module")
def model():
    return _load()


@pytest.fixture(scope="module")
def run(model):
    tokens = torch.randint(0, 256, (2, S), generator=torch.Generator().manual_seed(7))
    logits, cache = model.run_with_cache(tokens)
    return tokens, logits, cache


@pytest.fixture(scope="module")
def optin_run(run):
    """The same weights with the opt-in hooks attn.hook_result and mlp.hook_expert_out."""
    tokens = run[0]
    logits, cache = _load(use_attn_result=True, use_expert_out=True).run_with_cache(tokens)
    return logits, cache


def _close(a, b, rel=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    err, scale = (a.float() - b.float()).abs().max(), b.float().abs().max()
    assert err <= rel * scale, (float(err), float(scale))


def _reader(cache, layer, mlp_input):
    """(input, norm output) of what reads the residual at (layer, mlp_input)."""
    if layer is None:
        return cache["hc_head.hook_out"], cache["ln_final.hook_normalized"]
    hc, ln = ("mlp_hc", "ln2") if mlp_input else ("attn_hc", "ln1")
    return cache[f"blocks.{layer}.{hc}.hook_out"], cache[f"blocks.{layer}.{ln}.hook_normalized"]


# ---------------------------------------------------------------------- every public method is decided
SAFE_AS_INHERITED = {"keys", "values", "items", "toggle_autodiff", "ssm_layers"}  # no residual involved


def test_every_public_method_is_v4_aware_or_harmless(run):
    public = {n for n in dir(ActivationCache) if not n.startswith("_") and callable(getattr(ActivationCache, n))}
    inherited = {n for n in public if getattr(V4ActivationCache, n) is getattr(ActivationCache, n)}
    assert inherited == SAFE_AS_INHERITED, sorted(inherited - SAFE_AS_INHERITED)
    assert run[2].ssm_layers() == []  # true: V4 has none


# ---------------------------------------------------------------------- decompose_resid, apply_ln_to_stack
@pytest.mark.parametrize("layer, mlp_input", [(None, False), (0, False), (2, False), (2, True)])
def test_decompose_resid_sums_to_what_the_reader_reads(run, layer, mlp_input):
    cache = run[2]
    parts, labels = cache.decompose_resid(layer, mlp_input=mlp_input, return_labels=True)
    x, normed = _reader(cache, layer, mlp_input)
    _close(parts.sum(0), x)  # the additive sum of writes was ~50% off hc_head.hook_out
    n = 4 if layer is None else layer
    assert labels[0] == "embed" and len(labels) == 1 + 2 * n + mlp_input
    assert labels[-1] == (f"{layer}_attn_out" if mlp_input else f"{n - 1}_mlp_out" if n else "embed")
    _close(cache.apply_ln_to_stack(parts, layer, mlp_input).sum(0), normed)  # the reader's RMSNorm, weight included
    _close(cache.decompose_resid(layer, mlp_input=mlp_input, apply_ln=True), cache.apply_ln_to_stack(parts, layer, mlp_input))
    attn, mlp = cache.decompose_resid(layer, mlp_input, mode="attn", incl_embeds=False), cache.decompose_resid(layer, mlp_input, mode="mlp")
    _close(attn.sum(0) + mlp.sum(0), x)


def test_apply_ln_to_stack_slices_like_transformer_lens(run):
    cache = run[2]
    last = cache.decompose_resid(pos_slice=-1)  # an int drops the position axis: [C, b, d]
    assert last.shape == (9, 2, 64)
    _close(cache.apply_ln_to_stack(last, pos_slice=-1).sum(0), cache["ln_final.hook_normalized"][:, -1])
    one = cache.apply_ln_to_stack(last, pos_slice=-1, batch_slice=[1])
    _close(one.sum(0), cache["ln_final.hook_normalized"][[1], -1])
    lens = cache.apply_ln_to_stack(last, recompute_ln=True)  # each component by its own statistic
    _close(lens[3], rms_normalize(last[3], cache.model.ln_final.eps) * cache.model.ln_final.w)


# ---------------------------------------------------------------------- logit_attrs
def test_logit_attrs_sum_to_the_logits_and_equal_decompose(model, run):
    tokens, logits, cache = run
    parts = cache.decompose_resid()
    attrs = cache.logit_attrs(parts, tokens[:, -1])  # one target per example: [C, b, p]
    expected = logits.gather(-1, tokens[:, -1, None, None].expand(-1, S, 1))[..., 0]
    _close(attrs.sum(0), expected)
    _close(attrs, decompose(model, cache, target=tokens[:, -1], positions=None).values)
    per_position = cache.logit_attrs(parts, tokens)  # [b, p] targets
    _close(per_position.sum(0), logits.gather(-1, tokens[..., None])[..., 0])
    diff = cache.logit_attrs(parts[:, :, -1], 3, incorrect_tokens=9, pos_slice=-1)
    _close(diff.sum(0), logits[:, -1, 3] - logits[:, -1, 9])
    with pytest.raises(ValueError, match="same shape"):
        cache.logit_attrs(parts, tokens[:, -1], incorrect_tokens=tokens)


# ---------------------------------------------------------------------- heads
def test_stack_head_results_split_each_attention_part(run):
    cache = run[2]
    heads, labels = cache.stack_head_results(return_labels=True)
    parts, part_labels = cache.decompose_resid(return_labels=True)
    assert heads.shape == (4 * 4, 2, S, 64) and labels[:2] == ["L0H0", "L0H1"] and labels[-1] == "L3H3"
    for l in range(4):
        _close(heads[4 * l : 4 * l + 4].sum(0), parts[part_labels.index(f"{l}_attn_out")], 1e-4)
    with_rest, labels = cache.stack_head_results(2, return_labels=True, incl_remainder=True, mlp_input=True)
    assert labels[-1] == "remainder" and len(labels) == 3 * 4 + 1
    _close(with_rest.sum(0), cache["blocks.2.mlp_hc.hook_out"])
    assert cache.stack_head_results(0).shape == (0, 2, S, 64)


def test_compute_head_results_equals_the_models_hook_result(run, optin_run):
    logits, optin = optin_run
    torch.testing.assert_close(logits, run[1], rtol=0, atol=1e-5)  # the same weights
    cache = V4ActivationCache(dict(run[2].cache_dict), run[2].model)
    cache.compute_head_results()
    for l in range(4):
        result = cache["result", l]
        assert result.shape == (2, S, 4, 64)
        _close(result, optin[f"blocks.{l}.attn.hook_result"], 1e-5)
        _close(result.sum(2), cache[f"blocks.{l}.hook_attn_out"], 1e-5)
    # the cached results (and, with use_expert_out, the hooked expert outputs) give the same decomposition
    _close(optin.get_full_resid_decomposition(), run[2].get_full_resid_decomposition(), 1e-4)


# ---------------------------------------------------------------------- full decomposition: heads, experts, embed
@pytest.mark.parametrize("layer, mlp_input", [(None, False), (3, True)])
def test_get_full_resid_decomposition_sums_to_the_reader(run, layer, mlp_input):
    cache = run[2]
    full, labels = cache.get_full_resid_decomposition(layer, mlp_input, return_labels=True)
    x, normed = _reader(cache, layer, mlp_input)
    _close(full.sum(0), x, 1e-4)
    n = 4 if layer is None else layer
    E = cache.model.cfg.n_routed_experts
    assert len(labels) == 4 * (n + mlp_input) + n * (E + 1) + 1 and labels[-1] == "embed" and "bias" not in labels
    coarse, coarse_labels = cache.get_full_resid_decomposition(layer, mlp_input, expand_neurons=False, return_labels=True)
    _close(coarse.sum(0), x, 1e-4)
    assert coarse_labels[4 * (n + mlp_input)] == "0_mlp_out"
    _close(cache.get_full_resid_decomposition(layer, mlp_input, apply_ln=True).sum(0), normed, 1e-4)
    direction = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    _close(cache.get_full_resid_decomposition(layer, mlp_input, project_output_onto=direction), full @ direction, 1e-5)


def test_experts_are_the_units_of_an_moe_layer(run):
    cache = run[2]
    full, labels = cache.get_full_resid_decomposition(return_labels=True)
    parts, part_labels = cache.decompose_resid(return_labels=True)
    E = cache.model.cfg.n_routed_experts
    for l in range(4):
        rows = [labels.index(f"L{l}E{e}") for e in range(E)] + [labels.index(f"L{l}E_shared")]
        _close(full[rows].sum(0), parts[part_labels.index(f"{l}_mlp_out")], 1e-4)
        picked = torch.zeros(2, S, E, dtype=torch.bool).scatter_(-1, cache[f"blocks.{l}.mlp.hook_expert_ids"], True)
        silent = full[rows[:E]].permute(1, 2, 0, 3).abs().amax(-1)  # [b, p, E]: zero where the token did not pick e
        assert torch.all(silent[~picked] == 0) and torch.all(silent[picked] > 0)


def test_neuron_and_ssm_methods_name_the_v4_tools(run):
    cache = run[2]
    for call in (lambda: cache.get_neuron_results(0), lambda: cache.stack_neuron_results(2)):
        with pytest.raises(NotImplementedError, match=r"get_full_resid_decomposition\(expand_neurons=True\)"):
            call()
    for call in (cache.compute_ssm_state, cache.compute_ssm_effective_attention):
        with pytest.raises(NotImplementedError, match="no SSM"):
            call()


# ---------------------------------------------------------------------- accumulated_resid
def test_accumulated_resid_is_what_the_logit_lens_reads(model, run):
    cache = run[2]
    stack, labels = cache.accumulated_resid(return_labels=True)
    assert labels == ["0_pre", "1_pre", "2_pre", "3_pre", "final_post"]
    _close(stack[-1], cache["hc_head.hook_out"], 1e-6)
    lens = cache.logit_lens(keep_logits=True)
    _close(cache.accumulated_resid(apply_ln=True) @ model.W_U, lens.logits, 1e-5)
    mids, labels = cache.accumulated_resid(2, incl_mid=True, mlp_input=True, pos_slice=-1, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "2_pre", "2_mid"] and mids.shape == (6, 2, 64)
    _close(mids[-1], model.hc_head(cache["blocks.2.hook_streams_mid"])[:, -1], 1e-6)


# ---------------------------------------------------------------------- caches without a batch axis, sliced positions
def test_methods_follow_batch_and_position_slices(run):
    _, logits, cache = run
    one = cache.apply_slice_to_batch_dim(1)  # no batch axis: entries [p, ...]
    _close(one.decompose_resid().sum(0), cache["hc_head.hook_out"][1])
    _close(one.logit_attrs(one.decompose_resid(), 5, has_batch_dim=False).sum(0), logits[1, :, 5])
    assert one.stack_head_results().shape == (16, S, 64)
    _close(one.accumulated_resid()[-1], cache["hc_head.hook_out"][1], 1e-6)
    _close(one.get_full_resid_decomposition().sum(0), cache["hc_head.hook_out"][1], 1e-4)
    last = cache.apply_slice_to_pos_dim([-2, -1])  # every quantity is per position
    _close(last.decompose_resid().sum(0), cache["hc_head.hook_out"][:, -2:])
    _close(last.stack_head_results(), cache.stack_head_results()[:, :, -2:])


# ---------------------------------------------------------------------- short keys
def test_short_keys_resolve_to_v4_names_or_list_the_candidates(model, run):
    cache = run[2]
    both = r"blocks\.1\.attn_hc\.hook_comb.*blocks\.1\.mlp_hc\.hook_comb"
    for key in [("comb", 1), tl_act_name("comb", 1), "comb1"]:  # TransformerLens's spelling: blocks.1.hook_comb
        with pytest.raises(KeyError, match=both):
            cache[key]
    assert cache[tl_act_name("topk", 1)] is cache["blocks.1.attn.indexer.hook_topk"]
    assert cache["post", 1, "mlp_hc"] is cache["blocks.1.mlp_hc.hook_post"]  # the module named: unique
    with pytest.raises(KeyError, match="neuron"):  # TransformerLens's ("post", l, "mlp") means MLP neurons
        cache["post", 1, "mlp"]
    with pytest.raises(KeyError, match="no hook named hook_comb in block 1's 'attn' module"):
        cache["comb", 1, "attn"]
    # ambiguity is the model's, not the cache's: one comb cached is not "the" comb
    _, partial = model.run_with_cache(run[0], names_filter=lambda n: n.endswith("attn_hc.hook_comb"))
    with pytest.raises(KeyError, match=both):
        partial["comb", 1]
    with pytest.raises(KeyError, match="not in this cache"):
        partial["topk", 1]


def test_v4lens_utils_get_act_name(model):
    assert get_act_name("pattern", 1) == "blocks.1.attn.hook_pattern"
    assert get_act_name("embed") == "hook_embed" and get_act_name("normalized") == "ln_final.hook_normalized"
    assert get_act_name("topk", 1) == "blocks.1.attn.indexer.hook_topk"
    assert get_act_name("comb", 1, "mlp_hc") == "blocks.1.mlp_hc.hook_comb"
    assert get_act_name("comb", -1, "attn_hc", model=model) == "blocks.3.attn_hc.hook_comb"
    assert get_act_name("mtp.2.hook_hidden") == "mtp.2.hook_hidden"  # full names pass (any MTP block)
    with pytest.raises(KeyError, match=r"blocks\.1\.attn_hc\.hook_comb.*blocks\.1\.mlp_hc\.hook_comb"):
        get_act_name("comb", 1)
    with pytest.raises(KeyError, match="streams_post"):
        get_act_name("resid_post", 2)
    with pytest.raises(KeyError, match="no hook named hook_topk in block 0"):  # block 0 of tiny: sliding window
        get_act_name("topk", 0, model="tiny")
    with pytest.raises(KeyError, match="Similar"):
        get_act_name("patern", 1)
    with pytest.raises(KeyError, match="pass a layer"):
        get_act_name("pattern")
    # every hook of the model, named by (its name, its block, its module), comes back whole
    for name in model.hook_dict:
        if name.startswith("blocks."):
            _, l, rest = name.split(".", 2)
            module, _, hook = rest.rpartition(".")
            assert get_act_name(hook, int(l), module or None, model=model) == name

"""Exact logit attribution through mHC: the parts sum to the model's value, and the frozen-mixing
coefficients are what the model itself does when the mixing is held fixed."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb

import v4lens
from v4lens.analysis.decomposition import decompose, decomposition_hooks, stream_lineage

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    return perturb(v4lens.load("tiny", d_vocab=256, seed=3), seed=4)


@pytest.fixture(scope="module")
def run(model):
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(5))
    logits, cache = model.run_with_cache(tokens)
    return tokens, logits, cache


def _close(a, b, rel=1e-4):
    assert (a - b).abs().max() <= rel * b.abs().max(), ((a - b).abs().max(), b.abs().max())


@pytest.mark.parametrize("heads,experts", [(False, False), (True, False), (False, True), (True, True)])
def test_parts_sum_to_the_logit(model, run, heads, experts):
    tokens, logits, cache = run
    answer = tokens[:, -1]
    dec = decompose(model, cache, target=answer, positions=None, heads=heads, experts=experts)
    expected = logits.gather(-1, answer[:, None, None].expand(-1, 33, 1))[..., 0]
    _close(dec.total, expected, 1e-6)
    _close(dec.values.sum(0), expected)
    n_attn = model.cfg.n_heads if heads else 1
    n_mlp = model.cfg.n_activated_experts + 1 if experts else 1
    assert len(dec.labels) == dec.values.shape[0] == 1 + model.cfg.n_layers * (n_attn + n_mlp)


def test_splits_add_up_to_their_sublayer(model, run):
    _, _, cache = run
    coarse = decompose(model, cache, target=17, positions=[-1, 5])
    fine = decompose(model, cache, target=17, positions=[-1, 5], heads=True, experts=True)
    for l in range(model.cfg.n_layers):
        for part in ("attn", "mlp"):
            rows = [i for i, lab in enumerate(fine.labels) if lab.startswith(f"L{l}.{part}.")]
            _close(fine.values[rows].sum(0), coarse.values[coarse.labels.index(f"L{l}.{part}")], 1e-5)
    assert torch.equal(fine.expert_ids[2], cache["blocks.2.mlp.hook_expert_ids"][:, [-1, 5]])


def test_logit_difference_and_directions(model, run):
    _, logits, cache = run
    diff = decompose(model, cache, target=(3, 9), positions=[0, -1])
    _close(diff.total, logits[:, [0, -1], 3] - logits[:, [0, -1], 9], 1e-6)
    _close(diff.values.sum(0), diff.total)
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    along = decompose(model, cache, target=direction, positions=None)
    h = cache["ln_final.hook_normalized"]
    _close(along.total, h @ direction, 1e-6)
    _close(along.values.sum(0), along.total)
    per_position = decompose(model, cache, target=direction.expand(2, 33, -1).contiguous(), positions=None)
    _close(per_position.values, along.values, 1e-6)


def test_lineage_rebuilds_the_final_streams(model, run):
    _, _, cache = run
    lineage, labels, coefficients = stream_lineage(model, cache)
    writes = [cache["hook_embed"]] + [
        cache[f"blocks.{l}.hook_{part}_out"] for l in range(model.cfg.n_layers) for part in ("attn", "mlp")
    ]
    assert labels[:3] == ["embed", "L0.attn", "L0.mlp"] and len(labels) == len(writes)
    final = sum(v[..., None] * f[:, :, None, :] for v, f in zip(lineage, writes))
    _close(final, cache[f"blocks.{model.cfg.n_layers - 1}.hook_streams_post"], 1e-5)
    collapsed = sum(a[..., None] * f for a, f in zip(coefficients, writes))
    _close(collapsed, cache["hc_head.hook_out"], 1e-5)


def test_coefficients_are_the_models_response_with_mixing_frozen(model, run):
    """Hold every write, post, comb and hc_head's pre at the clean values and add ε·v to one write:
    the collapsed state moves by exactly α·ε·v (the direct path the decomposition describes)."""
    tokens, _, cache = run
    _, labels, coefficients = stream_lineage(model, cache)
    frozen = [
        name for name in cache.cache_dict
        if name.startswith("blocks.") and name.endswith(("hc.hook_post", "hc.hook_comb", "hook_attn_out", "hook_mlp_out"))
    ] + ["hc_head.hook_pre"]  # fmt: skip
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    for layer, part in ((0, "attn"), (2, "mlp")):
        nudged = f"blocks.{layer}.hook_{part}_out"

        def clean(x, hook, nudged=nudged):
            return cache[hook.name] + (1e-2 * v if hook.name == nudged else 0)

        out = {}
        hooks = [(name, clean) for name in frozen] + [
            ("hc_head.hook_out", lambda x, hook, out=out: out.setdefault("y", x))
        ]
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=hooks)
        moved = (out["y"] - cache["hc_head.hook_out"]) / 1e-2
        alpha = coefficients[labels.index(f"L{layer}.{part}")]
        _close(moved, alpha[..., None] * v, 1e-3)


def test_missing_hooks_are_named(model, run):
    tokens, _, _ = run
    _, small = model.run_with_cache(tokens, names_filter=["hook_embed"])
    with pytest.raises(KeyError, match="decomposition_hooks"):
        decompose(model, small, target=1)
    dec = decompose(model, tokens=tokens, target=1, heads=True)  # makes its own cache
    assert "L1.attn.h3" in dec.labels
    assert set(decomposition_hooks(model, heads=True)) >= {"blocks.1.attn.hook_z", "hc_head.hook_pre"}

"""Slicing selections are integers naming real layers, and a source hash table must hold real
experts: anything else is an error naming the argument (nothing is truncated or ignored)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_slicing import EXPERTS, HEADS, SOURCE, TARGET

from v4lens.weights.slicing import make_plan, remap_tid2eid

N_TARGET_LAYERS = TARGET.n_layers + TARGET.n_mtp_layers  # 4 blocks + 1 MTP block: experts keys 0..4


def test_integer_selections_of_every_kind_are_accepted():
    hidden = torch.randperm(256, generator=torch.Generator().manual_seed(1))[:160]
    plan = make_plan(SOURCE, TARGET, layers=np.array([0, 4, 5, 6]), hidden=hidden, heads=HEADS,
                     experts={2: np.array(EXPERTS), 4: EXPERTS})  # fmt: skip
    assert plan.layers == [0, 4, 5, 6] and torch.equal(plan.hidden, hidden)
    assert plan.experts[2] == EXPERTS and plan.experts[4] == EXPERTS and plan.experts[0] == [0, 1, 2, 3, 4]
    assert all(type(e) is int for e in plan.experts[2]) and all(type(s) is int for s in plan.layers)


@pytest.mark.parametrize("bad_layer", [5, 7, -1])
def test_an_experts_key_for_a_missing_layer_is_an_error(bad_layer):
    with pytest.raises(ValueError, match=rf"experts.*layer {bad_layer}\b.*0\.\.{N_TARGET_LAYERS - 1}"):
        make_plan(SOURCE, TARGET, experts={bad_layer: EXPERTS})
    with pytest.raises(ValueError, match=r"experts.*layer 4\b.*0\.\.3"):  # without MTP, 4 is no layer either
        make_plan(SOURCE, TARGET.without_mtp(), experts={4: EXPERTS})


def test_experts_keys_must_be_ints():
    with pytest.raises(TypeError, match=r"experts.*'2'"):
        make_plan(SOURCE, TARGET, experts={"2": EXPERTS})
    with pytest.raises(TypeError, match="experts"):
        make_plan(SOURCE, TARGET, experts={True: EXPERTS})


@pytest.mark.parametrize(
    "bad",
    [
        {"hidden": [i + 0.5 for i in range(160)]},
        {"hidden": torch.arange(160).float()},
        {"hidden": np.arange(160) + 0.7},
        {"hidden": [True] + list(range(1, 160))},
        {"hidden": torch.ones(160, dtype=torch.bool)},
        {"heads": [2.0, 3, 0, 1, 7, 6]},
        {"heads": [2, 3, 0, 1, 7, 6.9]},
        {"layers": [0, 4.0, 5, 6]},
        {"layers": [0, 4, 5, 6.5]},
        {"layers": [False, 4, 5, 6]},
        {"experts": [11, 3, 5, 0, 8.5]},
        {"experts": {2: [11, 3, 5, 0, 8.0]}},
        {"experts": [11, 3, True, 0, 8]},
        {"hidden": "0123"},
        {"layers": 5},
    ],
)
def test_non_integer_indices_are_refused_not_truncated(bad):
    (arg,) = bad
    with pytest.raises(TypeError, match=arg):
        make_plan(SOURCE, TARGET, **bad)


def test_a_source_hash_table_with_negative_ids_is_refused():
    table = torch.tensor([[4, 1, 2], [5, -1, 7], [0, 3, 6]])
    with pytest.raises(ValueError, match=r"tid2eid.*row 1\b.*-1"):
        remap_tid2eid(table, [0, 1, 2, 3], n_experts=4, k=3)
    with pytest.raises(TypeError, match="tid2eid"):
        remap_tid2eid(table.float() + 0.5, [0, 1, 2, 3], n_experts=4, k=3)
    with pytest.raises(ValueError, match=r"tid2eid.*row 2\b.*12"):
        remap_tid2eid(torch.tensor([[4, 1, 2], [5, 6, 7], [0, 12, 6]]), [0, 1, 2, 3], 4, 3, n_source_experts=12)
    # a valid table still follows the documented rule
    assert remap_tid2eid(table.abs(), [0, 1, 2, 3], 4, 3)[1].tolist() == [1, 2, 3]

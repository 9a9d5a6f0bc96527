"""Shared pytest fixtures. Keep this small; append new fixtures rather than rewriting."""

from __future__ import annotations

import pytest
import torch

import v4lens
from v4lens.model.kv_cache import V4KVCache


# ---------------------------------------------------------------- tiny model, small vocab
# (used by test_hooks.py, test_patching_tl.py, test_inputs.py, test_precision.py)
@pytest.fixture(scope="session")
def tiny256():
    """The `tiny` preset with d_vocab=256, fp32, seed 0, in eval mode.

    Session-shared and READ-ONLY: tests must not change its weights, dtype or device, and
    must not leave hooks attached (run_with_hooks / run_with_cache clean up after themselves).
    """
    return v4lens.load("tiny", d_vocab=256, seed=0)


@pytest.fixture(scope="session")
def tokens_2x40():
    """Random tokens [2, 40] for tiny256: long enough that the CSA indexer (top-3 of up to 10
    entries) is selective and the HCA layer (m=6) has 6 compressed entries."""
    return torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1234))


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tiny-model tests on one intra-op thread (restored afterwards).

    The tiny models are dominated by per-op overhead; on a busy 2-core machine, two torch
    threads per op make them several times slower. Use with
    `pytestmark = pytest.mark.usefixtures("single_thread")`.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def two_chunks(model, tokens: torch.Tensor, split: int) -> torch.Tensor:
    """The logits of `tokens` run as two chunks through a fresh V4KVCache (split at `split`), concatenated."""
    kv = V4KVCache()
    return torch.cat([model(tokens[:, :split], past_kv_cache=kv), model(tokens[:, split:], past_kv_cache=kv)], dim=1)


def perturb(model, seed: int, scale: float = 0.05):
    """Add N(0, scale) noise to every parameter (norm weights, sinks, position biases and router
    biases included), so no tensor keeps its symmetric initial value. Returns the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.device, p.dtype) * scale)  # the same noise on any device
    return model


# ---------------------------------------------------------------- parallel runs (pytest -n N, pytest-xdist)
def pytest_configure(config):
    """Under pytest-xdist, each of the N workers takes its share of the cores (torch threads and the
    OMP_NUM_THREADS its subprocesses inherit), so N workers never oversubscribe the machine."""
    import os

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        share = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(share)
        torch.set_num_threads(share)

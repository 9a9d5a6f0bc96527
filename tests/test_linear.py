"""One-row bf16 products run on PyTorch's GEMV kernel (oneDNN off for that call only); others keep oneDNN."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import v4lens
from v4lens.model import linear as linear_mod
from v4lens.model.kv_cache import V4KVCache
from v4lens.model.linear import grouped_linear, linear


@pytest.fixture
def onednn_seen(monkeypatch):
    """Record (product, input rows, whether oneDNN was on) for every bf16 F.linear and wo_a einsum."""
    seen = []
    real_linear, real_einsum = F.linear, torch.einsum

    def spy_linear(x, w, *rest):
        if x.dtype == torch.bfloat16:
            seen.append(("linear", x.numel() // max(x.shape[-1], 1), torch._C._get_mkldnn_enabled()))
        return real_linear(x, w, *rest)

    def spy_einsum(eq, *ops):
        if ops[0].dtype == torch.bfloat16 and eq == "bsgk,grk->bsgr":  # the grouped output projection
            seen.append((eq, ops[0].shape[0] * ops[0].shape[1], torch._C._get_mkldnn_enabled()))
        return real_einsum(eq, *ops)

    monkeypatch.setattr(linear_mod.F, "linear", spy_linear)
    monkeypatch.setattr(linear_mod.torch, "einsum", spy_einsum)
    return seen


def exact(x, w):
    """The fp32 product of bf16 values, rounded once to bf16."""
    return F.linear(x.float(), w.float()).bfloat16()


def test_one_bf16_row_uses_the_gemv_kernel_and_restores_the_switch(onednn_seen):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 640, generator=g).bfloat16()
    for x in (torch.randn(640, generator=g), torch.randn(1, 1, 640, generator=g)):
        y = linear(x.bfloat16(), w)
        assert y.dtype == torch.bfloat16 and y.shape == x.shape[:-1] + (96,)
        # fp32 accumulation either way: at most the last bit of an output differs from one rounding
        torch.testing.assert_close(y, exact(x.bfloat16(), w), rtol=2**-7, atol=1e-6)
    assert [on for _, _, on in onednn_seen] == [False, False]
    assert torch._C._get_mkldnn_enabled()


def test_wider_or_fp32_products_keep_onednn(onednn_seen, monkeypatch):
    w = torch.randn(32, 64)
    linear(torch.randn(2, 64).bfloat16(), w.bfloat16())  # two rows
    linear(torch.randn(0, 64).bfloat16(), w.bfloat16())  # no rows
    grouped_linear(torch.randn(1, 2, 4, 16).bfloat16(), torch.randn(4, 8, 16).bfloat16())  # two positions
    assert [on for _, _, on in onednn_seen] == [True] * 3
    flips = []
    monkeypatch.setattr(linear_mod.torch._C, "_set_mkldnn_enabled", flips.append)
    linear(torch.randn(1, 64), w)  # fp32: MKL's GEMV, the switch untouched
    assert flips == []


def test_grouped_one_row():
    z = torch.randn(1, 1, 4, 48).bfloat16()
    wo = torch.randn(4, 24, 48).bfloat16()
    want = torch.einsum("bsgk,grk->bsgr", z.float(), wo.float()).bfloat16()
    torch.testing.assert_close(grouped_linear(z, wo), want, rtol=2**-7, atol=1e-6)
    assert torch._C._get_mkldnn_enabled()


def test_an_error_inside_leaves_onednn_on():
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        linear(torch.randn(1, 64).bfloat16(), torch.randn(32, 65).bfloat16())
    assert torch._C._get_mkldnn_enabled()


@pytest.mark.filterwarnings("ignore:TF32 acceleration")
def test_a_switch_turned_off_by_the_user_stays_off():
    with torch.backends.mkldnn.flags(enabled=False):
        linear(torch.randn(1, 64).bfloat16(), torch.randn(32, 64).bfloat16())
        assert not torch._C._get_mkldnn_enabled()
    assert torch._C._get_mkldnn_enabled()


def test_threads_cannot_leave_the_switch_off():
    w = torch.randn(64, 256).bfloat16()
    x = torch.randn(1, 256).bfloat16()
    want = linear(x, w)
    results = []

    def work():
        results.extend(torch.equal(linear(x, w), want) for _ in range(200))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results) and len(results) == 800
    assert torch._C._get_mkldnn_enabled()


def test_a_bf16_decoding_step_takes_the_gemv_kernel_and_a_prefill_does_not(onednn_seen):
    model = v4lens.load("tiny", d_vocab=256, seed=0, dtype=torch.bfloat16)
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = V4KVCache()
        model(tokens[:, :11], past_kv_cache=cache)
        prefill = list(onednn_seen)
        onednn_seen.clear()
        model(tokens[:, 11:], past_kv_cache=cache)
    # the prefill: oneDNN for every product of several rows (projections, experts two tokens chose), not else
    assert any(rows > 1 for _, rows, _ in prefill)
    assert all(on == (rows > 1) for _, rows, on in prefill)
    # the step: every projection and expert, wo_a included, on the GEMV kernel
    assert onednn_seen and not any(on for _, _, on in onednn_seen)
    assert {eq for eq, _, _ in onednn_seen} == {"linear", "bsgk,grk->bsgr"}

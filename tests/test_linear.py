"""One-row bf16 products run on PyTorch's GEMV kernel (oneDNN off for that call only); others keep oneDNN.
Where the CPU has no native bf16 products, products of several rows run in fp32 and are rounded once."""

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
    """Record (product, input rows, whether oneDNN was on) for every bf16 F.linear and wo_a einsum,
    as on a CPU with native bf16 products (whatever this one has)."""
    monkeypatch.setattr(linear_mod, "native_bf16_products", lambda: True)
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


# ------------------------------------------------------------------ CPUs without native bf16 products
@pytest.fixture
def fp32_products_seen(monkeypatch):
    """As on a CPU without native bf16 products; records (dtypes, weight shape) of every F.linear."""
    monkeypatch.setattr(linear_mod, "native_bf16_products", lambda: False)
    seen, real_linear = [], F.linear

    def spy_linear(x, w, *rest):
        seen.append((x.dtype, w.dtype, tuple(w.shape)))
        return real_linear(x, w, *rest)

    monkeypatch.setattr(linear_mod.F, "linear", spy_linear)
    return seen


def test_native_bf16_products_is_answered_by_onednn():
    linear_mod.native_bf16_products.cache_clear()
    assert linear_mod.native_bf16_products() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_without_native_bf16_wide_products_multiply_in_fp32_slices(fp32_products_seen, monkeypatch):
    monkeypatch.setattr(linear_mod, "UPCAST_SLICE_BYTES", 40 * 64 * 4)  # 40 rows of the weight at a time
    g = torch.Generator().manual_seed(0)
    w = torch.randn(100, 64, generator=g).bfloat16()
    x = torch.randn(2, 3, 64, generator=g).bfloat16()  # 6 rows
    y = linear(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 100)
    f32 = torch.float32
    assert fp32_products_seen == [(f32, f32, (40, 64)), (f32, f32, (40, 64)), (f32, f32, (20, 64))]
    torch.testing.assert_close(y, exact(x, w), rtol=2**-7, atol=1e-6)  # one rounding of the fp32 sums


def test_without_native_bf16_few_rows_and_fp32_keep_their_kernels(fp32_products_seen):
    w = torch.randn(32, 64)
    for rows in range(1, linear_mod.UPCAST_MIN_ROWS):
        linear(torch.randn(rows, 64).bfloat16(), w.bfloat16())
    linear(torch.randn(8, 64), w)  # fp32
    bf16, f32 = torch.bfloat16, torch.float32
    assert fp32_products_seen == [(bf16, bf16, (32, 64))] * (linear_mod.UPCAST_MIN_ROWS - 1) + [(f32, f32, (32, 64))]


def test_without_native_bf16_einsums_multiply_in_fp32(monkeypatch):
    monkeypatch.setattr(linear_mod, "native_bf16_products", lambda: False)
    operands, real_einsum = [], torch.einsum
    monkeypatch.setattr(linear_mod.torch, "einsum", lambda eq, *ops: operands.extend(ops) or real_einsum(eq, *ops))
    g = torch.Generator().manual_seed(1)
    z, wo = torch.randn(1, 4, 2, 48, generator=g).bfloat16(), torch.randn(2, 24, 48, generator=g).bfloat16()
    q, k = torch.randn(1, 5, 3, 16, generator=g).bfloat16(), torch.randn(1, 7, 16, generator=g).bfloat16()
    grouped = grouped_linear(z, wo)
    dots = linear_mod.einsum_in_model_dtype("bshc,btc->bsht", q, k)
    assert grouped.dtype == dots.dtype == torch.bfloat16
    assert operands and all(op.dtype == torch.float32 for op in operands)
    want = real_einsum("bsgk,grk->bsgr", z.float(), wo.float()).bfloat16()
    torch.testing.assert_close(grouped, want, rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(
        dots, real_einsum("bshc,btc->bsht", q.float(), k.float()).bfloat16(), rtol=2**-7, atol=1e-6
    )
    fp32_dots = linear_mod.einsum_in_model_dtype("bshc,btc->bsht", q.float(), k.float())  # fp32 stays as it is
    assert fp32_dots.dtype == torch.float32


def test_a_bf16_model_without_native_bf16_gives_the_native_activations(monkeypatch):
    """Every hook of a bf16 forward, fp32 multiplications against bf16 ones: the same discrete decisions,
    and activations within bf16 rounding."""
    model = v4lens.load("tiny", d_vocab=256, seed=0, dtype=torch.bfloat16)
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    caches, bf16_rows, real_linear = [], [], F.linear

    def spy_linear(x, w, *rest):
        if x.dtype == torch.bfloat16:
            bf16_rows.append(x.numel() // x.shape[-1])
        return real_linear(x, w, *rest)

    monkeypatch.setattr(linear_mod.F, "linear", spy_linear)
    for native in (True, False):
        monkeypatch.setattr(linear_mod, "native_bf16_products", lambda native=native: native)
        bf16_rows.clear()
        with torch.no_grad():
            caches.append(model.run_with_cache(tokens)[1])
        assert any(rows >= 4 for rows in bf16_rows) == native  # the wide products' kernel really changed
    native, upcast = caches
    assert native.keys() == upcast.keys()
    for name in native:
        a, b = native[name], upcast[name]
        if a.is_floating_point():
            torch.testing.assert_close(b.float(), a.float(), rtol=0.05, atol=0.05, msg=name)
        else:
            assert torch.equal(a, b), name

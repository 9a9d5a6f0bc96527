"""Products with a weight matrix, on the CPU kernel that suits a single input row.

On CPU PyTorch sends every bf16 matrix product to oneDNN. For one input row (a decoding step's
projections, an expert that a single token chose) oneDNN reads the weight at about half the
speed of PyTorch's own GEMV kernel, and a decoding step is little else but such products. So a
one-row bf16 product runs with oneDNN switched off for that call. Both kernels multiply bf16
values exactly and accumulate in fp32; they may round the last bit of an output differently
(about one output in 10,000 in a test), which is within what bf16 itself changes. Wider products
(prefill, several tokens per expert) keep oneDNN, much faster there; fp32 products never use it.

Without native bf16 products in the CPU (no AVX-512 / AMX: e.g. AMD before Zen 4, most laptops),
PyTorch has no fast bf16 kernel at all: its fallback runs a row at a time at a few GFLOP/s, 6x
(a 256-token projection) to 270x (a 2048³ GEMM) slower than an fp32 GEMM. There, products of
`UPCAST_MIN_ROWS` or more rows upcast both operands to fp32 (exact), multiply in fp32 and round
the result to bf16 once: the same values up to summation order, as any bf16 kernel gives. The
weight is upcast a slice of output rows at a time (`UPCAST_SLICE_BYTES`), so no fp32 copy of a
large matrix is made and the slice stays in cache.

PyTorch's switch is process-wide: during such a call, bf16 products that other threads run at
the same moment take PyTorch's kernel too (same values up to that last bit). The switch is
flipped under a lock, so concurrent calls here cannot leave it off; a switch the user turned
off (`torch.backends.mkldnn.flags(enabled=False)`) stays off.
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F

# Held while any of PyTorch's process-wide matmul switches is flipped (here and in head.py), so two
# threads can never restore each other's value and leave a switch changed. Re-entrant: a weight
# subclass may compute inside the call.
SWITCH_LOCK = threading.RLock()


UPCAST_MIN_ROWS = 4  # below this the fallback's per-row kernel beats upcasting the weight (measured)
UPCAST_SLICE_BYTES = 3 << 19  # 1.5 MiB of fp32 weight per slice (256 rows at d 1536): fastest of 64-1024 rows


@functools.cache
def native_bf16_products() -> bool:
    """Whether this CPU multiplies bf16 natively (oneDNN's check: AVX-512 BF16, AMX, Arm's BF16)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: assume the native kernel
        return True


def _bf16_on_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.device.type == "cpu" and weight.dtype == torch.bfloat16 and x.dtype == torch.bfloat16


def _upcast_bf16(x: torch.Tensor, weight: torch.Tensor, rows: int) -> bool:
    return rows >= UPCAST_MIN_ROWS and _bf16_on_cpu(x, weight) and not native_bf16_products()


def _linear_via_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """bf16 x [..., in] times bf16 weight [out, in], multiplied in fp32 and rounded once to bf16."""
    x32, step = x.float(), max(1, UPCAST_SLICE_BYTES // (4 * max(weight.shape[1], 1)))
    if step >= weight.shape[0]:
        return F.linear(x32, weight.float()).to(x.dtype)
    out = x.new_empty(x.shape[:-1] + (weight.shape[0],))
    for r0 in range(0, weight.shape[0], step):
        out[..., r0 : r0 + step] = F.linear(x32, weight[r0 : r0 + step].float())  # rounds to bf16 on the copy
    return out


def einsum_in_model_dtype(equation: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.einsum of two same-dtype operands, the result in that dtype; on a CPU without native
    bf16 products, computed in fp32 and rounded once (see the module docstring)."""
    if _bf16_on_cpu(a, b) and not native_bf16_products():
        return torch.einsum(equation, a.float(), b.float()).to(a.dtype)
    return torch.einsum(equation, a, b)


def _one_bf16_row(x: torch.Tensor, weight: torch.Tensor, rows: int) -> bool:
    return rows == 1 and _bf16_on_cpu(x, weight)


def _without_onednn(fn, *args):
    with SWITCH_LOCK:
        if not torch._C._get_mkldnn_enabled():
            return fn(*args)
        torch._C._set_mkldnn_enabled(False)
        try:
            return fn(*args)
        finally:
            torch._C._set_mkldnn_enabled(True)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) without bias: [..., in] x [out, in] -> [..., out]."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if _one_bf16_row(x, weight, rows):
        return _without_onednn(F.linear, x, weight)
    if _upcast_bf16(x, weight, rows):
        return _linear_via_fp32(x, weight)
    return F.linear(x, weight)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Group g's input times weight[g]: x [b, s, G, in] x weight [G, out, in] -> [b, s, G, out]."""
    rows = x.shape[0] * x.shape[1]
    if _one_bf16_row(x, weight, rows):
        return _without_onednn(torch.einsum, "bsgk,grk->bsgr", x, weight)
    if _upcast_bf16(x, weight, rows):
        return einsum_in_model_dtype("bsgk,grk->bsgr", x, weight)
    return torch.einsum("bsgk,grk->bsgr", x, weight)

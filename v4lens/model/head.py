"""The logits head: fp32 logits (as in DeepSeek's reference) for every position, shared with the MTP blocks."""

from __future__ import annotations

import contextlib
import threading
import warnings

import torch
import torch.nn.functional as F

from .allocator import release_free_memory
from .linear import SWITCH_LOCK


def fp32_logits(h: torch.Tensor, weight: torch.Tensor, chunk: int = 1024, compiled: bool = False) -> torch.Tensor:
    """head · h in fp32 for every position: [..., d] x [V, d] -> [..., V] fp32.

    A bf16 head is upcast a vocabulary slice at a time, so no fp32 copy of the whole table exists
    (1024 rows, 6 MiB on mini-3b, stay in cache: a decoding step's head is 1.4x faster than
    with 4096, and long inputs are unaffected).
    When both operands hold bf16 values (a bf16 model), every product is exact in bf16, so on
    CPU oneDNN may multiply in bf16 while accumulating and writing fp32: the same fp32 logits up
    to summation order, about twice as fast as an fp32 GEMM. Not for one position (a decoding step):
    oneDNN would convert each fp32 slice back to bf16 first, and the plain fp32 GEMV is ~15% faster.
    compiled=True (`HookedV4.set_compiled_head`): one position on CPU with a bf16 table and no autograd runs
    through `_compiled_row_logits`, which reads the table once without an fp32 copy.
    """
    if compiled and _compilable(h, weight):
        logits = _compiled_row_logits(h, weight)
        if logits is not None:
            return logits
    if h.device.type == "cpu":
        # Logits that reach the mmap threshold (1 GiB: ~2,080 positions of a 129k vocabulary) first hand the heap's
        # freed temporaries back to the kernel; at 8k tokens on mini-3b the forward's peak drops by 1.2 GiB.
        release_free_memory(before_allocating=h.numel() // h.shape[-1] * weight.shape[0] * 4)
    h32 = h.float()
    if weight.dtype == torch.float32:
        return F.linear(h32, weight)
    out = h32.new_empty(h.shape[:-1] + (weight.shape[0],))  # written in place: no second logits tensor
    exact_in_bf16 = h.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and h.numel() > h.shape[-1]
    with _bf16_products_fp32_sums(h.device, exact_in_bf16):
        for v0 in range(0, weight.shape[0], chunk):
            out[..., v0 : v0 + chunk] = F.linear(h32, weight[v0 : v0 + chunk].float())
    return out


@contextlib.contextmanager
def _bf16_products_fp32_sums(device: torch.device, enabled: bool):
    """Let CPU fp32 GEMMs multiply in bf16 (only used where the operands are bf16-valued, so exact)."""
    flag = getattr(torch.backends.mkldnn, "matmul", None)
    if not enabled or device.type != "cpu" or flag is None or not torch.backends.mkldnn.is_available():
        yield
        return
    with SWITCH_LOCK:  # process-wide: a concurrent restore must not leave every fp32 product in bf16
        before = flag.fp32_precision
        flag.fp32_precision = "bf16"
        try:
            yield
        finally:
            flag.fp32_precision = before


# ---------------------------------------------------------------------------------------- compiled one-row head
# A decoding step's head is one row against the 129k-row table. Eagerly that is an upcast of every slice of the
# table to fp32 and then an fp32 GEMV (PyTorch has no CPU product of bf16 operands into fp32): ~45 ms on mini-3b
# here, a quarter of a step. torch.compile fuses the upcast into the dot products, one read of the bf16 table:
# ~12 ms. Compiling takes seconds once per process (inductor, which needs a C++ compiler), hence opt-in.
_COMPILE_LOCK = threading.Lock()  # dynamo compiles one call at a time
_compiled: dict[str, object] = {}  # "fn": the compiled kernel, or "failed": why compiling did not work


def _row_logits(h32: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h32 [1, d] fp32, weight [V, d] bf16 -> [V] fp32: exact products (bf16-valued operands), fp32 sums."""
    return (weight.float() * h32).sum(dim=-1)


def _compilable(h: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        h.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and h.numel() == h.shape[-1]
        and not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad))
    )


def _compiled_row_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """One position's fp32 logits from the compiled kernel ([..., d] -> [..., V]), or None (with a warning,
    once per process) where compiling fails; the caller then runs the eager head."""
    with _COMPILE_LOCK:
        if "failed" in _compiled:
            return None
        fn = _compiled.get("fn")
        if fn is None:  # compiles at its first call
            fn = _compiled["fn"] = torch.compile(_row_logits, dynamic=False)
        try:
            row = fn(h.reshape(1, -1).float(), weight)
        except Exception as e:  # noqa: BLE001 - no C++ compiler, no inductor, ...: an input error recurs in the eager head
            _compiled["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(
                f"set_compiled_head: torch.compile of the one-row head failed ({_compiled['failed']}); "
                "using the eager head (the same logits up to summation order, slower)",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
    return row.view(h.shape[:-1] + (weight.shape[0],))

"""Let glibc reuse freed memory for large CPU tensors instead of asking the kernel for fresh pages each time.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB by default) with new pages from
the kernel and unmaps them on free, so every large temporary of an eager forward — a [2048, 4, 1536] fp32
copy of the mHC streams is 48 MiB — is page-faulted and zeroed again on every op. Raising the mmap
threshold to 1 GiB serves those blocks from the heap, where freed memory is reused: on this project's
2-core machine a mini-3b bf16 forward ran 1.27x faster at 2k tokens (more than half of each mHC's time
was page faults) and 1.10x at 8k, for 6% / 15% more peak memory (a heap reused by blocks of many sizes
fragments). The trim threshold (256 MiB) hands a free heap top larger than that back to the kernel.
`HookedV4` applies this when the first model is built (host memory: it matters on a CPU device).

Freed blocks below the top of the heap stay resident, though: after the blocks of a long forward the heap
holds up to ~2 GiB of freed temporaries (mini-3b at 8k tokens). `release_free_memory` hands those pages
back (glibc's `malloc_trim`); the logits head calls it before it allocates a large output, so the fp32
logits of a long input (4 GiB at 8k) do not sit on top of them.

Opt out with the environment variable `V4LENS_MALLOC=default` (set before the first model is built), or
choose the values with `V4LENS_MALLOC=<mmap bytes>,<trim bytes>`. Only glibc (Linux) is tuned; elsewhere
nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)


@functools.cache
def tune_cpu_allocator() -> tuple[int, int] | str:
    """Apply the thresholds once per process; returns (mmap, trim) in bytes, or why nothing was changed."""
    return _apply(os.environ.get("V4LENS_MALLOC", ""))


def _apply(setting: str) -> tuple[int, int] | str:
    setting = setting.strip().lower()
    if setting == "default":
        return "V4LENS_MALLOC=default"
    if setting:
        try:
            mmap, trim = (int(v) for v in setting.split(","))
        except ValueError:
            raise ValueError(f"V4LENS_MALLOC={setting!r}: give 'default' or '<mmap bytes>,<trim bytes>'") from None
    else:
        mmap, trim = MMAP_THRESHOLD, TRIM_THRESHOLD
    libc = _glibc()
    if isinstance(libc, str):
        return libc
    mallopt = libc.mallopt
    if not (mallopt(_M_MMAP_THRESHOLD, min(mmap, 2**31 - 1)) and mallopt(_M_TRIM_THRESHOLD, min(trim, 2**31 - 1))):
        return "mallopt refused the thresholds"
    return (mmap, trim)


def release_free_memory(before_allocating: int | None = None) -> bool:
    """Hand the free pages inside the heap back to the kernel (glibc's `malloc_trim(0)`); True if any were.

    Only where `tune_cpu_allocator` raised the thresholds (with glibc's defaults large blocks are unmapped
    on free anyway). It costs a walk over the free blocks (milliseconds) and, for the next forward, fresh
    page faults where those blocks are used again, so call it before a large allocation, not per op.
    With `before_allocating=nbytes`, only if a block of that size reaches the mmap threshold in force: such
    a block gets fresh pages anyway, so the release costs it nothing (a smaller one would reuse the freed
    pages, already faulted in).
    """
    tuned = tune_cpu_allocator()
    if not isinstance(tuned, tuple):
        return False
    if before_allocating is not None and before_allocating < min(tuned[0], 2**31 - 1):
        return False
    return bool(_glibc().malloc_trim(0))


@functools.cache
def _glibc() -> ctypes.CDLL | str:
    """The C library if it is glibc, else why not."""
    if not sys.platform.startswith("linux"):
        return f"not glibc ({sys.platform})"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return "no C library found"
    if not hasattr(libc, "gnu_get_libc_version"):  # musl's mallopt is a stub that ignores the values
        return "not glibc"
    return libc

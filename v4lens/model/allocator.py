"""Let glibc reuse freed memory for large CPU tensors instead of asking the kernel for fresh pages each time.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB by default) with new pages from
the kernel and unmaps them on free, so every large temporary of an eager forward — a [2048, 4, 1536] fp32
copy of the mHC streams is 48 MiB — is page-faulted and zeroed again on every op. On a 2-core machine that
was 13% of a mini-3b forward at 2k tokens and more than half the time of each mHC. Raising the mmap
threshold to 1 GiB serves those blocks from the heap, where freed memory is reused; the trim threshold
(256 MiB) still hands a heap top that large back to the kernel, so the memory held after a forward stays
bounded. `HookedV4` applies this when the first model is built (host memory: it matters on a CPU device).

Opt out with the environment variable `V4LENS_MALLOC=default` (set before the first model is built), or
choose the values with `V4LENS_MALLOC=<mmap bytes>,<trim bytes>`. Only glibc (Linux) is tuned; elsewhere
nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)

_state: dict = {}  # "tuned": (mmap, trim) once applied, or the reason it was not


def tune_cpu_allocator() -> tuple[int, int] | str:
    """Apply the thresholds once per process; returns (mmap, trim) in bytes, or why nothing was changed."""
    if "result" not in _state:
        _state["result"] = _apply(os.environ.get("V4LENS_MALLOC", ""))
    return _state["result"]


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
    if not sys.platform.startswith("linux"):
        return f"not glibc ({sys.platform})"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, gnu_version = libc.mallopt, libc.gnu_get_libc_version  # musl has mallopt as a no-op stub
    except (OSError, AttributeError):
        return "not glibc"
    del gnu_version
    if not (mallopt(_M_MMAP_THRESHOLD, min(mmap, 2**31 - 1)) and mallopt(_M_TRIM_THRESHOLD, min(trim, 2**31 - 1))):
        return "mallopt refused the thresholds"
    return (mmap, trim)

"""Building a model lets glibc reuse freed memory for large CPU tensors (v4lens.model.allocator)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from v4lens.model import allocator

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the thresholds are glibc's (Linux)")

# In a fresh process: how many bytes does glibc serve with mmap for a 96 MiB tensor, before and after a
# model is built? (mallinfo2().hblkhd: bytes in mmap-ed blocks; glibc >= 2.33)
PROBE = textwrap.dedent(
    """
    import ctypes, torch
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    def mmapped_for_a_tensor():
        before = libc.mallinfo2().hblkhd
        t = torch.empty(96 << 20, dtype=torch.uint8)
        grown = libc.mallinfo2().hblkhd - before
        del t
        return grown
    first = mmapped_for_a_tensor()
    import v4lens
    v4lens.HookedV4(v4lens.preset("tiny"), device="meta")
    print(first, mmapped_for_a_tensor(), v4lens.model.allocator.tune_cpu_allocator())
    """
)


def _probe(env_value: str | None) -> list[str]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "V4LENS_MALLOC"}
    if env_value is not None:
        env["V4LENS_MALLOC"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", PROBE], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().split(maxsplit=2)


@glibc
def test_building_a_model_serves_large_tensors_from_the_heap():
    before, after, result = _probe(None)
    assert int(before) >= 96 << 20  # glibc's default: a fresh mapping (page-faulted again on every use)
    assert int(after) == 0, result  # now from the heap, where freed blocks are reused
    assert result == str((allocator.MMAP_THRESHOLD, allocator.TRIM_THRESHOLD))


@glibc
def test_v4lens_malloc_default_leaves_glibc_as_it_is():
    before, after, result = _probe("default")
    assert int(before) >= 96 << 20 and int(after) >= 96 << 20
    assert result == "V4LENS_MALLOC=default"


def test_a_malformed_setting_is_an_error_naming_the_variable():
    with pytest.raises(ValueError, match="V4LENS_MALLOC='lots'"):
        allocator._apply("lots")


# In a fresh process: a freed 128 MiB block below a live one stays resident until release_free_memory()
RELEASE_PROBE = textwrap.dedent(
    """
    import torch, v4lens
    from v4lens.model import allocator
    v4lens.HookedV4(v4lens.preset("tiny"), device="meta")
    def rss():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) << 10
    big = torch.ones(128 << 20, dtype=torch.uint8)  # from the heap (below the raised mmap threshold)
    pin = torch.ones(1 << 10, dtype=torch.uint8)  # allocated after it: the heap's top cannot shrink past it
    before = rss()
    del big
    kept = before - rss()
    released = allocator.release_free_memory()
    print(kept, before - rss(), released)
    """
)


@glibc
def test_release_free_memory_hands_freed_heap_blocks_back():
    import os

    env = {k: v for k, v in os.environ.items() if k != "V4LENS_MALLOC"}
    out = subprocess.run(
        [sys.executable, "-c", RELEASE_PROBE], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    kept, dropped, released = out.stdout.split()
    assert int(kept) < 16 << 20  # freed but still resident: the heap keeps it for reuse
    assert int(dropped) >= 120 << 20 and released == "True"


def test_release_free_memory_leaves_glibc_alone_when_not_tuned(monkeypatch):
    monkeypatch.setattr(allocator, "tune_cpu_allocator", lambda: "V4LENS_MALLOC=default")
    assert allocator.release_free_memory() is False
    assert allocator.release_free_memory(before_allocating=1 << 40) is False


def test_release_before_an_allocation_only_from_the_mmap_threshold_in_force(monkeypatch):
    """before_allocating=n releases only when a block of n bytes reaches the applied mmap threshold
    (a user's V4LENS_MALLOC value included; glibc caps the threshold below 2 GiB)."""
    from types import SimpleNamespace

    trims = []
    monkeypatch.setattr(allocator, "_glibc", lambda: SimpleNamespace(malloc_trim=lambda pad: trims.append(pad) or 1))
    monkeypatch.setattr(allocator, "tune_cpu_allocator", lambda: (64 << 20, 256 << 20))
    assert allocator.release_free_memory(before_allocating=(64 << 20) - 1) is False and trims == []
    assert allocator.release_free_memory(before_allocating=64 << 20) is True and trims == [0]
    assert allocator.release_free_memory() is True and len(trims) == 2  # no size given: always
    monkeypatch.setattr(allocator, "tune_cpu_allocator", lambda: (8 << 30, 256 << 20))
    assert allocator.release_free_memory(before_allocating=4 << 30) is True and len(trims) == 3

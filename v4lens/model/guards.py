"""Run-time guards of `HookedV4`: one thread at a time where hooks or a decoding cache are shared, and
hook return values checked against the tensor they replace.

Threads. Hooks are module state: a hook added by one thread fires in every thread's forward. So a
hooked run (`hooks()` / `run_with_hooks` / `run_with_cache` / `add_hook` / `reset_hooks`) claims the
model for its thread, and another thread's forward or hooked run is refused with a RuntimeError
while it lasts (and a hooked run is refused while another thread's forward is running). Plain
forwards with no hook context share no state and may run in several threads at once. A `V4KVCache`
is claimed by one thread per forward. The owning thread may re-enter freely (a hook that calls the
model, nested `hooks()` contexts, `generate` under hooks).

Hook returns. A hook may return None (the tensor flows on, possibly edited in place) or a
replacement, which must have the same shape, the same kind of dtype (floating / integer / bool)
and the same device; otherwise a ValueError / TypeError names the hook and both. A float of
another precision is cast to the dtype that flows there (the model would round its own values
to it too).
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
from transformer_lens.hook_points import HookPoint

# id(object) -> {thread id: [entries, exclusive entries]}, only while the object is in use (so an
# id reused by a later object never inherits a stale claim). One lock for all: held for microseconds.
_claims: dict[int, dict[int, list[int]]] = {}
_claims_lock = threading.Lock()


@contextlib.contextmanager
def claim(obj, what: str, exclusive: bool):
    """Use `obj` (a model or a cache) from this thread for the duration of the block.

    exclusive: no other thread may use it meanwhile (hooked runs, caches); otherwise only other
    threads' exclusive uses are refused (plain forwards share the model). The same thread may nest.
    """
    me = threading.get_ident()
    with _claims_lock:
        users = _claims.setdefault(id(obj), {})
        others = [counts for thread, counts in users.items() if thread != me]
        if others and (exclusive or any(exclusive_entries for _, exclusive_entries in others)):
            raise RuntimeError(
                f"{what}: this {type(obj).__name__} is already running in another thread (hooks and decoding "
                "caches are shared state, so the two runs would mix activations or tokens); use one model "
                "(and one cache) per thread, or a lock around each run"
            )
        counts = users.setdefault(me, [0, 0])
        counts[0] += 1
        counts[1] += exclusive
    try:
        yield
    finally:
        with _claims_lock:
            counts[0] -= 1
            counts[1] -= exclusive
            if not counts[0]:
                del users[me]
                if not users:
                    del _claims[id(obj)]


def dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating" if dtype.is_floating_point else "integer"


def checked_replacement(name: str, tensor, out):
    """A hook's return value `out` for the `tensor` it was given -> what flows on (see the module doc)."""
    if out is None or not isinstance(tensor, torch.Tensor):
        return out
    if isinstance(out, tuple) and len(out) == 1:  # a backward hook may return (grad,)
        return (checked_replacement(name, tensor, out[0]),)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"hook on {name} returned {type(out).__name__}; return None or a tensor like its input")
    got = f"{tuple(out.shape)} {out.dtype} on {out.device}"
    want = f"{tuple(tensor.shape)} {tensor.dtype} on {tensor.device}"
    if out.shape != tensor.shape:
        raise ValueError(f"hook on {name} returned shape {tuple(out.shape)}, but the tensor there is {want}")
    if dtype_kind(out.dtype) != dtype_kind(tensor.dtype):
        raise TypeError(
            f"hook on {name} returned a {dtype_kind(out.dtype)} tensor ({got}) where a "
            f"{dtype_kind(tensor.dtype)} one flows ({want})"
        )
    if out.device != tensor.device:
        raise ValueError(f"hook on {name} returned a tensor on {out.device}, but the tensor there is {want}")
    return out if out.dtype == tensor.dtype else out.to(tensor.dtype)


class _CheckedHook:
    """A user hook whose return value goes through `checked_replacement`; looks like the hook it wraps."""

    def __init__(self, hook):
        self.hook = hook
        functools.update_wrapper(self, hook, updated=())

    def __call__(self, tensor, hook):
        return checked_replacement(hook.name, tensor, self.hook(tensor, hook=hook))

    def __repr__(self) -> str:
        # repr(partial) prints its arguments (caches, tensors): slow, and TransformerLens avoids it too
        h = self.hook
        return f"partial({h.func!r},...)" if isinstance(h, functools.partial) else repr(h)


class CheckedHookPoint(HookPoint):
    """TransformerLens's HookPoint whose hooks' return values are checked (`checked_replacement`).

    Every path that attaches a hook (`add_hook`, `hooks()`, `run_with_hooks`, `run_with_cache`,
    `transformer_lens.patching`, a HookPoint's own `add_hook`) ends here.
    """

    def add_hook(self, hook, *args, **kwargs):
        handle = super().add_hook(_CheckedHook(hook), *args, **kwargs)
        if hasattr(handle, "user_hook"):
            handle.user_hook = hook  # list_hooks shows the user's function
        return handle

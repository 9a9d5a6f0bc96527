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

Candidates. The last axis of attention scores and patterns is each query's K candidate slots, and
which key sits in a slot (`attn.hook_key_index`) can differ between runs (the indexer's picks). The
attention layer attaches its key index to the storage of the scores and pattern it hooks
(`tag_candidates`), so a cached copy of them (same storage) still knows its candidates. A hook
written as `functools.partial(fn, ..., tensor or cache)` (as `transformer_lens.patching`'s are) that
pastes another run's scores or pattern slot by slot onto slots holding other keys is refused.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
from transformer_lens.hook_points import HookPoint

from .tl_versions import added_handle

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


KEY_INDEX_TAG = "v4lens_key_index"


def tag_candidates(t: torch.Tensor, key_index: torch.Tensor | None) -> torch.Tensor:
    """Attach the key index [b,p,K] to the storage of scores / a pattern [b,h,p,K] (None: no-op); returns t."""
    if key_index is not None:
        setattr(t.untyped_storage(), KEY_INDEX_TAG, key_index)
    return t


def key_index_of(t) -> torch.Tensor | None:
    return getattr(t.untyped_storage(), KEY_INDEX_TAG, None) if isinstance(t, torch.Tensor) else None


def _sources_with_other_candidates(hook, name: str, tensor) -> tuple[torch.Tensor | None, list]:
    """(this run's key index, [(tensor, its key index)] for each tensor of another run that a partial hook
    holds, directly or as `cache[name]`, whose candidates differ from this run's)."""
    here = key_index_of(tensor) if isinstance(hook, functools.partial) else None
    if here is None:
        return None, []
    held = [getattr(a, "cache_dict", {}).get(name, a) for a in (*hook.args, *hook.keywords.values())]
    sources = [(t, key_index_of(t)) for t in held if isinstance(t, torch.Tensor) and t.shape == tensor.shape]
    return here, [(t, k) for t, k in sources
                  if k is not None and k is not here and not torch.equal(k.to(here.device), here)]  # fmt: skip


def _refuse_slot_copies(name: str, before, after, here, sources) -> None:
    """A value the hook wrote into slot j equal to the source's value in slot j, where slot j holds another key
    there than here: a paste by column position across different candidates (ValueError)."""
    for src, there in sources:
        pasted = (after != before) & (after == src.to(after.device))  # [b,h,p,K]
        wrong = pasted & (there.to(here.device) != here)[:, None]
        if wrong.any():
            b, h, p, j = (int(i) for i in wrong.nonzero()[0])
            raise ValueError(
                f"hook on {name} pasted another run's values slot by slot onto other candidates: at batch {b}, "
                f"head {h}, query {p}, slot {j} is key {int(here[b, p, j])} in this run but key "
                f"{int(there[b, p, j])} in the source (attn.hook_key_index; the last axis of scores and patterns "
                "is candidate slots, not key positions, and the two runs' indexer picks differ). Patch patterns by "
                "candidate with v4lens.patching.get_act_patch_attn_head_pattern_all_pos / _by_pos / "
                "_dest_src_pos or v4lens.patching.pattern_patch_hooks instead of transformer_lens.patching's"
            )


class _CheckedHook:
    """A user hook whose return value goes through `checked_replacement`; looks like the hook it wraps."""

    def __init__(self, hook):
        self.hook = hook
        functools.update_wrapper(self, hook, updated=())

    def __call__(self, tensor, hook):
        here, sources = _sources_with_other_candidates(self.hook, hook.name, tensor)
        before = tensor.clone() if sources else None  # the hook may edit in place
        out = checked_replacement(hook.name, tensor, self.hook(tensor, hook=hook))
        if sources:
            _refuse_slot_copies(hook.name, before, tensor if out is None else out, here, sources)
        return out

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
        checked = _CheckedHook(hook)
        handle = added_handle(self, super().add_hook(checked, *args, **kwargs), checked)  # 3.x returns None
        if hasattr(handle, "user_hook"):
            handle.user_hook = hook  # list_hooks shows the user's function
        return handle

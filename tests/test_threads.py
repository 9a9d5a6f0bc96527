"""Threads: a hooked run owns the model, a decoding cache serves one thread at a time, and the
owning thread may re-enter. Overlaps are made deterministic with events and barriers (a thread
waits inside a hook until the other has tried), never by timing.
"""

from __future__ import annotations

import threading

import pytest
import torch

import v4lens
from v4lens.model import V4KVCache

pytestmark = pytest.mark.usefixtures("single_thread")

TOKENS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]])
WAIT = 60  # seconds: only reached if the test is broken (then it fails instead of hanging)


@pytest.fixture(scope="module")
def model():
    """This module's own model: the tests attach plain torch hooks to it."""
    return v4lens.load("tiny", d_vocab=256, seed=0)


class Paused:
    """Runs `work()` in a thread that stops inside the model (at `pause`, a function the model calls
    while running) until `release()`; `.result` / `.error` hold the outcome."""

    def __init__(self, work):
        self.inside, self.go = threading.Event(), threading.Event()
        self.result = self.error = None
        self.thread = threading.Thread(target=self._run, args=(work,))

    def pause(self, *args, **kwargs):
        self.inside.set()
        assert self.go.wait(WAIT), "never released"

    def _run(self, work):
        try:
            self.result = work()
        except BaseException as e:  # noqa: BLE001  (reported by the test)
            self.error = e

    def __enter__(self):
        self.thread.start()
        assert self.inside.wait(WAIT), f"the thread never reached the pause: {self.error!r}"
        return self

    def __exit__(self, *exc):
        self.go.set()
        self.thread.join(WAIT)
        assert not self.thread.is_alive()


def paused_in_block(model, work):
    """A Paused whose pause is a plain torch forward pre-hook on block 1 (not a v4lens hook:
    the paused run is a plain forward). Returns (paused, handle to remove)."""
    paused = Paused(work)
    handle = model.blocks[1].register_forward_pre_hook(lambda module, args: paused.pause())
    return paused, handle


def test_hooked_run_refuses_other_threads(model):
    with torch.no_grad():
        want = model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.hook_streams_pre", lambda t, hook: t * 0.5)])
    paused = Paused(lambda: None)

    def hooked_run():
        def halve_and_wait(t, hook):
            paused.pause()
            return t * 0.5

        with torch.no_grad():
            return model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.hook_streams_pre", halve_and_wait)])

    paused.thread = threading.Thread(target=paused._run, args=(hooked_run,))
    with paused, torch.no_grad():
        for attempt in (
            lambda: model(TOKENS),
            lambda: model.run_with_cache(TOKENS),
            lambda: model.run_with_hooks(TOKENS, fwd_hooks=[("hook_embed", lambda t, hook: None)]),
            lambda: model.add_hook("hook_embed", lambda t, hook: None),
            lambda: model.reset_hooks(),
        ):
            with pytest.raises(RuntimeError, match="already running in another thread"):
                attempt()
        assert not model.hook_dict["hook_embed"].fwd_hooks  # the refused calls attached nothing
    assert paused.error is None
    torch.testing.assert_close(paused.result, want, atol=0, rtol=0)  # the paused run was not disturbed
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), model(TOKENS), atol=0, rtol=0)  # free again


def test_running_forward_refuses_another_threads_hooks(model):
    with torch.no_grad():
        want = model(TOKENS)
    paused, handle = paused_in_block(model, lambda: model(TOKENS))
    try:
        with paused, torch.no_grad():
            with pytest.raises(RuntimeError, match="already running in another thread"):
                model.run_with_cache(TOKENS)
            with pytest.raises(RuntimeError, match="already running in another thread"), model.hooks():
                pass
    finally:
        handle.remove()
    assert paused.error is None
    torch.testing.assert_close(paused.result, want, atol=0, rtol=0)


def test_plain_forwards_run_in_parallel(model):
    """No hooks, no shared cache: two threads' forwards may overlap (both reach the barrier at once)."""
    barrier = threading.Barrier(2, timeout=WAIT)

    def meet(module, args):
        barrier.wait()  # (returns None: the block's inputs stay as they are)

    handle = model.blocks[1].register_forward_pre_hook(meet)
    tokens = [TOKENS, TOKENS.flip(-1)]
    out, errors = [None, None], []

    def work(i):
        try:
            with torch.no_grad():
                out[i] = model(tokens[i])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
    finally:
        handle.remove()
    assert not errors, errors
    with torch.no_grad():
        for i in range(2):
            torch.testing.assert_close(out[i], model(tokens[i]), atol=0, rtol=0)


def test_one_cache_is_refused_to_a_second_thread(model):
    kv = V4KVCache()
    paused, handle = paused_in_block(model, lambda: model(TOKENS[:, :8], past_kv_cache=kv))
    try:
        with paused, torch.no_grad(), pytest.raises(RuntimeError, match="V4KVCache is already running in another"):
            model(TOKENS[:, :3], past_kv_cache=kv)
    finally:
        handle.remove()
    assert paused.error is None and kv.length == 8  # only the first thread's tokens went in
    with torch.no_grad():
        rest = model(TOKENS[:, 8:], past_kv_cache=kv)
        torch.testing.assert_close(rest, model(TOKENS)[:, 8:], rtol=1e-5, atol=1e-6)


def test_the_owning_thread_may_re_enter(model):
    """A hook that calls the model, nested hook contexts, run_with_cache inside hooks(), generate with hooks."""
    inner = []

    def calls_the_model(t, hook):
        if not inner:  # (the inner forward fires this hook too)
            inner.append(None)
            inner[0] = model(TOKENS[:, :4])

    with torch.no_grad():
        model.run_with_hooks(TOKENS, fwd_hooks=[("hook_embed", calls_the_model)])
        outer, nested = [("hook_embed", lambda t, hook: None)], [("blocks.0.hook_streams_pre", lambda t, hook: None)]
        with model.hooks(fwd_hooks=outer), model.hooks(fwd_hooks=nested):
            model(TOKENS)
            _, cache = model.run_with_cache(TOKENS, names_filter=["hook_embed"])
        out = v4lens.generate.generate(model, TOKENS, 3, fwd_hooks=[("hook_embed", lambda t, hook: None)])
    assert len(inner) == 1 and inner[0].shape == (1, 4, 256) and "hook_embed" in cache
    assert out is not None
    assert not any(p.fwd_hooks for p in model.hook_dict.values())


def test_a_refused_thread_leaves_nothing_claimed(model):
    """After the overlap, the other thread can run hooked (no claim is left behind)."""
    paused, handle = paused_in_block(model, lambda: model(TOKENS))
    try:
        with paused, pytest.raises(RuntimeError):
            model.run_with_hooks(TOKENS, fwd_hooks=[("hook_embed", lambda t, hook: None)])
    finally:
        handle.remove()
    result = []
    t = threading.Thread(target=lambda: result.append(model.run_with_cache(TOKENS, names_filter=["hook_embed"])))
    t.start()
    t.join(WAIT)
    assert result and "hook_embed" in result[0][1]

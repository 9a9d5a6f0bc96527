"""Routed experts kept off the compute device and brought over when the router picks them.

`v4lens.load(path, device=..., expert_offload="cpu" | "disk", expert_cache="8GB")`: every block's
routed experts (97% of V4-Flash's bytes) stay in host memory ("cpu"; as stored with
`keep_quantized=True`) or in the checkpoint's files ("disk": never read whole, one expert read when
it is needed), while everything else sits on `device`. The stacked expert weights become
`OffloadedExperts`: reading `w1[e]` — what the MoE does for each expert its batch selected — brings
expert e to the compute device (dequantised to the model's dtype by the loading routine) through the
model's `ExpertCache`, a least-recently-used set of experts on the device of at most `expert_cache`
bytes (`model.expert_cache`: hits, misses, bytes). So a layer moves only the experts its tokens use,
and the outputs are the resident model's bit for bit.

Whole-tensor use of offloaded experts (anything but reading one expert) raises, naming the way out;
so do in-place edits.

Reads overlap compute: once a layer's router has picked, the MoE names the experts it will use
(`OffloadedExperts.prefetch`), and one background thread reads (and dequantises, and copies to the
device) the next `ExpertCache.ahead` of them while the current one computes; what the read-ahead
holds is bounded by `ahead` experts beyond the cache. The next layer's picks are not known before its
router runs, so reads never cross a layer boundary.
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from .at_rest import _read_quantized, _set, outside_inference_mode, quantized_targets

aten = torch.ops.aten
EXPERTS = re.compile(r"\.mlp\.experts\.w[123]$")


class ExpertCache:
    """Experts on the compute device, least recently used first out, at most `max_bytes` in all; plus a
    read-ahead of at most `ahead` tensors (one thread) over the order `schedule` was given."""

    def __init__(self, max_bytes: int, ahead: int = 6):
        self.max_bytes, self.entries, self.bytes = max_bytes, OrderedDict(), 0
        self.hits = self.misses = self.prefetched = 0
        self.ahead = ahead  # tensors read ahead (3 per expert: w1, w3, w2); 0 turns the read-ahead off
        self._lock = threading.Lock()  # forwards on several threads may share a model (and its cache)
        self._queue: deque = deque()  # (key, fetch) still to read ahead, in the order they will be used
        self._pending: dict = {}  # key -> Future of a read in flight or done, not yet taken
        self._reader: ThreadPoolExecutor | None = None

    def get(self, key, fetch: Callable[[], torch.Tensor]) -> torch.Tensor:
        with self._lock:
            if key in self.entries:
                self.hits += 1
                self.entries.move_to_end(key)
                return self.entries[key]
            self.misses += 1
            future = self._pending.pop(key, None)
            self.prefetched += future is not None
        value = future.result() if future is not None else fetch()  # outside the lock: reads may overlap
        self._top_up()
        size = value.numel() * value.element_size()
        with self._lock:
            if size <= self.max_bytes and key not in self.entries:
                self.entries[key] = value
                self.bytes += size
                while self.bytes > self.max_bytes:
                    _, old = self.entries.popitem(last=False)
                    self.bytes -= old.numel() * old.element_size()
        return value

    def schedule(self, jobs: list[tuple[object, Callable[[], torch.Tensor]]]) -> None:
        """The reads a forward is about to make, in order: start reading the first `ahead` of them (those not
        cached or already in flight), and the next one each time one is taken."""
        if self.ahead <= 0:
            return
        with self._lock:
            self._queue = deque((key, fetch) for key, fetch in jobs if key not in self.entries and key not in self._pending)
        self._top_up()

    def _top_up(self) -> None:
        with self._lock:
            while self._queue and len(self._pending) < self.ahead:
                key, fetch = self._queue.popleft()
                if key in self.entries or key in self._pending:
                    continue
                if self._reader is None:
                    self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="v4lens-experts")
                self._pending[key] = self._reader.submit(fetch)

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()
            self.bytes = 0
            self._queue.clear()
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.cancel()

    def __repr__(self) -> str:
        return (f"ExpertCache({len(self.entries)} experts, {self.bytes / 2**20:.1f} of {self.max_bytes / 2**20:.1f} MiB; "
                f"{self.hits} hits, {self.misses} misses, {self.prefetched} read ahead)")  # fmt: skip


class OffloadedExperts(torch.Tensor):
    """A stacked expert weight [E, out, in] (model dtype, on the compute device) whose experts live elsewhere:
    `fetch(e)` returns expert e (any device, any float dtype, or quantised as a `QuantizedWeight`)."""

    @staticmethod
    def __new__(cls, shape, dtype, device, fetch, cache: ExpertCache, key: str):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device, requires_grad=False)

    def __init__(self, shape, dtype, device, fetch, cache: ExpertCache, key: str):
        self.fetch, self.cache, self.key = fetch, cache, key

    def __repr__(self) -> str:
        return f"OffloadedExperts(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, {self.key})"

    def expert(self, e: int) -> torch.Tensor:
        """Expert e on the compute device, in the model's dtype (cached)."""
        return self.cache.get(self._key(e), self._bring(e))

    def prefetch(self, experts: list[int], *others: OffloadedExperts) -> None:
        """The experts a forward is about to read, in order, from this weight and `others` (the same
        experts' other matrices, read in the order given): start reading them in the background."""
        weights = (self, *others)
        self.cache.schedule([(w._key(e), w._bring(e)) for e in experts for w in weights])

    def _key(self, e: int) -> tuple:
        return (self.key, str(self.device), e)

    def _bring(self, e: int) -> Callable[[], torch.Tensor]:
        def bring():
            w = self.fetch(e)
            w = w.dequantize(self.dtype) if hasattr(w, "stored_tensors") else w
            return w.to(device=self.device, dtype=self.dtype)

        return bring

    def stored_tensors(self) -> tuple:  # nothing of it is resident: fingerprints and memory checks skip it
        return ()

    def stored_bytes(self) -> int:
        return 0

    def __deepcopy__(self, memo):  # the copy shares the source and the cache (nothing of it is resident)
        return type(self)(self.shape, self.dtype, self.device, self.fetch, self.cache, self.key)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        w = args[0] if args and isinstance(args[0], cls) else None
        if w is not None:
            if func is aten.select.int and args[1] == 0:
                with outside_inference_mode():  # autograd makes the result a view of this weight
                    return w.expert(args[2] % w.shape[0]).clone()
            if func in (aten.detach.default, aten.alias.default):
                return cls(w.shape, w.dtype, w.device, w.fetch, w.cache, w.key)
            if func is aten._to_copy.default and kwargs.get("dtype", w.dtype) == w.dtype:
                return cls(w.shape, w.dtype, kwargs.get("device", w.device), w.fetch, w.cache, w.key)
        names = [a.key for a in args if isinstance(a, cls)]
        raise RuntimeError(
            f"{func.__name__} on {names or 'offloaded experts'}: these routed experts are offloaded (expert_offload=...) "
            "and are read one expert at a time (w[e]); load without expert_offload to use or edit them whole"
        )


def offload_experts(model, ckpt, source: str, cache: ExpertCache, device, keep_quantized: bool) -> set[str]:
    """Replace every stacked routed-expert parameter of `model` (on meta) by `OffloadedExperts` reading from
    host memory ("cpu": read now, kept quantised if asked) or from the checkpoint's files ("disk": read per
    use). Returns the stored keys handled here (load_tensors skips them)."""
    from .names import canonical_name

    stages = model.cfg.n_mtp_layers if model.cfg.draft == "dspark" else 0
    keys: dict[str, dict[int, str]] = {}
    for key in ckpt.keys:
        name, expert = canonical_name(key, with_expert=True, dspark_stages=stages)
        if name is not None and expert is not None and EXPERTS.search(name):
            keys.setdefault(name, {})[expert] = key
    quantised = quantized_targets(model, ckpt)
    dtype = model.cfg.dtype
    for name, param in list(model.named_parameters()):
        if not EXPERTS.search(name):
            continue
        per_expert = keys.get(name, {})
        if sorted(per_expert) != list(range(param.shape[0])):
            continue  # load_tensors reports the missing experts
        for e, key in per_expert.items():
            if ckpt.shape(key) != tuple(param.shape[1:]):
                raise ValueError(f"checkpoint tensor {key} has shape {ckpt.shape(key)} but v4lens {name}[{e}] expects "
                                 f"{tuple(param.shape[1:])}")  # fmt: skip
        if source == "disk":
            def fetch(e, per_expert=per_expert):
                return ckpt.get(per_expert[e])  # one expert from the files (dequantised to fp32 if stored quantised)
        elif keep_quantized and name in quantised:
            host = _read_quantized(ckpt, per_expert, "cpu", dtype)

            def fetch(e, host=host):
                return host[e]
        else:
            host = torch.empty(param.shape, dtype=dtype)
            for e, key in per_expert.items():
                ckpt.read_into(key, host[e])

            def fetch(e, host=host):
                return host[e]
        _set(model, name, torch.nn.Parameter(OffloadedExperts(param.shape, dtype, torch.device(device), fetch, cache, name),
                                             requires_grad=False))  # fmt: skip
    return {key for per_expert in keys.values() for key in per_expert.values()}


def build_offloaded(cfg, ckpt, device, max_memory, source: str, cache_bytes: int, keep_quantized: bool):
    """A HookedV4 with offloaded routed experts (`offload_experts`), the rest on `device` (FP8 tensors kept as
    stored with keep_quantized). `max_memory` must hold the resident weights, the expert cache and the
    read-ahead. Returns (model, stored keys already read)."""
    from ..model import HookedV4
    from .at_rest import build_quantized

    with torch.device("meta"):
        model = HookedV4(cfg)
    model.expert_cache = ExpertCache(cache_bytes)
    handled = offload_experts(model, ckpt, source, model.expert_cache, device or "cpu", keep_quantized)
    matrix = cfg.moe_inter_dim * cfg.d_model * cfg.dtype.itemsize  # one expert matrix on the device
    reserve = cache_bytes + model.expert_cache.ahead * matrix  # max_memory covers the cache and the read-ahead
    if source == "cpu" and torch.device(device or "cpu").type == "cpu":  # experts "off" the device are in its memory
        reserve += sum(ckpt.stored_nbytes(k) if keep_quantized and ckpt.is_quantized(k)
                       else math.prod(ckpt.shape(k)) * cfg.dtype.itemsize for k in handled)  # fmt: skip
    model, read = build_quantized(cfg, ckpt, device, max_memory, model=model, keep=keep_quantized, reserve=reserve)
    return model, read | handled

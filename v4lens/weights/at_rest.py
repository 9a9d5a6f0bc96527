"""Weights kept as DeepSeek stores them, dequantised at the moment they are used.

`v4lens.load(path, keep_quantized=True)` keeps every FP8 matrix (128×128 block scales) and every
FP4 routed expert (packed two per byte, 1×32 scales) of a checkpoint quantised in memory: the model
then takes about the checkpoint's size instead of ×3.4 (bf16) or ×6.8 (fp32). Each such weight is a
`QuantizedWeight`: a tensor of the logical shape and the model's dtype that holds no dense values.
Any op that reads it gets the dense tensor, dequantised right then by the routine loading uses
(`quant.dequantize`, straight to the model's dtype: the same values) and dropped after the op; indexing one expert
of a stacked [E, out, in] tensor (`w1[e]`, what the MoE does) dequantises that expert only. So the
model's code is unchanged and its outputs are bit-identical to the dequantised-on-load model's.

What it refuses: in-place edits of a quantised weight (`w.mul_`, `copy_`, `load_state_dict` into it)
raise — an edit would land in a temporary dense copy and be lost. Load without keep_quantized to
edit weights. `.to(device)` moves the stored tensors; `.to(another dtype)` gives a dense tensor.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._pytree import tree_map

from .quant import dequantize, logical_shape

aten = torch.ops.aten


class QuantizedWeight(torch.Tensor):
    """A weight of logical shape [..., out, in] and dtype `dtype`, stored as `qdata` (FP8 e4m3, or FP4 packed
    in int8 [..., out, in/2]) with its block `scale`; dense values exist only while an op reads them."""

    qdata: torch.Tensor
    scale: torch.Tensor

    @staticmethod
    def __new__(cls, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        shape = logical_shape(tuple(qdata.shape), qdata.dtype)
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=qdata.device, requires_grad=False)

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        self.qdata, self.scale = qdata, scale

    def __repr__(self) -> str:
        return (f"QuantizedWeight(shape={tuple(self.shape)}, dtype={self.dtype}, stored as {self.qdata.dtype} "
                f"{tuple(self.qdata.shape)} + scale {self.scale.dtype} {tuple(self.scale.shape)})")  # fmt: skip

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense tensor (the model's dtype unless `dtype`), as loading without keep_quantized would hold it."""
        return dequantize(self.qdata, self.scale, dtype or self.dtype)

    def stored_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(qdata, scale): what the checkpoint holds, and what memory accounting and fingerprints read."""
        return self.qdata, self.scale

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stored_tensors())

    def __deepcopy__(self, memo):
        return type(self)(self.qdata.clone(), self.scale.clone(), self.dtype)

    def __reduce_ex__(self, protocol):  # pickling (torch.save of a module) would otherwise lose the subclass
        return type(self), (self.qdata, self.scale, self.dtype)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        weight = args[0] if args and isinstance(args[0], cls) else None
        if weight is not None:
            if func is aten.select.int and args[1] == 0 and weight.qdata.ndim == 3:  # one expert of a stack
                e = args[2]
                with outside_inference_mode():
                    return dequantize(weight.qdata[e], weight.scale[e], weight.dtype)
            if func in (aten.detach.default, aten.alias.default):
                return cls(weight.qdata, weight.scale, weight.dtype)
            if func is aten.clone.default:
                return cls(weight.qdata.clone(), weight.scale.clone(), weight.dtype)
            if func is aten._to_copy.default and kwargs.get("dtype", weight.dtype) == weight.dtype:
                device = kwargs.get("device", weight.device)  # a move: the stored tensors go, still quantised
                return cls(weight.qdata.to(device), weight.scale.to(device), weight.dtype)
            first = func._schema.arguments[0].alias_info if func._schema.arguments else None
            if first is not None and first.is_write:  # mul_, copy_, zero_, ...: an edit of the weight itself
                raise RuntimeError(
                    f"{func.__name__}: this weight is kept quantised (keep_quantized=True) and cannot be edited in "
                    "place (the edit would land in a temporary dense copy); load without keep_quantized to edit weights"
                )

        def dense(t):
            return t.dequantize() if isinstance(t, cls) else t

        returns = func._schema.returns
        if returns and returns[0].alias_info is not None:  # a view op (w.view, w.t)
            with outside_inference_mode():
                return func(*tree_map(dense, args), **tree_map(dense, kwargs))
        return func(*tree_map(dense, args), **tree_map(dense, kwargs))


def outside_inference_mode():
    """For results of view ops on a weight: autograd makes them views of the weight, sharing its version
    counter, which a tensor made under torch.inference_mode cannot do; the temporary is made outside it."""
    return torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext()


# ---------------------------------------------------------------------- loading
def quantized_targets(model, ckpt) -> dict[str, dict]:
    """{v4lens name: {expert index or None: stored key}} for the checkpoint's quantised tensors."""
    from .names import canonical_name

    stages = model.cfg.n_mtp_layers if model.cfg.draft == "dspark" else 0
    out: dict[str, dict] = {}
    for key in ckpt.keys:
        if ckpt.is_quantized(key):
            name, expert = canonical_name(key, with_expert=True, dspark_stages=stages)
            if name is not None:
                out.setdefault(name, {})[expert] = key
    return out


def build_quantized(cfg, ckpt, device=None, max_memory=None, model=None, keep: bool = True, reserve: int = 0):
    """A HookedV4 of `cfg` whose quantised checkpoint tensors are `QuantizedWeight`s (read as stored) and whose
    other tensors are allocated on `device`, unfilled (`load_tensors` fills them). Returns (model, the stored
    keys already read). The memory check counts the quantised weights at their stored size.
    model: a meta-device model to finish instead (its tensors already set elsewhere, e.g. offloaded experts,
    are left alone); keep=False: keep nothing quantised, only allocate; reserve: bytes the memory check adds
    (an expert cache)."""
    from ..model import HookedV4
    from .memory import check_memory, model_bytes

    if model is None:
        with torch.device("meta"):
            model = HookedV4(cfg)
    params = {n: p for n, p in model.named_parameters() if p.is_meta}
    targets = {n: keys for n, keys in quantized_targets(model, ckpt).items() if n in params} if keep else {}
    stored = 0
    for name, keys in targets.items():
        if name not in params:
            continue  # an unexpected tensor: load_tensors names it
        full = tuple(params[name].shape)
        stacked = None not in keys
        if stacked and (len(full) != 3 or sorted(keys) != list(range(full[0]))):
            raise ValueError(f"{name}: keep_quantized needs every expert 0..{full[0] - 1} stored quantised; the "
                             f"checkpoint has {sorted(keys)[:10]} ... quantised")  # fmt: skip
        for expert, key in keys.items():
            want = full[1:] if stacked else full
            if ckpt.shape(key) != want:
                raise ValueError(f"checkpoint tensor {key} has shape {ckpt.shape(key)} but v4lens {name}"
                                 f"{'' if expert is None else f'[{expert}]'} expects {want}")  # fmt: skip
            stored += ckpt.stored_nbytes(key)
    dense = sum(params[n].numel() * params[n].element_size() for n in targets if n in params)
    check_memory(cfg, device, max_memory, model_bytes(model) - dense + stored + reserve)  # offloaded experts count 0

    device = torch.device(device or "cpu")
    for name, keys in targets.items():
        if name in params:
            _set(model, name, torch.nn.Parameter(_read_quantized(ckpt, keys, device, cfg.dtype), requires_grad=False))
    for kind, tensors in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in list(tensors):
            if name not in targets and t.is_meta:
                empty = torch.empty(t.shape, dtype=t.dtype, device=device)
                _set(model, name, torch.nn.Parameter(empty, requires_grad=t.requires_grad) if kind == "param" else empty)
    cfg.device = device
    return model, {key for keys in targets.values() for key in keys.values()}


def _read_quantized(ckpt, keys: dict, device, dtype) -> QuantizedWeight:
    """One quantised weight, or a stack of experts (keys {0: ..., E-1: ...}), as stored."""
    pair = ckpt.read_stored
    if None in keys:
        q, s = pair(keys[None])
        return QuantizedWeight(q.to(device), s.to(device), dtype)
    first_q, first_s = pair(keys[0])
    E = len(keys)
    q = torch.empty((E, *first_q.shape), dtype=first_q.dtype, device=device)
    s = torch.empty((E, *first_s.shape), dtype=first_s.dtype, device=device)
    q[0], s[0] = first_q, first_s
    for e in range(1, E):
        qe, se = pair(keys[e])
        if qe.shape != first_q.shape or se.shape != first_s.shape or qe.dtype != q.dtype or se.dtype != s.dtype:
            raise ValueError(f"{keys[e]}: stored as {qe.dtype} {tuple(qe.shape)} + scale {se.dtype} {tuple(se.shape)}, "
                             f"unlike expert 0 ({q.dtype} {tuple(first_q.shape)} + {s.dtype} {tuple(first_s.shape)})")  # fmt: skip
        q[e], s[e] = qe, se
    return QuantizedWeight(q, s, dtype)


def _set(model, name: str, value) -> None:
    parent, _, leaf = name.rpartition(".")
    module = model.get_submodule(parent)
    if isinstance(value, torch.nn.Parameter):
        module._parameters[leaf] = value
    else:
        module._buffers[leaf] = value

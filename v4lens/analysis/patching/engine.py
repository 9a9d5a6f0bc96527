"""The engine every sweep shares: families of hook points (what a swept index patches and where),
patched forwards over every index (`_sweep`, several indices per forward with `batch_size`), and
attribution patching (`_atp`: one forward + backward, or `steps` points along the path to the target).
The public functions live in `sweeps.py`, `pattern.py`, `attribution.py` and `edits.py`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from tqdm.auto import tqdm

from ...model import tl_versions

MetricFn = Callable[[torch.Tensor], torch.Tensor]
Hooks = list  # list[tuple[str, Callable]]
# (hook name, activation, rows) -> what to write there. `rows`: which rows of the forward's batch the
# activation is (a slice; None = all): only targets that read other live tensors of the run need it.
Target = Callable[..., torch.Tensor]


# ====================================================================== the shared engine
@dataclass(frozen=True)
class _Family:
    """One patchable family: which hooks of a layer it writes, the axes swept after `layer`,
    which part of the activation one index covers (`select`), and (for AtP) how an elementwise
    contribution [b, ...activation] sums into the cells [b, *axes]."""

    names: Callable[[object, int], list[str]]  # (model, layer) -> hook names ([] = layer lacks it)
    axes: tuple[str, ...]
    select: Callable[[tuple[int, ...]], tuple]
    cells: Callable[[torch.Tensor], torch.Tensor] | None = None
    skip: Callable[[object, torch.Tensor, int, tuple[int, ...]], bool] | None = None  # (model, tokens, layer, rest)


def _n_candidates(cfg, S: int, layer: int) -> int:
    """K, the attention candidates per query of `layer` in a plain forward of S tokens (docs/hooks.md)."""
    m = cfg.compress_ratio(layer)
    return cfg.window_size + (0 if not m else min(cfg.index_topk, S // 4) if cfg.layer_type(layer) == "csa" else S // m)


def _axis_size(model, tokens: torch.Tensor, axis: str) -> int:
    cfg, S = model.cfg, tokens.shape[-1]
    if axis == "candidate":  # attention candidates: K of the widest layer
        return max(_n_candidates(cfg, S, layer) for layer in range(cfg.n_layers))
    return {"pos": S, "head": cfg.n_heads, "stream": cfg.hc_mult, "slot": cfg.n_activated_experts}[axis]


def _existing(model, names: list[str]) -> list[str]:
    return [n for n in names if n in model.hook_dict]


def _require_eval(model, what: str) -> None:
    training = [n or "<root>" for n, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"{what} requires the model in evaluation mode; found training mode at {training[:3]}. "
            "Call model.eval() first."
        )


def _check_tokens(model, tokens) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        raise ValueError("corrupted_tokens must be an int64 tensor [batch, pos] (the same shape as the clean tokens)")
    return tokens


def _clean_target(clean_cache) -> Target:
    """Target = the clean run's activation of the same hook (shape-checked against the corrupted one)."""
    store = getattr(clean_cache, "cache_dict", clean_cache)

    def target(name: str, act: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        if name not in store:
            raise KeyError(f"clean_cache has no {name!r}; build it with model.run_with_cache(clean_tokens) "
                           "on a model that has this hook (and no names_filter that drops it)")  # fmt: skip
        clean = store[name]
        if clean.shape != act.shape:
            raise ValueError(
                f"clean_cache[{name!r}] has shape {tuple(clean.shape)} but the corrupted run's is "
                f"{tuple(act.shape)}: clean and corrupted tokens must have the same shape"
            )
        return clean.to(act.device)

    return target


class _Metric:
    """TransformerLens's metric conventions: one callable or a mapping of them; reduce
    'scalar' (metric returns a scalar), 'mean' or 'none' (metric returns [batch])."""

    def __init__(self, metric, reduce: str, batch: int):
        if reduce not in ("scalar", "mean", "none"):
            raise ValueError(f"reduce must be 'scalar', 'mean' or 'none', got {reduce!r}")
        self.multi = isinstance(metric, Mapping)
        self.fns = dict(metric) if self.multi else {"metric": metric}
        if not self.fns:
            raise ValueError("patching_metric mapping must contain at least one metric")
        self.reduce, self.batch = reduce, batch

    def raw(self, name: str, logits: torch.Tensor) -> torch.Tensor:
        out = torch.as_tensor(self.fns[name](logits))
        if self.reduce == "scalar" and out.ndim != 0:
            raise ValueError(f"patching_metric {name!r} must return a scalar under reduce='scalar', got shape "
                             f"{tuple(out.shape)}; return [batch] and pass reduce='mean' or 'none'")  # fmt: skip
        if self.reduce != "scalar" and tuple(out.shape) != (self.batch,):
            raise ValueError(f"patching_metric {name!r} must return a [batch] tensor of length {self.batch} "
                             f"under reduce={self.reduce!r}, got shape {tuple(out.shape)}")  # fmt: skip
        return out

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """[metric, batch?] float32."""
        return torch.stack([self.raw(n, logits).detach().float() for n in self.fns])

    def finish(self, store: torch.Tensor, base, axes: list[str], sizes: tuple[int, ...]):
        if self.reduce == "mean":
            store = store.mean(-1)
            base = None if base is None else base.mean(-1)
        if not (self.multi or self.reduce == "none" or base is not None):
            return store[0]
        PatchingResult, make_df_from_ranges = tl_versions.patching_result()  # TransformerLens 4.2+

        return PatchingResult(
            values=store if self.multi else store[0], axis_names=axes, index_df=make_df_from_ranges(sizes, axes),
            metric_names=list(self.fns), reduced=self.reduce != "none",
            baseline=None if base is None else (base if self.multi else base[0]), has_metric_axis=self.multi,
        )  # fmt: skip


def _write_hook(act: torch.Tensor, hook, sel: tuple, target: Target) -> torch.Tensor:
    """Replace act[sel] by target[sel] (on a copy: caches and autograd keep the original)."""
    new = act.clone()
    new[sel] = target(hook.name, act)[sel].to(act.dtype)
    return new


def _write_copies(act: torch.Tensor, hook, copies: list[tuple[slice, tuple]], target: Target) -> torch.Tensor:
    """Batched sweeps: each copy (rows of the batch, sel) gets target[sel] in its own rows only (on a copy of act)."""
    new = act.clone()
    for rows, sel in copies:
        new[rows][sel] = target(hook.name, act[rows], rows)[sel].to(act.dtype)
    return new


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


def _sweep(model, tokens, metric, family: _Family, target: Target, reduce="scalar", baseline=False, what="patching",
           batch_size: int = 1, progress: bool = False):  # fmt: skip
    """Run the corrupted tokens once per index of [layer, *family.axes], with family.names(layer)
    overwritten at family.select(index) by target; collect the metric. NaN for absent layers (and
    for the indices `family.skip` names).

    batch_size: indices per forward. The corrupted batch [b, p] is repeated into [n·b, p] and copy
    k (rows k·b … (k+1)·b − 1) is patched at its own index; rows of a forward are independent, so
    each copy's logits are those of its own patched run, up to the rounding of larger GEMMs.
    Targets with `hooks(model, layers)` (reading other live tensors) get those hooks added.
    """
    _require_eval(model, what)
    tokens = _check_tokens(model, tokens)
    per_forward = _positive_int(batch_size, "batch_size (swept indices per forward)")
    ev = _Metric(metric, reduce, tokens.shape[0])
    axes = ["layer", *family.axes]
    sizes = (model.cfg.n_layers, *(_axis_size(model, tokens, a) for a in family.axes))
    per_example = (tokens.shape[0],) if reduce != "scalar" else ()
    store = torch.full((len(ev.fns), *sizes, *per_example), float("nan"), device=tokens.device)
    skip = family.skip or (lambda model, tokens, layer, rest: False)
    cells = [(layer, rest) for layer in range(sizes[0]) if family.names(model, layer)
             for rest in itertools.product(*(range(s) for s in sizes[1:]))
             if not skip(model, tokens, layer, rest)]  # fmt: skip
    b = tokens.shape[0]
    base = None
    with torch.no_grad():
        if baseline:
            base = ev(model.run_with_hooks(tokens, fwd_hooks=[]))
        chunks = [cells[i : i + per_forward] for i in range(0, len(cells), per_forward)]
        for chunk in tqdm(chunks, desc=what, unit="forward", disable=not progress):
            copies: dict[str, list] = {}
            for k, (layer, rest) in enumerate(chunk):
                for name in family.names(model, layer):
                    copies.setdefault(name, []).append((slice(k * b, (k + 1) * b), family.select(rest)))
            hooks = [(n, partial(_write_copies, copies=c, target=target)) for n, c in copies.items()]
            if hasattr(target, "hooks"):
                hooks = target.hooks(model, sorted({layer for layer, _ in chunk})) + hooks
            logits = model.run_with_hooks(tokens.repeat(len(chunk), 1), fwd_hooks=hooks)
            for k, (layer, rest) in enumerate(chunk):
                store[(slice(None), layer, *rest)] = ev(logits[k * b : (k + 1) * b])
    return ev.finish(store, base, axes, sizes)


def _require_grad_mode() -> None:
    if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
        mode = "torch.inference_mode()" if torch.is_inference_mode_enabled() else "torch.no_grad()"
        raise RuntimeError(
            f"attribution patching needs gradients (∂metric/∂activation), but it was called under {mode}; "
            "call it outside that context (it does not update any parameter or .grad)"
        )


def _atp(model, tokens, metric, family: _Family, target: Target, reduce="scalar", steps: int = 1) -> torch.Tensor:
    """cell = Σ (target - act) · ∂metric/∂act, by torch.autograd.grad (no parameter's .grad is touched).

    steps=1: the gradient of one forward on the corrupted tokens (plain AtP). steps=N: integrated
    gradients, the mean gradient at N points act + α·(target − act), α = 0, 1/N, …, (N−1)/N (a left
    Riemann sum, so its first point is plain AtP), one layer's family hooks moved at a time
    (`_path_gradients`).
    """
    _require_grad_mode()
    _require_eval(model, "attribution patching")
    tokens = _check_tokens(model, tokens)
    ev = _Metric(metric, reduce, tokens.shape[0])
    if ev.multi:
        raise ValueError("attribution patching takes one metric (a callable), not a mapping")
    steps = _positive_int(steps, "steps (points along the path; 1 = plain AtP)")
    names = {layer: family.names(model, layer) for layer in range(model.cfg.n_layers)}
    if steps == 1:
        deltas, grads = _corrupted_gradients(model, tokens, ev, names, target)
    else:
        deltas, grads = {}, {}
        for ns in names.values():
            if ns:
                layer_deltas, layer_grads = _path_gradients(model, tokens, ev, ns, target, steps)
                deltas.update(layer_deltas)
                grads.update(layer_grads)

    sizes = tuple(_axis_size(model, tokens, a) for a in family.axes)
    out = torch.full((model.cfg.n_layers, *sizes, tokens.shape[0]), float("nan"), device=tokens.device)
    with torch.no_grad():
        for layer, ns in names.items():
            if not ns:
                continue
            total = 0.0
            for n in ns:
                total = total + family.cells(deltas[n] * grads[n].float())  # [b, *axes]
            out[layer] = total.movedim(0, -1)
    return out if reduce == "none" else out.sum(-1)


def _differentiable_value(ev: _Metric, logits: torch.Tensor) -> torch.Tensor:
    """The metric of one batch as a scalar whose gradient holds each example's own gradient
    (examples are independent, so the gradient of their sum does)."""
    value = ev.raw("metric", logits)
    value = {"scalar": value, "mean": value.mean(), "none": value.sum()}[ev.reduce] if value.ndim else value
    if not value.requires_grad:
        raise RuntimeError(
            "the metric does not depend differentiably on the logits (it returned a tensor without a "
            "graph: avoid .item(), .detach(), argmax or comparisons in the metric)"
        )
    return value


def _corrupted_gradients(model, tokens, ev: _Metric, names: dict, target: Target) -> tuple[dict, dict]:
    """One forward caching the family's hooks of every layer, one backward -> ({name: target - act}, {name: grad})."""
    acts: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook) -> torch.Tensor:
        # Frozen parameters (or a hook upstream of every parameter) leave activations without a
        # graph; such an activation depends on nothing that requires grad, so making it a leaf
        # loses no path and lets the gradient reach it.
        if not act.requires_grad:
            act = act.detach().requires_grad_(True)
        acts[hook.name] = act
        return act

    with model.hooks(fwd_hooks=[(n, keep) for ns in names.values() for n in ns]):
        logits = model(tokens)
    value = _differentiable_value(ev, logits)
    order = [n for ns in names.values() for n in ns]
    grads = torch.autograd.grad(value, [acts[n] for n in order], allow_unused=True)
    grad_of = {n: (torch.zeros_like(acts[n]) if g is None else g) for n, g in zip(order, grads)}
    with torch.no_grad():
        deltas = {n: target(n, acts[n].detach()).float() - acts[n].detach().float() for n in order}
    return deltas, grad_of


def _path_gradients(model, tokens, ev: _Metric, names: list[str], target: Target, steps: int) -> tuple[dict, dict]:
    """One layer's hooks `names` moved along the straight path to the target: a forward of `steps`
    copies of the batch, copy k's activations set to act + (k/steps)·(target − act), one backward.
    -> ({name: target - act at the corrupted point}, {name: mean gradient over the copies})."""
    b = tokens.shape[0]
    points: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}

    def move(act: torch.Tensor, hook) -> torch.Tensor:
        with torch.no_grad():
            parts = []
            for k in range(steps):
                rows = slice(k * b, (k + 1) * b)
                delta = target(hook.name, act[rows], rows).float() - act[rows].float()
                deltas.setdefault(hook.name, delta)  # copy 0 (alpha 0) holds the corrupted activation
                parts.append((act[rows].float() + (k / steps) * delta).to(act.dtype))
        points[hook.name] = torch.cat(parts).requires_grad_(True)  # a leaf: its gradient is all we need
        return points[hook.name]

    with model.hooks(fwd_hooks=[(n, move) for n in names]):
        logits = model(tokens.repeat(steps, 1))
    value = sum(_differentiable_value(ev, logits[k * b : (k + 1) * b]) for k in range(steps))
    grads = torch.autograd.grad(value, [points[n] for n in names], allow_unused=True)
    mean = {n: torch.zeros_like(deltas[n]) if g is None else g.float().view(steps, b, *g.shape[1:]).mean(0)
            for n, g in zip(names, grads)}  # fmt: skip
    return deltas, mean


# ====================================================================== families
_ALL = slice(None)


def _per_layer(*templates: str) -> Callable[[object, int], list[str]]:
    return lambda model, layer: _existing(model, [t.format(l=layer) for t in templates])


def _pos_family(templates: Sequence[str], sum_dims: int) -> _Family:
    """[b, p, ...] activations patched at one position; AtP sums the trailing `sum_dims` dims."""
    return _Family(
        _per_layer(*templates),
        ("pos",),
        lambda r: (_ALL, r[0]),
        lambda c: c.flatten(2).sum(-1) if sum_dims else c,
    )


def _streams_family(where: str, per_stream: bool) -> _Family:
    if where not in ("pre", "mid", "post"):
        raise ValueError(f"where must be 'pre', 'mid' or 'post', got {where!r}")
    name = f"blocks.{{l}}.hook_streams_{where}"
    if per_stream:
        return _Family(_per_layer(name), ("pos", "stream"), lambda r: (_ALL, r[0], r[1]), lambda c: c.sum(-1))
    return _pos_family([name], 2)


def _head_family(by_pos: bool) -> _Family:
    name = "blocks.{l}.attn.hook_z"
    if by_pos:
        return _Family(_per_layer(name), ("pos", "head"), lambda r: (_ALL, r[0], r[1]), lambda c: c.sum(-1))
    return _Family(_per_layer(name), ("head",), lambda r: (_ALL, _ALL, r[0]), lambda c: c.sum(-1).sum(1))


def _expert_out_family(model, per_position: bool) -> _Family:
    if not getattr(model.cfg, "use_expert_out", False) or "blocks.0.mlp.hook_expert_out" not in model.hook_dict:
        raise ValueError(
            "expert-slot patching needs the opt-in hook mlp.hook_expert_out: build the model with "
            "use_expert_out=True, e.g. v4lens.load('tiny', d_vocab=256, use_expert_out=True), and take "
            "the clean cache from that model"
        )
    name = "blocks.{l}.mlp.hook_expert_out"
    if per_position:
        return _Family(_per_layer(name), ("pos", "slot"), lambda r: (_ALL, r[0], r[1]), lambda c: c.sum(-1))
    return _Family(_per_layer(name), ("slot",), lambda r: (_ALL, _ALL, r[0]), lambda c: c.sum(-1).sum(1))


_HCS = {"attn_hc": ("attn_hc",), "mlp_hc": ("mlp_hc",), "both": ("attn_hc", "mlp_hc")}
_HC_PARTS = ("pre", "post", "comb")


def _hc_names(hc: str, what) -> list[str]:
    whats = (what,) if isinstance(what, str) else tuple(what)
    if hc not in _HCS:
        raise ValueError(f"hc must be 'attn_hc', 'mlp_hc' or 'both', got {hc!r}")
    bad = [w for w in whats if w not in _HC_PARTS]
    if bad or not whats:
        raise ValueError(f"what must be one or more of {_HC_PARTS}, got {what!r}")
    return [f"blocks.{{l}}.{h}.hook_{w}" for h in _HCS[hc] for w in whats]


def _comb_target(value, n: int) -> Target:
    if isinstance(value, str):
        if value not in ("identity", "uniform"):
            raise ValueError(f"value must be 'identity', 'uniform' or an [n, n] tensor, got {value!r}")
        fixed = torch.eye(n) if value == "identity" else torch.full((n, n), 1.0 / n)
    else:
        fixed = torch.as_tensor(value, dtype=torch.float32)
        if fixed.shape != (n, n):
            raise ValueError(f"a comb value must be [{n}, {n}], got {tuple(fixed.shape)}")
    return lambda name, act, rows=None: fixed.to(act.device, act.dtype).expand_as(act)


def _sink_target(ablate, scale: float, shift: float) -> tuple[Target, bool]:
    if ablate is None:
        ablate = scale == 1.0 and shift == 0.0
    if ablate and (scale != 1.0 or shift != 0.0):
        raise ValueError("pass either ablate=True or scale/shift, not both")
    if ablate:
        return (lambda name, act, rows=None: torch.full_like(act, float("-inf"))), True
    return (lambda name, act, rows=None: act * scale + shift), False


_SINK = _Family(_per_layer("blocks.{l}.attn.hook_sink_logit"), ("head",), lambda r: (_ALL, r[0]), lambda c: c.sum(-1))


def _layer_family(names) -> _Family:
    return _Family(names, (), lambda r: (Ellipsis,), lambda c: c.flatten(1).sum(-1))

"""Activation patching and attribution patching (AtP) for DeepSeek-V4's own mechanisms.

Every sweep takes `(model, corrupted_tokens, clean_cache, patching_metric, ...)` like
`transformer_lens.patching`'s functions: it runs the corrupted tokens once per swept index with
one clean piece patched in, and returns the metric of each patched run in a tensor indexed by
the swept axes, layer first (the same values and layout as TransformerLens where the family
exists there, e.g. `get_act_patch_attn_out` -> [layer, pos]). Cells of a layer that lacks the
mechanism (the indexer on a sliding or HCA layer) are NaN. `reduce="mean"` / `"none"` and
`baseline=True` behave as in TransformerLens (`"none"` / `baseline` return its `PatchingResult`).
Clean and corrupted tokens must have the same shape; every prompt pair in the batch is patched
at the same index in the same forward. Only the main blocks are swept (not the MTP blocks).

The `atp_*` functions estimate the same sweeps with one forward and one backward pass
(attribution patching, node level): for each cell, Σ (target_act - corrupted_act) · ∂metric/∂act
over the cell's elements (and the batch), the gradient taken on the corrupted run. They return
*effects* (estimated patched metric minus the corrupted metric), with the same axes as the real
sweep of the family, so compare them with `sweep - patching_metric(model(corrupted_tokens))`.
The estimate is exact to first order: for a clean run close to the corrupted one, the error
shrinks quadratically with their distance. Integer decisions (expert ids, indexer picks) have no
gradient and no AtP, and AtP cannot see a patch flip one (a routing or indexer top-k choice
near a tie): hold them at the corrupted run's values (hooks returning the cached ids / picks)
when comparing AtP with real patching. No family here is linear in the metric (every path to
the logits crosses the final RMSNorm and mHC head), so AtP equals real patching only to first
order.

Hook helpers (`hash_route_hooks` / `override_hash_routes`, `indexer_pick_hooks` /
`force_indexer_picks`, `sink_hooks`, `comb_hooks`) return `(name, fn)` lists for
`model.run_with_hooks(fwd_hooks=...)` / `model.hooks(...)` or are context managers; they never
modify a parameter or buffer.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

from .indexer import visible_entries

MetricFn = Callable[[torch.Tensor], torch.Tensor]
Hooks = list  # list[tuple[str, Callable]]
Target = Callable[[str, torch.Tensor], torch.Tensor]  # (hook name, activation) -> what to write there

__all__ = [
    "atp_attn_head_out_all_pos",
    "atp_attn_head_out_by_pos",
    "atp_attn_out",
    "atp_expert_out",
    "atp_expert_weights",
    "atp_hc",
    "atp_hc_comb_fixed",
    "atp_mlp_out",
    "atp_sink",
    "atp_streams",
    "comb_hooks",
    "force_indexer_picks",
    "get_act_patch_attn_head_out_all_pos",
    "get_act_patch_attn_head_out_by_pos",
    "get_act_patch_attn_out",
    "get_act_patch_expert_out",
    "get_act_patch_hc",
    "get_act_patch_hc_comb_fixed",
    "get_act_patch_indexer_topk",
    "get_act_patch_mlp_out",
    "get_act_patch_routing",
    "get_act_patch_sink",
    "get_act_patch_streams",
    "hash_route_hooks",
    "indexer_pick_hooks",
    "override_hash_routes",
    "sink_hooks",
]  # fmt: skip


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


def _axis_size(model, tokens: torch.Tensor, axis: str) -> int:
    cfg = model.cfg
    return {"pos": tokens.shape[-1], "head": cfg.n_heads, "stream": cfg.hc_mult, "slot": cfg.n_activated_experts}[axis]


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

    def target(name: str, act: torch.Tensor) -> torch.Tensor:
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
        from transformer_lens.patching import PatchingResult, make_df_from_ranges

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


def _sweep(model, tokens, metric, family: _Family, target: Target, reduce="scalar", baseline=False, what="patching"):
    """Run the corrupted tokens once per index of [layer, *family.axes], with family.names(layer)
    overwritten at family.select(index) by target; collect the metric. NaN for absent layers."""
    _require_eval(model, what)
    tokens = _check_tokens(model, tokens)
    ev = _Metric(metric, reduce, tokens.shape[0])
    axes = ["layer", *family.axes]
    sizes = (model.cfg.n_layers, *(_axis_size(model, tokens, a) for a in family.axes))
    per_example = (tokens.shape[0],) if reduce != "scalar" else ()
    store = torch.full((len(ev.fns), *sizes, *per_example), float("nan"), device=tokens.device)
    base = None
    with torch.no_grad():
        if baseline:
            base = ev(model.run_with_hooks(tokens, fwd_hooks=[]))
        for layer in range(sizes[0]):
            names = family.names(model, layer)
            if not names:
                continue
            for rest in itertools.product(*(range(s) for s in sizes[1:])):
                hook = partial(_write_hook, sel=family.select(rest), target=target)
                store[(slice(None), layer, *rest)] = ev(
                    model.run_with_hooks(tokens, fwd_hooks=[(n, hook) for n in names])
                )
    return ev.finish(store, base, axes, sizes)


def _require_grad_mode() -> None:
    if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
        mode = "torch.inference_mode()" if torch.is_inference_mode_enabled() else "torch.no_grad()"
        raise RuntimeError(
            f"attribution patching needs gradients (∂metric/∂activation), but it was called under {mode}; "
            "call it outside that context (it does not update any parameter or .grad)"
        )


def _atp(model, tokens, metric, family: _Family, target: Target, reduce="scalar") -> torch.Tensor:
    """One forward on the corrupted tokens caching family.names of every layer, one backward
    (torch.autograd.grad, so no parameter's .grad is touched); cell = Σ (target - act) · grad."""
    _require_grad_mode()
    _require_eval(model, "attribution patching")
    tokens = _check_tokens(model, tokens)
    ev = _Metric(metric, reduce, tokens.shape[0])
    if ev.multi:
        raise ValueError("attribution patching takes one metric (a callable), not a mapping")
    names = {layer: family.names(model, layer) for layer in range(model.cfg.n_layers)}
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
    value = ev.raw("metric", logits)
    # examples are independent, so the gradient of the sum holds each example's own gradient
    value = {"scalar": value, "mean": value.mean(), "none": value.sum()}[reduce] if value.ndim else value
    if not value.requires_grad:
        raise RuntimeError(
            "the metric does not depend differentiably on the logits (it returned a tensor without a "
            "graph: avoid .item(), .detach(), argmax or comparisons in the metric)"
        )
    order = [n for ns in names.values() for n in ns]
    grads = torch.autograd.grad(value, [acts[n] for n in order], allow_unused=True)
    grad_of = {n: (torch.zeros_like(acts[n]) if g is None else g) for n, g in zip(order, grads)}

    sizes = tuple(_axis_size(model, tokens, a) for a in family.axes)
    out = torch.full((model.cfg.n_layers, *sizes, tokens.shape[0]), float("nan"), device=tokens.device)
    with torch.no_grad():
        for layer, ns in names.items():
            if not ns:
                continue
            total = 0.0
            for n in ns:
                act = acts[n].detach()
                delta = target(n, act).float() - act.float()
                total = total + family.cells(delta * grad_of[n].float())  # [b, *axes]
            out[layer] = total.movedim(0, -1)
    return out if reduce == "none" else out.sum(-1)


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
    return lambda name, act: fixed.to(act.device, act.dtype).expand_as(act)


def _sink_target(ablate, scale: float, shift: float) -> tuple[Target, bool]:
    if ablate is None:
        ablate = scale == 1.0 and shift == 0.0
    if ablate and (scale != 1.0 or shift != 0.0):
        raise ValueError("pass either ablate=True or scale/shift, not both")
    if ablate:
        return (lambda name, act: torch.full_like(act, float("-inf"))), True
    return (lambda name, act: act * scale + shift), False


_SINK = _Family(_per_layer("blocks.{l}.attn.hook_sink_logit"), ("head",), lambda r: (_ALL, r[0]), lambda c: c.sum(-1))


def _layer_family(names) -> _Family:
    return _Family(names, (), lambda r: (Ellipsis,), lambda c: c.flatten(1).sum(-1))


# ====================================================================== real patching sweeps
def get_act_patch_streams(model, corrupted_tokens, clean_cache, patching_metric, where: str = "pre",
                          per_stream: bool = False, *, reduce="scalar", baseline=False):  # fmt: skip
    """Patch the clean streams `blocks.{l}.hook_streams_{where}` ([b,p,n,d]) at one position
    (all n streams, or with `per_stream=True` one stream j) -> [layer, pos] or [layer, pos, stream].

    Holds fixed: every other position and stream of that hook; everything downstream is
    recomputed from the patched streams (the V4 analogue of TransformerLens's
    `get_act_patch_resid_pre` / `resid_mid` / `resid_post`).

    >>> res = get_act_patch_streams(model, corrupted, clean_cache, metric, where="mid")  # [L, p]
    """
    return _sweep(model, corrupted_tokens, patching_metric, _streams_family(where, per_stream),
                  _clean_target(clean_cache), reduce, baseline)  # fmt: skip


def get_act_patch_attn_out(model, corrupted_tokens, clean_cache, patching_metric, *, reduce="scalar", baseline=False):
    """Patch the clean attention output `blocks.{l}.hook_attn_out` [b,p,d] at one position -> [layer, pos].

    Holds fixed: the corrupted mHC weights (`post`, `comb`) and streams of that block; the output
    is spread over the streams with the corrupted `post`. Same values as TransformerLens's
    `get_act_patch_attn_out`.

    >>> res = get_act_patch_attn_out(model, corrupted, clean_cache, metric)  # [L, p]
    """
    family = _pos_family(["blocks.{l}.hook_attn_out"], 1)
    return _sweep(model, corrupted_tokens, patching_metric, family, _clean_target(clean_cache), reduce, baseline)


def get_act_patch_mlp_out(model, corrupted_tokens, clean_cache, patching_metric, *, reduce="scalar", baseline=False):
    """Patch the clean MoE output `blocks.{l}.hook_mlp_out` [b,p,d] at one position -> [layer, pos].

    Holds fixed: the corrupted mlp_hc weights and streams. Same values as TransformerLens's
    `get_act_patch_mlp_out`.

    >>> res = get_act_patch_mlp_out(model, corrupted, clean_cache, metric)  # [L, p]
    """
    family = _pos_family(["blocks.{l}.hook_mlp_out"], 1)
    return _sweep(model, corrupted_tokens, patching_metric, family, _clean_target(clean_cache), reduce, baseline)


def get_act_patch_attn_head_out_all_pos(model, corrupted_tokens, clean_cache, patching_metric, *,
                                        reduce="scalar", baseline=False):  # fmt: skip
    """Patch one head's clean output `blocks.{l}.attn.hook_z[:, :, h]` at every position -> [layer, head].

    Holds fixed: the other heads' z, so the grouped output projection mixes clean head h with the
    corrupted others. Same values as TransformerLens's `get_act_patch_attn_head_out_all_pos`.

    >>> res = get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric)  # [L, H]
    """
    return _sweep(model, corrupted_tokens, patching_metric, _head_family(False), _clean_target(clean_cache),
                  reduce, baseline)  # fmt: skip


def get_act_patch_attn_head_out_by_pos(model, corrupted_tokens, clean_cache, patching_metric, *,
                                       reduce="scalar", baseline=False):  # fmt: skip
    """Patch one head's clean z at one position -> [layer, pos, head] (TransformerLens's layout).

    Holds fixed: every other (position, head) of `attn.hook_z`.

    >>> res = get_act_patch_attn_head_out_by_pos(model, corrupted, clean_cache, metric)  # [L, p, H]
    """
    return _sweep(model, corrupted_tokens, patching_metric, _head_family(True), _clean_target(clean_cache),
                  reduce, baseline)  # fmt: skip


def get_act_patch_expert_out(model, corrupted_tokens, clean_cache, patching_metric, per_position: bool = False, *,
                             reduce="scalar", baseline=False):  # fmt: skip
    """Patch the clean weighted output of routing slot s (`mlp.hook_expert_out[:, :, s]`, [b,p,k,d])
    into the corrupted run -> [layer, slot] (all positions) or [layer, pos, slot].

    Holds fixed: the corrupted routing (ids and weights: they are computed before this hook), the
    other slots and the shared expert. Slot s is the s-th of the k routed experts (top-k rank on
    learned layers, tid2eid column on hash layers); the clean slot may hold a different expert than
    the corrupted one: its output, weight included, replaces the corrupted slot's. Needs a model
    (and clean cache) built with `use_expert_out=True`; ValueError otherwise.

    >>> m = v4lens.load("tiny", d_vocab=256, use_expert_out=True)
    >>> res = get_act_patch_expert_out(m, corrupted, m.run_with_cache(clean)[1], metric)  # [L, k]
    """
    family = _expert_out_family(model, per_position)
    return _sweep(model, corrupted_tokens, patching_metric, family, _clean_target(clean_cache), reduce, baseline)


def get_act_patch_routing(model, corrupted_tokens, clean_cache, patching_metric,
                          what: Literal["both", "ids", "weights"] = "both", *, reduce="scalar", baseline=False):  # fmt: skip
    """Route one position as the clean run did -> [layer, pos]: `mlp.hook_expert_ids` and
    `mlp.hook_expert_weights` set to their clean values there (`what="both"`), the experts then
    run on the corrupted input.

    Holds fixed: the corrupted expert computation (the corrupted ffn-normed input goes through
    the clean-chosen experts) and the shared expert. `what="ids"` patches only the ids (weights are
    then recomputed from the corrupted router scores of those experts); `what="weights"` only the
    per-slot weights (applied to the corrupted experts of each slot). Hash layers included.

    >>> res = get_act_patch_routing(model, corrupted, clean_cache, metric)  # [L, p]
    """
    parts = {"both": ("ids", "weights"), "ids": ("ids",), "weights": ("weights",)}
    if what not in parts:
        raise ValueError(f"what must be 'both', 'ids' or 'weights', got {what!r}")
    family = _pos_family([f"blocks.{{l}}.mlp.hook_expert_{p}" for p in parts[what]], 1)
    return _sweep(model, corrupted_tokens, patching_metric, family, _clean_target(clean_cache), reduce, baseline)


def get_act_patch_indexer_topk(model, corrupted_tokens, clean_cache, patching_metric, *,
                               reduce="scalar", baseline=False):  # fmt: skip
    """Give one query the clean run's indexer picks (`attn.indexer.hook_topk[:, p]`, int64 [b,p,k])
    -> [layer, pos]; NaN on layers without an indexer (sliding, HCA).

    Holds fixed: the corrupted compressed entries, keys, queries and window: only *which* entries
    that query attends changes (by entry index; the entries' content stays corrupted).

    >>> res = get_act_patch_indexer_topk(model, corrupted, clean_cache, metric)  # [L, p]
    """
    family = _pos_family(["blocks.{l}.attn.indexer.hook_topk"], 0)
    return _sweep(model, corrupted_tokens, patching_metric, family, _clean_target(clean_cache), reduce, baseline)


def get_act_patch_sink(model, corrupted_tokens, clean_cache, patching_metric, *, ablate: bool | None = None,
                       scale: float = 1.0, shift: float = 0.0, reduce="scalar", baseline=False):  # fmt: skip
    """Ablate (logit -inf: the head has no sink) or rescale one head's sink logit
    (`attn.hook_sink_logit[:, h]`, every query) -> [layer, head].

    The sink logit is a parameter, the same in clean and corrupted runs, so nothing is taken
    from `clean_cache` (pass it or None; kept for the common signature). By default the sink is
    ablated; with `scale` / `shift` the logit becomes logit·scale + shift (shift = log s
    multiplies the sink's unnormalised weight by s). Holds fixed: the other heads and layers and
    all attention scores; the head's pattern renormalises over its real candidates.

    >>> res = get_act_patch_sink(model, tokens, None, metric)  # [L, H]
    """
    target, _ = _sink_target(ablate, scale, shift)
    return _sweep(model, corrupted_tokens, patching_metric, _SINK, target, reduce, baseline)


def get_act_patch_hc(model, corrupted_tokens, clean_cache, patching_metric, what="comb", hc: str = "attn_hc", *,
                     reduce="scalar", baseline=False):  # fmt: skip
    """Patch the clean mHC mixing of one sub-layer at one position -> [layer, pos].

    what: "pre" ([b,p,n] collapse weights), "post" ([b,p,n] expand weights), "comb" ([b,p,n,n]
    stream mixing) or a tuple of them patched together; hc: "attn_hc", "mlp_hc" or "both".
    Holds fixed: the corrupted streams and sub-layer output: only the mixing weights are clean.

    >>> res = get_act_patch_hc(model, corrupted, clean_cache, metric, what="post", hc="mlp_hc")  # [L, p]
    """
    family = _pos_family(_hc_names(hc, what), 1)
    return _sweep(model, corrupted_tokens, patching_metric, family, _clean_target(clean_cache), reduce, baseline)


def get_act_patch_hc_comb_fixed(model, corrupted_tokens, clean_cache, patching_metric, value="identity",
                                hc: str = "both", *, reduce="scalar", baseline=False):  # fmt: skip
    """Force one layer's `hook_comb` to the identity (each stream keeps itself), the uniform
    matrix 1/n (every stream becomes the mean stream) or a given [n, n] matrix, at every
    position -> [layer].

    Nothing is taken from `clean_cache` (pass it or None). Holds fixed: `pre`, `post` and the
    sub-layer computation; hc chooses "attn_hc", "mlp_hc" or "both" sub-layers of the layer.

    >>> res = get_act_patch_hc_comb_fixed(model, tokens, None, metric, value="uniform")  # [L]
    """
    family = _layer_family(_per_layer(*_hc_names(hc, "comb")))
    return _sweep(model, corrupted_tokens, patching_metric, family, _comb_target(value, model.cfg.hc_mult),
                  reduce, baseline)  # fmt: skip


# ====================================================================== attribution patching
def atp_streams(model, corrupted_tokens, clean_cache, patching_metric, where: str = "pre", per_stream: bool = False,
                *, reduce="scalar"):  # fmt: skip
    """AtP estimate of `get_act_patch_streams`'s effects -> [layer, pos] or [layer, pos, stream].

    >>> est = atp_streams(model, corrupted, clean_cache, metric)  # ≈ sweep - corrupted metric
    """
    return _atp(model, corrupted_tokens, patching_metric, _streams_family(where, per_stream),
                _clean_target(clean_cache), reduce)  # fmt: skip


def atp_attn_out(model, corrupted_tokens, clean_cache, patching_metric, *, reduce="scalar"):
    """AtP estimate of `get_act_patch_attn_out`'s effects -> [layer, pos]."""
    return _atp(model, corrupted_tokens, patching_metric, _pos_family(["blocks.{l}.hook_attn_out"], 1),
                _clean_target(clean_cache), reduce)  # fmt: skip


def atp_mlp_out(model, corrupted_tokens, clean_cache, patching_metric, *, reduce="scalar"):
    """AtP estimate of `get_act_patch_mlp_out`'s effects -> [layer, pos]."""
    return _atp(model, corrupted_tokens, patching_metric, _pos_family(["blocks.{l}.hook_mlp_out"], 1),
                _clean_target(clean_cache), reduce)  # fmt: skip


def atp_attn_head_out_all_pos(model, corrupted_tokens, clean_cache, patching_metric, *, reduce="scalar"):
    """AtP estimate of `get_act_patch_attn_head_out_all_pos`'s effects -> [layer, head]."""
    return _atp(model, corrupted_tokens, patching_metric, _head_family(False), _clean_target(clean_cache), reduce)


def atp_attn_head_out_by_pos(model, corrupted_tokens, clean_cache, patching_metric, *, reduce="scalar"):
    """AtP estimate of `get_act_patch_attn_head_out_by_pos`'s effects -> [layer, pos, head]."""
    return _atp(model, corrupted_tokens, patching_metric, _head_family(True), _clean_target(clean_cache), reduce)


def atp_expert_out(model, corrupted_tokens, clean_cache, patching_metric, per_position: bool = False, *,
                   reduce="scalar"):  # fmt: skip
    """AtP estimate of `get_act_patch_expert_out`'s effects -> [layer, slot] or [layer, pos, slot]
    (needs `use_expert_out=True`)."""
    return _atp(model, corrupted_tokens, patching_metric, _expert_out_family(model, per_position),
                _clean_target(clean_cache), reduce)  # fmt: skip


def atp_expert_weights(model, corrupted_tokens, clean_cache, patching_metric, *, reduce="scalar"):
    """AtP estimate of `get_act_patch_routing(..., what="weights")`'s effects -> [layer, pos]
    (the ids are integers: re-routing itself has no gradient)."""
    return _atp(model, corrupted_tokens, patching_metric, _pos_family(["blocks.{l}.mlp.hook_expert_weights"], 1),
                _clean_target(clean_cache), reduce)  # fmt: skip


def atp_hc(model, corrupted_tokens, clean_cache, patching_metric, what="comb", hc: str = "attn_hc", *,
           reduce="scalar"):  # fmt: skip
    """AtP estimate of `get_act_patch_hc`'s effects -> [layer, pos]."""
    return _atp(model, corrupted_tokens, patching_metric, _pos_family(_hc_names(hc, what), 1),
                _clean_target(clean_cache), reduce)  # fmt: skip


def atp_hc_comb_fixed(model, corrupted_tokens, clean_cache, patching_metric, value="identity", hc: str = "both", *,
                      reduce="scalar"):  # fmt: skip
    """AtP estimate of `get_act_patch_hc_comb_fixed`'s effects -> [layer] (first order in comb - value)."""
    return _atp(model, corrupted_tokens, patching_metric, _layer_family(_per_layer(*_hc_names(hc, "comb"))),
                _comb_target(value, model.cfg.hc_mult), reduce)  # fmt: skip


def atp_sink(model, corrupted_tokens, clean_cache, patching_metric, *, scale: float = 1.0, shift: float = 0.0,
             reduce="scalar"):  # fmt: skip
    """AtP estimate of `get_act_patch_sink(..., scale=, shift=)`'s effects -> [layer, head].

    Only rescaling/shifting: an ablation sets the logit to -inf, which no first-order estimate
    can represent (ValueError).
    """
    if scale == 1.0 and shift == 0.0:
        raise ValueError("atp_sink estimates a finite change of the sink logit: pass scale and/or shift "
                         "(ablation to -inf cannot be linearised; use get_act_patch_sink for it)")  # fmt: skip
    target, _ = _sink_target(False, scale, shift)
    return _atp(model, corrupted_tokens, patching_metric, _SINK, target, reduce)


# ====================================================================== hook helpers
# ---------------------------------------------------------------- hash routes
def _hash_layers(model, layers) -> list[int]:
    hashed = [l for l in range(model.cfg.n_layers) if f"blocks.{l}.mlp.hook_hash_ids" in model.hook_dict]
    if layers is None:
        if not hashed:
            raise ValueError("this model has no hash-routed MoE layers (cfg.n_hash_layers = 0)")
        return hashed
    layers = [layers] if isinstance(layers, int) else list(layers)
    bad = [l for l in layers if l not in hashed]
    if bad:
        raise ValueError(f"layer(s) {bad} route by learned top-k, not by a tid2eid table; hash layers: {hashed}")
    return layers


def _route_tables(model, layers, routes, swap) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (lookup [V] int64: row index of each overridden token id or -1, rows [m, k])."""
    V, k, E = model.cfg.d_vocab, model.cfg.n_activated_experts, model.cfg.n_routed_experts
    routes = dict(routes or {})
    pairs = [] if swap is None else ([tuple(swap)] if isinstance(swap[0], int) else [tuple(s) for s in swap])
    touched = list(routes) + [t for p in pairs for t in p]
    if any(len(p) != 2 or p[0] == p[1] for p in pairs):
        raise ValueError(f"swap takes pairs of two different token ids, got {pairs}")
    if len(set(touched)) != len(touched):
        raise ValueError(
            f"each token id may be overridden or swapped once, got routes {list(routes)} and swaps {pairs}"
        )
    if not touched:
        raise ValueError("nothing to override: pass routes={token_id: expert ids} and/or swap=(a, b)")
    if any(not 0 <= t < V for t in touched):
        raise ValueError(f"token ids must lie in [0, {V}), got {touched}")
    tables = {}
    for layer in layers:
        tid2eid = model.blocks[layer].mlp.gate.tid2eid
        rows = {t: torch.as_tensor(r, dtype=torch.long, device=tid2eid.device) for t, r in routes.items()}
        for a, b in pairs:
            rows[a], rows[b] = tid2eid[b].clone(), tid2eid[a].clone()
        for t, r in rows.items():
            if r.shape != (k,) or int(r.max()) >= E or int(r.min()) < -1:
                raise ValueError(f"token {t}: a route is {k} expert ids in [-1, {E}), got {r.tolist()}")
        tids = torch.tensor(list(rows), dtype=torch.long, device=tid2eid.device)
        lookup = torch.full((V,), -1, dtype=torch.long, device=tid2eid.device)
        lookup[tids] = torch.arange(len(tids), device=tid2eid.device)
        tables[layer] = (lookup, torch.stack(list(rows.values())))
    return tables


def _hash_edit(ids: torch.Tensor, hook, table, get_tokens: Callable[[], torch.Tensor]) -> torch.Tensor:
    tokens = get_tokens()
    if tokens is None or tokens.shape != ids.shape[:2]:
        raise ValueError(f"{hook.name}: the hash override was built for tokens of shape "
                         f"{None if tokens is None else tuple(tokens.shape)}, the forward has {tuple(ids.shape[:2])}")  # fmt: skip
    lookup, rows = (t.to(ids.device) for t in table)
    which = lookup[tokens.to(ids.device)]  # [b,p]: row index or -1
    return torch.where(which[..., None] >= 0, rows[which.clamp(min=0)], ids)


def hash_route_hooks(model, tokens: torch.Tensor, routes: Mapping[int, Sequence[int]] | None = None,
                     swap=None, layers=None) -> Hooks:  # fmt: skip
    """Forward hooks that re-route chosen token ids on hash layers, for a forward on `tokens`.

    routes: {token_id: k expert ids (-1 = empty slot)}; swap: (a, b) or a list of pairs: tokens a
    route as b does and vice versa (rows read from each layer's tid2eid). layers: hash layer(s),
    default all; a learned-routing layer is a ValueError. Edits `mlp.hook_hash_ids` where the
    token matches (weights follow the new experts' scores); other positions and the tid2eid
    buffer are untouched.

    >>> logits = model.run_with_hooks(tokens, fwd_hooks=hash_route_hooks(model, tokens, swap=(17, 42)))
    """
    tokens = torch.as_tensor(tokens)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    tables = _route_tables(model, _hash_layers(model, layers), routes, swap)
    return [(f"blocks.{l}.mlp.hook_hash_ids", partial(_hash_edit, table=t, get_tokens=lambda: tokens))
            for l, t in tables.items()]  # fmt: skip


@contextmanager
def override_hash_routes(model, routes: Mapping[int, Sequence[int]] | None = None, swap=None,
                         layers=None) -> Iterator:  # fmt: skip
    """Context manager: `hash_route_hooks` for every forward inside it, whatever its tokens
    (they are read from each hash layer's MoE input). The tid2eid buffers are never written.

    >>> with override_hash_routes(model, routes={17: [0, 1]}):
    ...     logits = model(tokens)
    """
    tables = _route_tables(model, _hash_layers(model, layers), routes, swap)
    seen: dict[int, torch.Tensor] = {}

    def grab(layer, module, args, kwargs):
        seen[layer] = kwargs["tokens"] if "tokens" in kwargs else (args[1] if len(args) > 1 else None)

    handles = [model.blocks[l].mlp.register_forward_pre_hook(partial(grab, l), with_kwargs=True) for l in tables]
    try:
        hooks = [(f"blocks.{l}.mlp.hook_hash_ids", partial(_hash_edit, table=t, get_tokens=partial(seen.get, l)))
                 for l, t in tables.items()]  # fmt: skip
        with model.hooks(fwd_hooks=hooks):
            yield model
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- indexer picks
def _csa_layers(model, layers) -> list[int]:
    csa = [l for l in range(model.cfg.n_layers) if f"blocks.{l}.attn.indexer.hook_topk" in model.hook_dict]
    layers = [layers] if isinstance(layers, int) else list(layers)
    bad = [l for l in layers if l not in csa]
    if bad:
        raise ValueError(f"layer(s) {bad} have no Lightning Indexer (only CSA layers do: {csa})")
    return layers


def _edit_picks(picks: torch.Tensor, hook, include, exclude, queries, scores: dict) -> torch.Tensor:
    _, S, k = picks.shape
    qmask = torch.zeros(S, dtype=torch.bool, device=picks.device)
    qmask[queries if queries is not None else slice(None)] = True
    picks = picks.clone()
    if exclude:
        hit = torch.isin(picks, torch.tensor(exclude, device=picks.device)) & qmask[None, :, None]
        picks = torch.where(hit, -1, picks)
    if not include:
        return picks
    forced = torch.tensor(include, device=picks.device)
    score = scores[hook.name]  # [b,S,T] fp32, from the same forward
    visible = visible_entries(torch.arange(S, device=picks.device), 4)
    for e in include:
        need = (qmask & (e < visible))[None, :] & ~(picks == e).any(-1)  # [b,S]
        if not need.any():
            continue
        # empty slots first (-inf), then the lowest-scoring pick; entries being forced are kept (+inf)
        s = torch.where(picks < 0, float("-inf"), score.gather(-1, picks.clamp(min=0)))
        s = torch.where(torch.isin(picks, forced), float("inf"), s)
        slot = s.argmin(-1, keepdim=True)  # [b,S,1]
        if (need & (s.gather(-1, slot)[..., 0] == float("inf"))).any():
            raise ValueError(f"{hook.name}: cannot force {len(include)} entries into {k} indexer slots")
        picks = torch.where(need[..., None], picks.scatter(-1, slot, e), picks)
    return picks


def indexer_pick_hooks(model, layers, include: Sequence[int] = (), exclude: Sequence[int] = (),
                       queries: Sequence[int] | None = None) -> Hooks:  # fmt: skip
    """Forward hooks that force compressed entries into / out of the indexer's top-k on CSA layer(s).

    include / exclude: compressed entry ids w; queries: positions to edit (default all).
    Exclude: a pick equal to an excluded entry becomes -1 (an empty slot: that query simply
    attends one entry fewer). Include: an entry not yet picked takes an empty slot if there is
    one, else replaces the query's lowest-scoring pick (scores read from `indexer.hook_scores` of
    the same forward); entries being included are never displaced by each other. An entry a query
    cannot see yet (w >= (t+1)//4) is not included there: the model would drop it (causality) and
    it would only cost a real pick. A layer without an indexer is a ValueError.

    >>> with model.hooks(fwd_hooks=indexer_pick_hooks(model, 1, exclude=[0], queries=[30, 31])):
    ...     logits = model(tokens)
    """
    include, exclude = [int(e) for e in include], [int(e) for e in exclude]
    if set(include) & set(exclude):
        raise ValueError(f"entries {sorted(set(include) & set(exclude))} are both included and excluded")
    queries = None if queries is None else [int(q) for q in queries]
    hooks: Hooks = []
    for layer in _csa_layers(model, layers):
        scores: dict[str, torch.Tensor] = {}
        topk = f"blocks.{layer}.attn.indexer.hook_topk"
        if include:

            def grab(s, hook, scores=scores, topk=topk):
                scores[topk] = s.detach()

            hooks.append((f"blocks.{layer}.attn.indexer.hook_scores", grab))
        hooks.append((topk, partial(_edit_picks, include=include, exclude=exclude, queries=queries, scores=scores)))
    return hooks


@contextmanager
def force_indexer_picks(model, layers, include: Sequence[int] = (), exclude: Sequence[int] = (),
                        queries: Sequence[int] | None = None) -> Iterator:  # fmt: skip
    """Context manager form of `indexer_pick_hooks`.

    >>> with force_indexer_picks(model, [1, 3], include=[2]):
    ...     logits, cache = model.run_with_cache(tokens)
    """
    with model.hooks(fwd_hooks=indexer_pick_hooks(model, layers, include, exclude, queries)):
        yield model


# ---------------------------------------------------------------- sink and comb
def sink_hooks(model, layers, heads: Sequence[int] | None = None, *, ablate: bool | None = None,
               scale: float = 1.0, shift: float = 0.0) -> Hooks:  # fmt: skip
    """Forward hooks on `attn.hook_sink_logit` of layer(s): ablate (-inf, default) or
    logit·scale + shift, for `heads` (default all). The `attn_sink` parameter is untouched.

    >>> logits = model.run_with_hooks(tokens, fwd_hooks=sink_hooks(model, 2, heads=[0]))
    """
    target, _ = _sink_target(ablate, scale, shift)
    sel = (_ALL, _ALL if heads is None else list(heads))
    layers = [layers] if isinstance(layers, int) else list(layers)
    return [(f"blocks.{l}.attn.hook_sink_logit", partial(_write_hook, sel=sel, target=target)) for l in layers]


def comb_hooks(model, layers, value="identity", hc: str = "both") -> Hooks:
    """Forward hooks forcing `hook_comb` of layer(s) to "identity", "uniform" (1/n) or an [n, n]
    matrix at every position (hc: "attn_hc", "mlp_hc" or "both").

    >>> logits = model.run_with_hooks(tokens, fwd_hooks=comb_hooks(model, [0, 1], "identity"))
    """
    target = _comb_target(value, model.cfg.hc_mult)
    layers = [layers] if isinstance(layers, int) else list(layers)
    names = [t.format(l=l) for l in layers for t in _hc_names(hc, "comb")]
    return [(n, partial(_write_hook, sel=(Ellipsis,), target=target)) for n in names]

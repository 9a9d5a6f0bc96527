"""Routed experts as research objects, addressed by expert id (not by routing slot).

A V4 MoE layer adds, at each token, the weighted outputs of the k experts the router chose (the
routing weight multiplies the expert's hidden activation before its down projection) plus the
shared expert. Here **expert e's output** at a token is that weighted contribution: what e adds
to `mlp.hook_mlp_out`, a [b, p, d] fp32 tensor that is 0 where e was not picked.

- `expert_output(model, source, layer, expert)` reads it (and where e was picked). It is the
  by-id view of the opt-in `mlp.hook_expert_out` [b, p, k, d] (by slot), mapped through
  `mlp.hook_expert_ids`; without that hook it runs the layer's own expert e on the tokens routed
  to it (from `ln2.hook_normalized`, the ids and the weights): the same rows through the same
  code, so the same numbers. No extra hook is needed.
- `expert_out_hooks(model, layer, expert, fn)` is the per-expert output hook: `fn(out, picked)`
  sees e's output and returns its replacement. Mechanism: e's routing weight is set to 0 at the
  chosen tokens (`mlp.hook_expert_weights`), which removes e's term exactly and leaves the other
  experts' weights as they were (V4 normalises the weights over the chosen experts before that
  hook and never again), then the replacement is added to `hook_mlp_out`.
- `ablate_expert_hooks` (zero, mean, resample), `patch_expert_hooks` (from a clean run) are
  built on it. Zero-ablation equals a copy of the model with e's weights zeroed, bit for bit (the
  router still picks e, e adds nothing); a replacement equals running with e's output replaced,
  up to the order of fp32 additions.
- `force_expert_hooks` / `forbid_expert_hooks` change the routing instead: the router's choice
  is recomputed from the same forward's scores (`mlp.hook_router_scores` + the gate's bias) with
  e ranked first or removed, so the next-best expert takes its place and the weights follow the
  new set, as the router would do. Hash layers (a fixed token-id table, no ranking): forbidding
  empties e's slot (-1; the other weights are renormalised as for any empty slot), forcing is
  refused.
- `expert_sweep(model, tokens, metric, how=...)` -> [layer, expert] metric of each intervention.

Every hook list is `[(name, fn), ...]` for `model.run_with_hooks(fwd_hooks=...)` or
`model.hooks(...)`; no parameter or buffer is modified. `positions` chooses the tokens an
intervention touches: None (all), positions (ints, the same in every row), or a bool mask [p] /
[b, p]. Built for plain forwards (one forward over the whole input). When combining a routing
edit with an output edit of the same layer, list the routing hooks first (hooks run in list order).

    hooks = experts.ablate_expert_hooks(model, layer=2, expert=5, how="mean", reference=ref_tokens)
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    effect = experts.expert_sweep(model, tokens, metric, how="zero")  # [n_layers, E], NaN = never picked
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from .layout import require_hooks
from .stats.common import token_mask

Hooks = list  # list[tuple[str, Callable]]
HOW = ("zero", "mean", "resample", "forbid", "patch")


class ExpertOutput(NamedTuple):
    out: torch.Tensor  # [b, p, d] fp32: expert e's weighted contribution, 0 where not picked
    picked: torch.Tensor  # [b, p] bool: e was one of the token's experts


# ----------------------------------------------------------------------------- names and checks
def _prefix(model, layer: int | str) -> str:
    """Block index (n_layers + i for MTP block i) or prefix ("blocks.2", "mtp.0") -> prefix of a MoE layer."""
    n = model.cfg.n_layers
    if isinstance(layer, str):
        prefix = layer.rstrip(".")
    else:
        total = n + len(getattr(model, "mtp", ()))
        if not -n <= layer < total:
            raise IndexError(f"layer {layer} out of range: blocks 0..{n - 1}, MTP blocks {n}..{total - 1}")
        layer = layer % n if layer < 0 else layer
        prefix = f"blocks.{layer}" if layer < n else f"mtp.{layer - n}"
    if f"{prefix}.mlp.hook_expert_ids" not in model.hook_dict:
        raise ValueError(f"layer {layer!r}: {prefix}.mlp is not a MoE layer of this model (blocks.0 … blocks.{n - 1})")
    return prefix


def _experts(model, experts: int | Sequence[int]) -> list[int]:
    E = model.cfg.n_routed_experts
    ids = [int(experts)] if isinstance(experts, int) else [int(e) for e in experts]
    bad = [e for e in ids if not 0 <= e < E]
    if bad or not ids or len(set(ids)) != len(ids):
        raise ValueError(f"expert ids must be distinct and lie in [0, {E}), got {ids}")
    return ids


def _selected(positions, b: int, p: int, device) -> torch.Tensor:
    """positions (None, ints, or a bool mask [p] / [b, p]) -> bool [b, p]."""
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        if positions.shape not in ((p,), (b, p)):
            raise ValueError(f"positions: a bool mask must be [p] or [b, p] = {(b, p)}, got {tuple(positions.shape)}")
        return token_mask(positions.to(device), None, b, p, device)
    if isinstance(positions, int):
        positions = [positions]
    if positions is not None and any(not -p <= int(t) < p for t in positions):
        raise IndexError(f"positions {list(positions)} out of range for {p} positions")
    return token_mask(None, positions, b, p, device)


def reads(model, layer: int | str) -> list[str]:
    """The hooks `expert_output` reads for a layer (a `names_filter` list for run_with_cache)."""
    prefix = _prefix(model, layer)
    return [f"{prefix}.ln2.hook_normalized", f"{prefix}.mlp.hook_expert_ids", f"{prefix}.mlp.hook_expert_weights"]


def _cache_of(model, source, names: list[str]):
    if hasattr(source, "cache_dict") or isinstance(source, dict):
        return source
    mtp = any(n.startswith("mtp.") for n in names)  # MTP blocks run only when asked for
    with torch.no_grad():
        return model.run_with_cache(source, names_filter=names, **({"mtp": True} if mtp else {}))[1]


def _contribution(mlp, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, e: int) -> torch.Tensor:
    """Expert e's weighted output, run by the layer's own `experts` on the tokens routed to e:
    x [b,p,d], ids [b,p,k], weights [b,p,k] -> [b,p,d] fp32 (0 where e is not picked)."""
    b, p, d = x.shape
    only = torch.where(ids == e, ids, -1)  # the same tokens, in the same order, as in the forward
    return mlp.experts(x.reshape(b * p, d), only.reshape(b * p, -1), weights.reshape(b * p, -1)).view(b, p, d)


# ----------------------------------------------------------------------------- reading
@torch.no_grad()
def expert_output(model, source, layer: int | str, expert: int) -> ExpertOutput:
    """Expert `expert`'s output (its weighted contribution) at every cached token of `layer`.

    source: a cache holding the layer's `ln2.hook_normalized`, `mlp.hook_expert_ids` and
    `mlp.hook_expert_weights` (or `mlp.hook_expert_out` with the ids), or tokens / a prompt to run.
    Returns `ExpertOutput(out [b, p, d] fp32, picked [b, p] bool)`.

        out, picked = experts.expert_output(model, cache, layer=2, expert=5)
    """
    prefix, (e,) = _prefix(model, layer), _experts(model, expert)
    names = reads(model, prefix)
    cache = _cache_of(model, source, names)
    store = getattr(cache, "cache_dict", cache)
    by_slot = f"{prefix}.mlp.hook_expert_out"
    need = [names[1], by_slot] if by_slot in store else names
    why = f"expert_output needs them; cache with names_filter={names} (or pass the tokens)"
    t = require_hooks(cache, need, why)
    batched = getattr(cache, "has_batch_dim", True)
    ids = t[names[1]] if batched else t[names[1]][None]
    hit = ids == e  # [b,p,k]
    if by_slot in store:
        slots = t[by_slot] if batched else t[by_slot][None]
        out = torch.where(hit[..., None], slots.float(), 0.0).sum(2)
    else:
        x, w = (t[n] if batched else t[n][None] for n in (names[0], names[2]))
        out = _contribution(model.get_submodule(f"{prefix}.mlp"), x, ids, w, e)
    return ExpertOutput(out, hit.any(-1))


# ----------------------------------------------------------------------------- editing an expert's output
def expert_out_hooks(model, layer: int | str, expert: int, fn: Callable | None = None, positions=None) -> Hooks:
    """The per-expert output hook: at the chosen tokens, expert `expert`'s output is replaced by
    `fn(out, picked)` (out [b, p, d] fp32 as the forward computed it, picked [b, p] bool; return
    [b, p, d]). fn=None removes it (zero-ablation). Elsewhere nothing changes.

    Exact: e's routing weight is set to 0 there (its term leaves the routed sum, the other weights
    stay), then fn's value is added to `hook_mlp_out`. fn may return a non-zero value where e was
    not picked (patching in a clean run's contribution does).

        hooks = experts.expert_out_hooks(model, 2, 5, lambda out, picked: 2 * out)  # double expert 5
    """
    prefix, (e,) = _prefix(model, layer), _experts(model, expert)
    mlp = model.get_submodule(f"{prefix}.mlp")
    seen: dict[str, torch.Tensor] = {}

    def grab(act, hook, key):
        seen[key] = act

    def zero_weight(weights, hook):
        ids = seen["ids"]
        seen["sel"] = _selected(positions, *ids.shape[:2], ids.device)
        seen["weights"] = weights
        return torch.where((ids == e) & seen["sel"][..., None], 0.0, weights)

    def replace(mlp_out, hook):
        ids, weights, sel, x = seen.pop("ids"), seen.pop("weights"), seen.pop("sel"), seen.pop("x")
        new = fn(_contribution(mlp, x, ids, weights, e), (ids == e).any(-1))
        if tuple(new.shape) != tuple(mlp_out.shape):
            raise ValueError(f"{hook.name}: the replacement for expert {e} must be {tuple(mlp_out.shape)}, "
                             f"got {tuple(new.shape)}")  # fmt: skip
        added = mlp_out.float() + new.to(mlp_out.device, torch.float32)
        return torch.where(sel[..., None], added, mlp_out.float()).to(mlp_out.dtype)

    hooks = [(f"{prefix}.mlp.hook_expert_ids", lambda a, hook: grab(a, hook, "ids")),
             (f"{prefix}.mlp.hook_expert_weights", zero_weight)]  # fmt: skip
    if fn is not None:
        hooks = [(f"{prefix}.ln2.hook_normalized", lambda a, hook: grab(a, hook, "x")), *hooks,
                 (f"{prefix}.hook_mlp_out", replace)]  # fmt: skip
    return hooks


def _reference_outputs(model, reference, prefix: str, e: int) -> torch.Tensor:
    if reference is None:
        raise ValueError("mean- and resample-ablation need reference= (a cache or tokens of a reference run)")
    out, picked = expert_output(model, reference, prefix, e)
    if not picked.any():
        raise ValueError(f"{prefix}: expert {e} was never picked in the reference run: nothing to average or resample")
    return out[picked]  # [n, d]: e's output at each reference token that picked it


def ablate_expert_hooks(model, layer: int | str, expert: int, how: str = "zero", reference=None, positions=None,
                        seed: int = 0) -> Hooks:  # fmt: skip
    """Hooks ablating expert `expert` of `layer` at the tokens that picked it (within `positions`).

    how: "zero" (its output removed: as if its weights were 0), "mean" (replaced by the mean of
    its outputs over the reference tokens that picked it), "resample" (by its output at a random
    reference token that picked it, a fresh seeded draw per token and forward). reference: a cache
    or tokens (mean / resample). Tokens that did not pick e are untouched.

        logits = model.run_with_hooks(tokens, fwd_hooks=experts.ablate_expert_hooks(model, 1, 3))
    """
    if how not in ("zero", "mean", "resample"):
        raise ValueError(f"how must be 'zero', 'mean' or 'resample', got {how!r}")
    if how == "zero":
        return expert_out_hooks(model, layer, expert, None, positions)
    prefix, (e,) = _prefix(model, layer), _experts(model, expert)
    ref = _reference_outputs(model, reference, prefix, e)
    if how == "mean":
        mean = ref.mean(0)

        def fn(out, picked):
            return torch.where(picked[..., None], mean.to(out.device), 0.0)

    else:
        gen = torch.Generator().manual_seed(seed)

        def fn(out, picked):
            draw = torch.randint(ref.shape[0], tuple(picked.shape), generator=gen)
            return torch.where(picked[..., None], ref[draw].to(out.device), 0.0)

    return expert_out_hooks(model, prefix, e, fn, positions)


def patch_expert_hooks(model, layer: int | str, expert: int, clean_cache, positions=None) -> Hooks:
    """Hooks patching expert `expert`'s output from a clean run: at the chosen tokens its output
    becomes the clean run's (0 where the clean run did not pick it; added where only the clean
    run picked it). The routing of the other experts stays the corrupted run's.

        logits = model.run_with_hooks(corrupted, fwd_hooks=experts.patch_expert_hooks(model, 2, 5, clean_cache))
    """
    prefix, (e,) = _prefix(model, layer), _experts(model, expert)
    clean = expert_output(model, clean_cache, prefix, e).out

    def fn(out, picked):
        if clean.shape != out.shape:
            raise ValueError(f"{prefix}: the clean run has shape {tuple(clean.shape)}, this forward "
                             f"{tuple(out.shape)}: clean and corrupted tokens must have the same shape")  # fmt: skip
        return clean.to(out.device)

    return expert_out_hooks(model, prefix, e, fn, positions)


# ----------------------------------------------------------------------------- routing: force and forbid
def _route_hooks(model, layer, experts, positions, force: bool) -> Hooks:
    prefix, chosen = _prefix(model, layer), _experts(model, experts)
    mlp = model.get_submodule(f"{prefix}.mlp")
    E, k = model.cfg.n_routed_experts, model.cfg.n_activated_experts
    hashed = f"{prefix}.mlp.hook_hash_ids" in model.hook_dict
    if hashed and force:
        raise ValueError(
            f"{prefix} routes by a fixed token-id table (a hash layer): there is no ranking that says which "
            "of a token's experts a forced one would displace. Choose the route yourself: "
            "patching.hash_route_hooks(model, tokens, routes={token_id: [expert ids]}), or a hook on "
            f"{prefix}.mlp.hook_expert_ids"
        )
    if force and len(chosen) > k:
        raise ValueError(f"cannot force {len(chosen)} experts {chosen} into {k} routing slots")
    if not force and not hashed and E - len(chosen) < k:
        raise ValueError(f"forbidding {chosen} leaves {E - len(chosen)} experts for {k} routing slots")
    seen: dict[str, torch.Tensor] = {}

    def grab(scores, hook):
        seen["scores"] = scores

    def edit(ids, hook):
        b, p, _ = ids.shape
        sel = _selected(positions, b, p, ids.device)[..., None]
        listed = torch.tensor(chosen, device=ids.device)
        if hashed:  # forbid: the slot is emptied; the model renormalises the others as for any empty slot
            return torch.where(sel & torch.isin(ids, listed), -1, ids)
        # the router's own ranking (scores + bias, as the model computes it) without the listed experts
        banned = torch.zeros(E, dtype=torch.bool, device=ids.device)
        banned[listed] = True
        ranked = (seen.pop("scores") + mlp.gate.bias).masked_fill(banned, float("-inf"))
        if force:  # the listed experts first, then the router's best k - n others, in its order
            new = torch.cat([listed.expand(b, p, -1), ranked.topk(k - len(chosen), dim=-1).indices], dim=-1)
        else:
            new = ranked.topk(k, dim=-1).indices
        return torch.where(sel, new, ids)

    return [(f"{prefix}.mlp.hook_router_scores", grab), (f"{prefix}.mlp.hook_expert_ids", edit)]


def force_expert_hooks(model, layer: int | str, experts: int | Sequence[int], positions=None) -> Hooks:
    """Hooks routing the chosen tokens to expert(s) `experts` of a learned-routing layer, as the
    router would if they ranked first: the ids become the forced experts followed by the router's
    best k − n others (from this forward's scores + bias); the weights follow the new set. A hash
    layer is a ValueError (see the module docstring).

        logits = model.run_with_hooks(tokens, fwd_hooks=experts.force_expert_hooks(model, 1, 6, positions=[-1]))
    """
    return _route_hooks(model, layer, experts, positions, force=True)


def forbid_expert_hooks(model, layer: int | str, experts: int | Sequence[int], positions=None) -> Hooks:
    """Hooks keeping expert(s) `experts` out of the chosen tokens' routes: on a learned-routing
    layer the router's next-best expert takes the place (its top-k of scores + bias without them),
    and the weights are recomputed over the new set; on a hash layer the slot is emptied (-1).

        logits = model.run_with_hooks(tokens, fwd_hooks=experts.forbid_expert_hooks(model, 1, 6))
    """
    return _route_hooks(model, layer, experts, positions, force=False)


# ----------------------------------------------------------------------------- sweep
@torch.no_grad()
def expert_sweep(model, tokens: torch.Tensor, metric: Callable[[torch.Tensor], torch.Tensor], how: str = "zero",
                 layers: Sequence[int] | None = None, experts: Sequence[int] | None = None, *, reference=None,
                 clean_cache=None, positions=None, seed: int = 0) -> torch.Tensor:  # fmt: skip
    """The metric of one intervention per (layer, expert): fp32 [n_layers, E].

    how: "zero" / "mean" / "resample" (ablation; reference defaults to the tokens' own run),
    "forbid", or "patch" (from `clean_cache`). metric(logits) -> a scalar. A cell is NaN where the
    expert was never picked at the selected tokens (its ablation or forbidding would change
    nothing; for "patch": picked in neither run), and for layers not swept. Main blocks only.

        effect = experts.expert_sweep(model, tokens, metric, how="zero") - metric(model(tokens))
    """
    if how not in HOW:
        raise ValueError(f"how must be one of {HOW}, got {how!r}")
    if model.training:
        raise ValueError("expert_sweep needs the model in evaluation mode: call model.eval() first")
    if how == "patch" and clean_cache is None:
        raise ValueError("how='patch' needs clean_cache (model.run_with_cache(clean_tokens))")
    L, E = model.cfg.n_layers, model.cfg.n_routed_experts
    layers = list(range(L)) if layers is None else [int(l) for l in layers]
    if any(not 0 <= l < L for l in layers):
        raise ValueError(f"layers must be main blocks 0..{L - 1}, got {layers}")
    experts = list(range(E)) if experts is None else _experts(model, experts)
    names = [n for l in layers for n in reads(model, l)]
    _, run = model.run_with_cache(tokens, names_filter=names)  # which experts fire, and the default reference
    if how in ("mean", "resample"):
        reference = run if reference is None else _cache_of(model, reference, names)
    result = torch.full((L, E), float("nan"), device=tokens.device)
    for l in layers:
        ids = run[f"blocks.{l}.mlp.hook_expert_ids"]
        sel = _selected(positions, *ids.shape[:2], ids.device)[..., None]
        clean_ids = clean_cache[f"blocks.{l}.mlp.hook_expert_ids"] if how == "patch" else None
        for e in experts:
            used = ((ids == e) & sel).any() or (clean_ids is not None and ((clean_ids == e) & sel).any())
            if not used:
                continue
            if how == "forbid":
                hooks = forbid_expert_hooks(model, l, e, positions)
            elif how == "patch":
                hooks = patch_expert_hooks(model, l, e, clean_cache, positions)
            else:
                hooks = ablate_expert_hooks(model, l, e, how, reference, positions, seed)
            value = torch.as_tensor(metric(model.run_with_hooks(tokens, fwd_hooks=hooks)))
            if value.numel() != 1:
                raise ValueError(f"metric must return a scalar, got shape {tuple(value.shape)}")
            result[l, e] = float(value)
    return result

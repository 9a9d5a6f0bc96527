"""Hook helpers that edit a mechanism without touching a weight: hash routes, indexer picks, sinks,
mHC mixing (the package docstring says how they are used)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial

import torch

from ...model.indexer import visible_entries
from .engine import _ALL, Hooks, _comb_target, _hc_names, _sink_target, _write_hook


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

"""Caching activations: TransformerLens's `run_with_cache` / `get_caching_hooks`, stream-aware.

Each hook's tensor is sliced on its real position axis (`layout.position_axis`: streams are
[b, p, n, d], scores and patterns head-first, compressed entries have no position axis), can be
kept on another device or on disk (`offload_dir`), and a long input can run in chunks through a
`V4KVCache` whose caches are assembled into the one a single forward gives (`chunk_len`).

    >>> _, cache = run_with_cache(model, tokens, pos_slice=-1)    # = model.run_with_cache(...)
    >>> cache["streams_post", 3].shape                             # [b, 1, n, d]
    >>> cache.accumulated_streams().shape                          # [L+1, b, 1, n, d]
    >>> cache.logit_lens(k=5).top_strs[-1]                         # what the last layer predicts
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from transformer_lens.utilities.slice import Slice

from ..model.guards import key_index_of, tag_candidates
from ..model.kv_cache import V4KVCache
from .cache import V4ActivationCache
from .layout import position_axis
from .offload import OffloadRun


def caching_hooks(
    model,
    names_filter=None,
    incl_bwd: bool = False,
    device=None,
    remove_batch_dim: bool = False,
    cache: dict | None = None,
    pos_slice=None,
    offload_dir=None,
) -> tuple[dict, list, list]:
    """TransformerLens's `get_caching_hooks`, slicing positions on each hook's real position axis.

    Returns (cache dict filled during the forward, forward hooks, backward hooks); same arguments as
    `HookedRootModule.get_caching_hooks`. An int `pos_slice` keeps a length-1 position axis, as
    TransformerLens does. Compressed-entry tensors are cached whole. Per-row positions: an integer
    tensor [b, k] keeps positions pos_slice[i] of row i (a position axis of length k; negative counts
    from the end), e.g. each row's last real token `pos_slice=last[:, None]`. A 1-D tensor or list is
    TransformerLens's meaning: the same positions in every row.
    offload_dir: an `OffloadRun` (what `run_with_cache(offload_dir=DIR)` makes): write each tensor,
    as its hook fires, to a file of the run and cache a memory-mapped view of it; the run is moved
    into DIR by `run.commit()` after the forward (`open_offloaded` reopens DIR later). A long run's
    cache then lives in the page cache, which the OS can evict, not in the process's memory.

    >>> cache_dict, fwd, _ = caching_hooks(model, names_filter=is_stream_name, pos_slice=[0, -1])
    >>> with model.hooks(fwd_hooks=fwd):
    ...     model(tokens)
    """
    if offload_dir is not None and not isinstance(offload_dir, OffloadRun):
        raise ValueError(
            "caching_hooks(offload_dir=...) needs an OffloadRun, not a path: only run_with_cache knows when the "
            "forward has finished and the files can be moved into place. Use run_with_cache(..., offload_dir=DIR)"
        )
    cache = {} if cache is None else cache
    rows = row_positions(pos_slice)  # [b, k] or None
    pos_slice = Slice.unwrap(pos_slice) if rows is None else Slice(None)
    names_filter = _as_filter(names_filter)
    model.is_caching = True

    def save_hook(tensor: torch.Tensor, hook, is_backward: bool = False) -> None:
        t = tensor.detach().to(device)
        if t.data_ptr() != tensor.data_ptr():  # moved: keep the key index (what each candidate slot holds)
            tag_candidates(t, key_index_of(tensor))
        axis = position_axis(hook.name)
        if rows is not None and axis is not None and t.ndim > axis:
            t = take_rows(t, rows, axis, hook.name)
        if remove_batch_dim:
            if t.shape[0] != 1:
                raise ValueError(f"remove_batch_dim needs batch size 1, {hook.name} has {t.shape[0]}")
            t = t[0]
        axis = position_axis(hook.name, has_batch_dim=not remove_batch_dim)
        if axis is not None and t.ndim > axis:
            t = pos_slice.apply(t, dim=axis)
        name = hook.name + ("_grad" if is_backward else "")
        cache[name] = t if offload_dir is None else offload_dir.write(t, name)

    fwd = [(name, save_hook) for name in model.hook_dict if names_filter(name)]
    bwd = [(name, lambda t, hook: save_hook(t, hook, is_backward=True)) for name, _ in fwd] if incl_bwd else []
    return cache, fwd, bwd


def row_positions(pos_slice) -> torch.Tensor | None:
    """`pos_slice` as per-row positions [b, k] (int64) if it is a 2-D integer tensor, array or nested list, else None."""
    value = pos_slice.slice if isinstance(pos_slice, Slice) and pos_slice.mode == "array" else pos_slice
    if not isinstance(value, (torch.Tensor, np.ndarray, list)):
        return None
    try:
        rows = torch.as_tensor(np.asarray(value) if isinstance(value, list) else value)
    except ValueError as err:  # ragged rows
        raise ValueError(f"pos_slice: every row needs the same number of positions ({err})") from None
    if rows.ndim < 2:
        return None  # TransformerLens's meaning: the same positions in every row
    if rows.ndim != 2 or rows.dtype == torch.bool or rows.is_floating_point() or rows.is_complex():
        raise ValueError(
            f"pos_slice: per-row positions must be an integer tensor [b, k] (row i keeps positions pos_slice[i]), "
            f"got {rows.dtype} of shape {tuple(rows.shape)}; for a [b, p] boolean mask pass the positions it "
            "selects, the same number per row"
        )
    return rows.long()


def take_rows(t: torch.Tensor, rows: torch.Tensor, axis: int, name: str) -> torch.Tensor:
    """Row i's positions rows[i] of t's position axis `axis` (t batch-first): [b, .., p, ..] -> [b, .., k, ..]."""
    b, k = rows.shape
    if t.shape[0] != b:
        raise ValueError(f"pos_slice: per-row positions have {b} rows, but {name} has batch size {t.shape[0]}")
    S = t.shape[axis]
    if int(rows.max()) >= S or int(rows.min()) < -S:
        raise IndexError(f"pos_slice: per-row positions {int(rows.min())}..{int(rows.max())} are outside "
                         f"{name}'s {S} positions")  # fmt: skip
    index = (rows % S).to(t.device).view((b,) + (1,) * (axis - 1) + (k,) + (1,) * (t.ndim - axis - 1))
    return t.gather(axis, index.expand(t.shape[:axis] + (k,) + t.shape[axis + 1 :]))


def _as_filter(names_filter):
    """TransformerLens's names_filter forms (None, a name, a list of names, a function) -> a function."""
    if callable(names_filter):
        return names_filter
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        names_filter = [names_filter]
    if isinstance(names_filter, (list, tuple, set)):
        wanted = set(names_filter)
        return lambda name: name in wanted
    raise ValueError("names_filter must be a string, a list of strings, or a function")


def run_with_cache(
    model,
    input,
    *model_args,
    names_filter=None,
    device=None,
    remove_batch_dim: bool = False,
    incl_bwd: bool = False,
    reset_hooks_end: bool = True,
    clear_contexts: bool = False,
    pos_slice=None,
    offload_dir=None,
    chunk_len: int | None = None,
    **model_kwargs,
):
    """Run `model(input, ...)` and cache activations: TransformerLens's `run_with_cache`, stream-aware.

    Returns (model output, `V4ActivationCache`): the output is what `model(input, ...)` returns, so
    with `draft=True` (DSpark) it is `((logits, Draft), cache)`, with `mtp=True` `((logits, mtp_logits),
    cache)`. Same keywords as TransformerLens; `device`
    is where the cache is stored (e.g. "cpu" while the model runs on a GPU). The cache also keeps
    the input tokens and, after `pos_slice`, which positions it holds, so the logit lens can find
    next-token targets. `HookedV4.run_with_cache` should be this function.
    offload_dir: keep the cache on disk (memory-mapped files, see `caching_hooks`; reopen with
    `open_offloaded`). DIR must be new, empty or an earlier run's offload folder (only that run's
    files are replaced); the run appears there only once the forward finished, and a run that fails
    leaves the previous one as it was (`v4lens.analysis.offload`). Long inputs: combine with
    `names_filter`, `pos_slice` (any position subset, 4-D streams included), `stop_at_layer=L` (only
    blocks < L run) and `return_type=None` (no [b, p, V] logits).
    chunk_len: run the input through a `V4KVCache` chunk_len tokens at a time (the forward's own
    memory then grows with chunk_len, not with the length) and assemble the chunks' caches into
    the one a single forward gives (`concat_chunk_tensors`). Not with MTP, gradients or a cache of
    your own; with `draft=True` the drafter runs after the last chunk.
    pos_slice: TransformerLens's forms (an int, a (start, stop[, step]) tuple, positions [k] kept in every
    row), or per-row positions [b, k] (`caching_hooks`; not with chunk_len, and `cache.positions` is then
    None: the lens cannot know the rows' targets).
    names_filter: a name or a list of names must all be hook points of this model (else a KeyError with
    near matches, before the forward); those that did not fire (return_type=None, stop_at_layer, mtp.*
    hooks without mtp=True, ...) are listed in a warning.

    >>> logits, cache = run_with_cache(model, "The capital of France is", device="cpu", pos_slice=-1)
    >>> _, cache = run_with_cache(model, tokens, pos_slice=last_positions[:, None])   # one position per row
    """
    # text -> tokens once (as forward would tokenize it), so the cache can keep them
    tokens = model._validate_tokens(input, model_kwargs.get("prepend_bos", True), model_kwargs.get("padding_side"))
    if remove_batch_dim and tokens.shape[0] != 1:
        raise ValueError(f"Cannot remove batch dimension from cache with batch size {tokens.shape[0]}")
    if isinstance(names_filter, (str, list, tuple, set)):  # a typo must not cost a forward and cache nothing
        model.check_hook_names([names_filter] if isinstance(names_filter, str) else list(names_filter))
    rows = row_positions(pos_slice)
    if rows is not None:
        if rows.shape[0] != tokens.shape[0]:
            raise ValueError(f"pos_slice: per-row positions [b, k] have {rows.shape[0]} rows, the input has "
                             f"{tokens.shape[0]} (shape {tuple(tokens.shape)})")  # fmt: skip
        if chunk_len is not None:
            raise ValueError("pos_slice: per-row positions [b, k] do not work with chunk_len; cache whole positions "
                             "or run without chunk_len")  # fmt: skip
    # the absolute positions the cache holds, when every row holds the same ones (lens targets need them)
    positions = None if pos_slice is None or rows is not None else torch.as_tensor(
        Slice.unwrap(pos_slice).indices(tokens.shape[1]))  # fmt: skip
    if chunk_len is not None and (incl_bwd or remove_batch_dim or model_args or model_kwargs.get("mtp")
                                  or "past_kv_cache" in model_kwargs):  # fmt: skip
        raise ValueError("chunk_len works with return_type / names_filter / pos_slice / device / offload_dir only")
    run = None if offload_dir is None else OffloadRun(offload_dir, model)  # refuses a folder that is not ours
    try:
        if chunk_len is not None:
            hook_kwargs = {"reset_hooks_end": reset_hooks_end, "clear_contexts": clear_contexts}
            out, cache_dict = _chunked_run(model, tokens, chunk_len, names_filter, device, positions, model_kwargs,
                                           hook_kwargs)  # fmt: skip
            if run is not None:
                cache_dict = {name: run.write(t, name) for name, t in cache_dict.items()}
        else:
            cache_dict, fwd, bwd = caching_hooks(
                model, names_filter, incl_bwd, device, remove_batch_dim, pos_slice=pos_slice, offload_dir=run
            )
            with model.hooks(fwd_hooks=fwd, bwd_hooks=bwd, reset_hooks_end=reset_hooks_end,
                             clear_contexts=clear_contexts):  # fmt: skip
                out = model(tokens, *model_args, **model_kwargs)
                if incl_bwd:
                    out.backward()
        if run is not None:  # tokens and positions too, so that open_offloaded can rebuild the whole cache
            run.write(tokens.cpu(), "tokens")
            if positions is not None:
                run.write(positions, "positions")
            on_disk = run.commit()  # the run appears in offload_dir only now, complete
            cache_dict = {name: on_disk[name] for name in cache_dict}
    except BaseException:
        if run is not None:
            run.abort()  # the temporary files go; the previous run in offload_dir is untouched
        raise
    _warn_unfired(names_filter, cache_dict, model_args, model_kwargs)
    cache_tokens = tokens.to(device) if device is not None else tokens
    return out, V4ActivationCache(
        cache_dict,
        model,
        has_batch_dim=not remove_batch_dim,
        tokens=cache_tokens[0] if remove_batch_dim else cache_tokens,
        positions=positions,
    )


def _warn_unfired(names_filter, cache_dict, model_args, model_kwargs) -> None:
    """Warn about hooks a name or list `names_filter` asked for that did not fire in the forward."""
    if not isinstance(names_filter, (str, list, tuple, set)):
        return  # a function selects what exists; it names nothing that must be there
    named = [names_filter] if isinstance(names_filter, str) else list(dict.fromkeys(names_filter))
    missing = [name for name in named if name not in cache_dict]
    if not missing:
        return
    why = []
    if model_kwargs.get("stop_at_layer") is not None:
        why.append(f"stop_at_layer={model_kwargs['stop_at_layer']} runs only the blocks below it")
    if (model_args[:1] or [model_kwargs.get("return_type", "logits")])[0] is None:
        why.append("return_type=None stops after the last block (no hc_head, ln_final or logits)")
    if any(name.startswith("mtp.") for name in missing) and not model_kwargs.get("mtp"):
        why.append("mtp.* hooks fire only with mtp=True")
    if any(name.startswith("dspark.") for name in missing) and not model_kwargs.get("draft"):
        why.append("dspark.* hooks fire only with draft=True")
    why = "; ".join(why) or "that part of the model did not run in this forward"
    warnings.warn(f"run_with_cache: names_filter asked for {missing}, which did not fire, so the cache lacks them "
                  f"({why})", stacklevel=3)  # fmt: skip


def _chunked_run(model, tokens, chunk_len, names_filter, device, positions, model_kwargs, hook_kwargs):
    """run_with_cache's chunk_len path: (output over all chunks, {name: tensor as one forward caches it})."""
    if model_kwargs.get("return_type", "logits") not in ("logits", None):
        raise ValueError("chunk_len: return_type must be 'logits' or None (a loss would miss the chunk boundaries)")
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be at least 1, got {chunk_len}")
    S = tokens.shape[1]
    model_kwargs = dict(model_kwargs)
    draft = {"draft": model_kwargs.pop("draft", False), "draft_anchor": model_kwargs.pop("draft_anchor", None)}
    kv, pieces, ends, outs, drafted = V4KVCache(), {}, [], [], None
    for s0 in range(0, S, chunk_len):
        s1 = min(S, s0 + chunk_len)
        chunk_cache, fwd, _ = caching_hooks(model, names_filter, device=device)
        with model.hooks(fwd_hooks=fwd, **hook_kwargs):  # a DSpark draft follows the last chunk only
            outs.append(model(tokens[:, s0:s1], past_kv_cache=kv, **model_kwargs, **(draft if s1 == S else {})))
        if draft["draft"] and s1 == S:
            outs[-1], drafted = outs[-1]
        local = None if positions is None else positions[(positions >= s0) & (positions < s1)] - s0
        for name, t in chunk_cache.items():
            if name.startswith("dspark.") and not draft["draft"]:
                continue  # the context ring's taps: a forward without draft=True fires no dspark hook
            axis = position_axis(name)
            if local is not None and axis is not None:
                t = t.index_select(axis, local.to(t.device))
            pieces.setdefault(name, []).append(t)
        ends.append(s1)
    out = None if outs[0] is None else torch.cat(outs, dim=1)
    out = (out, drafted) if draft["draft"] else out
    return out, {name: concat_chunk_tensors(name, parts, ends) for name, parts in pieces.items()}


# hooks whose last axis grows with the entries seen so far, and what fills the columns an earlier chunk lacks
_GROWING = {"attn.hook_key_index": -1, "attn.hook_attn_scores": float("-inf"), "attn.hook_pattern": 0.0,
            "indexer.hook_scores": float("-inf"), "indexer.hook_topk": -1}  # fmt: skip


def concat_chunk_tensors(name: str, pieces: list[torch.Tensor], ends: list[int]) -> torch.Tensor:
    """Hook `name`'s tensors from consecutive chunks of one sequence (a `V4KVCache` run; chunk i
    ends at token ends[i]) -> the tensor one forward over the whole sequence gives: positions
    concatenated, compressed entries appended, candidate axes that grow with the entries seen
    (key index, scores, pattern, indexer scores and picks) padded as empty, and key indices
    renumbered from N + w (N = tokens seen by the chunk) to S + w."""
    axis = position_axis(name)
    if axis is None:
        return torch.cat(pieces, dim=1)
    fill = next((v for suffix, v in _GROWING.items() if name.endswith(suffix)), None)
    if fill is not None:
        if name.endswith("hook_key_index"):
            pieces = [torch.where(p >= n, p - n + ends[-1], p) for p, n in zip(pieces, ends)]
        width = max(p.shape[-1] for p in pieces)
        pieces = [torch.nn.functional.pad(p, (0, width - p.shape[-1]), value=fill) for p in pieces]
    return torch.cat(pieces, dim=axis)

"""`V4ActivationCache`: TransformerLens's `ActivationCache` for a model whose residual is 4-D.

Where the position axis is (HOOKS.md) decides how every slicing operation works:

- almost every hook is `[b, p, ...]`: position is axis 1, including the 4-D stream tensors
  `hook_streams_pre/mid/post`, `mtp.{i}.hook_hidden` [b, p, n, d] and `hc.hook_comb` [b, p, n, n];
- attention scores/patterns `[b, h, p, K]` and `hook_sink` / `hook_sink_logit` `[b, h, p]` keep
  TransformerLens's head-first layout: the query position is axis 2 (the K candidates are not
  positions and are never sliced);
- compressed-entry tensors (`*.compressor.*`, `*.indexer.hook_kv`) are `[b, T, ...]`: axis 1 is the
  entry w, not a position, so position slicing leaves them whole. (HCA entry w pools tokens
  [w·m, (w+1)·m), CSA entry w tokens [w·m − m, w·m + m); a query at p sees the entries complete
  by then, per `hook_key_index`.)

TransformerLens's own caching hooks guess the position axis from the end (-2, or -3 for q/k/v/z),
which lands on the stream axis n of a `[b, p, n, d]` tensor; `caching_hooks` / `run_with_cache`
below use `position_axis` instead. Without a batch axis (`remove_batch_dim`) every axis moves down one.

    >>> _, cache = run_with_cache(model, tokens, pos_slice=-1)    # = model.run_with_cache(...)
    >>> cache["streams_post", 3].shape                             # [b, 1, n, d]
    >>> cache.accumulated_streams().shape                          # [L+1, b, 1, n, d]
    >>> cache.logit_lens(k=5).top_strs[-1]                         # what the last layer predicts
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import einops
import torch
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.utilities import get_act_name
from transformer_lens.utilities.slice import Slice

# hooks laid out [b, h, p, ...] (TransformerLens's attention layout): query position is axis 2
_HEAD_FIRST = ("attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_sink", "attn.hook_sink_logit")


def is_stream_name(name: str) -> bool:
    """Hooks that carry the n residual streams, [b, p, n, d].

    Also a handy `names_filter`: `model.run_with_cache(tokens, names_filter=is_stream_name)`
    caches just what `accumulated_streams` and the logit lens read.
    """
    return ".hook_streams_" in name or name.endswith("hook_hidden")


def is_entry_name(name: str) -> bool:
    """Hooks indexed by compressed entry (axis 1 = entry w, not query position)."""
    return ".compressor." in name or name.endswith("indexer.hook_kv")


def position_axis(name: str, has_batch_dim: bool = True) -> int | None:
    """The query-position axis of the tensor cached under `name`, or None if it has none.

    >>> position_axis("blocks.0.hook_streams_post"), position_axis("blocks.0.attn.hook_pattern")
    (1, 2)
    >>> position_axis("blocks.1.attn.compressor.hook_kv") is None     # entries, not positions
    True
    """
    name = name.removesuffix("_grad")  # gradients are cached under name + "_grad", same layout
    if is_entry_name(name):
        return None
    axis = 2 if name.endswith(_HEAD_FIRST) else 1
    return axis if has_batch_dim else axis - 1


def require_hooks(cache, names, why: str) -> dict:
    """The cache's tensors by name (a cache or a plain dict) after checking it holds every one of
    `names`; otherwise a KeyError naming the missing hooks, then `why` (who needs them, how to cache them)."""
    tensors = getattr(cache, "cache_dict", cache)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise KeyError(f"the cache lacks {missing[:6]}{' ...' if len(missing) > 6 else ''}: {why}")
    return tensors


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
    TransformerLens does. Compressed-entry tensors are cached whole.
    offload_dir: write each tensor, as its hook fires, to a file there and cache a memory-mapped
    view of it (`open_offloaded` reopens the directory later): a long run's cache then lives in
    the page cache, which the OS can evict, not in the process's memory.

    >>> cache_dict, fwd, _ = caching_hooks(model, names_filter=is_stream_name, pos_slice=[0, -1])
    >>> with model.hooks(fwd_hooks=fwd):
    ...     model(tokens)
    """
    cache = {} if cache is None else cache
    pos_slice = Slice.unwrap(pos_slice)
    names_filter = _as_filter(names_filter)
    model.is_caching = True

    def save_hook(tensor: torch.Tensor, hook, is_backward: bool = False) -> None:
        t = tensor.detach().to(device)
        if remove_batch_dim:
            if t.shape[0] != 1:
                raise ValueError(f"remove_batch_dim needs batch size 1, {hook.name} has {t.shape[0]}")
            t = t[0]
        axis = position_axis(hook.name, has_batch_dim=not remove_batch_dim)
        if axis is not None and t.ndim > axis:
            t = pos_slice.apply(t, dim=axis)
        name = hook.name + ("_grad" if is_backward else "")
        cache[name] = t if offload_dir is None else _offload(t, Path(offload_dir), name)

    if offload_dir is not None:
        _fresh_index(Path(offload_dir))
    fwd = [(name, save_hook) for name in model.hook_dict if names_filter(name)]
    bwd = [(name, lambda t, hook: save_hook(t, hook, is_backward=True)) for name, _ in fwd] if incl_bwd else []
    return cache, fwd, bwd


def _fresh_index(directory: Path) -> None:
    """Start a run's index: a directory reused for another run then lists only that run."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "index.json").unlink(missing_ok=True)


def _offload(t: torch.Tensor, directory: Path, name: str) -> torch.Tensor:
    """Copy `t` into `directory/name.bin` and return the file's memory-mapped tensor; record it in index.json."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.bin"
    path.unlink(missing_ok=True)  # from_file maps an existing file as it is: start from an empty one
    mapped = torch.from_file(str(path), shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
    mapped.copy_(t)
    index_path = directory / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    index[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    index_path.write_text(json.dumps(index, indent=1))
    return mapped


def open_offloaded(directory, model, tokens=None, positions=None) -> V4ActivationCache:
    """A `V4ActivationCache` over the tensors a run with `offload_dir=directory` wrote (memory-mapped
    copy-on-write: edits stay in memory, the files are never changed), with the run's tokens and positions."""
    directory = Path(directory)
    index = json.loads((directory / "index.json").read_text())
    tensors = {}
    for name, meta in index.items():
        dtype = getattr(torch, meta["dtype"])
        n = math.prod(meta["shape"])
        tensors[name] = torch.from_file(str(directory / f"{name}.bin"), shared=False, size=n, dtype=dtype).view(meta["shape"])
    tokens = tensors.pop("tokens", None) if tokens is None else tokens
    positions = tensors.pop("positions", None) if positions is None else positions
    return V4ActivationCache(tensors, model, tokens=tokens, positions=positions)


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

    Returns (model output, `V4ActivationCache`). Same keywords as TransformerLens; `device`
    is where the cache is stored (e.g. "cpu" while the model runs on a GPU). The cache also keeps
    the input tokens and, after `pos_slice`, which positions it holds, so the logit lens can find
    next-token targets. `HookedV4.run_with_cache` should be this function.
    offload_dir: keep the cache on disk (memory-mapped files, see `caching_hooks`; reopen with
    `open_offloaded`). Long inputs: combine with `names_filter`, `pos_slice` (any position subset,
    4-D streams included), `stop_at_layer=L` (only blocks < L run) and `return_type=None` (no
    [b, p, V] logits).
    chunk_len: run the input through a `V4KVCache` chunk_len tokens at a time (the forward's own
    memory then grows with chunk_len, not with the length) and assemble the chunks' caches into
    the one a single forward gives (`concat_chunk_tensors`). Not with MTP, gradients or a cache of
    your own.

    >>> logits, cache = run_with_cache(model, "The capital of France is", device="cpu", pos_slice=-1)
    """
    tokens = model._validate_tokens(input)  # text -> tokens once, so the cache can keep them
    if remove_batch_dim and tokens.shape[0] != 1:
        raise ValueError(f"Cannot remove batch dimension from cache with batch size {tokens.shape[0]}")
    positions = None if pos_slice is None else torch.as_tensor(Slice.unwrap(pos_slice).indices(tokens.shape[1]))
    if chunk_len is not None:
        if incl_bwd or remove_batch_dim or model_args or model_kwargs.get("mtp") or "past_kv_cache" in model_kwargs:
            raise ValueError("chunk_len works with return_type / names_filter / pos_slice / device / offload_dir only")
        out, cache_dict = _chunked_run(model, tokens, chunk_len, names_filter, device, positions, model_kwargs,
                                       dict(reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts))  # fmt: skip
        if offload_dir is not None:
            _fresh_index(Path(offload_dir))
            cache_dict = {name: _offload(t, Path(offload_dir), name) for name, t in cache_dict.items()}
    else:
        cache_dict, fwd, bwd = caching_hooks(
            model, names_filter, incl_bwd, device, remove_batch_dim, pos_slice=pos_slice, offload_dir=offload_dir
        )
        with model.hooks(fwd_hooks=fwd, bwd_hooks=bwd, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
            out = model(tokens, *model_args, **model_kwargs)
            if incl_bwd:
                out.backward()
    cache_tokens = tokens.to(device) if device is not None else tokens
    if offload_dir is not None:  # so that open_offloaded can rebuild the whole cache
        _offload(tokens.cpu(), Path(offload_dir), "tokens")
        if positions is not None:
            _offload(positions, Path(offload_dir), "positions")
    return out, V4ActivationCache(
        cache_dict,
        model,
        has_batch_dim=not remove_batch_dim,
        tokens=cache_tokens[0] if remove_batch_dim else cache_tokens,
        positions=positions,
    )


def _chunked_run(model, tokens, chunk_len, names_filter, device, positions, model_kwargs, hook_kwargs):
    """run_with_cache's chunk_len path: (output over all chunks, {name: tensor as one forward caches it})."""
    from .kv_cache import V4KVCache

    if model_kwargs.get("return_type", "logits") not in ("logits", None):
        raise ValueError("chunk_len: return_type must be 'logits' or None (a loss would miss the chunk boundaries)")
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be at least 1, got {chunk_len}")
    S = tokens.shape[1]
    kv, pieces, ends, outs = V4KVCache(), {}, [], []
    for s0 in range(0, S, chunk_len):
        s1 = min(S, s0 + chunk_len)
        chunk_cache, fwd, _ = caching_hooks(model, names_filter, device=device)
        with model.hooks(fwd_hooks=fwd, **hook_kwargs):
            outs.append(model(tokens[:, s0:s1], past_kv_cache=kv, **model_kwargs))
        local = None if positions is None else positions[(positions >= s0) & (positions < s1)] - s0
        for name, t in chunk_cache.items():
            axis = position_axis(name)
            if local is not None and axis is not None:
                t = t.index_select(axis, local.to(t.device))
            pieces.setdefault(name, []).append(t)
        ends.append(s1)
    out = None if outs[0] is None else torch.cat(outs, dim=1)
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


class V4ActivationCache(ActivationCache):
    """`cache[name]` / `cache["attn_out", 3]` as in TransformerLens, with stream-aware slicing,
    stacking over layers, the streams at every block boundary, and logit lenses.

    tokens: the input tokens [b, S] (or [S] without batch axis), if known: the lens's default targets.
    positions: the absolute positions [p] the cached position axis holds (None: all, 0..S-1).

    Short keys: `cache["streams_post", 3]`, `cache["attn_hc.hook_comb", 3]`, `cache["topk", 1]`
    (any unique `.hook_{name}` in block 3) work besides TransformerLens's `cache["pattern", 3]`.
    `cache["resid_post", 3]` raises: the residual is n streams, `cache["streams_post", 3]`.
    """

    def __init__(self, cache_dict, model, has_batch_dim: bool = True, tokens=None, positions=None):
        super().__init__(cache_dict, model, has_batch_dim=has_batch_dim)
        self.tokens = tokens
        self.positions = None if positions is None else torch.as_tensor(positions, dtype=torch.long).cpu()

    # ------------------------------------------------------------------ lookup
    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, str) and key in self.cache_dict:
            return self.cache_dict[key]
        return self.cache_dict[self._resolve(key)]

    def _resolve(self, key) -> str:
        """Full hook name for `key`: a name, a TransformerLens shorthand, or (name, layer[, sublayer])."""
        if isinstance(key, str):
            candidates, layer, short = [get_act_name(key)], None, key
        else:
            short, layer, *rest = tuple(key) + (None,) * (2 - len(key))
            if layer is not None and layer < 0:
                layer += self.model.cfg.n_layers
            candidates = [get_act_name(short, layer, *rest[:1])]
            if layer is not None:
                # v4lens suffixes: ("attn_hc.hook_comb", 2), ("streams_post", 2)
                candidates += [f"blocks.{layer}.{short}", f"blocks.{layer}.hook_{short}"]
        for name in candidates:
            if name in self.cache_dict:
                return name
        if layer is not None:  # a unique ".hook_{short}" inside the block: ("topk", 1), ("expert_ids", 2)
            ending = short if short.startswith("hook_") else f"hook_{short}"
            found = [n for n in self.cache_dict if n.startswith(f"blocks.{layer}.") and n.endswith("." + ending)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise KeyError(f"{key!r} is ambiguous in this cache: {found}")
        hint = ""
        if "resid" in short:
            hint = (
                " v4lens's residual is n parallel streams [b, p, n, d], cached as blocks.{l}.hook_streams_pre/mid/post:"
                " use cache['streams_post', l], cache.streams(l) or cache.accumulated_streams()."
            )
        raise KeyError(f"{key!r} is not in this cache (tried {candidates}).{hint}")

    def streams(self, layer: int, where: str = "post") -> torch.Tensor:
        """The n streams around block `layer`: where = "pre" | "mid" | "post" -> [b, p, n, d]."""
        return self[f"blocks.{layer}.hook_streams_{where}"]

    # ------------------------------------------------------------------ slicing, devices
    def remove_batch_dim(self, batch_size: int | None = None) -> V4ActivationCache:
        """Drop the batch axis of a batch-1 cache in place (TransformerLens's semantics)."""
        had_batch = self.has_batch_dim
        super().remove_batch_dim(batch_size)
        if had_batch and self.tokens is not None and self.tokens.ndim == 2:
            self.tokens = self.tokens[0]
        return self

    def apply_slice_to_batch_dim(self, batch_slice) -> V4ActivationCache:
        """A new cache with `batch_slice` applied to axis 0 of every entry (and to the tokens).

        Every v4lens hook is batch-first, so unlike TransformerLens no entry is skipped.
        An int removes the batch axis.

        >>> first = cache.apply_slice_to_batch_dim(0)       # entries [p, ...]
        """
        batch_slice = batch_slice if isinstance(batch_slice, Slice) else Slice(batch_slice)
        if not self.has_batch_dim:
            raise ValueError("Cannot index into a cache without a batch dim")
        entries = {name: batch_slice.apply(t, dim=0) for name, t in self.cache_dict.items()}
        tokens = None if self.tokens is None else batch_slice.apply(self.tokens, dim=0)
        return V4ActivationCache(
            entries, self.model, has_batch_dim=batch_slice.mode != "int", tokens=tokens, positions=self.positions
        )

    def apply_slice_to_pos_dim(self, pos_slice) -> V4ActivationCache:
        """A new cache with `pos_slice` applied to the query-position axis of every entry.

        The axis comes from `position_axis`: axis 1 (streams included), axis 2 for attention
        scores/patterns and the sink; compressed-entry tensors are kept whole. Like
        `run_with_cache(pos_slice=...)`, an int keeps a length-1 position axis. The new cache
        remembers which absolute positions it holds (`cache.positions`), so lens targets stay right.

        >>> last = cache.apply_slice_to_pos_dim(-1)         # streams [b, 1, n, d]
        """
        pos_slice = Slice.unwrap(pos_slice)
        entries = {}
        for name, t in self.cache_dict.items():
            axis = position_axis(name, self.has_batch_dim)
            entries[name] = pos_slice.apply(t, dim=axis) if axis is not None and t.ndim > axis else t
        held = self.positions if self.positions is not None else torch.arange(self._n_positions())
        positions = torch.as_tensor(held.numpy()[pos_slice.slice]).reshape(-1)
        return V4ActivationCache(entries, self.model, self.has_batch_dim, tokens=self.tokens, positions=positions)

    def to(self, device) -> V4ActivationCache:
        """Move every entry (and the tokens) to `device`, in place: `cache.to("cpu")`."""
        super().to(device)
        if self.tokens is not None:
            self.tokens = self.tokens.to(device)
        return self

    def _n_positions(self) -> int:
        """Length of the cached position axis, read off a per-token entry."""
        for name, t in self.cache_dict.items():
            axis = position_axis(name, self.has_batch_dim)
            if axis is not None and t.ndim > axis:
                return t.shape[axis]
        raise ValueError("the cache holds no per-position tensor")

    # ------------------------------------------------------------------ stacking
    def stack_activation(
        self, activation_name: str, layer: int = -1, sublayer_type: str | None = None, layers=None
    ) -> torch.Tensor:
        """One per-block hook stacked over blocks: [L, ...] (TransformerLens's `stack_activation`).

        activation_name: any per-block key `self[(activation_name, l)]` understands: a v4lens
        suffix ("hook_streams_post", "attn_hc.hook_comb"), a short name ("streams_post",
        "expert_ids") or a TransformerLens shorthand ("pattern", "attn_out").
        layer: blocks 0 .. layer-1 (-1 / None: all). layers: an explicit list instead, e.g. the CSA
        layers for an indexer hook (only some layer types have it).

        >>> cache.stack_activation("attn_hc.hook_comb").shape   # [L, b, p, n, n]
        """
        if layers is None:
            layers = range(self.model.cfg.n_layers if layer is None or layer == -1 else layer)
        layers = list(layers)
        present = [l for l in range(self.model.cfg.n_layers) if self._has((activation_name, l, sublayer_type))]
        missing = [l for l in layers if l not in present]
        if missing:
            raise KeyError(
                f"{activation_name!r} is not cached for layers {missing}; it is for {present} (pass layers=)"
            )
        parts = [self[(activation_name, l, sublayer_type)] for l in layers]
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) > 1:  # e.g. compressed entries: T differs between CSA and HCA layers
            raise ValueError(f"{activation_name!r} has different shapes across layers {layers}: {shapes}")
        return torch.stack(parts, dim=0)

    def _has(self, key) -> bool:
        try:
            self._resolve(key)
        except KeyError:
            return False
        return True

    def _boundaries(self, layer: int | None = None, incl_mid: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(label, streams [b, p, n, d]) at each block boundary up to block `layer`, lazily."""
        L = self.model.cfg.n_layers
        layer = L if layer is None or layer == -1 else layer
        if not 0 <= layer <= L:
            raise ValueError(f"layer must lie in [0, {L}] (or be None / -1), got {layer}")
        if "blocks.0.hook_streams_pre" in self.cache_dict:
            embed = self.cache_dict["blocks.0.hook_streams_pre"]  # the embedding, copied n times
        elif "hook_embed" in self.cache_dict:
            embed = einops.repeat(self["hook_embed"], "... p d -> ... p n d", n=self.model.cfg.hc_mult)
        else:
            raise KeyError("the embedding boundary needs 'hook_embed' or 'blocks.0.hook_streams_pre' in the cache")
        yield "embed", embed
        for l in range(layer):
            if incl_mid:
                yield f"{l}_mid", self.streams(l, "mid")
            yield f"{l}_post", self.streams(l, "post")

    def accumulated_streams(self, layer: int | None = None, incl_mid: bool = False, return_labels: bool = False):
        """The n streams at every block boundary: [n_boundaries, b, p, n, d] (cf. `accumulated_resid`).

        Boundaries: the embedding copied into the n streams ("embed"), then each block's
        `hook_streams_post` ("{l}_post"), with `hook_streams_mid` ("{l}_mid") before it if
        incl_mid. layer: stop at the streams entering block `layer` (None / -1: all L+1).
        return_labels: also return the labels.

        >>> streams, labels = cache.accumulated_streams(incl_mid=True, return_labels=True)
        >>> streams.shape, labels[:3]        # [2L+1, b, p, n, d], ['embed', '0_mid', '0_post']
        """
        labels, parts = zip(*self._boundaries(layer, incl_mid))
        stacked = torch.stack(parts, dim=0)
        return (stacked, list(labels)) if return_labels else stacked

    # ------------------------------------------------------------------ lenses
    def logit_lens(self, tokens=None, k: int = 5, per_stream: bool = True, positions=None, **kwargs):
        """Read every block boundary through hc_head -> ln_final -> head; see `v4lens.lens.logit_lens`.

        >>> lens = cache.logit_lens(k=5, positions=-1)
        >>> lens.top_strs[-1][0][0], lens.target_probs[:, 0, 0]   # final top-5, P(next token) per layer
        """
        from .lens import logit_lens

        return logit_lens(self, tokens=tokens, k=k, per_stream=per_stream, positions=positions, **kwargs)

    def mtp_lens(self, depth: int = 0, tokens=None, k: int = 5, per_stream: bool = True, positions=None, **kwargs):
        """Read MTP block `depth`'s boundaries through its own hc_head / ln_final; see `v4lens.lens.mtp_lens`.

        >>> _, cache = model.run_with_cache(tokens, mtp=True)
        >>> cache.mtp_lens(0, tokens=tokens).labels            # ['mtp0_pre', 'mtp0_mid', 'mtp0_post']
        """
        from .lens import mtp_lens

        return mtp_lens(self, depth, tokens=tokens, k=k, per_stream=per_stream, positions=positions, **kwargs)

    def __repr__(self) -> str:
        return f"V4ActivationCache with keys {list(self.cache_dict)[:8]}... ({len(self.cache_dict)} total)"


__all__ = [
    "V4ActivationCache", "caching_hooks", "is_entry_name", "is_stream_name", "position_axis", "run_with_cache",
]  # fmt: skip

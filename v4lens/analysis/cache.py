"""`V4ActivationCache`: TransformerLens's `ActivationCache` for a model whose residual is 4-D.

`cache[name]` / `cache["attn_out", 3]` as in TransformerLens; slicing by position uses each hook's
real position axis (`layout.py`); the n streams at every block boundary; logit lenses. Made by
`model.run_with_cache` (`caching.py`) or reopened from disk by `open_offloaded` (`offload.py`).
"""

from __future__ import annotations

from collections.abc import Iterator

import einops
import torch
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.utilities.slice import Slice

from ..model import tl_versions
from .cache_compat import ResidualMethods
from .hook_names import resolve_hook_name
from .layout import position_axis


class V4ActivationCache(ResidualMethods, ActivationCache):
    """`cache[name]` / `cache["attn_out", 3]` as in TransformerLens, with stream-aware slicing,
    stacking over layers, the streams at every block boundary, and logit lenses.

    tokens: the input tokens [b, S] (or [S] without batch axis), if known: the lens's default targets.
    positions: the absolute positions [p] the cached position axis holds (None: all, 0..S-1).

    Short keys: `cache["streams_post", 3]`, `cache["attn_hc.hook_comb", 3]`, `cache["topk", 1]`
    (the one `hook_{name}` of block 3) work besides TransformerLens's `cache["pattern", 3]`;
    `cache["comb", 3]` (two of them) raises a KeyError listing both, `cache["comb", 3, "mlp_hc"]`
    picks one. `cache["resid_post", 3]` raises: the residual is n streams, `cache["streams_post", 3]`.

    TransformerLens's residual methods (`decompose_resid`, `stack_head_results`, `logit_attrs`,
    `get_full_resid_decomposition`, `apply_ln_to_stack`, `accumulated_resid`, ...) work on what
    each reader of the streams collapses them to (`cache_compat`); the MLP-neuron and SSM ones raise.
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
        """Full hook name for `key`: a name, a short name, or (name, layer[, layer_type]) (`hook_names`).

        Resolved against the model's hooks (so `("comb", 1)` is ambiguous whatever was cached), then
        checked to be in this cache.
        """
        names = set(self.cache_dict) | set(getattr(self.model, "hook_dict", ()))
        n_layers = getattr(getattr(self.model, "cfg", None), "n_layers", None)
        name = resolve_hook_name(key, names, n_layers)
        if name not in self.cache_dict:
            raise KeyError(
                f"{key!r} is {name!r}, which is not in this cache (not cached by the names_filter, after"
                " stop_at_layer, or a hook that did not fire: docs/hooks.md lists when each one fires)"
            )
        return name

    def streams(self, layer: int, where: str = "post") -> torch.Tensor:
        """The n streams around block `layer`: where = "pre" | "mid" | "post" -> [b, p, n, d]."""
        return self[f"blocks.{layer}.hook_streams_{where}"]

    # ------------------------------------------------------------------ slicing, devices
    def remove_batch_dim(self, batch_size: int | None = None) -> V4ActivationCache:
        """Drop the batch axis of a batch-1 cache in place (TransformerLens's semantics)."""
        had_batch = self.has_batch_dim
        tl_versions.remove_batch_dim(super().remove_batch_dim, batch_size)  # 3.x takes no batch_size
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
        """Read every block boundary through hc_head -> ln_final -> head; see `v4lens.analysis.lens.logit_lens`.

        >>> lens = cache.logit_lens(k=5, positions=-1)
        >>> lens.top_strs[-1][0][0], lens.target_probs[:, 0, 0]   # final top-5, P(next token) per layer
        """
        from .lens import logit_lens

        return logit_lens(self, tokens=tokens, k=k, per_stream=per_stream, positions=positions, **kwargs)

    def mtp_lens(self, depth: int = 0, tokens=None, k: int = 5, per_stream: bool = True, positions=None, **kwargs):
        """Read MTP block `depth`'s boundaries through its own hc_head / ln_final; see `v4lens.analysis.lens.mtp_lens`.

        >>> _, cache = model.run_with_cache(tokens, mtp=True)
        >>> cache.mtp_lens(0, tokens=tokens).labels            # ['mtp0_pre', 'mtp0_mid', 'mtp0_post']
        """
        from .lens import mtp_lens

        return mtp_lens(self, depth, tokens=tokens, k=k, per_stream=per_stream, positions=positions, **kwargs)

    def __repr__(self) -> str:
        return f"V4ActivationCache with keys {list(self.cache_dict)[:8]}... ({len(self.cache_dict)} total)"

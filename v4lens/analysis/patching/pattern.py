"""Attention-pattern patching keyed by candidate identity.

The last axis of `attn.hook_pattern` [b, h, p, K] is each query's K candidate slots, and which key
sits in slot j (`attn.hook_key_index` [b, p, K]) belongs to the run: on a CSA layer the corrupted
run's indexer may pick other compressed entries than the clean run's, or the same ones in another
order. Pasting the clean pattern column by column would put clean probabilities onto other keys
(v4lens refuses that paste when `transformer_lens.patching`'s pattern functions try it). Here the
clean probabilities move with their keys (`align_pattern`):

- a corrupted candidate the clean query did not attend gets probability 0;
- clean probability on a key the corrupted query does not attend (it is not among its candidates,
  so no value of it is gathered) is handled by `missing`:
  "renormalize" (default): dropped, and the row's other clean probabilities are scaled up to the
  clean row's total (1 − the clean sink mass): the clean pattern conditioned on the candidates the
  corrupted query has; "drop": dropped, the row sums to less (as if the sink had taken that mass);
  "raise": ValueError naming the query and the key. Rows that lose nothing are never rescaled.

Where the key indices agree (sliding-window and HCA layers of same-length runs, CSA layers where the
picks agree), a patch here equals TransformerLens's column-wise one exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .engine import _ALL, Hooks, _clean_target, _Family, _n_candidates, _per_layer, _sweep, _write_hook

MISSING = ("renormalize", "drop", "raise")


# ====================================================================== matching candidates by key
def _find(keys: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each key id in wanted [b, p, n]: its column in keys [b, p, m], and whether keys holds it
    (-1, an empty slot, never matches). Sort + binary search: memory grows with b·p·(n + m)."""
    sorted_keys, order = keys.sort(-1)
    at = torch.searchsorted(sorted_keys, wanted.contiguous()).clamp(max=keys.shape[-1] - 1)
    found = (sorted_keys.gather(-1, at) == wanted) & (wanted >= 0)
    return order.gather(-1, at), found


def _refuse_duplicates(what: str, key_index: torch.Tensor) -> None:
    s = key_index.sort(-1).values
    dup = (s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)
    if dup.any():
        b, p, j = (int(i) for i in dup.nonzero()[0])
        raise ValueError(f"{what} lists key {int(s[b, p, j + 1])} twice for batch {b}, query {p} (an edited "
                         "indexer pick?): a probability cannot be matched to one candidate")  # fmt: skip


def align_pattern(clean_pattern: torch.Tensor, clean_key_index: torch.Tensor, key_index: torch.Tensor,
                  missing: str = "renormalize") -> torch.Tensor:  # fmt: skip
    """The clean pattern moved onto another run's candidates, key by key.

    clean_pattern [b, h, p, Kc] (probabilities) over clean_key_index [b, p, Kc] -> [b, h, p, K] over
    key_index [b, p, K] (int64 in hook numbering: token t is t, compressed entry w is N + w, -1
    empty; both runs must have the same length, so that N is the same). Slot j gets the clean
    probability of key key_index[b, p, j], 0 where the clean query did not attend that key;
    `missing` ("renormalize", "drop", "raise") says what becomes of clean probability on keys that
    key_index lacks (the module docstring).

    >>> cc, kc = clean_cache, corrupted_cache                       # same tokens length
    >>> a = align_pattern(cc["pattern", 1], cc["key_index", 1], kc["key_index", 1])  # [b, h, p, K]
    """
    if missing not in MISSING:
        raise ValueError(f"missing must be one of {MISSING}, got {missing!r}")
    B, H, P, Kc = clean_pattern.shape
    if tuple(clean_key_index.shape) != (B, P, Kc) or tuple(key_index.shape[:2]) != (B, P):
        raise ValueError(
            f"clean_pattern {tuple(clean_pattern.shape)} [b, h, p, Kc] needs clean_key_index [b, p, Kc] and key_index "
            f"[b, p, K], got {tuple(clean_key_index.shape)} and {tuple(key_index.shape)}"
        )
    _refuse_duplicates("clean_key_index", clean_key_index)
    _refuse_duplicates("key_index", key_index)
    col, found = _find(clean_key_index, key_index)  # [b, p, K]: the clean column holding each slot's key
    aligned = torch.where(found[:, None], clean_pattern.gather(-1, col[:, None].expand(-1, H, -1, -1)), 0.0)
    _, kept = _find(key_index, clean_key_index)  # [b, p, Kc]: the clean candidates this run has too
    lost = (clean_pattern > 0) & (~kept & (clean_key_index >= 0))[:, None]  # [b, h, p, Kc]
    if missing == "raise" and lost.any():
        b, h, p, j = (int(i) for i in lost.nonzero()[0])
        raise ValueError(
            f"the clean pattern gives key {int(clean_key_index[b, p, j])} probability "
            f"{float(clean_pattern[b, h, p, j]):.3g} (batch {b}, head {h}, query {p}), but that key is not among "
            f"the candidates of this query here {key_index[b, p].tolist()}; pass missing='renormalize' or 'drop'"
        )
    if missing == "renormalize":
        total, have = clean_pattern.sum(-1, keepdim=True), aligned.sum(-1, keepdim=True)
        scaled = torch.where(have > 0, aligned * (total / have.clamp_min(torch.finfo(have.dtype).tiny)), 0.0)
        aligned = torch.where(lost.any(-1, keepdim=True), scaled, aligned)
    return aligned.to(clean_pattern.dtype)


class _PatternTarget:
    """Target for `attn.hook_pattern`: the clean pattern aligned to the key index of the same forward
    (read by `hooks`, which run before the pattern's hook)."""

    def __init__(self, clean_cache, missing: str):
        if missing not in MISSING:
            raise ValueError(f"missing must be one of {MISSING}, got {missing!r}")
        self.clean, self.missing, self.live = _clean_target(clean_cache), missing, {}

    def hooks(self, model, layers) -> Hooks:
        def read(key_index: torch.Tensor, hook) -> None:
            self.live[hook.name] = key_index

        return [(f"blocks.{l}.attn.hook_key_index", read) for l in layers]

    def __call__(self, name: str, act: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        key_name = name.replace("attn.hook_pattern", "attn.hook_key_index")
        live = self.live[key_name] if rows is None else self.live[key_name][rows]
        return align_pattern(self.clean(name, act), self.clean(key_name, live), live, self.missing)


# ====================================================================== hooks for any run
def pattern_patch_hooks(model, clean_cache, layers, heads: Sequence[int] | None = None,
                        queries: Sequence[int] | None = None, missing: str = "renormalize") -> Hooks:  # fmt: skip
    """Forward hooks that patch the clean attention pattern of layer(s), keyed by candidate:
    `heads` and `queries` (default all) get the clean probabilities of the keys they attend in
    this run (`align_pattern`; `missing` as there). `clean_cache` must hold `attn.hook_pattern` and
    `attn.hook_key_index` of those layers, from tokens of the same shape as the run's.

    >>> hooks = pattern_patch_hooks(model, clean_cache, layers=1, heads=[2], queries=[-1])
    >>> logits = model.run_with_hooks(corrupted, fwd_hooks=hooks)
    """
    target = _PatternTarget(clean_cache, missing)
    layers = [layers] if isinstance(layers, int) else list(layers)
    # outer product of heads × queries: a [h, 1] and a [q] index broadcast to [h, q]
    hsel = _ALL if heads is None else torch.as_tensor(list(heads), dtype=torch.long).view(-1, 1)
    qsel = _ALL if queries is None else torch.as_tensor(list(queries), dtype=torch.long)

    def write(act: torch.Tensor, hook) -> torch.Tensor:
        return _write_hook(act, hook, (_ALL, hsel, qsel), target)

    return target.hooks(model, layers) + [(f"blocks.{l}.attn.hook_pattern", write) for l in layers]


# ====================================================================== sweeps
def _pattern_family(axes: tuple[str, ...]) -> _Family:
    names = _per_layer("blocks.{l}.attn.hook_pattern")
    if axes != ("head", "pos", "candidate"):
        return _Family(names, axes, lambda r: (_ALL, *r))

    def beyond_k(model, tokens, layer, r) -> bool:  # slots beyond a layer's K do not exist there (NaN cells)
        return r[2] >= _n_candidates(model.cfg, tokens.shape[-1], layer)

    return _Family(names, axes, lambda r: (_ALL, *r), skip=beyond_k)


def get_act_patch_attn_head_pattern_all_pos(model, corrupted_tokens, clean_cache, patching_metric, *,
                                            missing: str = "renormalize", reduce="scalar", baseline=False,
                                            batch_size: int = 1, progress: bool = False):  # fmt: skip
    """Patch head h's clean attention pattern at every query, keyed by candidate -> [layer, head].

    Each query's row gets the clean probabilities of the keys the corrupted query attends
    (`align_pattern`; `missing` for clean mass on keys it does not attend). Holds fixed: the
    corrupted values (keys = values) and the other heads. Needs `attn.hook_pattern` and
    `attn.hook_key_index` in `clean_cache`. Where the key indices agree, the values of
    TransformerLens's function of the same name (which v4lens refuses where they differ).

    >>> res = get_act_patch_attn_head_pattern_all_pos(model, corrupted, clean_cache, metric)  # [L, H]
    """
    family, target = _pattern_family(("head",)), _PatternTarget(clean_cache, missing)
    return _sweep(model, corrupted_tokens, patching_metric, family, target, reduce, baseline,
                  batch_size=batch_size, progress=progress)


def get_act_patch_attn_head_pattern_by_pos(model, corrupted_tokens, clean_cache, patching_metric, *,
                                           missing: str = "renormalize", reduce="scalar", baseline=False,
                                           batch_size: int = 1, progress: bool = False):  # fmt: skip
    """Patch head h's clean pattern at one query (destination) position, keyed by candidate
    -> [layer, head, pos] (TransformerLens's layout); otherwise as the `_all_pos` sweep.

    >>> res = get_act_patch_attn_head_pattern_by_pos(model, corrupted, clean_cache, metric)  # [L, H, p]
    """
    family, target = _pattern_family(("head", "pos")), _PatternTarget(clean_cache, missing)
    return _sweep(model, corrupted_tokens, patching_metric, family, target, reduce, baseline,
                  batch_size=batch_size, progress=progress)


def get_act_patch_attn_head_pattern_dest_src_pos(model, corrupted_tokens, clean_cache, patching_metric, *,
                                                 reduce="scalar", baseline=False, batch_size: int = 1,
                                                 progress: bool = False):  # fmt: skip
    """Patch one probability: head h, query p, candidate slot j of the corrupted run
    -> [layer, head, pos, candidate] (K of the widest layer; NaN beyond a layer's K).

    The last axis is the corrupted run's candidate slot, not a key position: the key in slot j is
    `corrupted_cache["key_index", l][b, p, j]`. The slot gets the clean probability of that key (0
    if the clean query did not attend it); the rest of the row is not renormalised (as in
    TransformerLens's single-entry patch). Where the key indices agree, the values of
    TransformerLens's function of the same name, whose src_pos indexes the same slots but runs
    over the S positions (an IndexError where S > K).

    >>> res = get_act_patch_attn_head_pattern_dest_src_pos(model, corrupted, clean_cache, metric)
    """
    family, target = _pattern_family(("head", "pos", "candidate")), _PatternTarget(clean_cache, "drop")
    return _sweep(model, corrupted_tokens, patching_metric, family, target, reduce, baseline,
                  batch_size=batch_size, progress=progress)

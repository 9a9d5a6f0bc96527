"""Real activation patching: the `get_act_patch_*` sweeps, one patched forward per swept index, or
`batch_size` indices per forward (conventions: the package docstring, `help(v4lens.patching)`)."""

from __future__ import annotations

from typing import Literal

from .engine import (
    _SINK,
    _clean_target,
    _comb_target,
    _expert_out_family,
    _hc_names,
    _head_family,
    _layer_family,
    _per_layer,
    _pos_family,
    _sink_target,
    _streams_family,
    _sweep,
)  # fmt: skip


# ====================================================================== real patching sweeps
def get_act_patch_streams(model, corrupted_tokens, clean_cache, patching_metric, where: str = "pre",
                          per_stream: bool = False, *, reduce="scalar", baseline=False, batch_size: int = 1,
                          progress: bool = False):  # fmt: skip
    """Patch the clean streams `blocks.{l}.hook_streams_{where}` ([b,p,n,d]) at one position
    (all n streams, or with `per_stream=True` one stream j) -> [layer, pos] or [layer, pos, stream].

    Holds fixed: every other position and stream of that hook; everything downstream is
    recomputed from the patched streams (the V4 analogue of TransformerLens's
    `get_act_patch_resid_pre` / `resid_mid` / `resid_post`).

    >>> res = get_act_patch_streams(model, corrupted, clean_cache, metric, where="mid")  # [L, p]
    """
    return _sweep(model, corrupted_tokens, patching_metric, _streams_family(where, per_stream),
                  _clean_target(clean_cache), reduce, baseline, batch_size=batch_size, progress=progress)  # fmt: skip


def get_act_patch_attn_out(model, corrupted_tokens, clean_cache, patching_metric, *, reduce="scalar", baseline=False,
                           batch_size: int = 1, progress: bool = False):  # fmt: skip
    """Patch the clean attention output `blocks.{l}.hook_attn_out` [b,p,d] at one position -> [layer, pos].

    Holds fixed: the corrupted mHC weights (`post`, `comb`) and streams of that block; the output
    is spread over the streams with the corrupted `post`. Same values as TransformerLens's
    `get_act_patch_attn_out`.

    >>> res = get_act_patch_attn_out(model, corrupted, clean_cache, metric)  # [L, p]
    """
    family = _pos_family(["blocks.{l}.hook_attn_out"], 1)
    return _sweep(model, corrupted_tokens, patching_metric, family, _clean_target(clean_cache), reduce, baseline,
                  batch_size=batch_size, progress=progress)


def get_act_patch_mlp_out(model, corrupted_tokens, clean_cache, patching_metric, *, reduce="scalar", baseline=False,
                          batch_size: int = 1, progress: bool = False):  # fmt: skip
    """Patch the clean MoE output `blocks.{l}.hook_mlp_out` [b,p,d] at one position -> [layer, pos].

    Holds fixed: the corrupted mlp_hc weights and streams. Same values as TransformerLens's
    `get_act_patch_mlp_out`.

    >>> res = get_act_patch_mlp_out(model, corrupted, clean_cache, metric)  # [L, p]
    """
    family = _pos_family(["blocks.{l}.hook_mlp_out"], 1)
    return _sweep(model, corrupted_tokens, patching_metric, family, _clean_target(clean_cache), reduce, baseline,
                  batch_size=batch_size, progress=progress)


def get_act_patch_attn_head_out_all_pos(model, corrupted_tokens, clean_cache, patching_metric, *, reduce="scalar",
                                        baseline=False, batch_size: int = 1, progress: bool = False):  # fmt: skip
    """Patch one head's clean output `blocks.{l}.attn.hook_z[:, :, h]` at every position -> [layer, head].

    Holds fixed: the other heads' z, so the grouped output projection mixes clean head h with the
    corrupted others. Same values as TransformerLens's `get_act_patch_attn_head_out_all_pos`.

    >>> res = get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric)  # [L, H]
    """
    return _sweep(model, corrupted_tokens, patching_metric, _head_family(False), _clean_target(clean_cache),
                  reduce, baseline, batch_size=batch_size, progress=progress)  # fmt: skip


def get_act_patch_attn_head_out_by_pos(model, corrupted_tokens, clean_cache, patching_metric, *, reduce="scalar",
                                       baseline=False, batch_size: int = 1, progress: bool = False):  # fmt: skip
    """Patch one head's clean z at one position -> [layer, pos, head] (TransformerLens's layout).

    Holds fixed: every other (position, head) of `attn.hook_z`.

    >>> res = get_act_patch_attn_head_out_by_pos(model, corrupted, clean_cache, metric)  # [L, p, H]
    """
    return _sweep(model, corrupted_tokens, patching_metric, _head_family(True), _clean_target(clean_cache),
                  reduce, baseline, batch_size=batch_size, progress=progress)  # fmt: skip


def get_act_patch_expert_out(model, corrupted_tokens, clean_cache, patching_metric, per_position: bool = False, *,
                             reduce="scalar", baseline=False, batch_size: int = 1, progress: bool = False):  # fmt: skip
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
    return _sweep(model, corrupted_tokens, patching_metric, family, _clean_target(clean_cache), reduce, baseline,
                  batch_size=batch_size, progress=progress)


def get_act_patch_routing(model, corrupted_tokens, clean_cache, patching_metric,
                          what: Literal["both", "ids", "weights"] = "both", *, reduce="scalar", baseline=False,
                          batch_size: int = 1, progress: bool = False):  # fmt: skip
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
    return _sweep(model, corrupted_tokens, patching_metric, family, _clean_target(clean_cache), reduce, baseline,
                  batch_size=batch_size, progress=progress)


def get_act_patch_indexer_topk(model, corrupted_tokens, clean_cache, patching_metric, *, reduce="scalar",
                               baseline=False, batch_size: int = 1, progress: bool = False):  # fmt: skip
    """Give one query the clean run's indexer picks (`attn.indexer.hook_topk[:, p]`, int64 [b,p,k])
    -> [layer, pos]; NaN on layers without an indexer (sliding, HCA).

    Holds fixed: the corrupted compressed entries, keys, queries and window: only *which* entries
    that query attends changes (by entry index; the entries' content stays corrupted).

    >>> res = get_act_patch_indexer_topk(model, corrupted, clean_cache, metric)  # [L, p]
    """
    family = _pos_family(["blocks.{l}.attn.indexer.hook_topk"], 0)
    return _sweep(model, corrupted_tokens, patching_metric, family, _clean_target(clean_cache), reduce, baseline,
                  batch_size=batch_size, progress=progress)


def get_act_patch_sink(model, corrupted_tokens, clean_cache, patching_metric, *, ablate: bool | None = None,
                       scale: float = 1.0, shift: float = 0.0, reduce="scalar", baseline=False, batch_size: int = 1,
                       progress: bool = False):  # fmt: skip
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
    return _sweep(model, corrupted_tokens, patching_metric, _SINK, target, reduce, baseline,
                  batch_size=batch_size, progress=progress)


def get_act_patch_hc(model, corrupted_tokens, clean_cache, patching_metric, what="comb", hc: str = "attn_hc", *,
                     reduce="scalar", baseline=False, batch_size: int = 1, progress: bool = False):  # fmt: skip
    """Patch the clean mHC mixing of one sub-layer at one position -> [layer, pos].

    what: "pre" ([b,p,n] collapse weights), "post" ([b,p,n] expand weights), "comb" ([b,p,n,n]
    stream mixing) or a tuple of them patched together; hc: "attn_hc", "mlp_hc" or "both".
    Holds fixed: the corrupted streams and sub-layer output: only the mixing weights are clean.

    >>> res = get_act_patch_hc(model, corrupted, clean_cache, metric, what="post", hc="mlp_hc")  # [L, p]
    """
    family = _pos_family(_hc_names(hc, what), 1)
    return _sweep(model, corrupted_tokens, patching_metric, family, _clean_target(clean_cache), reduce, baseline,
                  batch_size=batch_size, progress=progress)


def get_act_patch_hc_comb_fixed(model, corrupted_tokens, clean_cache, patching_metric, value="identity",
                                hc: str = "both", *, reduce="scalar", baseline=False, batch_size: int = 1,
                                progress: bool = False):  # fmt: skip
    """Force one layer's `hook_comb` to the identity (each stream keeps itself), the uniform
    matrix 1/n (every stream becomes the mean stream) or a given [n, n] matrix, at every
    position -> [layer].

    Nothing is taken from `clean_cache` (pass it or None). Holds fixed: `pre`, `post` and the
    sub-layer computation; hc chooses "attn_hc", "mlp_hc" or "both" sub-layers of the layer.

    >>> res = get_act_patch_hc_comb_fixed(model, tokens, None, metric, value="uniform")  # [L]
    """
    family = _layer_family(_per_layer(*_hc_names(hc, "comb")))
    return _sweep(model, corrupted_tokens, patching_metric, family, _comb_target(value, model.cfg.hc_mult),
                  reduce, baseline, batch_size=batch_size, progress=progress)  # fmt: skip

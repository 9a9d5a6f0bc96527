"""Attribution patching (AtP): the `atp_*` estimates of the sweeps, one forward and one backward pass,
or with `steps=N` integrated gradients along the path to the patch (what they return and how exact
they are: the package docstring, `help(v4lens.patching)`)."""

from __future__ import annotations

from .engine import (
    _SINK,
    _atp,
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
)  # fmt: skip


# ====================================================================== attribution patching
def atp_streams(model, corrupted_tokens, clean_cache, patching_metric, where: str = "pre", per_stream: bool = False,
                *, reduce="scalar", steps: int = 1):  # fmt: skip
    """AtP estimate of `get_act_patch_streams`'s effects -> [layer, pos] or [layer, pos, stream].

    >>> est = atp_streams(model, corrupted, clean_cache, metric)  # ≈ sweep - corrupted metric
    """
    return _atp(model, corrupted_tokens, patching_metric, _streams_family(where, per_stream),
                _clean_target(clean_cache), reduce, steps)  # fmt: skip


def atp_attn_out(model, corrupted_tokens, clean_cache, patching_metric, *, reduce="scalar", steps: int = 1):
    """AtP estimate of `get_act_patch_attn_out`'s effects -> [layer, pos]."""
    return _atp(model, corrupted_tokens, patching_metric, _pos_family(["blocks.{l}.hook_attn_out"], 1),
                _clean_target(clean_cache), reduce, steps)  # fmt: skip


def atp_mlp_out(model, corrupted_tokens, clean_cache, patching_metric, *, reduce="scalar", steps: int = 1):
    """AtP estimate of `get_act_patch_mlp_out`'s effects -> [layer, pos]."""
    return _atp(model, corrupted_tokens, patching_metric, _pos_family(["blocks.{l}.hook_mlp_out"], 1),
                _clean_target(clean_cache), reduce, steps)  # fmt: skip


def atp_attn_head_out_all_pos(model, corrupted_tokens, clean_cache, patching_metric, *, reduce="scalar",
                             steps: int = 1):  # fmt: skip
    """AtP estimate of `get_act_patch_attn_head_out_all_pos`'s effects -> [layer, head]."""
    return _atp(model, corrupted_tokens, patching_metric, _head_family(False), _clean_target(clean_cache), reduce,
                steps)  # fmt: skip


def atp_attn_head_out_by_pos(model, corrupted_tokens, clean_cache, patching_metric, *, reduce="scalar",
                            steps: int = 1):  # fmt: skip
    """AtP estimate of `get_act_patch_attn_head_out_by_pos`'s effects -> [layer, pos, head]."""
    return _atp(model, corrupted_tokens, patching_metric, _head_family(True), _clean_target(clean_cache), reduce,
                steps)  # fmt: skip


def atp_expert_out(model, corrupted_tokens, clean_cache, patching_metric, per_position: bool = False, *,
                   reduce="scalar", steps: int = 1):  # fmt: skip
    """AtP estimate of `get_act_patch_expert_out`'s effects -> [layer, slot] or [layer, pos, slot]
    (needs `use_expert_out=True`)."""
    return _atp(model, corrupted_tokens, patching_metric, _expert_out_family(model, per_position),
                _clean_target(clean_cache), reduce, steps)  # fmt: skip


def atp_expert_weights(model, corrupted_tokens, clean_cache, patching_metric, *, reduce="scalar", steps: int = 1):
    """AtP estimate of `get_act_patch_routing(..., what="weights")`'s effects -> [layer, pos]
    (the ids are integers: re-routing itself has no gradient)."""
    return _atp(model, corrupted_tokens, patching_metric, _pos_family(["blocks.{l}.mlp.hook_expert_weights"], 1),
                _clean_target(clean_cache), reduce, steps)  # fmt: skip


def atp_hc(model, corrupted_tokens, clean_cache, patching_metric, what="comb", hc: str = "attn_hc", *,
           reduce="scalar", steps: int = 1):  # fmt: skip
    """AtP estimate of `get_act_patch_hc`'s effects -> [layer, pos]."""
    return _atp(model, corrupted_tokens, patching_metric, _pos_family(_hc_names(hc, what), 1),
                _clean_target(clean_cache), reduce, steps)  # fmt: skip


def atp_hc_comb_fixed(model, corrupted_tokens, clean_cache, patching_metric, value="identity", hc: str = "both", *,
                      reduce="scalar", steps: int = 1):  # fmt: skip
    """AtP estimate of `get_act_patch_hc_comb_fixed`'s effects -> [layer] (first order in comb - value)."""
    return _atp(model, corrupted_tokens, patching_metric, _layer_family(_per_layer(*_hc_names(hc, "comb"))),
                _comb_target(value, model.cfg.hc_mult), reduce, steps)  # fmt: skip


def atp_sink(model, corrupted_tokens, clean_cache, patching_metric, *, scale: float = 1.0, shift: float = 0.0,
             reduce="scalar", steps: int = 1):  # fmt: skip
    """AtP estimate of `get_act_patch_sink(..., scale=, shift=)`'s effects -> [layer, head].

    Only rescaling/shifting: an ablation sets the logit to -inf, which no first-order estimate
    can represent (ValueError).
    """
    if scale == 1.0 and shift == 0.0:
        raise ValueError("atp_sink estimates a finite change of the sink logit: pass scale and/or shift "
                         "(ablation to -inf cannot be linearised; use get_act_patch_sink for it)")  # fmt: skip
    target, _ = _sink_target(False, scale, shift)
    return _atp(model, corrupted_tokens, patching_metric, _SINK, target, reduce, steps)

"""The preset configs: `tiny`, `tiny-recall`, `mini-3b` (built with seeded random weights) and the
DeepSeek releases `flash` (April V4-Flash, MTP), `flash-0731` (DSpark), `pro` (April V4-Pro, MTP) and
`pro-0813` (DSpark), which are config only: their weights do not fit a usual machine.
"""

from __future__ import annotations

from .config import V4Config


def _tiny(**kw) -> V4Config:
    """Every attention type (sliding, CSA, HCA with a non-128 ratio), hash and routed MoE, MTP.

    Real vocabulary so the V4 tokenizer's ids are valid; everything else tiny.
    """
    base = dict(
        name="tiny", d_vocab=129280, d_model=64, n_layers=4, n_heads=4, head_dim=32, rope_head_dim=8,
        q_lora_rank=32, o_lora_rank=16, o_groups=2, window_size=8, compress_ratios=(0, 4, 6, 4, 0),
        index_n_heads=2, index_head_dim=16, index_topk=3, n_routed_experts=8, n_activated_experts=2,
        moe_inter_dim=32, n_hash_layers=1, n_mtp_layers=1,
    )  # fmt: skip
    base.update(kw)
    return V4Config(**base)


def _tiny_dspark(**kw) -> V4Config:
    """`tiny` with a DSpark drafter instead of the MTP block: 3 stages, block 5, taps of layers 1-3."""
    base = dict(name="tiny-dspark", n_mtp_layers=3, compress_ratios=(0, 4, 6, 4, 0, 0, 0), dspark_block_size=5,
                dspark_noise_token_id=128799, dspark_target_layer_ids=(1, 2, 3), dspark_markov_rank=8)  # fmt: skip
    base.update(kw)
    return _tiny(**base)


def _tiny_recall(**kw) -> V4Config:
    """The model `v4lens.load("tiny-recall")` ships trained (v4lens/train.py, v4lens/data/tiny-recall).

    128-token synthetic vocabulary (layout in v4lens.train); layer 0 sliding (window 8) with a
    hash-routed MoE, layer 1 CSA (ratio 4, Lightning Indexer picking the top 2 entries), layer 2
    HCA (ratio 8); 4 routed experts (top-2) + 1 shared; mHC with 4 streams; no MTP block. Its tokenizer
    (`v4lens.tokenizer.tokenizer_for` picks it by the vocabulary size) names the ids: BOS, QUERY, KEY_3, VAL_7.
    """
    base = dict(
        name="tiny-recall", d_vocab=128, d_model=64, n_layers=3, n_heads=4, head_dim=32, rope_head_dim=8,
        q_lora_rank=32, o_lora_rank=16, o_groups=2, window_size=8, compress_ratios=(0, 4, 8),
        index_n_heads=2, index_head_dim=16, index_topk=2, n_routed_experts=4, n_activated_experts=2,
        moe_inter_dim=64, n_hash_layers=1, n_mtp_layers=0, hc_mult=4, max_position_embeddings=4096,
        original_seq_len=0,  # no YaRN: sequences are short
    )  # fmt: skip
    base.update(kw)
    return V4Config(**base)


def _mini_3b(**kw) -> V4Config:
    """A small-scale replica of V4-Flash (3.17B parameters with MTP, 3.07B without)."""
    base = dict(
        name="mini-3b", d_vocab=129280, d_model=1536, n_layers=28, n_heads=24, head_dim=64, rope_head_dim=32,
        q_lora_rank=512, o_lora_rank=512, o_groups=4, window_size=64,
        compress_ratios=(0, 0) + (4, 112) * 12 + (4, 0), index_n_heads=16, index_head_dim=96, index_topk=192,
        n_routed_experts=24, n_activated_experts=4, moe_inter_dim=768, n_hash_layers=2, n_mtp_layers=1,
        max_position_embeddings=1048576, rope_factor=16.0, original_seq_len=65536, compress_rope_theta=160000.0,
        rope_theta=10000.0, route_scale=1.5, swiglu_limit=10.0, hc_mult=4,
    )  # fmt: skip
    base.update(kw)
    return V4Config(**base)


def _flash(**kw) -> V4Config:
    """V4-Flash (April) dimensions, one MTP block (config only: 284B parameters do not fit here)."""
    base = dict(name="flash")
    base.update(kw)
    return V4Config(**base)


# DSpark of the 0731 / 0813 releases: blocks of 5 (the anchor + 4 noise tokens 128799), three stages
# (layer ids n_layers + 0..2, compress ratio 0 each), tapping the last three backbone layers.
_DSPARK = dict(n_mtp_layers=3, dspark_block_size=5, dspark_noise_token_id=128799)
_FLASH_RATIOS = (0, 0) + (4, 128) * 20 + (4,)
_PRO_RATIOS = (128, 128) + (4, 128) * 29 + (4,)  # layers 0 and 1 are HCA and hash-routed at once


def _flash_0731(**kw) -> V4Config:
    """V4-Flash-0731: the Flash backbone with a DSpark drafter of 3 stages (config only)."""
    base = dict(name="flash-0731", compress_ratios=_FLASH_RATIOS + (0, 0, 0), dspark_target_layer_ids=(40, 41, 42),
                dspark_markov_rank=256, **_DSPARK)  # fmt: skip
    base.update(kw)
    return V4Config(**base)


def _pro(**kw) -> V4Config:
    """V4-Pro (April): 61 layers of D 7168, 384 experts, one MTP block (config only).

    rope_head_dim 64, vocabulary and special tokens as V4-Flash (the same code; inferred)."""
    base = dict(
        name="pro", d_model=7168, n_layers=61, n_heads=128, head_dim=512, rope_head_dim=64, q_lora_rank=1536,
        o_lora_rank=1024, o_groups=16, window_size=128, compress_ratios=_PRO_RATIOS + (0,), index_n_heads=64,
        index_head_dim=128, index_topk=1024, n_routed_experts=384, n_activated_experts=6, moe_inter_dim=3072,
        n_hash_layers=3, route_scale=2.5, swiglu_limit=10.0, n_mtp_layers=1,
    )  # fmt: skip
    base.update(kw)
    return _flash(**base)


def _pro_0813(**kw) -> V4Config:
    """V4-Pro-0813: the Pro backbone with a DSpark drafter of 3 stages (config only)."""
    base = dict(name="pro-0813", compress_ratios=_PRO_RATIOS + (0, 0, 0), dspark_target_layer_ids=(58, 59, 60),
                dspark_markov_rank=512, **_DSPARK)  # fmt: skip
    base.update(kw)
    return _pro(**base)


PRESETS = {"tiny": _tiny, "tiny-dspark": _tiny_dspark, "tiny-recall": _tiny_recall, "mini-3b": _mini_3b,
           "flash": _flash, "flash-0731": _flash_0731, "pro": _pro, "pro-0813": _pro_0813}  # fmt: skip


DRAFTS = ("preset", "mtp", "dspark", None)
# the release (or scaffold) that has the other draft module on the same backbone: its drafter is the one chosen
_SIBLING = {"tiny": "tiny-dspark", "tiny-dspark": "tiny", "flash": "flash-0731", "flash-0731": "flash",
            "pro": "pro-0813", "pro-0813": "pro"}  # fmt: skip


def preset(name: str, *, draft: str | None = "preset", **overrides) -> V4Config:
    """A preset config by name (`tiny`, `tiny-dspark`, `tiny-recall`, `mini-3b`, `flash`, and config only
    `flash-0731`, `pro`, `pro-0813`), with field overrides.

    draft: the draft module on the preset's backbone: "preset" (its own), "mtp" (one April MTP block,
    compress ratio 0), "dspark" (three DSpark stages of ratio 0 tapping the last three backbone layers, blocks
    of 5 with noise token 128799, Markov rank 256, as V4-Flash-0731) or None (no draft module). Where a
    sibling preset has that draft module on the same backbone (tiny / tiny-dspark, flash / flash-0731, pro /
    pro-0813), its drafter is used (tiny: Markov rank 8). Overrides of the draft fields (n_mtp_layers,
    dspark_*, compress_ratios) win."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    if draft not in DRAFTS:
        raise ValueError(f"draft must be one of {DRAFTS} ('preset': the preset's own draft module), got {draft!r}")
    own = PRESETS[name]()
    if draft == "preset" or draft == own.draft:
        return PRESETS[name](**overrides)
    n_layers = overrides.get("n_layers", own.n_layers)
    backbone = tuple(own.compress_ratios[:n_layers])
    sibling = PRESETS[_SIBLING[name]]() if name in _SIBLING else None
    model = sibling if sibling is not None and sibling.draft == draft else None
    if draft is None:
        fields = {"n_mtp_layers": 0, "dspark_block_size": 0, "dspark_target_layer_ids": ()}
    elif draft == "mtp":
        fields = {"n_mtp_layers": 1, "dspark_block_size": 0, "dspark_target_layer_ids": ()}
    else:  # DSpark taps the last backbone layers (the releases: [40, 41, 42] of 43, [58, 59, 60] of 61)
        source = _DSPARK | {"dspark_markov_rank": 256} if model is None else vars(model)
        fields = {k: source[k] for k in ("n_mtp_layers", "dspark_block_size", "dspark_noise_token_id",
                                         "dspark_markov_rank")}  # fmt: skip
        taps = len(model.dspark_target_layer_ids) if model is not None else 3
        fields["dspark_target_layer_ids"] = tuple(range(max(0, n_layers - taps), n_layers))
    stages = [model.compress_ratio(model.n_layers + j) for j in range(model.n_mtp_layers)] if model else []
    fields["compress_ratios"] = backbone + tuple(stages or [0] * fields["n_mtp_layers"])
    return PRESETS[name](**{**fields, **overrides})

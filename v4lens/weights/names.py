"""Tensor names in the three layouts v4lens reads and writes.

- v4lens: the module tree (`blocks.3.attn.wq_a`, `blocks.3.mlp.experts.w1` stacked [E, I, D]);
- official: DeepSeek's `inference/model.py` names (`layers.3.attn.wq_a.weight`,
  `layers.3.ffn.experts.17.w1.weight`);
- transformers: `DeepseekV4ForCausalLM`'s module names, and the names its `save_pretrained`
  writes (the official names with a `model.` prefix and four renames, see `hf_saved_name`).

`canonical_name` maps any of them to v4lens; `official_name` and `hf_saved_name` go back.

April's MTP blocks and the DSpark drafter of the 0731 / 0813 releases both live under `mtp.{s}.*`,
so what such a name means depends on the config: give `dspark_stages` (the config's n_mtp_layers
when `cfg.draft == "dspark"`, else 0). For DSpark, stage s is an ordinary block under `mtp.{s}.`
(its official block names -> `dspark.stages.{s}.*`), plus `mtp.0.main_proj.weight` -> `dspark.main_proj`,
`mtp.0.main_norm.weight` -> `dspark.main_norm.w` and, on the last stage L, `mtp.L.norm.weight` ->
`dspark.ln_final.w`, `mtp.L.hc_head_{fn,base,scale}` -> `dspark.hc_head.*`,
`mtp.L.markov_head.markov_w{1,2}.weight` -> `dspark.markov_w{1,2}` and
`mtp.L.confidence_head.proj.weight` -> `dspark.confidence_proj`. Without `dspark_stages`,
`mtp.0.norm.weight` is an April MTP block's `mtp.0.ln_final.w`.
"""

from __future__ import annotations

import re

# (pattern, replacement) applied in order to a name with any leading "model." removed.
# Left: transformers' module names (HF 5.23 internals) and the names its save_pretrained writes;
# right: DeepSeek's official names, which the second table maps to v4lens.
_HF_TO_OFFICIAL = [
    (r"^embed_tokens\.", "embed."),
    (r"^lm_head\.", "head."),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2"),
    (r"\.sinks$", ".attn_sink"),
    (r"\.compressor\.indexer\.scorer\.weights_proj\.", ".indexer.weights_proj."),
    (r"\.compressor\.indexer\.q_b_proj\.", ".indexer.wq_b."),
    (r"\.compressor\.indexer\.", ".indexer.compressor."),
    (r"\.compressor\.kv_norm\.", ".compressor.norm."),
    (r"\.position_bias$", ".ape"),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_b_proj\.", ".wq_b."),
    (r"\.q_a_norm\.", ".q_norm."),
    (r"\.compressor\.kv_proj\.", ".compressor.wkv."),
    (r"\.compressor\.gate_proj\.", ".compressor.wgate."),
    (r"\.kv_proj\.", ".wkv."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.attn\.norm\.weight$", ".attn.kv_norm.weight"),  # what HF 5.23's save_pretrained writes
]
_OFFICIAL_TO_V4LENS = [
    (r"^layers\.(\d+)\.", r"blocks.\1."),
    (r"^norm\.weight$", "ln_final.w"),
    (r"^hc_head_(fn|base|scale)$", r"hc_head.\1"),
    (r"^(mtp\.\d+)\.norm\.weight$", r"\1.ln_final.w"),
    (r"^(mtp\.\d+)\.hc_head_(fn|base|scale)$", r"\1.hc_head.\2"),
    (r"\.attn_norm\.weight$", ".ln1.w"),
    (r"\.ffn_norm\.weight$", ".ln2.w"),
    (r"\.hc_attn_(fn|base|scale)$", r".attn_hc.\1"),
    (r"\.hc_ffn_(fn|base|scale)$", r".mlp_hc.\1"),
    (r"\.ffn\.", ".mlp."),
    (r"\.(q_norm|kv_norm|norm|enorm|hnorm)\.weight$", r".\1.w"),
    (r"\.(wq_a|wq_b|wkv|wgate|wo_a|wo_b|weights_proj|e_proj|h_proj|w1|w2|w3)\.weight$", r".\1"),
]
_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.(w[123])$")
_IGNORED = re.compile(r"^mtp\.\d+\.(emb|embed|head)\.")


# DSpark tensors outside its stages' blocks: (stage, official name after "mtp.{stage}.") <-> v4lens name;
# stage "last" is the config's last stage (2 in the releases).
_DSPARK_HEADS = [
    (0, "main_proj.weight", "dspark.main_proj"),
    (0, "main_norm.weight", "dspark.main_norm.w"),
    ("last", "norm.weight", "dspark.ln_final.w"),
    ("last", "hc_head_fn", "dspark.hc_head.fn"),
    ("last", "hc_head_base", "dspark.hc_head.base"),
    ("last", "hc_head_scale", "dspark.hc_head.scale"),
    ("last", "markov_head.markov_w1.weight", "dspark.markov_w1"),
    ("last", "markov_head.markov_w2.weight", "dspark.markov_w2"),
    ("last", "confidence_head.proj.weight", "dspark.confidence_proj"),
]


def _check_stages(dspark_stages) -> None:
    if isinstance(dspark_stages, bool) or not isinstance(dspark_stages, int) or dspark_stages < 0:
        raise ValueError(
            f"dspark_stages must be the DSpark stage count (an int >= 0; 0: not DSpark), got {dspark_stages!r}"
        )


def canonical_name(name: str, with_expert: bool = False, dspark_stages: int = 0):
    """Any known checkpoint name -> the v4lens parameter name (and the expert index for per-expert tensors).

    dspark_stages: the DSpark stage count of the checkpoint's config (0, the default: `mtp.*` are April
    MTP blocks). Returns None (or (None, None)) for tensors v4lens ignores on purpose.
    """
    _check_stages(dspark_stages)
    n = re.sub(r"^model\.", "", name)
    for pattern, repl in _HF_TO_OFFICIAL:
        n = re.sub(pattern, repl, n)
    if _IGNORED.search(n):
        return (None, None) if with_expert else None
    stage = re.match(r"^mtp\.(\d+)\.(.*)$", n) if dspark_stages else None
    if stage:
        s, rest = int(stage.group(1)), stage.group(2)
        heads = {(dspark_stages - 1 if i == "last" else i, o): v for i, o, v in _DSPARK_HEADS}
        # a stage's block tensors: named as layer s, then moved under dspark.stages.s
        n = heads.get((s, rest)) or f"layers.{s}.{rest}"
    for pattern, repl in _OFFICIAL_TO_V4LENS:
        n = re.sub(pattern, repl, n)
    if stage and n.startswith("blocks."):
        n = "dspark.stages." + n.removeprefix("blocks.")
    expert = None
    match = _EXPERT.search(n)
    if match:
        expert = int(match.group(1))
        n = n[: match.start()] + f".mlp.experts.{match.group(2)}"
    return (n, expert) if with_expert else n


# v4lens -> official, applied in order (the inverse of _OFFICIAL_TO_V4LENS).
_V4LENS_TO_OFFICIAL = [
    (r"^blocks\.(\d+)\.", r"layers.\1."),
    (r"(^|\.)ln_final\.w$", r"\1norm.weight"),
    (r"(^|\.)hc_head\.(fn|base|scale)$", r"\1hc_head_\2"),
    (r"\.ln1\.w$", ".attn_norm.weight"),
    (r"\.ln2\.w$", ".ffn_norm.weight"),
    (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"),
    (r"\.mlp_hc\.(fn|base|scale)$", r".hc_ffn_\1"),
    (r"\.mlp\.", ".ffn."),
    (r"\.(q_norm|kv_norm|norm|enorm|hnorm)\.w$", r".\1.weight"),
    (r"\.(wq_a|wq_b|wkv|wgate|wo_a|wo_b|weights_proj|e_proj|h_proj|w1|w2|w3)$", r".\1.weight"),
]


def official_name(name: str, expert: int | None = None, dspark_stages: int = 0) -> str:
    """v4lens name (and expert index for the stacked expert tensors) -> DeepSeek's official name.

    dspark_stages: the model's DSpark stage count, needed for the `dspark.*` names (the heads sit on the
    last stage)."""
    _check_stages(dspark_stages)
    if name.startswith("dspark."):
        if not dspark_stages:
            raise ValueError(f"official_name({name!r}): a DSpark tensor's official name depends on the stage count; "
                             "give dspark_stages=cfg.n_mtp_layers")  # fmt: skip
        for i, official, ours in _DSPARK_HEADS:
            if name == ours:
                return f"mtp.{dspark_stages - 1 if i == 'last' else i}.{official}"
        stage = re.match(r"^dspark\.stages\.(\d+)\.(.*)$", name)
        if stage is None:
            raise ValueError(f"official_name({name!r}): not a tensor of the DSpark drafter")
        # a stage is named as an ordinary layer, then moved under mtp.{s}
        return "mtp." + official_name(f"blocks.{stage.group(1)}.{stage.group(2)}", expert).removeprefix("layers.")
    for pattern, repl in _V4LENS_TO_OFFICIAL:
        name = re.sub(pattern, repl, name)
    if expert is not None:
        name = re.sub(r"\.experts\.(w[123])\.weight$", rf".experts.{expert}.\1.weight", name)
    return name


def hf_saved_name(official: str) -> str:
    """Official name -> the name transformers' `save_pretrained` writes for DeepseekV4ForCausalLM.

    The official name with a `model.` prefix, except: the embedding is `embed_tokens`, the head
    stays unprefixed, hc_head's tensors sit in a module, and the attention's kv_norm is `norm`.
    MTP and DSpark tensors (`mtp.*`, which transformers ignores) keep their official names.
    """
    if official.startswith("mtp.") or official == "head.weight":
        return official
    name = re.sub(r"^embed\.", "embed_tokens.", official)
    name = re.sub(r"^hc_head_(fn|base|scale)$", r"hc_head.hc_\1", name)
    name = re.sub(r"\.attn\.kv_norm\.weight$", ".attn.norm.weight", name)
    return "model." + name

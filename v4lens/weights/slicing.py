"""Slicing a large V4 checkpoint (V4-Flash) down to a smaller config (mini-3b, or any V4Config).

Every target tensor is a sub-block of one source tensor (dequantised first when FP8/FP4),
chosen along named axes. The rules, each with an override in `slice_checkpoint`:

- **layers**: target layer t takes source layer `layers[t]`. A target layer needs a source
  layer of the same attention type (CSA from CSA; HCA from HCA with a ratio at least the
  target's), except that a sliding target may come from any layer (its compressor is
  dropped), and the same MoE kind (hash-routed from hash-routed). Default: the increasing
  assignment closest to even spacing, minimising Σ_t |layers[t] − t·(L_src−1)/(L_tgt−1)|
  plus 1 for each sliding target fed by a compressed layer (`default_layers`; for mini-3b
  from Flash: 0, 1, 4, 5, 6, 7, 10, 11, ..., 39, 40, 42).
  The MTP block j comes from the source's MTP block j.
- **DSpark** (a 0731 / 0813 source): DSpark stage s comes from the source's stage s, sliced like
  any block (same hidden channels, heads, rope pairs, experts, ranks). The target's taps
  (`dspark_target_layer_ids`) are the target layers the source's tap layers map to: a kept tap
  layer maps to its target layer; a dropped one to the target layer fed by the largest kept
  source layer below it (the layer whose output the dropped one would have read); taps that land
  on one target layer are merged, its `main_proj` column block being the sum of theirs (what the
  drafter computes when fed that layer twice). So mini-3b from Flash-0731 (layers ..., 39, 40, 42)
  taps target layers 26, 27 (source 40 and 41 -> 26, 42 -> 27). `main_proj` keeps the hidden rows and,
  per tap, the hidden columns; the Markov heads keep the vocabulary rows and the first r_tgt rank
  columns, the confidence head the hidden columns then the first r_tgt rank columns. The target's
  other DSpark fields (block size, noise token) are its own. A DSpark source sliced to an April
  MTP target (or the other way round) is an error; a target given by preset name takes the
  source's draft module (`preset(name, draft=...)`).
- **hidden channels** (`hidden`, default the first D_tgt), applied everywhere D appears,
  including each mHC stream's slice of `fn`. **Vocabulary**: the first V_tgt rows.
  **mHC streams**: the first hc_tgt (pre, post and comb rows/columns of the kept streams).
- **heads** (`heads`, H_tgt source head ids): target output group g holds heads
  `heads[g·H_tgt/G_tgt : (g+1)·H_tgt/G_tgt]`, which must share one source group (their
  rows of wo_a and columns of wo_b). Default: the first H_tgt/G_tgt heads of each of the
  first G_tgt source groups.
- **head channels**: the first (c−r)_tgt nope channels stay nope; of the rope pairs, target
  pair j keeps the source pair with the nearest base frequency θ^(−2i/r) (every other pair
  when r halves and θ is the same). The same rule picks the indexer's channels. Base
  frequencies only: YaRN's ramp is placed on pair indices with floor/ceil at each rope
  dimension's own granularity, so for the pairs inside the ramp the slowed-down effective
  frequencies of source and target differ slightly (recorded per target layer in the
  metadata as `rope_max_rel_freq_error`). A sliding target from a compressed source layer
  matches rope_theta against compress_rope_theta the same way.
- **LoRA ranks, MoE inner dim, indexer heads**: the first R_q / R_o (per group) / I / H_I.
- **experts** (`experts`: one list for every layer or {target layer: list}; default the
  first E_tgt): router rows and biases follow. Hash layers' tid2eid rows are remapped into
  the kept experts: a row keeps its surviving experts in order; each dropped expert e is
  replaced by kept expert e mod E_tgt (or the next one not already in the row), and a row
  still short of k_tgt experts is filled with the lowest unused ids.
- **compressor position biases** (`ape`, [m, ·]) for a shorter ratio keep the rows
  round(linspace(0, m_src−1, m_tgt)), which spans the whole window.

Memory is that of the output: the source is memory-mapped and read one tensor at a time
(only the kept experts' tensors are read at all).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from ..model import HookedV4
from ..model.config import V4Config, resolve_dtype
from ..model.presets import preset
from .loading import Checkpoint
from .saving import write_checkpoint
from .slice_plan import TID2EID_RULE, SlicePlan, default_layers, make_plan

__all__ = ["TID2EID_RULE", "SlicePlan", "default_layers", "make_plan", "remap_tid2eid", "slice_checkpoint"]


# ---------------------------------------------------------------------- the slicing
def slice_checkpoint(
    src: str | Path, target: str | V4Config, out: str | Path, *, layers=None, hidden=None, heads=None,
    experts=None, format: str | None = None, dtype="bfloat16", max_shard_size="5GB", progress: bool = True,
    overwrite: bool = False,
) -> SlicePlan:  # fmt: skip
    """Write a smaller checkpoint cut out of `src` (a directory in either layout, FP8/FP4 allowed).

    target: a preset name ("mini-3b") or a V4Config. out: the directory to write: not the source, nor
    inside or around it (ValueError); an existing non-empty folder must be a checkpoint v4lens wrote
    unless `overwrite=True` (`v4lens.weights.saving.save_pretrained`); written atomically.
    layers / hidden / heads / experts: override the default selections (module docstring).
    format: "hf" or "official" (default: the source's layout). dtype: of the written matrices
    (the fp32 islands stay fp32). Returns the plan; the output's safetensors metadata and
    `slice.json` record the source, the mapping and the rules.
    """
    from tqdm.auto import tqdm

    from .atomic import check_separate, check_target
    from .saving import shard_size_bytes

    out = Path(out)
    check_separate(src, out)  # before anything: the output must never replace the source's files
    check_target(out, overwrite)  # and a refused `out` fails now, not after the slicing
    shard_size_bytes(max_shard_size)
    with Checkpoint(src) as ckpt:
        src_cfg = ckpt.config()
        ckpt.check_draft(src_cfg)  # April MTP tensors under a DSpark config (or the other way round): refused
        if not ckpt.has_mtp():
            src_cfg = src_cfg.without_draft()
        tgt_cfg = _target_config(target, src_cfg, src).replace(dtype=resolve_dtype(dtype), device=None)
        plan = make_plan(src_cfg, tgt_cfg, layers=layers, hidden=hidden, heads=heads, experts=experts)
        if plan.tgt.dspark_target_layer_ids != tgt_cfg.dspark_target_layer_ids:
            warnings.warn(f"the DSpark drafter taps target layers {list(plan.tgt.dspark_target_layer_ids)}, the layers "
                          f"the source's taps {list(src_cfg.dspark_target_layer_ids)} map to (not the target config's "
                          f"{list(tgt_cfg.dspark_target_layer_ids)}); see slice.json")  # fmt: skip
        tgt_cfg = plan.tgt
        with torch.device("meta"):
            shapes = {n: (tuple(t.shape), t.dtype) for n, t in HookedV4(tgt_cfg).state_dict().items()}
        keys = ckpt.canonical_keys(src_cfg.n_mtp_layers if src_cfg.draft == "dspark" else 0)
        state = {}
        for name in tqdm(list(shapes), desc="slicing", disable=not progress):
            shape, out_dtype = shapes[name]
            value = _slice_tensor(plan, name, keys, ckpt)
            if tuple(value.shape) != shape:
                raise AssertionError(f"slicing produced {name} of shape {tuple(value.shape)}, expected {shape}")
            state[name] = value.to(out_dtype)
        record = {"source": str(Path(src).resolve()), "source_format": ckpt.format,
                  "source_config": src_cfg.to_official(), "target": tgt_cfg.name, **plan.to_json()}  # fmt: skip
        write_checkpoint(out, state, tgt_cfg, format or ckpt.format, max_shard_size,
                         metadata={"v4lens_slice": json.dumps(record)}, progress=progress, overwrite=overwrite,
                         extra_files={"slice.json": json.dumps(record, indent=1) + "\n"})  # fmt: skip
    return plan


def _target_config(target: str | V4Config, src_cfg: V4Config, src) -> V4Config:
    """The target config, with a draft module the source can give: a preset name takes the source's kind of
    draft module; a draft module of the other kind is an error; more stages / blocks than the source has are cut."""
    if isinstance(target, str):
        return _fit_draft(preset(target, draft=src_cfg.draft) if src_cfg.draft else preset(target), src_cfg, src)
    if target.draft and src_cfg.draft and target.draft != src_cfg.draft:
        kinds = {"mtp": "April MTP blocks", "dspark": "a DSpark drafter (0731 / 0813)"}
        raise ValueError(
            f"the target config has {kinds[target.draft]} but the source {src} has {kinds[src_cfg.draft]}, which "
            f"cannot be cut into it; give a target with the source's kind of draft module (e.g. "
            f"preset(name, draft={src_cfg.draft!r})) or none (cfg.without_draft())"
        )
    return _fit_draft(target, src_cfg, src)


def _fit_draft(tgt: V4Config, src_cfg: V4Config, src) -> V4Config:
    n = src_cfg.n_mtp_layers
    if tgt.n_mtp_layers <= n:
        return tgt
    warnings.warn(f"{src} has {n} {'DSpark stages' if tgt.draft == 'dspark' else 'MTP layers'}: the output has no more")
    if n == 0:
        return tgt.without_draft()
    return tgt.replace(n_mtp_layers=n, compress_ratios=tgt.compress_ratios[: tgt.n_layers + n])


_LAYER = re.compile(r"^(blocks|mtp|dspark\.stages)\.(\d+)\.(.*)$")


def _slice_tensor(plan: SlicePlan, name: str, keys: dict, ckpt: Checkpoint) -> torch.Tensor:
    """The target tensor `name` (a v4lens name) cut out of the source."""
    tgt = plan.tgt
    D, V = plan.hidden, torch.arange(tgt.d_vocab)
    match = _LAYER.match(name)
    if match is None and name.startswith("dspark."):  # the drafter's own tensors (its stages are blocks)
        return _slice_dspark(plan, name, keys, ckpt, D, V)
    if match is None:  # embed, head, ln_final, hc_head
        return _read_cut(ckpt, keys, name, _global_axes(plan, name, D, V))
    kind, idx, rest = match.group(1), int(match.group(2)), match.group(3)
    t = idx if kind == "blocks" else tgt.n_layers + idx  # MTP block / DSpark stage j: layer n_layers + j
    s = plan.source_layer(t)
    src_name = f"blocks.{s}.{rest}" if kind == "blocks" else f"{kind}.{idx}.{rest}"
    if rest in ("e_proj", "h_proj"):
        return _read_cut(ckpt, keys, src_name, (D, D))
    if rest in ("enorm.w", "hnorm.w", "ln_final.w") or rest.startswith("hc_head."):
        return _read_cut(ckpt, keys, src_name, _global_axes(plan, rest, D, V))
    if rest.startswith("mlp.experts."):
        inner = torch.arange(tgt.moe_inter_dim)
        axes = (D, inner) if rest.endswith("w2") else (inner, D)
        return torch.stack([_read_cut(ckpt, keys, src_name, axes, expert=e) for e in plan.experts[t]])
    if rest == "mlp.gate.tid2eid":
        table = _read_cut(ckpt, keys, src_name, (V, None))
        return remap_tid2eid(table, plan.experts[t], tgt.n_routed_experts, tgt.n_activated_experts,
                             n_source_experts=plan.src.n_routed_experts, name=src_name)  # fmt: skip
    return _read_cut(ckpt, keys, src_name, _block_axes(plan, t, rest, D))


def _slice_dspark(plan: SlicePlan, name: str, keys: dict, ckpt: Checkpoint, D, V) -> torch.Tensor:
    """A DSpark tensor outside its stages (same v4lens name in source and target)."""
    src, tgt = plan.src, plan.tgt
    rank = torch.arange(tgt.dspark_markov_rank)
    if name == "dspark.main_proj":  # [D, T·D]: per target tap, the hidden columns of its source taps, summed (fp32)
        blocks = [[i for i, t in enumerate(plan.taps) if t == layer] for layer in tgt.dspark_target_layer_ids]
        return torch.cat([sum(_read_cut(ckpt, keys, name, (D, i * src.d_model + D)).float() for i in taps)
                          for taps in blocks], dim=1)  # fmt: skip
    if name in ("dspark.markov_w1", "dspark.markov_w2"):  # [V, r]
        return _read_cut(ckpt, keys, name, (V, rank))
    if name == "dspark.confidence_proj":  # [1, D + r]: w_c · [h ; e]
        return _read_cut(ckpt, keys, name, (None, torch.cat([D, src.d_model + rank])))
    return _read_cut(ckpt, keys, name, _global_axes(plan, name.removeprefix("dspark."), D, V))  # norms, hc_head


def _global_axes(plan: SlicePlan, name: str, D, V):
    if name in ("embed.weight", "head.weight"):
        return (V, D)
    if name.endswith(("ln_final.w", "enorm.w", "hnorm.w", "main_norm.w")):
        return (D,)
    streams = torch.arange(plan.tgt.hc_mult)
    return {"hc_head.fn": (streams, plan.stream_hidden()), "hc_head.base": (streams,), "hc_head.scale": (None,)}[name]


def _block_axes(plan: SlicePlan, t: int, rest: str, D):
    src, tgt = plan.src, plan.tgt
    s = plan.source_layer(t)
    q_rank = torch.arange(tgt.q_lora_rank)
    chans = plan.head_channels(t)
    heads = torch.tensor(plan.heads)
    q_rows = (heads[:, None] * src.head_dim + chans[None, :]).flatten()
    index_chans = plan.index_channels(t)
    index_rows = (torch.arange(tgt.index_n_heads)[:, None] * src.index_head_dim + index_chans[None, :]).flatten()
    o_cols = (torch.tensor(plan.groups())[:, None] * src.o_lora_rank + torch.arange(tgt.o_lora_rank)).flatten()
    inner = torch.arange(tgt.moe_inter_dim)
    experts = torch.tensor(plan.experts[t])

    def compressor_rows(c_src, kept):  # CSA stores [a-half; b-half], each c wide
        return torch.cat([kept, c_src + kept]) if src.compress_ratio(s) == 4 else kept

    table = {
        "ln1.w": (D,), "ln2.w": (D,),
        "attn_hc.fn": (plan.mix_rows(), plan.stream_hidden()), "attn_hc.base": (plan.mix_rows(),),
        "mlp_hc.fn": (plan.mix_rows(), plan.stream_hidden()), "mlp_hc.base": (plan.mix_rows(),),
        "attn_hc.scale": (None,), "mlp_hc.scale": (None,),
        "attn.wq_a": (q_rank, D), "attn.q_norm.w": (q_rank,), "attn.wq_b": (q_rows, q_rank),
        "attn.wkv": (chans, D), "attn.kv_norm.w": (chans,),
        "attn.wo_a": "wo_a", "attn.wo_b": (D, o_cols), "attn.attn_sink": (heads,),
        "attn.compressor.wkv": (compressor_rows(src.head_dim, chans), D),
        "attn.compressor.wgate": (compressor_rows(src.head_dim, chans), D),
        "attn.compressor.ape": (plan.ape_rows(t), compressor_rows(src.head_dim, chans)),
        "attn.compressor.norm.w": (chans,),
        "attn.indexer.wq_b": (index_rows, q_rank),
        "attn.indexer.weights_proj": (torch.arange(tgt.index_n_heads), D),
        "attn.indexer.compressor.wkv": (torch.cat([index_chans, src.index_head_dim + index_chans]), D),
        "attn.indexer.compressor.wgate": (torch.cat([index_chans, src.index_head_dim + index_chans]), D),
        "attn.indexer.compressor.ape": (None, torch.cat([index_chans, src.index_head_dim + index_chans])),
        "attn.indexer.compressor.norm.w": (index_chans,),
        "mlp.gate.weight": (experts, D), "mlp.gate.bias": (experts,),
        "mlp.shared_experts.w1": (inner, D), "mlp.shared_experts.w3": (inner, D),
        "mlp.shared_experts.w2": (D, inner),
    }  # fmt: skip
    if rest not in table:
        raise KeyError(f"no slicing rule for {rest}")
    axes = table[rest]
    if axes == "wo_a":  # [G·R_o, H·c/G]: each target group's rows and its own heads' columns
        per, src_per = tgt.n_heads // tgt.o_groups, src.n_heads // src.o_groups
        blocks = []
        for g, sg in enumerate(plan.groups()):
            local = heads[g * per : (g + 1) * per] - sg * src_per
            cols = (local[:, None] * src.head_dim + chans[None, :]).flatten()
            rows = sg * src.o_lora_rank + torch.arange(tgt.o_lora_rank)
            blocks.append((rows, cols))
        return blocks
    return axes


def _read_cut(ckpt: Checkpoint, keys: dict, name: str, axes, expert: int | None = None) -> torch.Tensor:
    """Read one source tensor (dequantised) and keep `axes` (an index tensor, or None for all, per dim)."""
    key = keys.get((name, expert))
    if key is None:
        raise ValueError(
            f"the source checkpoint has no tensor for {name}{'' if expert is None else f' expert {expert}'}"
        )
    tensor = ckpt.get(key)
    if isinstance(axes, list):  # blockwise (wo_a)
        return torch.cat([tensor[rows][:, cols] for rows, cols in axes])
    if len(axes) != tensor.ndim:
        raise ValueError(f"{key}: expected a {len(axes)}-d tensor, found shape {tuple(tensor.shape)}")
    for dim, index in enumerate(axes):
        if index is not None:
            if index.numel() and int(index.max()) >= tensor.shape[dim]:
                raise ValueError(
                    f"{key} has shape {tuple(tensor.shape)}: index {int(index.max())} out of range on dim {dim}"
                )
            tensor = tensor.index_select(dim, index)
    return tensor


def remap_tid2eid(table: torch.Tensor, kept: list[int], n_experts: int, k: int,
                  n_source_experts: int | None = None, name: str = "tid2eid") -> torch.Tensor:  # fmt: skip
    """Hash routes [V, k_src] over source experts -> [V, k] over the kept ones (rule: TID2EID_RULE).

    Every source id must be a real expert, in [0, n_source_experts) when that is given: a -1 would
    index the last entry of the id map and come out as a made-up route. `name` (the source tensor) goes
    into the error messages."""
    if table.is_floating_point() or table.is_complex() or table.dtype == torch.bool:
        raise TypeError(f"{name} (source hash routes) must be an integer tensor, got {table.dtype}")
    V = table.shape[0]
    table = table.long()
    bad = table < 0
    if n_source_experts is not None:
        bad |= table >= n_source_experts
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        where = "an id >= 0" if n_source_experts is None else f"in [0, {n_source_experts})"
        raise ValueError(
            f"{name} (source hash routes) row {row} (token id {row}) holds {int(table[row, col])} at column {col}: "
            f"every entry must be a source expert, {where}; is the source checkpoint damaged?"
        )
    new_id = torch.full((max(int(table.max()) + 1, max(kept) + 1),), -1, dtype=torch.long)
    new_id[torch.tensor(kept)] = torch.arange(len(kept))
    out = torch.full((V, k), -1, dtype=torch.long)
    used = torch.zeros(V, n_experts, dtype=torch.bool)
    filled = torch.zeros(V, dtype=torch.long)
    rows = torch.arange(V)

    def place(candidate: torch.Tensor, valid: torch.Tensor) -> None:
        ok = valid & (filled < k) & ~used[rows, candidate.clamp(min=0)]
        out[rows[ok], filled[ok]] = candidate[ok]
        used[rows[ok], candidate[ok]] = True
        filled.add_(ok.long())

    for col in range(table.shape[1]):  # 1. the surviving experts, in order
        mapped = new_id[table[:, col]]
        place(mapped, mapped >= 0)
    for col in range(table.shape[1]):  # 2. a substitute for each dropped expert
        dropped = new_id[table[:, col]] < 0
        candidate = table[:, col] % n_experts
        for _ in range(n_experts):  # advance past experts the row already holds
            clash = used[rows, candidate]
            if not clash.any():
                break
            candidate = torch.where(clash, (candidate + 1) % n_experts, candidate)
        place(candidate, dropped)
    for e in range(n_experts):  # 3. rows still short (k > k_src): lowest unused ids
        place(torch.full((V,), e), torch.ones(V, dtype=torch.bool))
    assert bool((out >= 0).all())
    return out.to(table.dtype)

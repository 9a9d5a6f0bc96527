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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import V4Config, preset, resolve_dtype
from .loading import Checkpoint
from .model import HookedV4
from .rope import rope_frequencies
from .saving import write_checkpoint

TID2EID_RULE = (
    "surviving experts in row order; each dropped expert e -> kept expert e mod E_tgt "
    "(or the next one not in the row); then the lowest unused ids"
)


# ---------------------------------------------------------------------- the plan
@dataclass
class SlicePlan:
    """Which source indices every target axis keeps (all index lists refer to the source)."""

    src: V4Config
    tgt: V4Config
    layers: list[int]  # source layer of each target layer (MTP blocks map to themselves)
    hidden: torch.Tensor
    heads: list[int]
    experts: dict[int, list[int]]  # target layer (MTP: n_layers + j) -> source experts
    rope_pairs: dict[int, torch.Tensor] = field(default_factory=dict)  # target layer -> source pair per target pair
    rope_error: dict[int, float] = field(default_factory=dict)  # target layer -> max rel. effective-frequency gap

    # -------------------------------------------------------------- per-axis indices
    def source_layer(self, t: int) -> int:
        return self.layers[t] if t < self.tgt.n_layers else self.src.n_layers + (t - self.tgt.n_layers)

    def head_channels(self, t: int) -> torch.Tensor:
        """Source channels of one head for target layer t: nope first, then the kept rope pairs."""
        s, T = self.src, self.tgt
        return _channels(s.head_dim - s.rope_head_dim, T.head_dim - T.rope_head_dim, self.rope_pairs[t])

    def index_channels(self, t: int) -> torch.Tensor:
        s, T = self.src, self.tgt
        return _channels(s.index_head_dim - s.rope_head_dim, T.index_head_dim - T.rope_head_dim, self.rope_pairs[t])

    def groups(self) -> list[int]:
        """The source output group of each target group."""
        per = self.tgt.n_heads // self.tgt.o_groups
        src_per = self.src.n_heads // self.src.o_groups
        return [self.heads[g * per] // src_per for g in range(self.tgt.o_groups)]

    def mix_rows(self) -> torch.Tensor:
        """Rows of an mHC `fn`/`base`: pre and post of the kept streams, then comb[i, j] for kept i, j."""
        n, k = self.src.hc_mult, self.tgt.hc_mult
        keep = torch.arange(k)
        comb = 2 * n + (keep[:, None] * n + keep[None, :]).flatten()
        return torch.cat([keep, n + keep, comb])

    def stream_hidden(self) -> torch.Tensor:
        """Columns of an mHC `fn`: each kept stream's kept hidden channels of the flattened [hc·D]."""
        return (torch.arange(self.tgt.hc_mult)[:, None] * self.src.d_model + self.hidden[None, :]).flatten()

    def ape_rows(self, t: int) -> torch.Tensor:
        m_src, m_tgt = self.src.compress_ratio(self.source_layer(t)), self.tgt.compress_ratio(t)
        return torch.linspace(0, m_src - 1, m_tgt).round().long()

    def to_json(self) -> dict:
        custom_hidden = not torch.equal(self.hidden, torch.arange(self.tgt.d_model))
        return {
            "layers": self.layers,
            "mtp": {str(self.tgt.n_layers + j): self.src.n_layers + j for j in range(self.tgt.n_mtp_layers)},
            "hidden": self.hidden.tolist() if custom_hidden else f"first {self.tgt.d_model}",
            "vocab": f"first {self.tgt.d_vocab}",
            "streams": f"first {self.tgt.hc_mult}",
            "heads": self.heads,
            "experts": {str(t): e for t, e in self.experts.items()},
            "rope_pairs": {str(t): p.tolist() for t, p in self.rope_pairs.items()},
            "rope_max_rel_freq_error": {str(t): e for t, e in self.rope_error.items()},
            "ranks_and_inner_dims": "first q_lora_rank, o_lora_rank (per group), moe_inter_dim, index_n_heads",
            "nope_channels": "first (head_dim - rope_head_dim) of the target",
            "ape_rows": "round(linspace(0, m_src - 1, m_tgt))",
            "tid2eid": TID2EID_RULE,
        }


def _channels(src_nope: int, tgt_nope: int, pairs: torch.Tensor) -> torch.Tensor:
    rope = src_nope + torch.stack([2 * pairs, 2 * pairs + 1], dim=-1).flatten()
    return torch.cat([torch.arange(tgt_nope), rope])


def _layer_kind(cfg: V4Config, layer: int) -> tuple[str, bool]:
    return cfg.layer_type(layer), layer < cfg.n_layers and cfg.is_hash_layer(layer)


def _compatible(src: V4Config, s: int, tgt: V4Config, t: int) -> bool:
    (s_type, s_hash), (t_type, t_hash) = _layer_kind(src, s), _layer_kind(tgt, t)
    if s_hash != t_hash:
        return False
    if t_type == "sliding":
        return True
    return s_type == t_type and src.compress_ratio(s) >= tgt.compress_ratio(t)


def default_layers(src: V4Config, tgt: V4Config) -> list[int]:
    """The increasing, type-compatible source layers closest to an even spread (dynamic programming)."""
    Ls, Lt = src.n_layers, tgt.n_layers
    target_pos = [t * (Ls - 1) / (Lt - 1) if Lt > 1 else 0.0 for t in range(Lt)]
    inf = float("inf")
    cost = [[inf] * Ls for _ in range(Lt)]
    back = [[-1] * Ls for _ in range(Lt)]
    for t in range(Lt):
        best, best_s = (0.0, -1) if t == 0 else (inf, -1)
        for s in range(Ls):
            if t > 0 and s > 0 and cost[t - 1][s - 1] < best:
                best, best_s = cost[t - 1][s - 1], s - 1
            if best < inf and _compatible(src, s, tgt, t):
                # a sliding target prefers a sliding source over dropping a compressor
                mismatch = float(src.layer_type(s) != tgt.layer_type(t))
                cost[t][s] = best + abs(s - target_pos[t]) + mismatch
                back[t][s] = best_s
    end = min(range(Ls), key=lambda s: cost[Lt - 1][s])
    if cost[Lt - 1][end] == inf:
        raise ValueError(
            "no increasing assignment of source layers has the attention types (and hash routing) "
            "the target needs; pass layers=[...] explicitly"
        )
    layers = [end]
    for t in range(Lt - 1, 0, -1):
        layers.append(back[t][layers[-1]])
    return layers[::-1]


def make_plan(src: V4Config, tgt: V4Config, layers=None, hidden=None, heads=None, experts=None) -> SlicePlan:
    """Check that `tgt` fits inside `src` and fill in the default selections."""
    too_big = [
        f"{field_name} {getattr(tgt, field_name)} > {getattr(src, field_name)}"
        for field_name in ("d_vocab", "d_model", "n_heads", "o_groups", "q_lora_rank", "o_lora_rank",
                           "n_routed_experts", "moe_inter_dim", "index_n_heads", "hc_mult", "n_mtp_layers")
        if getattr(tgt, field_name) > getattr(src, field_name)
    ]  # fmt: skip
    for name, (t_all, t_rope), (s_all, s_rope) in (
        ("head_dim", (tgt.head_dim, tgt.rope_head_dim), (src.head_dim, src.rope_head_dim)),
        ("index_head_dim", (tgt.index_head_dim, tgt.rope_head_dim), (src.index_head_dim, src.rope_head_dim)),
    ):
        if t_all - t_rope > s_all - s_rope or t_rope > s_rope:
            too_big.append(f"{name} {t_all} (rope {t_rope}) does not fit {s_all} (rope {s_rope})")
    if tgt.n_shared_experts != src.n_shared_experts:
        too_big.append(f"n_shared_experts {tgt.n_shared_experts} != {src.n_shared_experts}")
    if too_big:
        raise ValueError("the target config does not fit inside the source: " + "; ".join(too_big))

    layers = default_layers(src, tgt) if layers is None else [int(s) for s in layers]
    if len(layers) != tgt.n_layers:
        raise ValueError(f"layers has {len(layers)} entries; the target has {tgt.n_layers} layers")
    for t in range(tgt.n_layers + tgt.n_mtp_layers):
        s = layers[t] if t < tgt.n_layers else src.n_layers + t - tgt.n_layers
        if not 0 <= s < src.n_layers + src.n_mtp_layers or not _compatible(src, s, tgt, t):
            raise ValueError(
                f"target layer {t} ({_describe(tgt, t)}) cannot come from source layer {s}"
                f"{f' ({_describe(src, s)})' if 0 <= s < src.n_layers + src.n_mtp_layers else ' (no such layer)'}"
            )

    hidden = torch.arange(tgt.d_model) if hidden is None else torch.as_tensor(hidden, dtype=torch.long)
    _check_selection("hidden", hidden.tolist(), tgt.d_model, src.d_model)

    per, src_per = tgt.n_heads // tgt.o_groups, src.n_heads // src.o_groups
    if heads is None:
        if per > src_per:
            raise ValueError(f"a target group has {per} heads, a source group only {src_per}")
        heads = [g * src_per + j for g in range(tgt.o_groups) for j in range(per)]
    heads = [int(h) for h in heads]
    _check_selection("heads", heads, tgt.n_heads, src.n_heads)
    for g in range(tgt.o_groups):
        if len({h // src_per for h in heads[g * per : (g + 1) * per]}) != 1:
            raise ValueError(
                f"target group {g} takes heads {heads[g * per : (g + 1) * per]} from more than one source group"
            )

    all_layers = range(tgt.n_layers + tgt.n_mtp_layers)
    if experts is None:
        experts = list(range(tgt.n_routed_experts))
    per_layer = (
        {t: list(experts.get(t, range(tgt.n_routed_experts))) for t in all_layers}
        if isinstance(experts, dict)
        else {t: list(experts) for t in all_layers}
    )
    for t, chosen in per_layer.items():
        _check_selection(f"experts of target layer {t}", chosen, tgt.n_routed_experts, src.n_routed_experts)

    plan = SlicePlan(src, tgt, layers, hidden, heads, per_layer)
    for t in all_layers:
        plan.rope_pairs[t], plan.rope_error[t] = _match_rope(src, plan.source_layer(t), tgt, t)
    return plan


def _describe(cfg: V4Config, layer: int) -> str:
    kind, hashed = _layer_kind(cfg, layer)
    ratio = cfg.compress_ratio(layer)
    return f"{kind}{f' ratio {ratio}' if ratio else ''}{', hash-routed' if hashed else ''}"


def _check_selection(what: str, chosen: list[int], size: int, limit: int) -> None:
    if len(chosen) != size or len(set(chosen)) != size or not all(0 <= i < limit for i in chosen):
        raise ValueError(f"{what} must be {size} distinct source indices in [0, {limit}); got {chosen}")


def _match_rope(src: V4Config, s: int, tgt: V4Config, t: int) -> tuple[torch.Tensor, float]:
    """For each target rope pair, the source pair with the nearest base frequency (distinct, in order);
    and the largest relative difference of the effective (YaRN) frequencies of the matched pairs."""
    src_compressed, tgt_compressed = src.layer_type(s) != "sliding", tgt.layer_type(t) != "sliding"

    def base(cfg, compressed):
        theta = cfg.compress_rope_theta if compressed else cfg.rope_theta
        return theta ** (-torch.arange(0, cfg.rope_head_dim, 2, dtype=torch.float64) / cfg.rope_head_dim)

    src_log, tgt_log = base(src, src_compressed).log(), base(tgt, tgt_compressed).log()
    pairs, used = [], set()
    for j in range(len(tgt_log)):
        order = (src_log - tgt_log[j]).abs().argsort(stable=True).tolist()
        pick = next(i for i in order if i not in used)
        used.add(pick)
        pairs.append(pick)
    pairs_t = torch.tensor(pairs)
    effective_src = rope_frequencies(src, src_compressed).double()[pairs_t]
    effective_tgt = rope_frequencies(tgt, tgt_compressed).double()
    error = ((effective_src - effective_tgt).abs() / effective_tgt).max().item()
    return pairs_t, error


# ---------------------------------------------------------------------- the slicing
def slice_checkpoint(
    src: str | Path, target: str | V4Config, out: str | Path, *, layers=None, hidden=None, heads=None,
    experts=None, format: str | None = None, dtype="bfloat16", max_shard_size="5GB", progress: bool = True,
) -> SlicePlan:  # fmt: skip
    """Write a smaller checkpoint cut out of `src` (a directory in either layout, FP8/FP4 allowed).

    target: a preset name ("mini-3b") or a V4Config. out: the directory to write.
    layers / hidden / heads / experts: override the default selections (module docstring).
    format: "hf" or "official" (default: the source's layout). dtype: of the written matrices
    (the fp32 islands stay fp32). Returns the plan; the output's safetensors metadata and
    `slice.json` record the source, the mapping and the rules.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    with Checkpoint(src) as ckpt:
        src_cfg = ckpt.config()
        if not ckpt.has_mtp():
            src_cfg = src_cfg.without_mtp()
        tgt_cfg = preset(target) if isinstance(target, str) else target
        tgt_cfg = tgt_cfg.replace(dtype=resolve_dtype(dtype), device=None)
        if tgt_cfg.n_mtp_layers > src_cfg.n_mtp_layers:
            warnings.warn(f"{src} has {src_cfg.n_mtp_layers} MTP layers: the output has no more")
            tgt_cfg = tgt_cfg.replace(n_mtp_layers=src_cfg.n_mtp_layers)
        plan = make_plan(src_cfg, tgt_cfg, layers=layers, hidden=hidden, heads=heads, experts=experts)
        with torch.device("meta"):
            shapes = {n: (tuple(t.shape), t.dtype) for n, t in HookedV4(tgt_cfg).state_dict().items()}
        keys = ckpt.canonical_keys()
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
                         metadata={"v4lens_slice": json.dumps(record)}, progress=progress)  # fmt: skip
        (out / "slice.json").write_text(json.dumps(record, indent=1) + "\n")
    return plan


_LAYER = re.compile(r"^(blocks|mtp)\.(\d+)\.(.*)$")


def _slice_tensor(plan: SlicePlan, name: str, keys: dict, ckpt: Checkpoint) -> torch.Tensor:
    """The target tensor `name` (a v4lens name) cut out of the source."""
    tgt = plan.tgt
    D, V = plan.hidden, torch.arange(tgt.d_vocab)
    match = _LAYER.match(name)
    if match is None:  # embed, head, ln_final, hc_head
        return _read_cut(ckpt, keys, name, _global_axes(plan, name, D, V))
    kind, idx, rest = match.group(1), int(match.group(2)), match.group(3)
    t = idx if kind == "blocks" else tgt.n_layers + idx
    s = plan.source_layer(t)
    src_name = f"blocks.{s}.{rest}" if kind == "blocks" else f"mtp.{idx}.{rest}"
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
        return remap_tid2eid(table, plan.experts[t], tgt.n_routed_experts, tgt.n_activated_experts)
    return _read_cut(ckpt, keys, src_name, _block_axes(plan, t, rest, D))


def _global_axes(plan: SlicePlan, name: str, D, V):
    if name in ("embed.weight", "head.weight"):
        return (V, D)
    if name.endswith(("ln_final.w", "enorm.w", "hnorm.w")):
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


def remap_tid2eid(table: torch.Tensor, kept: list[int], n_experts: int, k: int) -> torch.Tensor:
    """Hash routes [V, k_src] over source experts -> [V, k] over the kept ones (rule: TID2EID_RULE)."""
    V = table.shape[0]
    table = table.long()
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

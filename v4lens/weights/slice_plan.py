"""The slicing plan: which source layer, hidden channels, heads, rope pairs and experts each target
tensor keeps (the rules are stated in `slicing.py`'s docstring; `make_plan` applies them)."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch

from ..model.config import V4Config
from ..model.rope import rope_frequencies

TID2EID_RULE = (
    "surviving experts in row order; each dropped expert e -> kept expert e mod E_tgt "
    "(or the next one not in the row); then the lowest unused ids"
)
DSPARK_TAP_RULE = (
    "each source tap layer l -> the target layer fed by the largest source layer <= l (l itself when kept; else "
    "the layer whose output a dropped layer would have read); taps landing on one target layer are merged, "
    "its main_proj column block the sum of theirs"
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
    taps: list[int] = field(default_factory=list)  # DSpark: the target layer of each source tap layer

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
        } | (self._dspark_json() if self.tgt.draft == "dspark" else {})

    def _dspark_json(self) -> dict:
        return {"dspark": {
            "stages": {str(s): s for s in range(self.tgt.n_mtp_layers)},
            "taps": {str(src): tgt for src, tgt in zip(self.src.dspark_target_layer_ids, self.taps)},
            "target_layer_ids": list(self.tgt.dspark_target_layer_ids),
            "tap_rule": DSPARK_TAP_RULE,
            "markov_rank": f"first {self.tgt.dspark_markov_rank}",
        }}  # fmt: skip


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
    if tgt.draft == "dspark" and tgt.dspark_markov_rank > src.dspark_markov_rank:
        too_big.append(f"dspark_markov_rank {tgt.dspark_markov_rank} > {src.dspark_markov_rank}")
    if tgt.n_shared_experts != src.n_shared_experts:
        too_big.append(f"n_shared_experts {tgt.n_shared_experts} != {src.n_shared_experts}")
    if too_big:
        raise ValueError("the target config does not fit inside the source: " + "; ".join(too_big))

    layers = default_layers(src, tgt) if layers is None else _indices("layers", layers)
    if len(layers) != tgt.n_layers:
        raise ValueError(f"layers has {len(layers)} entries; the target has {tgt.n_layers} layers")
    taps = []
    if tgt.draft == "dspark":  # the drafter taps the target layers the source's taps map to
        if src.draft != "dspark":
            raise ValueError(
                f"the target config has a DSpark drafter but the source ({src.name}) has none to cut it from"
            )
        taps = dspark_taps(src, layers)
        tgt = tgt.replace(dspark_target_layer_ids=tuple(dict.fromkeys(taps)))  # distinct, in order
    for t in range(tgt.n_layers + tgt.n_mtp_layers):
        s = layers[t] if t < tgt.n_layers else src.n_layers + t - tgt.n_layers
        if not 0 <= s < src.n_layers + src.n_mtp_layers or not _compatible(src, s, tgt, t):
            raise ValueError(
                f"target layer {t} ({_describe(tgt, t)}) cannot come from source layer {s}"
                f"{f' ({_describe(src, s)})' if 0 <= s < src.n_layers + src.n_mtp_layers else ' (no such layer)'}"
            )

    hidden = torch.arange(tgt.d_model) if hidden is None else torch.tensor(_indices("hidden", hidden), dtype=torch.long)
    _check_selection("hidden", hidden.tolist(), tgt.d_model, src.d_model)

    per, src_per = tgt.n_heads // tgt.o_groups, src.n_heads // src.o_groups
    if heads is None:
        if per > src_per:
            raise ValueError(f"a target group has {per} heads, a source group only {src_per}")
        heads = [g * src_per + j for g in range(tgt.o_groups) for j in range(per)]
    heads = _indices("heads", heads)
    _check_selection("heads", heads, tgt.n_heads, src.n_heads)
    for g in range(tgt.o_groups):
        if len({h // src_per for h in heads[g * per : (g + 1) * per]}) != 1:
            raise ValueError(
                f"target group {g} takes heads {heads[g * per : (g + 1) * per]} from more than one source group"
            )

    all_layers = range(tgt.n_layers + tgt.n_mtp_layers)
    if experts is None:
        experts = list(range(tgt.n_routed_experts))
    if isinstance(experts, dict):
        for t in experts:  # a key naming no target layer would be silently ignored
            if isinstance(t, bool) or not isinstance(t, int):
                raise TypeError(f"experts: the keys are target layer numbers (ints), got {t!r}")
            if t not in all_layers:
                mtp = f", MTP blocks from {tgt.n_layers}" if tgt.n_mtp_layers else ""
                raise ValueError(f"experts: the target has no layer {t}; its layers are 0..{len(all_layers) - 1}{mtp}")
        per_layer = {
            t: _indices(f"experts of target layer {t}", experts.get(t, range(tgt.n_routed_experts))) for t in all_layers
        }
    else:
        chosen = _indices("experts", experts)
        per_layer = {t: list(chosen) for t in all_layers}
    for t, chosen in per_layer.items():
        _check_selection(f"experts of target layer {t}", chosen, tgt.n_routed_experts, src.n_routed_experts)

    plan = SlicePlan(src, tgt, layers, hidden, heads, per_layer, taps=taps)
    for t in all_layers:
        plan.rope_pairs[t], plan.rope_error[t] = _match_rope(src, plan.source_layer(t), tgt, t)
    return plan


def dspark_taps(src: V4Config, layers: list[int]) -> list[int]:
    """The target layer of each of the source's DSpark tap layers (rule: DSPARK_TAP_RULE)."""
    out = []
    for tap in src.dspark_target_layer_ids:
        before = [(s, t) for t, s in enumerate(layers) if s <= tap]
        if not before:
            raise ValueError(f"the source's DSpark drafter taps layer {tap}, but every target layer comes from a later "
                             f"source layer (layers={layers}): no target layer can stand in for it")  # fmt: skip
        out.append(max(before)[1])
    return out


def _describe(cfg: V4Config, layer: int) -> str:
    kind, hashed = _layer_kind(cfg, layer)
    ratio = cfg.compress_ratio(layer)
    return f"{kind}{f' ratio {ratio}' if ratio else ''}{', hash-routed' if hashed else ''}"


def _indices(what: str, values) -> list[int]:
    """A selection as a list of Python ints: lists, tuples, integer tensors and arrays are fine; floats
    and bools are refused (int() would truncate 1.7 to 1 and read True as 1: a silently wrong slice)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{what} must be a list of ints, got {type(values).__name__} {values!r}")
    out = []
    for i, v in enumerate(values.tolist() if hasattr(values, "tolist") else values):  # tensors, arrays: Python scalars
        try:
            if isinstance(v, bool):
                raise TypeError
            out.append(operator.index(v))  # ints (numpy's included) only: no float, no bool
        except TypeError:
            raise TypeError(f"{what} must hold ints; entry {i} is {type(v).__name__} {v!r}") from None
    return out


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

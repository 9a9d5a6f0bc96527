"""Logit lens for the multi-stream residual: read every block boundary the way the model reads its last one.

The model ends with

    streams X [b,p,n,d] -> hc_head: y = Σ_j pre_j · X_j  (pre computed from these same streams)
                        -> ln_final (RMSNorm) -> head, in fp32        -> logits [b,p,V]

The lens applies exactly these modules to the streams at each block boundary (the embedding
copied into the n streams, then each block's `hook_streams_post`), so the last boundary gives the
model's own logits bit for bit. The MTP lens does the same inside an MTP block, with that block's
own hc_head and final norm and the shared head.

Per stream (`per_stream`), stream j alone is read as if it were the final state:

    logits_j = head · ln_final(X_j)                                     [b,p,n,V]

with no collapse. hc_head's weight pre_j is a positive scalar per token, which ln_final divides
out again (up to its eps), so this is also what the head makes of stream j's share pre_j·X_j of
the collapse, taken on its own.

Memory: the lens never holds [n_boundaries, b, p, V] unless asked (`keep_logits=True`). Each
boundary's logits are formed, reduced to top-k and target statistics, and dropped; the peak is
one boundary's logits at the positions read, b·P·V fp32 (b·P·n·V with per_stream), about twice
that with the log-softmax. On a large vocabulary pass `positions=` to read only a few positions.
The lens runs the model's modules, so hooks attached to hc_head / ln_final at the time would fire.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformer_lens.utilities.slice import Slice

from ..model.head import fp32_logits


@dataclass
class LensResult:
    """What a lens read at each boundary. B = boundaries, P = positions read, k = top-k.

    With a batch-less cache (`remove_batch_dim`) the b axes are absent. `per_stream` holds the
    same fields for each stream read alone, with a stream axis n after P ([B, b, P, n, k], ...).

    labels: the B boundary names ("embed", "0_post", ... or "mtp0_pre", ...).
    positions: [P] int64, the absolute positions read.
    top_ids / top_logprobs: [B, b, P, k], most likely first (int64 / fp32).
    top_strs: [B][b][P][k] decoded tokens, or None (decode=False).
    targets: [b, P] int64, the token each position is scored on (-1: none, e.g. past the end), or None.
    target_logprobs: [B, b, P] fp32 log-probability of the target (nan where it is -1), or None.
    target_ranks: [B, b, P] int64, 0 = the target is the top-1 prediction (-1 where no target), or None.
    logits: [B, b, P, V] fp32 with keep_logits=True, else None.
    stream_axis: True for the per-stream reading (the stream axis n after P).

    `print(lens)` gives a few lines: what was read, and each boundary's top-1 at one position.
    """

    labels: list[str]
    positions: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor
    top_strs: list | None = None
    targets: torch.Tensor | None = None
    target_logprobs: torch.Tensor | None = None
    target_ranks: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    per_stream: LensResult | None = None
    stream_axis: bool = False

    @property
    def top_probs(self) -> torch.Tensor:
        return self.top_logprobs.exp()

    @property
    def target_probs(self) -> torch.Tensor | None:
        """[B, b, P] probability of the target at each boundary (nan where there is none)."""
        return None if self.target_logprobs is None else self.target_logprobs.exp()

    @property
    def log_probs(self) -> torch.Tensor:
        """[B, b, P, V] log-softmax of the kept logits (needs keep_logits=True)."""
        if self.logits is None:
            raise ValueError("the logits were not kept: run the lens with keep_logits=True")
        return self.logits.log_softmax(-1)

    def __repr__(self) -> str:
        """The shape of what was read, then each boundary's top-1 (per stream: one per stream) and the
        target's probability and rank, at batch row 0 and the last position read that has a target."""
        batched = self.top_ids.ndim == 4 + self.stream_axis
        P, pos = len(self.positions), self.positions.tolist()
        if pos == list(range(pos[0], pos[-1] + 1)):
            span = f"{pos[0]}..{pos[-1]}" if P > 1 else str(pos[0])
        else:
            span = ", ".join(map(str, pos[:6])) + (", ..." if P > 6 else "")
        extras = [f"top-{self.top_ids.shape[-1]}"] + ["targets"] * (self.targets is not None)
        if self.stream_axis or self.per_stream is not None:
            n = (self if self.stream_axis else self.per_stream).top_ids.shape[-2]
            extras.append(f"each of {n} streams read alone" if self.stream_axis else f"per_stream ({n} streams)")
        extras += ["logits kept"] * (self.logits is not None)
        b = f" × batch {self.top_ids.shape[1]}" if batched else ""
        plural = "s" if P != 1 else ""
        head = f"LensResult: {len(self.labels)} boundaries{b} × {P} position{plural} ({span}); {', '.join(extras)}"

        def row0(t):  # batch row 0, and a stream axis for every reading: [B, P, n, ...]
            t = t[:, 0] if batched else t
            return t if self.stream_axis else t.unsqueeze(2)

        targets = None if self.targets is None else (self.targets[0] if batched else self.targets)
        has = [] if targets is None else [p for p in range(P) if int(targets[p]) >= 0]
        p = has[-1] if has else P - 1  # the last position read that has a target
        probs = row0(self.top_probs)[:, p, :, 0].tolist()  # [B][n]
        if self.top_strs is not None:
            tops = [s[0][p] if batched else s[p] for s in self.top_strs]  # [B] of [n][k] (per stream) or [k]
            tops = [[repr(x[0]) for x in t] if self.stream_axis else [repr(t[0])] for t in tops]
        else:
            tops = [[f"id {i}" for i in row] for row in row0(self.top_ids)[:, p, :, 0].tolist()]
        if has:
            t_probs, t_ranks = row0(self.target_probs)[:, p].tolist(), row0(self.target_ranks)[:, p].tolist()
        where = ["batch row 0"] * batched + [f"target id {int(targets[p])}"] * bool(has)
        lines = [head, f"  top-1 at position {pos[p]}" + (f" ({'; '.join(where)})" if where else "") + ":"]
        width = max(len(label) for label in self.labels)
        shown = list(range(len(self.labels)))
        if len(shown) > 10:  # a deep model: the first and last boundaries
            shown = shown[:4] + [None] + shown[-4:]
        for i in shown:
            if i is None:
                lines.append("    ...")
                continue
            cells = []
            for j, top in enumerate(tops[i]):  # one cell, or one short cell per stream
                if self.stream_axis:
                    cells.append(f"{top} {probs[i][j]:.2f}" + (f", target {t_probs[i][j]:.2f}" if has else ""))
                else:
                    target = f"   target p={t_probs[i][j]:.3f} rank {t_ranks[i][j]}" if has else ""
                    cells.append(f"{top} {probs[i][j]:.3f}{target}")
            lines.append(f"    {self.labels[i]:<{width}}  " + " | ".join(cells))
        return "\n".join(lines)

    def table(self, batch: int = 0, position: int = -1):
        """A pandas DataFrame, one row per boundary, for one (batch, position) of those read.

        >>> cache.logit_lens(k=3).table(position=-1)
        """
        import pandas as pd

        idx = (slice(None), batch, position) if self.top_ids.ndim == 4 else (slice(None), position)
        probs, ids = self.top_probs[idx].tolist(), self.top_ids[idx].tolist()
        strs = _index_nested(self.top_strs, idx[1:]) if self.top_strs is not None else ids
        rows = {"top": [[f"{s!r} {p:.3f}" for s, p in zip(ss, pp)] for ss, pp in zip(strs, probs)]}
        if self.target_logprobs is not None:
            rows["target_prob"] = self.target_probs[idx].tolist()
            rows["target_rank"] = self.target_ranks[idx].tolist()
        return pd.DataFrame(rows, index=self.labels)


# ---------------------------------------------------------------------- reading one boundary
def read_collapsed(streams: torch.Tensor, hc_head, ln_final, head_weight: torch.Tensor) -> torch.Tensor:
    """The model's own final path: streams [b, p, n, d] -> fp32 logits [b, p, V].

    >>> read_collapsed(cache["streams_post", -1], model.hc_head, model.ln_final, model.head.weight)
    """
    return fp32_logits(ln_final(hc_head(streams)), head_weight)


def read_each_stream(streams: torch.Tensor, ln_final, head_weight: torch.Tensor) -> torch.Tensor:
    """Each stream alone through the final norm and head: [b, p, n, d] -> fp32 logits [b, p, n, V].

    >>> read_each_stream(cache["streams_post", 0], model.ln_final, model.head.weight)[:, :, 2]  # stream 2
    """
    return fp32_logits(ln_final(streams), head_weight)


def next_token_targets(tokens: torch.Tensor, positions: torch.Tensor, offset: int = 1) -> torch.Tensor:
    """tokens[:, t + offset] for each position t: [b, S], [P] -> [b, P] int64, -1 past the end.

    offset 1: the next token (main head); 2 + i: what MTP depth i predicts at t.

    >>> next_token_targets(torch.tensor([[5, 6, 7]]), torch.tensor([0, 2]))     # tensor([[ 6, -1]])
    """
    S = tokens.shape[-1]
    t = positions.to(tokens.device) + offset
    return torch.where(t < S, tokens[..., t.clamp(max=S - 1)], -1)


def _summarise(logits: torch.Tensor, targets: torch.Tensor | None, k: int) -> dict[str, torch.Tensor]:
    """Top-k and target statistics of logits [..., V]; targets broadcast against logits[..., 0]."""
    logprobs = logits.log_softmax(-1)
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)
    out = {"top_ids": top_ids, "top_logprobs": top_logprobs}
    if targets is not None:
        # targets [b, P] (or [P]) against [b, P] or per stream [b, P, n]: align on the left axes
        t = targets.to(logits.device)
        t = t.reshape(t.shape + (1,) * (logits.ndim - 1 - t.ndim)).expand(logits.shape[:-1])
        has = t >= 0
        t = t.clamp(min=0)[..., None]
        out["target_logprobs"] = torch.where(has, logprobs.gather(-1, t)[..., 0], float("nan"))
        rank = (logits > logits.gather(-1, t)).sum(-1)  # tokens strictly more likely than the target
        out["target_ranks"] = torch.where(has, rank, -1)
    return out


# ---------------------------------------------------------------------- the lens loop
@torch.no_grad()
def read_boundaries(
    boundaries: Iterable[tuple[str, torch.Tensor]],
    hc_head,
    ln_final,
    head_weight: torch.Tensor,
    k: int = 5,
    targets: torch.Tensor | None = None,
    pos_index: torch.Tensor | None = None,
    per_stream: bool = True,
    keep_logits: bool = False,
) -> tuple[list[str], dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Read (label, streams [b, p, n, d]) pairs one at a time -> (labels, collapsed stats, per-stream stats).

    Each stat is stacked over boundaries ([B, b, P, ...]) and lives on the streams' device; the
    reading runs on head_weight's device. pos_index [P] picks positions before anything is computed.

    >>> labels, main, each = read_boundaries(cache._boundaries(), model.hc_head, model.ln_final, model.head.weight)
    """
    labels, main, each = [], {}, {}
    for label, streams in boundaries:
        home = streams.device
        x = streams if pos_index is None else streams[:, pos_index.to(home)]
        x = x.to(head_weight.device)
        reads = [(main, read_collapsed(x, hc_head, ln_final, head_weight))]
        if per_stream:
            reads.append((each, read_each_stream(x, ln_final, head_weight)))
        for acc, logits in reads:
            stats = _summarise(logits, targets, k)
            if keep_logits:
                stats["logits"] = logits
            for name, t in stats.items():
                acc.setdefault(name, []).append(t.to(home))
        labels.append(label)
    main = {name: torch.stack(ts) for name, ts in main.items()}
    each = {name: torch.stack(ts) for name, ts in each.items()} if per_stream else None
    return labels, main, each


def _lens(cache, boundaries, hc_head, ln_final, *, offset, tokens, targets, k, per_stream, positions, keep_logits,
          decode) -> LensResult:  # fmt: skip
    """Shared by `logit_lens` and `mtp_lens`: choose positions and targets, read, decode, package."""
    model, batched = cache.model, cache.has_batch_dim
    boundaries = list(boundaries)
    if not batched:  # work with a batch axis of 1 throughout; removed again at the end
        boundaries = [(label, s[None]) for label, s in boundaries]
    n_cached = boundaries[0][1].shape[1]

    # which cached positions to read, and which absolute positions they are
    held = cache.positions if cache.positions is not None else torch.arange(n_cached)
    pos_index = None if positions is None else torch.as_tensor(Slice.unwrap(positions).indices(n_cached))
    read_pos = held if pos_index is None else held[pos_index]

    if targets is not None:
        targets = torch.as_tensor(targets, dtype=torch.long)
        if not batched or targets.ndim == 1:  # one row of targets for the whole batch
            targets = targets.reshape(1, -1).expand(boundaries[0][1].shape[0], -1)
    else:
        tokens = cache.tokens if tokens is None else torch.as_tensor(tokens)
        if tokens is not None:
            tokens = tokens.reshape(1, -1) if tokens.ndim == 1 else tokens
            if cache.positions is None and tokens.shape[-1] != n_cached:
                raise ValueError(
                    f"tokens have {tokens.shape[-1]} positions, the cache {n_cached}: pass the run's input tokens"
                )
            targets = next_token_targets(tokens, read_pos, offset)
    if targets is not None and targets.shape[-1] != len(read_pos):
        raise ValueError(f"targets cover {targets.shape[-1]} positions, the lens reads {len(read_pos)}")

    labels, main, each = read_boundaries(
        boundaries, hc_head, ln_final, model.head.weight, k=k, targets=targets, pos_index=pos_index,
        per_stream=per_stream, keep_logits=keep_logits,
    )  # fmt: skip

    def package(stats: dict, stream_axis: bool = False) -> LensResult:
        strs = _decode(model, stats["top_ids"]) if decode else None
        result = LensResult(labels, read_pos, top_strs=strs, targets=targets, stream_axis=stream_axis, **stats)
        return result if batched else _drop_batch(result)

    result = package(main)
    if per_stream:
        result.per_stream = package(each, stream_axis=True)
    return result


def logit_lens(
    cache,
    tokens: torch.Tensor | None = None,
    k: int = 5,
    per_stream: bool = True,
    positions=None,
    targets: torch.Tensor | None = None,
    incl_mid: bool = False,
    keep_logits: bool = False,
    decode: bool = True,
) -> LensResult:
    """Logit lens over a `V4ActivationCache`: each block boundary through hc_head -> ln_final -> head.

    cache: from `model.run_with_cache(tokens)` (or with `names_filter=is_stream_name`); it may
    live on another device than the model (e.g. cached with device="cpu").
    tokens: the run's input tokens [b, S]; targets are then the next tokens (the last position has
    none). Defaults to the tokens the cache kept (`run_with_cache` keeps them);
    with neither, no target statistics are computed.
    targets: explicit target ids instead, [b, P] or [P], one per position read (-1: none).
    positions: which cached positions to read (int, list, (start, stop) tuple, slice; None: all).
    incl_mid: also read each block's `hook_streams_mid`. keep_logits: also return the logits
    (memory: [B, b, P, V] fp32; per stream ×n). decode: decode the top-k ids to strings.

    The last boundary reproduces the model's logits exactly (same modules, same inputs).

    >>> lens = logit_lens(cache, tokens, k=5, positions=[-1])
    >>> lens.labels[-1], lens.top_strs[-1][0][0], lens.target_probs[:, 0, 0]
    """
    model = cache.model
    return _lens(
        cache, cache._boundaries(incl_mid=incl_mid), model.hc_head, model.ln_final, offset=1, tokens=tokens,
        targets=targets, k=k, per_stream=per_stream, positions=positions, keep_logits=keep_logits, decode=decode,
    )  # fmt: skip


def mtp_lens(
    cache,
    depth: int = 0,
    tokens: torch.Tensor | None = None,
    k: int = 5,
    per_stream: bool = True,
    positions=None,
    targets: torch.Tensor | None = None,
    keep_logits: bool = False,
    decode: bool = True,
) -> LensResult:
    """Logit lens inside MTP block `depth`: its streams pre / mid / post through its own hc_head and
    ln_final and the shared head. The last boundary reproduces `mtp.{depth}.hook_logits` exactly.

    Needs a cache from a run with `mtp=True`. Targets: at position t depth i predicts token
    t + 2 + i (docs/hooks.md), so the default targets are tokens[t + 2 + depth]; other arguments as in
    `logit_lens`.

    >>> _, cache = model.run_with_cache(tokens, mtp=True)
    >>> mtp_lens(cache, 0, tokens).target_probs.nanmean(dim=(1, 2))   # mean P(token t+2) per boundary
    """
    names = [f"mtp.{depth}.hook_streams_{where}" for where in ("pre", "mid", "post")]
    missing = [n for n in names if n not in cache.cache_dict]
    if missing:
        raise KeyError(f"{missing} not in the cache: run the model with mtp=True and cache these hooks")
    block = cache.model.mtp[depth]
    boundaries = [(f"mtp{depth}_{where}", cache[n]) for where, n in zip(("pre", "mid", "post"), names)]
    return _lens(
        cache, boundaries, block.hc_head, block.ln_final, offset=2 + depth, tokens=tokens, targets=targets, k=k,
        per_stream=per_stream, positions=positions, keep_logits=keep_logits, decode=decode,
    )  # fmt: skip


# ---------------------------------------------------------------------- helpers
def _decode(model, ids: torch.Tensor) -> list:
    """Nested lists of token strings shaped like `ids`; each distinct id is decoded once."""
    distinct = ids.unique().tolist()
    text = dict(zip(distinct, model.to_str_tokens(distinct)))

    def walk(x):
        return [walk(y) for y in x] if isinstance(x, list) else text[x]

    return walk(ids.tolist())


def _index_nested(nested: list, idx: tuple) -> list:
    """nested[:][i][j]... for nested lists whose first axis is kept: idx = (i, j, ...)."""
    out = []
    for row in nested:
        for i in idx:
            row = row[i]
        out.append(row)
    return out


def _drop_batch(result: LensResult) -> LensResult:
    """Remove the batch axis of 1 (axis 1 of the stacked stats, axis 0 of targets) for a batch-less cache."""
    changes = {}
    for f in ("top_ids", "top_logprobs", "target_logprobs", "target_ranks", "logits"):
        t = getattr(result, f)
        changes[f] = None if t is None else t[:, 0]
    changes["targets"] = None if result.targets is None else result.targets[0]
    changes["top_strs"] = None if result.top_strs is None else [per_boundary[0] for per_boundary in result.top_strs]
    return dataclasses.replace(result, **changes)

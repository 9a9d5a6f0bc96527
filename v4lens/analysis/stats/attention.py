"""Sparse attention: how much of dense compressed attention the indexer's top-k keeps; sink mass."""

from __future__ import annotations

import torch
from einops import einsum

from ...model.indexer import visible_entries
from .common import _frame, _get, _layer_index, _layers, _prefix, _row, token_mask


# ----------------------------------------------------------------------------- 4. indexer recall
@torch.no_grad()
def indexer_recall(model, cache, layer: int | str, per_head: bool = False, chunk: int = 256) -> torch.Tensor:
    """How much dense compressed attention the Lightning Indexer's picks keep, per query.

    Definition: per head, take a softmax over ALL compressed entries visible to query t
    (w < (t+1)//4, see `visible_entries`) with logits q·kv / sqrt(c), from `attn.hook_q`
    [b,p,h,c] and `attn.compressor.hook_kv` [b,T,c]; recall = the probability it puts on
    the entries in `attn.indexer.hook_topk` (-1 and not-visible picks ignored, duplicates
    once). The sliding window and the sink are left out on purpose: this measures the
    indexer's choice among compressed entries only. 1 when the picks cover every visible
    entry; NaN for queries with no visible entry (nothing to choose).
    Returns [b, p] (mean over heads) or [b, h, p] with per_head=True. Memory O(b·h·chunk·T).

        r = stats.indexer_recall(model, cache, 1)  # [b, p]
    """
    prefix = _prefix(model, layer)
    if model.cfg.layer_type(_layer_index(model, prefix)) != "csa":
        raise ValueError(f"{prefix} is not a CSA layer: it has no indexer")
    q = _get(cache, f"{prefix}.attn.hook_q", "indexer_recall").float()  # [b,p,h,c]
    kv = _get(cache, f"{prefix}.attn.compressor.hook_kv", "indexer_recall").float()  # [b,T,c]
    picks = _get(cache, f"{prefix}.attn.indexer.hook_topk", "indexer_recall")  # [b,p,k]
    b, S, H, c = q.shape
    T = kv.shape[1]
    w = torch.arange(T, device=q.device)
    visible = w[None, :] < visible_entries(torch.arange(S, device=q.device), 4)[:, None]  # [p,T]
    picked = torch.zeros(b, S, T + 1, dtype=torch.bool, device=q.device)
    picked.scatter_(-1, torch.where((picks >= 0) & (picks < T), picks, T), True)  # -1 -> spare column
    picked = picked[..., :T] & visible  # what the attention really receives

    out = []
    for s0 in range(0, S, chunk):  # dense scores are [b,h,p,T]: build them a query chunk at a time
        s1 = min(S, s0 + chunk)
        logits = einsum(q[:, s0:s1], kv, "b p h c, b t c -> b h p t") * c**-0.5
        probs = logits.masked_fill(~visible[s0:s1], float("-inf")).softmax(-1)  # all -inf -> NaN row
        out.append((probs * picked[:, None, s0:s1]).sum(-1))  # [b,h,s]
    recall = torch.cat(out, dim=-1) if out else q.new_zeros(b, H, 0)
    return recall if per_head else recall.mean(1)


def indexer_recall_summary(model, cache, mask=None, positions=None, layers=None):
    """One row per CSA layer: token statistics of `indexer_recall` (head means).

    Columns: layer, block, layer_type, queries (selected queries with >= 1 visible entry),
    recall (mean), recall_min, selective_queries (those with more visible entries than
    index_topk, where the indexer actually drops some), recall_selective (mean over those;
    NaN if none).

        df = stats.indexer_recall_summary(model, cache)
    """
    rows = []
    for prefix in _layers(model, cache, layers, lambda l: model.cfg.layer_type(l) == "csa"):
        r = indexer_recall(model, cache, prefix)
        b, S = r.shape
        keep = token_mask(mask, positions, b, S, r.device) & ~r.isnan()
        selective = keep & (visible_entries(torch.arange(S, device=r.device), 4) > model.cfg.index_topk)[None]
        rows.append(
            {**_row(model, prefix), "queries": int(keep.sum()), "recall": float(r[keep].mean()),
             "recall_min": float(r[keep].min()) if keep.any() else float("nan"),
             "selective_queries": int(selective.sum()), "recall_selective": float(r[selective].mean())}
        )  # fmt: skip
    return _frame(rows)


# ----------------------------------------------------------------------------- 5. sink mass
@torch.no_grad()
def sink_mass(model, cache, per_position: bool = False, mask=None, positions=None, layers=None) -> torch.Tensor:
    """Mean attention-sink probability per layer and head, from `attn.hook_sink` [b,h,p].

    Returns [L, H] (mean over the selected tokens) or, with per_position=True, [L, H, p]
    (mean over the batch at each position; NaN where no token is selected).

        sink = stats.sink_mass(model, cache)  # [L, H]
    """
    out = []
    for prefix in _layers(model, cache, layers):
        sink = _get(cache, f"{prefix}.attn.hook_sink", "sink_mass").float()  # [b,h,p]
        keep = token_mask(mask, positions, sink.shape[0], sink.shape[2], sink.device)[:, None].float()  # [b,1,p]
        if per_position:
            out.append((sink * keep).sum(0) / keep.sum(0))  # [h,p]
        else:
            out.append(einsum(sink, keep, "b h p, b o p -> h") / keep.sum())
    return torch.stack(out)


def sink_mass_frame(model, cache, mask=None, positions=None, layers=None):
    """`sink_mass` in long form: one row per (layer, head) with layer, block, layer_type, head, sink_mass.

    df = stats.sink_mass_frame(model, cache)
    df.pivot(index="layer", columns="head", values="sink_mass")
    """
    prefixes = _layers(model, cache, layers)
    mass = sink_mass(model, cache, mask=mask, positions=positions, layers=prefixes)
    rows = [
        {**_row(model, prefix), "head": h, "sink_mass": float(mass[i, h])}
        for i, prefix in enumerate(prefixes)
        for h in range(mass.shape[1])
    ]
    return _frame(rows)

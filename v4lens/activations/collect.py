"""Collecting chosen hooks at chosen positions over a whole dataset, into an on-disk store.

How a batch is made: rows are read `bucket_rows` at a time, sorted by length within that window
and cut into batches of `batch_size`, so rows of similar length share a batch and little of it is
padding. A batch is padded on the right. That cannot change any real position's values, because
everything in V4 looks only backwards: the sliding window, the compressed entries (visible only
once their block of tokens is complete), the indexer (it ranks only visible entries) and the
routing (per token). So each stored value is the value of its row run alone (up to float rounding;
tested). Padded positions are never stored.

Memory holds one batch's forward and the captured rows of at most one shard: each hook keeps only
the chosen positions, moved to the CPU as it fires, and a shard is written (and forgotten) once it
reaches `shard_size`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from tqdm import tqdm

from ..analysis.layout import position_axis
from ..model.fingerprint import model_identity
from ..weights.saving import shard_size_bytes
from .store import ActivationStore, StoreWriter, dtype_name, tokens_checksum

# hooks whose last axis counts attention candidates: on CSA / HCA layers their number and numbering
# follow the (padded) batch length, so rows of a batch would not match the row run alone
_CANDIDATE_HOOKS = ("attn.hook_key_index", "attn.hook_attn_scores", "attn.hook_pattern", "indexer.hook_scores",
                    "indexer.hook_topk")  # fmt: skip
_HEAD_HOOKS = ("hc_head.", "ln_final.", "hook_logits")  # fire only when the forward computes logits


def collect(
    model,
    dataset: Iterable,
    hooks,
    out_dir,
    positions="last",
    batch_size: int = 32,
    bucket_rows: int | None = None,
    shard_size: int | str = "256MB",
    dtype: torch.dtype | None = None,
    prepend_bos: bool = True,
    max_len: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ActivationStore:
    """Run `model` over `dataset` in batches and store `hooks` at `positions` of every row in `out_dir`.

    dataset: any iterable of rows (a list, a torch or Hugging Face dataset, a generator); a row is a
        text (tokenized by `model.to_tokens`, BOS prepended unless `prepend_bos=False`), a 1-D tensor or
        list of token ids (used as given), or a dict with "text", or "input_ids" / "tokens" (and an
        optional "attention_mask" choosing the real tokens). Row i is the i-th item.
    hooks: a hook name or a list of names (docs/hooks.md), e.g. ["blocks.2.hook_streams_post"].
        Refused, with the reason: compressed-entry hooks (no position axis), the key index, scores,
        patterns and indexer scores/picks of CSA and HCA layers (their candidate axis follows the padded
        length), and MTP / DSpark hooks. Only the blocks up to the last one named run.
    positions: which positions of each row to store: "last" (the last real token), "all" (every real
        token), an int (one position; negative counts from the row's end), a function
        `f(tokens [L]) -> bool mask [L] or position indices`, or a sequence indexed by row id giving
        each row's mask or indices (a mask may be longer than the row if the extra entries are False).
    batch_size: rows per forward. bucket_rows: rows read ahead and sorted by length together
        (default 32 * batch_size); larger means less padding.
    shard_size: bytes (or "256MB") of captured tensors per shard file; memory holds about this much.
    dtype: store floating-point hooks in this dtype (e.g. torch.float16); default: as the hook gives.
    max_len: keep only the first max_len tokens of each row (a long document's positions are not all needed).
    overwrite: replace a store of another collection in out_dir (only the store's own files).
    progress: show a tqdm progress bar (rows).

    Returns the store (`ActivationStore`, a torch Dataset; reopen later with `open_store(out_dir)`).
    Resuming: if the collection stops (an exception, an interrupt, a killed process), rerun it with the
    same arguments: rows already in the store are skipped (after checking they are the same tokens), the
    others are collected, and every row ends up stored exactly once. A store of another model, other
    hooks, positions rule, dtype or max_len is refused (ValueError saying what differs); a positions
    function or per-row sequence is recorded by name only, so pass the same one again.

    >>> store = collect(model, texts, ["blocks.2.hook_streams_post"], "acts/", positions="last")
    >>> store[0]["blocks.2.hook_streams_post"].shape        # [n, d]: the 4 streams at the last token
    """
    hooks = check_hooks(model, hooks)
    describe, pick = positions_rule(positions)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    bucket_rows = 32 * batch_size if bucket_rows is None else bucket_rows
    if isinstance(bucket_rows, bool) or not isinstance(bucket_rows, int) or bucket_rows < batch_size:
        raise ValueError(f"bucket_rows must be an int >= batch_size ({batch_size}), got {bucket_rows!r}")
    try:
        limit = shard_size_bytes(shard_size)
    except ValueError:
        raise ValueError(f"shard_size must be a positive number of bytes or a string like '256MB', not "
                         f"{shard_size!r}") from None  # fmt: skip
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be None or a floating-point torch.dtype (e.g. torch.float16), got {dtype!r}")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise ValueError(f"max_len must be None or a positive int, got {max_len!r}")
    run = {
        "model": {"name": model.cfg.name, **model_identity(model)},
        "hooks": hooks,
        "positions": describe,
        "dtype": None if dtype is None else dtype_name(dtype),
        "prepend_bos": bool(prepend_bos),
        "max_len": max_len,
    }
    writer = StoreWriter(out_dir, model, run, overwrite)  # refuses a foreign folder before any work
    plan = forward_plan(hooks)
    total = len(dataset) if hasattr(dataset, "__len__") else None
    bar = tqdm(total=total, unit="row", desc="collect", disable=not progress, dynamic_ncols=True)
    try:
        with torch.no_grad():
            for bucket in _buckets(model, dataset, bucket_rows, prepend_bos, max_len):
                for batch in _batches(bucket, batch_size):
                    todo = [(r, t) for r, t in batch if not _stored(writer, r, t)]
                    if todo:
                        writer.add(run_batch(model, todo, hooks, pick, plan, dtype))
                    bar.update(len(batch))
                    if writer.pending_bytes >= limit:
                        writer.flush()
                        bar.set_postfix(shards=len(writer.manifest["shards"]))
        writer.finish()
    except BaseException:
        if not writer.failed:  # keep the whole batches collected before the failure
            try:
                writer.flush()
            except Exception as e:  # noqa: BLE001 -- the first failure is the one to raise
                warnings.warn(f"collect: the batches collected before the failure could not be stored ({e})",
                              stacklevel=2)  # fmt: skip
        raise
    finally:
        bar.close()
    return ActivationStore(out_dir)


def check_hooks(model, hooks) -> list[str]:
    """The hook names to collect (duplicates dropped), after checking each exists and can be stored per
    position of a right-padded batch; otherwise an error naming the hook and why."""
    names = [hooks] if isinstance(hooks, str) else list(hooks)
    if not names:
        raise ValueError("hooks is empty: name the hooks to collect, e.g. ['blocks.2.hook_streams_post']")
    model.check_hook_names(names)
    names = list(dict.fromkeys(names))
    for name in names:
        why = _refusal(model, name)
        if why is not None:
            raise ValueError(f"cannot collect {name}: {why}")
    return names


def _refusal(model, name: str) -> str | None:
    per_prompt = "cache it prompt by prompt with model.run_with_cache instead"
    if name.startswith("mtp."):
        return ("MTP blocks read the token after each position, which after a row's last token is padding in a "
                f"batch; {per_prompt}(tokens, mtp=True)")  # fmt: skip
    if name.startswith("dspark."):
        return f"the DSpark drafter runs only with draft=True, after the last position; {per_prompt}(..., draft=True)"
    if position_axis(name) is None:
        return ("it has no position axis (axis 1 counts compressed entries, each pooling several tokens), so it "
                f"cannot be stored per position; {per_prompt}")  # fmt: skip
    if name.endswith(_CANDIDATE_HOOKS) and model.cfg.compress_ratio(int(name.split(".")[1])) != 0:
        return ("on this compressed-attention layer its last axis counts candidates whose number and numbering "
                "(compressed entry w is S + w) follow the padded batch length, so a row of a batch would not "
                f"match the row run alone; {per_prompt} (on sliding-window layers it can be collected)")  # fmt: skip
    return None


def forward_plan(hooks: list[str]) -> dict:
    """The cheapest forward that fires `hooks`: up to the last block named, or to the logits."""
    if any(n.startswith(_HEAD_HOOKS) for n in hooks):
        return {"return_type": "logits"}
    layers = [int(n.split(".")[1]) for n in hooks if n.startswith("blocks.")]
    return {"stop_at_layer": max(layers, default=-1) + 1}  # 0 for hook_embed alone: no block runs


def positions_rule(positions) -> tuple[str, Callable]:
    """`collect`'s positions argument -> (its description for the manifest, f(row id, tokens [L]) ->
    sorted distinct positions, int64)."""
    if isinstance(positions, str):
        if positions == "last":
            return "last", lambda r, t: torch.tensor([len(t) - 1])
        if positions == "all":
            return "all", lambda r, t: torch.arange(len(t))
        raise ValueError(
            f"positions must be 'last', 'all', an int, a function or a per-row sequence, got {positions!r}"
        )
    if isinstance(positions, int) and not isinstance(positions, bool):
        return f"index {positions}", lambda r, t: _indices(positions, r, t)
    if callable(positions):
        # recorded by name: a resumed collection must pass the same function (its code is not compared)
        name = getattr(positions, "__qualname__", type(positions).__name__)
        return f"function {getattr(positions, '__module__', '?')}.{name}", lambda r, t: _indices(positions(t), r, t)
    if hasattr(positions, "__getitem__") and hasattr(positions, "__len__"):

        def per_row(r, t):
            if r >= len(positions):
                raise IndexError(f"positions has {len(positions)} entries (one per row), but the dataset has row {r}")
            return _indices(positions[r], r, t)

        return "per row", per_row
    raise TypeError(f"positions must be 'last', 'all', an int, a function or a per-row sequence, got {type(positions)}")


def _indices(value, row: int, tokens: torch.Tensor) -> torch.Tensor:
    """A row's chosen positions (a bool mask, an int or int indices) -> sorted distinct positions [P]."""
    L = len(tokens)
    v = torch.as_tensor(value)
    if v.dtype == torch.bool:
        if v.ndim != 1 or v.shape[0] < L or v[L:].any():
            raise ValueError(f"positions of row {row}: a boolean mask needs one entry per token ({L}, any extra "
                             f"entries False), got shape {tuple(v.shape)}")  # fmt: skip
        return v[:L].nonzero()[:, 0].cpu()
    if v.is_floating_point() or v.is_complex() or v.ndim > 1:
        raise ValueError(f"positions of row {row}: expected a boolean mask or int positions, got {v.dtype} "
                         f"of shape {tuple(v.shape)}")  # fmt: skip
    v = v.reshape(-1).long().cpu()
    bad = v[(v < -L) | (v >= L)]
    if bad.numel():
        raise IndexError(f"positions of row {row}: position {bad[0].item()} is out of range for its {L} tokens")
    return torch.unique(v % L)


def row_tokens(model, item, prepend_bos: bool, row: int) -> torch.Tensor:
    """One dataset row -> its token ids, int64 [L] on the CPU."""
    if isinstance(item, dict):
        if "text" in item:
            item = item["text"]
        else:
            key = next((k for k in ("input_ids", "tokens") if k in item), None)
            if key is None:
                raise ValueError(f"dataset row {row} is a dict with keys {sorted(item)}; expected 'text', "
                                 "'input_ids' or 'tokens'")  # fmt: skip
            ids, mask = torch.as_tensor(item[key]), item.get("attention_mask")
            if mask is not None:
                mask = torch.as_tensor(mask).bool()
                if mask.shape != ids.shape:
                    raise ValueError(f"dataset row {row}: attention_mask has shape {tuple(mask.shape)}, "
                                     f"{key} {tuple(ids.shape)}")  # fmt: skip
                ids = ids[mask]
            item = ids
    if isinstance(item, str):
        return model.to_tokens(item, prepend_bos=prepend_bos)[0].cpu()
    t = torch.as_tensor(item)
    if t.ndim == 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"dataset row {row}: expected a text or a 1-D tensor of token ids, got {t.dtype} of "
                         f"shape {tuple(t.shape)}")  # fmt: skip
    if t.numel() == 0:
        raise ValueError(f"dataset row {row} has no tokens")
    V = model.cfg.d_vocab
    if t.min() < 0 or t.max() >= V:
        raise ValueError(f"dataset row {row}: token ids must lie in [0, {V}), got {t.min().item()} .. {t.max().item()}")
    return t.to("cpu", torch.int64)


def _buckets(model, dataset, bucket_rows: int, prepend_bos: bool, max_len: int | None):
    """Yield lists of up to bucket_rows (row id, tokens), in dataset order."""
    bucket = []
    for row, item in enumerate(dataset):
        bucket.append((row, row_tokens(model, item, prepend_bos, row)[:max_len]))
        if len(bucket) == bucket_rows:
            yield bucket
            bucket = []
    if bucket:
        yield bucket


def _batches(bucket: list, batch_size: int):
    """A bucket sorted by length, longest first (an out-of-memory shows at once), cut into batches.
    The order depends only on the bucket, so a resumed collection makes the same batches."""
    ordered = sorted(bucket, key=lambda rt: -len(rt[1]))  # stable: ties keep dataset order
    for i in range(0, len(ordered), batch_size):
        yield ordered[i : i + batch_size]


def _stored(writer: StoreWriter, row: int, tokens: torch.Tensor) -> bool:
    """Whether `row` is in the store already, after checking the store holds these very tokens for it."""
    seen = writer.stored.get(row)
    if seen is None:
        return False
    if seen != (len(tokens), tokens_checksum(tokens)):
        raise ValueError(
            f"dataset row {row} ({len(tokens)} tokens) is not the row stored under that index in {writer.folder} "
            f"({seen[0]} tokens, other token ids): the dataset changed since. Collect into another folder, or "
            "pass overwrite=True to start the store again"
        )
    return True


def run_batch(model, rows: list, hooks: list[str], pick, plan: dict, dtype) -> dict[str, torch.Tensor]:
    """One right-padded forward over `rows` [(row id, tokens)] -> the batch's tensors for the store:
    per row `row_ids`, `row_lengths`, `tokens` (concatenated); per stored position `row`, `position`,
    `token` and each hook's value there ([P, ...], on the CPU)."""
    lengths = [len(t) for _, t in rows]
    pad = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else 0
    tokens = torch.full((len(rows), max(lengths)), pad, dtype=torch.long)  # [B, S]
    picks = []
    for b, (r, t) in enumerate(rows):
        tokens[b, : len(t)] = t
        picks.append(pick(r, t))
    b_idx = torch.cat([torch.full_like(p, b) for b, p in enumerate(picks)])  # [P]
    p_idx = torch.cat(picks)  # [P], all < the row's length: padding is never stored
    on_device = b_idx.to(model.device), p_idx.to(model.device)
    captured: dict[str, torch.Tensor] = {}

    def grab(t: torch.Tensor, hook) -> None:
        if hook.name in captured:
            raise RuntimeError(f"hook {hook.name} fired twice in one forward; collect expects one tensor per hook")
        if position_axis(hook.name) == 2:  # head-first [b, h, p, ...] -> [b, p, h, ...]
            t = t.movedim(2, 1)
        idx = on_device if t.device == on_device[0].device else tuple(i.to(t.device) for i in on_device)
        x = t[idx].detach()  # [P, ...]: only the chosen positions leave the forward (a model placed
        # over several devices has each block's hooks on its own device)
        captured[hook.name] = x.to("cpu", dtype) if dtype is not None and x.is_floating_point() else x.to("cpu")

    with model.hooks(fwd_hooks=[(name, grab) for name in hooks]):
        model(tokens.to(model.device), **plan)
    missing = [n for n in hooks if n not in captured]
    if missing:
        raise RuntimeError(f"hooks {missing} did not fire in a forward of {plan}; docs/hooks.md says when each fires")
    row_ids = torch.tensor([r for r, _ in rows], dtype=torch.long)
    return {
        "row_ids": row_ids, "row_lengths": torch.tensor(lengths, dtype=torch.long),
        "tokens": torch.cat([t for _, t in rows]), "row": row_ids[b_idx], "position": p_idx,
        "token": tokens[b_idx, p_idx], **captured,
    }  # fmt: skip

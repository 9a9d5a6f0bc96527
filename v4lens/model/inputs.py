"""`HookedV4.forward`'s argument checks: every bad argument is an error naming it, nothing is coerced.

Token lists must hold ints (a float or bool is not a token id); `mtp_next_tokens` is [b, n] with
1 <= n <= n_mtp_layers; `stop_at_layer` is an int in [-n_layers, n_layers] (negative counts from
the end, as a slice does in TransformerLens); `logits_to_keep` is an int >= 0.
"""

from __future__ import annotations

import numbers

import torch


def _is_token_id(x) -> bool:
    if isinstance(x, torch.Tensor):  # a 0-d integer tensor, as indexing a token tensor gives
        return x.ndim == 0 and dtype_is_integer(x.dtype)
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def dtype_is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _flat(items):
    for x in items:
        if isinstance(x, (list, tuple)):
            yield from _flat(x)
        else:
            yield x


def token_tensor(value, name: str) -> torch.Tensor:
    """A list / tuple of token ids (possibly nested: rows) or an integer tensor -> an int64 tensor.

    A float or bool anywhere is a TypeError naming `name` (torch.tensor would truncate 1.9 to 1)."""
    if isinstance(value, (list, tuple)):
        bad = next((x for x in _flat(value) if not _is_token_id(x)), None)
        if bad is not None:
            raise TypeError(
                f"{name}: a list of token ids must hold ints, got {type(bad).__name__} {bad!r} "
                "(text goes in as a str or a list of str)"
            )
        try:
            value = torch.tensor(value, dtype=torch.long)
        except (ValueError, TypeError) as err:  # ragged rows
            raise ValueError(f"{name}: the rows of a token list must all have the same length ({err})") from None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be text, a list of texts or an int64 token tensor, got {type(value).__name__}")
    if not dtype_is_integer(value.dtype):
        raise TypeError(f"{name}: tokens must be an integer tensor, got {value.dtype}")
    return value


def check_token_range(tokens: torch.Tensor, d_vocab: int, name: str = "input") -> None:
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= d_vocab:
        raise ValueError(f"{name}: token ids must lie in [0, {d_vocab}), got values in [{lo}, {hi}]")


def _int_arg(value, name: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def stop_layer(stop_at_layer, n_layers: int) -> int | None:
    """None, or an int in [-n_layers, n_layers] -> the number of blocks to run (negative: n_layers + it)."""
    if stop_at_layer is None:
        return None
    stop = _int_arg(stop_at_layer, "stop_at_layer")
    if not -n_layers <= stop <= n_layers:
        raise ValueError(
            f"stop_at_layer must lie in [-{n_layers}, {n_layers}] (this model has {n_layers} blocks; negative "
            f"counts from the end), got {stop}"
        )
    return n_layers + stop if stop < 0 else stop


def keep_count(logits_to_keep) -> int:
    keep = _int_arg(logits_to_keep, "logits_to_keep")
    if keep < 0:
        raise ValueError(f"logits_to_keep must be >= 0 (0 keeps every position), got {keep}")
    return keep


def mtp_tokens(next_tokens, batch: int, n_mtp: int, d_vocab: int, device) -> torch.Tensor:
    """mtp_next_tokens -> int64 [batch, n] on `device`, 1 <= n <= n_mtp (no reshaping)."""
    t = token_tensor(next_tokens, "mtp_next_tokens")
    if t.ndim != 2 or t.shape[0] != batch or not 1 <= t.shape[1] <= n_mtp:
        raise ValueError(
            f"mtp_next_tokens must be [batch={batch}, n] with 1 <= n <= n_mtp_layers={n_mtp}, "
            f"got shape {tuple(t.shape)}"
        )
    check_token_range(t, d_vocab, "mtp_next_tokens")
    return t.to(device=device, dtype=torch.long)


def forward_args(cfg, tokens, return_type, mtp, mtp_next_tokens, past_kv_cache, stop_at_layer, logits_to_keep):
    """`HookedV4.forward`'s options, checked together -> (stop_at_layer as a block count or None,
    logits_to_keep, mtp_next_tokens as int64 [b, n] or None)."""
    if return_type not in ("logits", "loss", "both", None):
        raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
    keep = keep_count(logits_to_keep)
    stop = stop_layer(stop_at_layer, cfg.n_layers)
    if keep and return_type in ("loss", "both"):
        raise ValueError("the loss needs the logits of every position: drop logits_to_keep")
    if stop is not None and (past_kv_cache is not None or mtp):
        raise ValueError("stop_at_layer cannot be combined with past_kv_cache or mtp (later layers would not run)")
    if mtp_next_tokens is not None and not mtp:
        raise ValueError("mtp_next_tokens is only used with mtp=True")
    if mtp_next_tokens is not None and cfg.n_mtp_layers:  # (no MTP block: forward says so)
        mtp_next_tokens = mtp_tokens(mtp_next_tokens, tokens.shape[0], cfg.n_mtp_layers, cfg.d_vocab, tokens.device)
    return stop, keep, mtp_next_tokens

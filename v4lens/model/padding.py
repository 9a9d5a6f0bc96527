"""Padded batches and starting at a block: `HookedV4.forward`'s TransformerLens options
`prepend_bos`, `padding_side`, `attention_mask`, `start_at_layer` and `tokens`.

Right padding needs nothing. V4 looks only backwards everywhere: the sliding window holds earlier
tokens, a compressed entry becomes visible only once all m tokens of its block have passed, the
indexer ranks only visible entries, and the mHC, the router and the experts work token by token.
So pads after a row's real tokens are never read by a real position, and each row's logits and
hooked values at its real positions equal that row run alone (a batch changes only the rounding of
batched matrix products).

Left padding moves the real tokens to later positions: their RoPE angles, which blocks of m tokens
the compressors pool and what the window holds would all change. A forward with an `attention_mask`
(1 = real token; each row's ones in one run) therefore moves each row's real tokens to the front,
runs that right-padded batch and moves the outputs back into the caller's layout: logits equal each
row alone at its real positions. Hooks would see the moved layout, not the caller's, so a batch
that is not right-padded is refused while hooks are attached (`run_with_cache` included): pass it
right-padded, e.g. `model.to_tokens(texts, padding_side="right")` (the default).

`start_at_layer=l` runs blocks l.. on `input`, the streams entering block l [b, p, n, d] (a cache's
`blocks.{l}.hook_streams_pre`); hash-routed blocks (l < cfg.n_hash_layers) and the loss also need
the token ids, as `tokens=` [b, p].

For `generate`: `prompt_tokens` reads the prompts and their mask, `length_groups` splits a padded
batch into groups of rows of equal real length (each group decodes with its own cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformer_lens.utilities.lm_utils import lm_cross_entropy_loss

from .inputs import check_token_range, dtype_is_integer, stop_layer, token_tensor

SIDES = ("left", "right")


def check_side(padding_side, default: str = "right") -> str:
    if padding_side is None:
        return default
    if padding_side not in SIDES:
        raise ValueError(f"padding_side must be 'left', 'right' or None, got {padding_side!r}")
    return padding_side


def text_tokens(model, text, prepend_bos: bool = True, padding_side=None, truncate: bool = True):
    """Text or texts -> (int64 tokens [b, p] on the model's device, bool mask [b, p] or None when no row is padded).

    BOS is prepended unless a text already starts with it (a rendered chat prompt); rows of different
    lengths are padded with the pad token on `padding_side` ("right" when None)."""
    side = check_side(padding_side)
    texts = [text] if isinstance(text, str) else list(text)
    if not texts:
        raise ValueError("to_tokens got an empty list of strings")
    cfg, rows = model.cfg, []
    for i, t in enumerate(texts):
        ids = model._token_ids(t, "text" if len(texts) == 1 else f"text {i}")
        if prepend_bos and (not ids or ids[0] != cfg.bos_token_id):
            ids = [cfg.bos_token_id] + ids
        rows.append(ids[: cfg.max_position_embeddings] if truncate else ids)
    width = max(len(r) for r in rows)
    if not all(rows):
        which = "the text" if len(rows) == 1 else f"text {[len(r) for r in rows].index(0)}"
        raise ValueError(f"{which} tokenizes to nothing; pass non-empty text or prepend_bos=True")
    pad = cfg.pad_token_id
    if pad is None and len({len(r) for r in rows}) > 1:
        raise ValueError("the texts tokenize to different lengths and cfg.pad_token_id is None: nothing to pad with")
    tokens = torch.full((len(rows), width), 0 if pad is None else pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        at = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        tokens[i, at], mask[i, at] = torch.tensor(r, dtype=torch.long), True
    device = model.cfg.device or "cpu"
    return tokens.to(device), (None if bool(mask.all()) else mask.to(device))


def mask_from_pads(tokens: torch.Tensor, pad: int | None, side: str) -> torch.Tensor | None:
    """tokens [b, p] -> bool mask [b, p], False on each row's leading (side="left") or trailing ("right")
    run of pad tokens; None when nothing is padded (TransformerLens reads padding off the pad token too)."""
    if pad is None:
        raise ValueError("padding_side on tokens reads the padding off cfg.pad_token_id, which is None here; "
                         "pass attention_mask= instead")  # fmt: skip
    is_pad = tokens == pad
    if side == "right":
        is_pad = is_pad.flip(1)
    real = (~is_pad).long().cumsum(1) > 0  # from the first non-pad token on
    mask = real.flip(1) if side == "right" else real
    return None if bool(mask.all()) else mask


def check_mask(attention_mask, shape: tuple) -> torch.Tensor | None:
    """An attention mask (bool or 0/1 integers, [b, p] or [p]) -> bool [b, p], or None when every token is real.

    Each row's ones must form one run (left, right or both-sided padding) and no row may be all padding."""
    mask = attention_mask
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a bool or 0/1 integer tensor [batch, pos], got {type(mask).__name__}")
    if not (mask.dtype == torch.bool or dtype_is_integer(mask.dtype)):
        raise TypeError(f"attention_mask must hold bools or 0/1 integers, got {mask.dtype}")
    if mask.ndim == 1:
        mask = mask[None]
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, the tokens {tuple(shape)}")
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"attention_mask must hold 0 and 1 only, got values {sorted(set(mask.unique().tolist()))}")
        mask = mask == 1
    runs = mask[:, :1].long().sum(1) + (mask[:, 1:] & ~mask[:, :-1]).long().sum(1)  # [b] runs of ones per row
    bad = (runs != 1).nonzero()
    if len(bad):
        row = int(bad[0, 0])
        what = "no real token" if int(runs[row]) == 0 else f"{int(runs[row])} separate runs of ones"
        raise ValueError(
            f"attention_mask row {row} has {what}: each row needs one run of real tokens (1s), padded on the left "
            f"and/or right. Row {row}: {mask[row].long().tolist()[:64]}"
        )
    return None if bool(mask.all()) else mask


def real_first(mask: torch.Tensor) -> torch.Tensor | None:
    """bool mask [b, p] -> order [b, p]: the caller's positions with each row's real tokens first, then its pads
    (both in order); None when that is every row's own order (right padding)."""
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices
    same = torch.arange(mask.shape[1], device=mask.device).expand_as(order)
    return None if torch.equal(order, same) else order


def gather_positions(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [b, p, ...] -> t[i, index[i, j], ...] for each row i (index [b, p])."""
    index = index.reshape(*index.shape, *([1] * (t.ndim - 2))).expand_as(t)
    return t.gather(1, index)


def hooks_attached(model) -> bool:
    return any(hp._forward_hooks or hp._backward_hooks for hp in model.hook_dict.values())


@dataclass
class Inputs:
    """What `forward` runs: tokens and/or streams in the layout the blocks see, and how to give results back.

    tokens [b, p] int64 (None: start_at_layer without tokens); streams [b, p, n, d] entering block `start`
    (start_at_layer) or None; mask [b, p] bool in the caller's layout (None: every token real); order [b, p]:
    the caller's position of each position the blocks see (None: the same layout); caller_tokens: tokens
    in the caller's layout (for the loss)."""

    tokens: torch.Tensor | None
    streams: torch.Tensor | None = None
    start: int = 0
    mask: torch.Tensor | None = None
    order: torch.Tensor | None = None
    caller_tokens: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return (self.tokens if self.streams is None else self.streams).shape[0]

    @property
    def device(self) -> torch.device:
        return (self.tokens if self.streams is None else self.streams).device

    def run_type(self, return_type):
        """The model computes logits only when the masked loss is computed here."""
        return "logits" if self.mask is not None and return_type in ("loss", "both") else return_type

    def keep(self, logits_to_keep: int) -> int:
        return 0 if self.order is not None else logits_to_keep  # the caller's last positions are known only after

    def finish(self, out, return_type, per_token: bool, logits_to_keep: int, stopped: bool):
        """The model's output in the layout the blocks saw -> the caller's result."""
        if self.mask is None:
            return out
        back = (lambda t: t) if self.order is None else (lambda t: gather_positions(t, self.order.argsort(1)))
        if stopped:
            return back(out)  # streams [b, p, n, d]
        if return_type is None:
            return None
        logits = back(out)
        if return_type == "logits":
            return logits[:, -logits_to_keep:] if logits_to_keep else logits
        if self.mask[:, 1:].logical_and(self.mask[:, :-1]).sum() == 0:
            raise ValueError("attention_mask leaves no next token to score: every row has a single real token")
        loss = lm_cross_entropy_loss(logits, self.caller_tokens, attention_mask=self.mask, per_token=per_token)
        return loss if return_type == "loss" else (logits, loss)


def model_inputs(model, input, *, prepend_bos=True, padding_side=None, attention_mask=None, start_at_layer=None,
                 tokens=None, stop_at_layer=None, return_type="logits", mtp=False, draft=False,
                 past_kv_cache=None) -> Inputs:  # fmt: skip
    """Check forward's input and its TransformerLens options together -> `Inputs` (module doc)."""
    if not isinstance(prepend_bos, bool):
        raise TypeError(f"prepend_bos must be True or False, got {prepend_bos!r}")
    side = check_side(padding_side, default=None)
    cfg, streams, start = model.cfg, None, 0
    if start_at_layer is None:
        if tokens is not None:
            raise ValueError("tokens= is for start_at_layer (the token ids of the streams it starts from); the "
                             "input itself is the tokens otherwise")  # fmt: skip
        caller, text_mask = _text_or_tokens(model, input, prepend_bos, side)
    else:
        start, text_mask = _start_layer(start_at_layer, cfg.n_layers), None
        streams = _check_streams(model, input)
        caller = None if tokens is None else _check_tokens(model, tokens, streams.shape[:2])
        stop = stop_layer(stop_at_layer, cfg.n_layers)
        if stop is not None and stop < start:
            raise ValueError(f"stop_at_layer ({stop_at_layer} -> block {stop}) is before start_at_layer "
                             f"({start_at_layer} -> block {start}): no block would run")  # fmt: skip
        if mtp or draft or past_kv_cache is not None:
            raise ValueError("start_at_layer cannot be combined with mtp, draft or past_kv_cache (they need every "
                             "layer's run over the tokens)")  # fmt: skip
        if caller is None and start < cfg.n_hash_layers:
            raise ValueError(f"start_at_layer={start_at_layer}: blocks 0..{cfg.n_hash_layers - 1} route experts by "
                             "token id (hash routing): pass tokens=[b, p] with the streams")  # fmt: skip
        if caller is None and return_type in ("loss", "both"):
            raise ValueError(f"return_type={return_type!r} with start_at_layer needs tokens=[b, p] (the targets)")
    x = Inputs(tokens=caller, streams=streams, start=start, caller_tokens=caller)
    shape = (streams if streams is not None else caller).shape[:2]
    if attention_mask is not None:
        x.mask = check_mask(attention_mask.to(x.device), shape)
    elif text_mask is not None:  # left-padded texts: the mask is known from their lengths
        x.mask = text_mask
    elif side == "left" and caller is not None and streams is None:
        x.mask = mask_from_pads(caller, cfg.pad_token_id, "left")  # tokens: TransformerLens reads it off the pads
    if x.mask is None:
        return x
    if mtp or draft or past_kv_cache is not None:
        raise ValueError("a padded batch (attention_mask with zeros) cannot be combined with mtp, draft or "
                         "past_kv_cache: they continue after the last position of every row; run rows of one "
                         "length together")  # fmt: skip
    x.order = real_first(x.mask)
    if x.order is not None:
        if hooks_attached(model):
            raise ValueError(
                "a left-padded batch (attention_mask with zeros before real tokens) runs with each row's real "
                "tokens moved to the front, so hooks would see other positions than the input's. With hooks "
                "attached (run_with_cache, run_with_hooks, hooks()), pass the batch right-padded, e.g. "
                "model.to_tokens(texts, padding_side='right'): V4 looks only backwards, so right padding leaves "
                "every real position as the row alone"
            )
        x.tokens = None if caller is None else caller.gather(1, x.order)
        x.streams = None if streams is None else gather_positions(streams, x.order)
    return x


def is_text(input) -> bool:
    return isinstance(input, str) or (isinstance(input, (list, tuple)) and bool(input) and isinstance(input[0], str))


def _text_or_tokens(model, input, prepend_bos, side) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (tokens [b, p], the mask of left-padded texts or None). Right padding needs no mask (module doc)."""
    if is_text(input):
        tokens, mask = text_tokens(model, input, prepend_bos, side)
        return model._validate_tokens(tokens), (mask if side == "left" else None)
    return model._validate_tokens(input), None


def _start_layer(start_at_layer, n_layers: int) -> int:
    if isinstance(start_at_layer, bool) or not isinstance(start_at_layer, int):
        raise TypeError(f"start_at_layer must be an int, got {type(start_at_layer).__name__} {start_at_layer!r}")
    if not -n_layers <= start_at_layer <= n_layers:
        raise ValueError(f"start_at_layer must lie in [-{n_layers}, {n_layers}] (this model has {n_layers} blocks; "
                         f"negative counts from the end), got {start_at_layer}")  # fmt: skip
    return n_layers + start_at_layer if start_at_layer < 0 else start_at_layer


def _check_streams(model, streams) -> torch.Tensor:
    cfg = model.cfg
    want = f"the streams entering the block [b, p, n={cfg.hc_mult}, d={cfg.d_model}] in {cfg.dtype}"
    if not isinstance(streams, torch.Tensor) or not streams.is_floating_point():
        raise TypeError(f"with start_at_layer the input is {want}, got {type(streams).__name__}"
                        f"{' ' + str(streams.dtype) if isinstance(streams, torch.Tensor) else ''}")  # fmt: skip
    if streams.ndim != 4 or tuple(streams.shape[2:]) != (cfg.hc_mult, cfg.d_model) or 0 in streams.shape[:2]:
        raise ValueError(f"with start_at_layer the input is {want}, got shape {tuple(streams.shape)}")
    if streams.dtype != cfg.dtype:
        raise TypeError(
            f"with start_at_layer the input is {want}, got {streams.dtype}; convert it with .to({cfg.dtype})"
        )
    if streams.device != model.device:
        raise ValueError(f"the streams are on {streams.device} but the model is on {model.device}")
    return streams


def _check_tokens(model, tokens, shape) -> torch.Tensor:
    t = token_tensor(tokens, "tokens")
    if t.ndim == 1:
        t = t[None]
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"tokens must be [b, p] = {tuple(shape)} like the streams, got shape {tuple(t.shape)}")
    check_token_range(t, model.cfg.d_vocab, "tokens")
    return t.to(model.device, torch.long)


# ---------------------------------------------------------------------- generate's prompts
def prompt_tokens(model, input, prepend_bos, padding_side, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`generate`'s input -> (tokens [b, p] as given or tokenized, bool mask [b, p] of real tokens or None)."""
    side = check_side(padding_side, default=None)
    if not isinstance(prepend_bos, bool):
        raise TypeError(f"prepend_bos must be True or False, got {prepend_bos!r}")
    if is_text(input):  # texts of different lengths: padded on the left unless asked otherwise, as TransformerLens does
        tokens, mask = text_tokens(model, input, prepend_bos, side or "left")
        tokens = model._validate_tokens(tokens)
    else:
        tokens, mask = model._validate_tokens(input), None
        if attention_mask is None and side is not None:
            mask = mask_from_pads(tokens, model.cfg.pad_token_id, side)
        elif attention_mask is None:
            refuse_right_padding(tokens, model.cfg.pad_token_id)
    if attention_mask is not None:
        mask = check_mask(attention_mask.to(tokens.device), tokens.shape)
    return tokens, mask


def length_groups(tokens: torch.Tensor, mask: torch.Tensor | None) -> list:
    """tokens [b, p], mask [b, p] or None -> [(rows [g] or None for all, each row's real tokens [g, L])], one per L."""
    if mask is None:
        return [(None, tokens)]
    lengths = mask.sum(1)  # [b]
    groups = []
    for length in sorted(set(lengths.tolist())):
        rows = (lengths == length).nonzero()[:, 0]
        groups.append((rows, tokens[rows][mask[rows]].reshape(len(rows), length)))
    return groups


def refuse_right_padding(tokens: torch.Tensor, pad: int) -> None:
    """tokens [b, p]: rows ending in different numbers of pad tokens are a right-padded batch (what
    to_tokens makes of texts of different lengths): new tokens would follow the pads."""
    if tokens.shape[0] < 2:
        return
    trailing = (tokens == pad).flip(1).long().cumprod(1).sum(1)  # [b] length of each row's final pad run
    lo, hi = int(trailing.argmin()), int(trailing.argmax())
    if trailing[lo] != trailing[hi]:
        raise ValueError(
            f"tokens row {hi} ends in {int(trailing[hi])} pad tokens (id {pad}), row {lo} in {int(trailing[lo])}: "
            "a right-padded batch of prompts of different lengths, whose pads would be read as context; pass "
            "attention_mask (1 on real tokens) or padding_side='right' and each row continues as if alone"
        )

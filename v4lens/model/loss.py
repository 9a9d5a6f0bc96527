"""The language-model loss `HookedV4.forward(return_type="loss")` returns."""

from __future__ import annotations

import torch


def lm_cross_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, per_token: bool = False, pad_token_id: int | None = None
) -> torch.Tensor:
    """Next-token cross-entropy: logits [b,p,V] fp32, tokens [b,p] -> scalar (or [b,p-1]).

    pad_token_id: right padding does not count (as TransformerLens masks pads): a target equal to it
    after its row's last other token (how `to_tokens` pads texts of different lengths) is left out
    of the mean, and its per-token loss is NaN (0 would read as a perfect prediction).
    """
    if tokens.shape[1] < 2:
        raise ValueError("a loss needs at least two tokens per sequence")
    logprobs = logits[:, :-1].log_softmax(-1)
    nll = -logprobs.gather(-1, tokens[:, 1:, None])[..., 0]
    if pad_token_id is None:
        return nll if per_token else nll.mean()
    # real[i, t]: token t is at or before row i's last non-pad token
    real = ((tokens != pad_token_id).flip(-1).cumsum(-1).flip(-1) > 0)[:, 1:]
    if per_token:
        return nll.masked_fill(~real, float("nan"))
    if not real.any():
        raise ValueError(f"every target is padding (pad_token_id={pad_token_id}): no next token to score")
    return nll.mean() if real.all() else nll[real].mean()

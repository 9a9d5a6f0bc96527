"""Text generation with hooks: greedy or sampled, one full forward per new token.

Every step runs the whole sequence through the model (no incremental KV / compressor cache
yet), so hooks see every position at every step, exactly as in a plain forward, and a hook that
edits activations changes what is generated. Cost grows with the square of the length: fine
for interpretability-sized generations, not for long ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Generation:
    """What `generate` returns.

    tokens [b, prompt + new] (after EOS a row is padded with `pad_token_id`); new_tokens [b, new];
    text: the decoded new tokens per row (when a tokenizer is available); caches: one activation
    cache per step when asked for; mtp_drafts [b, steps] the MTP head's prediction, at each step,
    of the token after the next one (-1 where no such step followed), and mtp_acceptance: the
    fraction of drafts the model then generated itself.
    """

    tokens: torch.Tensor
    new_tokens: torch.Tensor
    text: list[str] | None = None
    caches: list = field(default_factory=list)
    mtp_drafts: torch.Tensor | None = None
    mtp_acceptance: float | None = None


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """logits [b, V] -> token ids [b]: argmax if temperature == 0, else a sample from the
    temperature-scaled distribution restricted to the top-k tokens and the top-p nucleus."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model, input, max_new_tokens: int = 20, *, temperature: float = 0.0, top_k: int | None = None,
    top_p: float | None = None, seed: int | None = None, stop_at_eos: bool = True,
    eos_token_id: int | None = None, fwd_hooks: Sequence = (), cache_steps: bool = False,
    names_filter=None, mtp: bool = False, stream: Callable[[torch.Tensor], None] | None = None,
    chat: bool = False, thinking: bool = False,
) -> Generation:  # fmt: skip
    """Generate up to `max_new_tokens` tokens after `input`.

    input: text, a list of texts, tokens [b, p], or (chat=True) a list of {"role", "content"}
    messages rendered with the V4 chat template (`thinking` picks its mode).
    temperature 0 = greedy; otherwise sampling with optional top_k / top_p, reproducible with `seed`.
    stop_at_eos: a row stops after emitting EOS (`eos_token_id`, default the config's); the rest
    keep going until all stopped or max_new_tokens.
    fwd_hooks: (name, fn) pairs active at every step (edits change the generation);
    cache_steps: keep each step's `V4ActivationCache` (only `names_filter` hooks if given).
    mtp: also read the MTP head at each step and report its drafts and acceptance rate.
    stream: called with the new token ids [b] after every step.

    Example::

        out = model.generate("The capital of France is", max_new_tokens=5)
        out.text, out.new_tokens
    """
    if chat:
        from .tokenizer import render_chat

        text = render_chat(list(input), thinking=thinking)
        tokens = model.to_tokens(text, prepend_bos=False)  # the template starts with BOS
    else:
        tokens = model._validate_tokens(input)
    if mtp and not len(model.mtp):
        raise ValueError("mtp=True needs a model with an MTP block (cfg.n_mtp_layers > 0)")
    eos = model.cfg.eos_token_id if eos_token_id is None else eos_token_id
    generator = torch.Generator(device=tokens.device).manual_seed(seed) if seed is not None else None
    b = tokens.shape[0]
    done = torch.zeros(b, dtype=torch.bool, device=tokens.device)
    caches, drafts, new = [], [], []
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        for _ in range(max_new_tokens):
            if cache_steps:
                out, cache = model.run_with_cache(tokens, mtp=mtp, names_filter=names_filter)
                caches.append(cache)
            else:
                out = model(tokens, mtp=mtp)
            logits, mtp_logits = (out[0], out[1][0]) if mtp else (out, None)
            next_tokens = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
            next_tokens = torch.where(done, model.cfg.pad_token_id, next_tokens)
            if mtp:
                # the MTP head at the last position drafts token t+2 after the greedy draft of t+1
                drafts.append(torch.where(done, -1, mtp_logits[:, -1].argmax(-1)))
            new.append(next_tokens)
            tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
            if stream is not None:
                stream(next_tokens)
            if stop_at_eos:
                done = done | (next_tokens == eos)
                if bool(done.all()):
                    break
    new_tokens = torch.stack(new, dim=1) if new else tokens[:, :0]
    result = Generation(tokens=tokens, new_tokens=new_tokens, caches=caches)
    if mtp and drafts:
        result.mtp_drafts, result.mtp_acceptance = _mtp_readout(torch.stack(drafts, dim=1), new_tokens)
    try:
        result.text = [model.to_string(row) for row in new_tokens]
    except Exception:  # no tokenizer: ids only
        result.text = None
    return result


def _mtp_readout(drafts: torch.Tensor, new_tokens: torch.Tensor) -> tuple[torch.Tensor, float | None]:
    """Draft at step i predicts new token i+1: acceptance = the share of drafts that came true."""
    drafts = drafts.clone()
    drafts[:, -1] = -1  # the last step's draft has no following step to check against
    checked = drafts[:, :-1] >= 0
    hits = (drafts[:, :-1] == new_tokens[:, 1:]) & checked
    n = int(checked.sum())
    return drafts, (int(hits.sum()) / n if n else None)

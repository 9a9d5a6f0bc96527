"""Text generation with hooks: greedy or sampled, incremental (`V4KVCache`) or full forwards,
optionally speculative with the MTP head or the DSpark drafter (v4lens.speculative).

Hooks are active at every step, so a hook that edits activations changes what is generated.
By default each step runs only the new token against the decoding cache (the same logits as a
full forward); `use_cache=False` reruns the whole sequence every step, so hooks see every
position each time.

The signature is TransformerLens's `HookedTransformer.generate` (do_sample, top_k, top_p,
temperature, stop_at_eos, use_past_kv_cache, prepend_bos, padding_side, return_type "input" /
"str" / "tokens", verbose) plus v4lens's options; `return_type="generation"` gives the whole
`Generation` record (new tokens, text, per-step caches, MTP and DSpark statistics).

Prompts of different lengths (a list of texts, or tokens with an `attention_mask`) each continue
exactly as if generated alone: the decoding cache holds one length for all its rows, so rows of
equal length decode together, one forward per length per step (hooks see each such group as a
batch of its own).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .model.kv_cache import V4KVCache
from .model.padding import is_text, length_groups, prompt_tokens
from .speculative import _Picker, speculate_dspark, speculate_mtp, token_probs


@dataclass
class Generation:
    """What `generate(..., return_type="generation")` returns.

    tokens [b, prompt + new]: the prompt as given (padding included), then the new tokens (after EOS a
    row is padded with `pad_token_id`); new_tokens [b, new];
    text: the decoded new tokens per row (when a tokenizer is available); caches: one activation
    cache per step when asked for; mtp_drafts [b, steps] the MTP head's prediction, at each step,
    of the token after the next one (-1 where no such step followed), and mtp_acceptance: the
    fraction of drafts the model then generated itself (with speculative decoding: the fraction
    of verified drafts kept); forwards: how many model forwards the generation took.
    With DSpark speculative decoding: rounds, one `DraftRound` per round (drafts, confidences,
    how many were verified and kept), and draft_acceptance, the fraction of verified drafts the
    acceptance rule kept (per live row; `v4lens.analysis.drafts` reads both).
    """

    tokens: torch.Tensor
    new_tokens: torch.Tensor
    text: list[str] | None = None
    caches: list = field(default_factory=list)
    mtp_drafts: torch.Tensor | None = None
    mtp_acceptance: float | None = None
    forwards: int = 0
    rounds: list = field(default_factory=list)
    draft_acceptance: float | None = None


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """logits [b, V] -> token ids [b]: argmax if temperature == 0, else a sample from the
    temperature-scaled distribution restricted to the top-k tokens and the top-p nucleus."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    probs = token_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


RETURN_TYPES = ("input", "str", "tokens", "generation")


@torch.no_grad()
def generate(
    model, input, max_new_tokens: int = 20, *, do_sample: bool | None = None, temperature: float | None = None,
    top_k: int | None = None, top_p: float | None = None, seed: int | None = None, stop_at_eos: bool = True,
    eos_token_id: int | None = None, fwd_hooks: Sequence = (), cache_steps: bool = False,
    names_filter=None, mtp: bool = False, stream: Callable[[torch.Tensor], None] | None = None,
    chat: bool = False, thinking: bool = False, use_cache: bool | None = None, use_past_kv_cache: bool | None = None,
    speculative: bool = False, draft_threshold: float | None = None, prepend_bos: bool = True,
    padding_side: str | None = None, attention_mask: torch.Tensor | None = None, return_type: str = "input",
    verbose: bool = False,
):  # fmt: skip
    """Generate up to `max_new_tokens` tokens after `input`.

    input: text, a list of texts, tokens [b, p], or (chat=True) a string (one user turn) or a list of
    {"role", "content"} messages rendered with the V4 chat template (`thinking` picks its mode).
    Text with a lone surrogate is refused, naming its position. prepend_bos: for text.
    Prompts of different lengths: a list of texts is padded on `padding_side` (default "left", as
    TransformerLens does); tokens take an `attention_mask` [b, p] (1 = real token, one run per row) or
    `padding_side` (the mask read off the pad tokens). Each row continues exactly as if generated alone
    (greedy: the same tokens); the output keeps the input's padding, new tokens after it. Tokens
    that end in different numbers of pad tokens without either are refused (the pads would be read
    as context).
    return_type (TransformerLens's): "input" (the default: "str" for text, "tokens" for tokens), "str"
    (prompt and continuation decoded without special tokens: a str for one row, else a list), "tokens"
    (int64 [b, p + new]: the prompt, then the new tokens) or "generation" (the `Generation` record).
    do_sample: False = greedy; True samples at `temperature` (1.0 when not given; TransformerLens's
    default). When do_sample is None, as by default, a temperature > 0 samples and otherwise decoding
    is greedy (unlike TransformerLens, whose default is to sample). Sampling takes optional top_k (>= 1) /
    top_p (in (0, 1]) and is reproducible with `seed`; max_new_tokens: an int >= 0. Anything else is an
    error naming the argument. verbose: a progress bar over the new tokens.
    stop_at_eos: a row stops after emitting EOS (`eos_token_id`, default the config's); the rest
    keep going until all stopped or max_new_tokens.
    fwd_hooks: (name, fn) pairs active at every step (edits change the generation);
    cache_steps: keep each step's `V4ActivationCache` (only `names_filter` hooks if given).
    use_cache (or TransformerLens's name, use_past_kv_cache; default True): decode incrementally with
    a `V4KVCache` (prefill, then one token per step: the same logits as full forwards, each step
    costs O(window + top-k + entries)); then a step's
    hooks and cache cover the new position only (the prefill: the prompt, the heads' hooks its
    last position). use_cache=False runs the whole sequence every step (hooks see every
    position each time; cost grows as n²).
    mtp: also read the MTP head at each step and report its drafts and acceptance rate.
    speculative: greedy decoding that verifies the MTP head's draft of the token after next in the
    same forward as the next token, keeping it when the model agrees (up to 2 tokens per
    forward); the output equals plain greedy decoding (exactly in fp32; in bf16 a two-token
    forward rounds differently from one-token steps, as the cache itself rounds differently
    from full forwards, so near-tied argmaxes can flip). Hooks then see the verification
    forwards (a rejected draft's position included). On a DSpark model (0731 / 0813 configs)
    speculative=True drafts dspark_block_size tokens per round from the cache's context ring and
    verifies them in one forward: greedy (the tokens of plain greedy decoding) or sampled with
    temperature / top_k / top_p and `seed` (lossless speculative sampling: the main model's
    distribution); per-round statistics in `Generation.rounds` (v4lens.speculative).
    draft_threshold: DSpark only; verify drafts while their predicted survival Π σ(c_j) (the
    confidence head) stays >= this value in (0, 1]; None verifies all of them.
    stream: called with the new token ids [b] after every token.

    Example::

        model.generate("The capital of France is", max_new_tokens=5)          # the text, continued
        out = model.generate(tokens, 5, return_type="generation")             # out.new_tokens, out.text, ...
    """
    max_new_tokens = _count("max_new_tokens", max_new_tokens)
    temperature = _temperature(do_sample, temperature, top_k, top_p)
    use_cache = _use_cache(use_cache, use_past_kv_cache)
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
    if return_type == "input":
        return_type = "str" if chat or is_text(input) else "tokens"
    if chat:
        from .tokenizer import render_chat

        if attention_mask is not None or padding_side is not None:
            raise ValueError("chat=True renders one conversation: attention_mask / padding_side do not apply")
        text = render_chat(_chat_messages(input), thinking=thinking)
        tokens, mask = model.to_tokens(text, prepend_bos=False), None  # the template starts with BOS
    else:
        _check_texts(input)
        tokens, mask = prompt_tokens(model, input, prepend_bos, padding_side, attention_mask)
    if mask is not None and (speculative or cache_steps):
        raise ValueError("prompts of different lengths decode in groups of equal length: speculative=True and "
                         "cache_steps=True need one batch; generate each length on its own")  # fmt: skip
    dspark = speculative and model.cfg.draft == "dspark"
    if mtp and not len(model.mtp):
        raise ValueError("mtp=True needs a model with an MTP block (cfg.n_mtp_layers > 0 on an April config)")
    if speculative and not (len(model.mtp) or dspark):
        raise ValueError("speculative=True needs a draft module: an MTP block or a DSpark drafter")
    if speculative and (cache_steps or not use_cache or (temperature > 0 and not dspark)):
        raise ValueError("speculative=True decodes with the KV cache (no cache_steps or use_cache=False); with the MTP "
                         "head it is greedy only (no temperature)")  # fmt: skip
    _check_threshold(draft_threshold, dspark)
    run = _Run(model, tokens, max_new_tokens, stop_at_eos, eos_token_id, stream, verbose)
    generator = _generator(seed, tokens.device) if seed is not None else None
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        if dspark:
            speculate_dspark(model, run, V4KVCache(), _Picker(temperature, top_k, top_p, generator), draft_threshold)
        elif speculative:
            speculate_mtp(model, run, V4KVCache())
        else:
            sampling = (temperature, top_k, top_p, generator)
            _decode(model, run, length_groups(tokens, mask), use_cache, mtp, cache_steps, names_filter, sampling)
    out = run.result(model, mtp and not speculative)
    if return_type == "generation":
        return out
    if return_type == "tokens":
        return out.tokens
    texts = [model.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in out.tokens]
    return texts[0] if len(texts) == 1 else texts


def _decode(model, run, groups, use_cache, mtp, cache_steps, names_filter, sampling) -> None:
    """Plain decoding, one token per row per step; `groups` [(rows or None for all, prompt [g, L])]: rows of
    one real length, each group with its own decoding cache (one forward per group per step)."""
    kvs = [V4KVCache() if use_cache else None for _ in groups]
    while not run.finished:
        step = torch.empty_like(run.done, dtype=torch.long)  # [b] this step's token per row
        drafts = torch.full_like(step, -1)
        for (rows, prompt), kv in zip(groups, kvs):
            at = slice(None) if rows is None else rows
            if not run.new:  # the prefill
                feed = prompt
            elif use_cache:
                feed = run.new[-1][at][:, None]
            else:
                feed = torch.cat([prompt, torch.stack(run.new, dim=1)[at]], dim=1)
            # (with the cache only the last position's logits are needed: a long prompt's
            # all-position logits would dominate the prefill's memory)
            kwargs = {"mtp": mtp, "past_kv_cache": kv, "logits_to_keep": 1 if use_cache else 0}
            if cache_steps:
                out, cache = model.run_with_cache(feed, names_filter=names_filter, **kwargs)
                run.caches.append(cache)
            else:
                out = model(feed, **kwargs)
            run.forwards += 1
            logits, mtp_logits = (out[0], out[1][0]) if mtp else (out, None)
            if mtp:  # the MTP head at the last position drafts token t+2 after the greedy draft of t+1
                drafts[at] = mtp_logits[:, -1].argmax(-1)
            step[at] = sample_next(logits[:, -1], *sampling)
        if mtp:
            run.drafts.append(torch.where(run.done, -1, drafts))
        run.emit(step)


# ---------------------------------------------------------------------- argument checks
def _temperature(do_sample, temperature, top_k, top_p) -> float:
    """(do_sample, temperature) -> the temperature to decode at (0 = greedy); see `generate`."""
    if do_sample is not None and not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be True, False or None, got {type(do_sample).__name__} {do_sample!r}")
    check_sampling(0.0 if temperature is None else temperature, top_k, top_p)
    if temperature is None:
        temperature = 1.0 if do_sample else 0.0
    return 0.0 if do_sample is False else temperature


def _use_cache(use_cache, use_past_kv_cache) -> bool:
    given = {
        name: v for name, v in (("use_cache", use_cache), ("use_past_kv_cache", use_past_kv_cache)) if v is not None
    }
    for name, value in given.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if len(set(given.values())) > 1:
        raise ValueError(f"use_cache={use_cache} and use_past_kv_cache={use_past_kv_cache} disagree (one name, "
                         "TransformerLens's, for the other)")  # fmt: skip
    return next(iter(given.values()), True)


def check_sampling(temperature, top_k, top_p) -> None:
    """Refuse settings that would silently mean something else: a negative temperature used to mean
    greedy, top_p 0 sampled from nothing, top_k 0 failed deep inside topk."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        kind = type(temperature).__name__
        raise TypeError(f"temperature must be a number >= 0 (0 = greedy), got {kind} {temperature!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None:
        top_k = _count("top_k", top_k, what="a positive int or None")
        if top_k < 1:
            raise ValueError(f"top_k must be a positive int or None (no limit), got {top_k}")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
            raise TypeError(f"top_p must be a number in (0, 1] or None, got {type(top_p).__name__} {top_p!r}")
        if not 0 < top_p <= 1:  # also refuses NaN
            raise ValueError(f"top_p must lie in (0, 1] (1 or None = no nucleus cut), got {top_p}")


def _check_threshold(threshold, dspark: bool) -> None:
    if threshold is None:
        return
    if not dspark:
        raise ValueError("draft_threshold is for speculative=True on a DSpark model (its confidence head)")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 < threshold <= 1:
        raise ValueError(f"draft_threshold must be a number in (0, 1] (a predicted survival), got {threshold!r}")


def _count(name: str, value, what: str = "an int >= 0") -> int:
    """An int argument (Python, numpy or 0-d tensor int); floats and bools are refused, not rounded."""
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}") from None
    if n < 0:
        raise ValueError(f"{name} must be {what}, got {n}")
    return n


def _generator(seed, device) -> torch.Generator:
    seed = _count("seed", seed, what="an int in [0, 2**64)")
    try:
        return torch.Generator(device=device).manual_seed(seed)
    except (RuntimeError, ValueError, OverflowError) as e:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed} ({e})") from None


def _chat_messages(input) -> list[dict]:
    """chat=True input: a string is one user turn; otherwise a list of {"role", "content"} messages."""
    from .tokenizer import check_text

    if isinstance(input, str):
        input = [{"role": "user", "content": input}]
    if not isinstance(input, (list, tuple)) or not input or not all(isinstance(m, dict) and "role" in m for m in input):
        raise TypeError(
            "chat=True expects a string (one user turn) or a non-empty list of {'role': ..., 'content': ...} "
            f"messages, got {type(input).__name__}: {str(input)[:80]}"
        )
    for i, message in enumerate(input):
        for key, value in message.items():
            if isinstance(value, str):
                check_text(value, f"chat message {i} {key!r}")
    return list(input)


def _check_texts(input) -> None:
    """Lone surrogates: an error naming the text and position instead of the tokenizer's TypeError."""
    from .tokenizer import check_text

    if isinstance(input, str):
        check_text(input)
    elif isinstance(input, (list, tuple)):
        for i, text in enumerate(input):
            if isinstance(text, str):
                check_text(text, f"text {i}")


class _Run:
    """Bookkeeping shared by plain and speculative decoding: emitted tokens, EOS, budget, streaming."""

    def __init__(self, model, tokens, max_new_tokens, stop_at_eos, eos_token_id, stream, verbose=False):
        self.tokens, self.max_new_tokens, self.stop_at_eos, self.stream = tokens, max_new_tokens, stop_at_eos, stream
        self.bar = None
        if verbose:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max_new_tokens, desc="generate", unit="token")
        self.eos = model.cfg.eos_token_id if eos_token_id is None else eos_token_id
        self.pad = model.cfg.pad_token_id
        self.done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        self.new, self.caches, self.drafts, self.rounds = [], [], [], []
        self.forwards, self.verified, self.accepted = 0, 0, 0

    @property
    def finished(self) -> bool:
        return len(self.new) >= self.max_new_tokens or bool(self.done.all())

    def emit(self, next_tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (pad after a row's EOS); returns what was appended."""
        next_tokens = torch.where(self.done, self.pad, next_tokens)
        self.new.append(next_tokens)
        self.tokens = torch.cat([self.tokens, next_tokens[:, None]], dim=1)
        if self.stream is not None:
            self.stream(next_tokens)
        if self.bar is not None:
            self.bar.update(1)
        if self.stop_at_eos:
            self.done = self.done | (next_tokens == self.eos)
        return next_tokens

    def result(self, model, mtp_readout: bool) -> Generation:
        if self.bar is not None:
            self.bar.close()
        new_tokens = torch.stack(self.new, dim=1) if self.new else self.tokens[:, :0]
        result = Generation(tokens=self.tokens, new_tokens=new_tokens, caches=self.caches, forwards=self.forwards)
        if mtp_readout and self.drafts:
            result.mtp_drafts, result.mtp_acceptance = _mtp_readout(torch.stack(self.drafts, dim=1), new_tokens)
        if self.rounds:
            result.rounds = self.rounds
            result.draft_acceptance = self.accepted / self.verified if self.verified else None
        elif self.verified:
            result.mtp_acceptance = self.accepted / self.verified
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

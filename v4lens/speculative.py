"""Speculative decoding: a draft module guesses tokens ahead and one forward of the main model checks them.

- MTP (April V4): the MTP head guesses the token after the next one; greedy only (`speculate_mtp`).
- DSpark (0731 / 0813): the drafter guesses K tokens after the next one every round; greedy or
  sampled, and lossless either way (`speculate_dspark`): greedy gives plain greedy decoding's tokens,
  sampling gives tokens distributed as the main model's (standard speculative sampling).

One DSpark round. The cache holds positions 0..p; x, the token at p+1, is chosen but not yet run.
 1. draft y_1..y_K from the cache's context ring with anchor x (`draft_from_cache`: no main forward);
    sampled drafts are drawn from q_k, the softmax of the Markov-corrected logits at the temperature;
 2. verify n <= K drafts: all, or while the predicted survival Π σ(c_j) stays >= `draft_threshold`
    (confidence decides how many drafts are worth checking, never whether one is accepted);
 3. one forward of [x, y_1..y_n] gives the main model's distributions p_0..p_n at p+1..p+n+1;
 4. greedy keeps y_{i+1} while it equals argmax p_i; sampling keeps it with probability
    min(1, p_i(y)/q_i(y)) and replaces the first rejection by a draw from the residual
    max(0, p_i - q_i); when all n are kept a bonus token is drawn from p_n;
 5. the rows of a batch share the cache's length, so the batch keeps m = the fewest drafts a live row
    kept; a row that kept more emits its accepted y_{m+1} as its next token (an accepted draft is a
    draw from p_m, so nothing is biased) and drafts again from there next round;
 6. if m < n the cache is rolled back (snapshot / restore) and [x, y_1..y_m] runs again, so the
    cache only ever holds kept tokens; the token chosen in 4-5 is the next round's x.
Hooks see every forward: the drafting passes, the verification forwards (rejected positions
included) and the reruns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model.kv_cache import V4KVCache


@dataclass
class DraftRound:
    """One DSpark round of speculative decoding (b rows, K = dspark_block_size).

    drafts [b,K] int64 and confidences [b,K] fp32 (raw logits c_k) as drafted; verified: how many
    drafts the main model checked (n <= K); accepted [b] int64: the drafts each row's rule kept
    (0..verified; -1 for a row that had already finished); kept: the drafts the batch kept (the
    fewest over live rows), so the round emitted kept + 1 tokens.
    """

    drafts: torch.Tensor
    confidences: torch.Tensor
    verified: int
    accepted: torch.Tensor
    kept: int


def token_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                top_p: float | None = None) -> torch.Tensor:  # fmt: skip
    """logits [..., V] -> the sampling distribution [..., V] fp32: temperature-scaled (> 0), restricted to
    the top-k tokens and the top-p nucleus (the smallest prefix of the sorted tokens reaching top_p)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(-1)


class _Picker:
    """How a token is chosen from logits: argmax (temperature 0) or a draw from `token_probs`."""

    def __init__(self, temperature, top_k, top_p, generator):
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return token_probs(logits, self.temperature, self.top_k, self.top_p)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [b,V] -> tokens [b]."""
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]

    def __call__(self, logits: torch.Tensor):
        """logits [b,V] -> (tokens [b], probs [b,V] or None): what the Markov walk of the drafter calls."""
        if self.greedy:
            return logits.argmax(-1), None
        probs = self.probs(logits)
        return self.draw(probs), probs


def speculate_dspark(model, run, kv: V4KVCache, picker: _Picker, threshold: float | None) -> None:
    """Decode `run` (generate's bookkeeping) with the DSpark drafter; see the module docstring."""
    from .model.dspark import draft_from_cache

    if run.finished:
        return
    logits = model(run.tokens, past_kv_cache=kv, logits_to_keep=1)
    run.forwards += 1
    x = run.emit(picker(logits[:, -1])[0])
    K = model.cfg.dspark_block_size
    while not run.finished:
        budget = run.max_new_tokens - len(run.new) - 1  # drafts this round may still emit
        if budget == 0:  # one token left: a plain step, nothing to draft
            run.emit(picker(model(x[:, None], past_kv_cache=kv, logits_to_keep=1)[:, -1])[0])
            run.forwards += 1
            return
        draft = draft_from_cache(model, kv, x, pick=None if picker.greedy else picker)
        live = ~run.done
        y = torch.where(run.done[:, None], run.pad, draft.tokens)  # a finished row feeds pads, as plain decoding does
        n = min(_to_verify(draft.confidences, live, threshold, K), budget)
        before = kv.snapshot()
        logits = model(torch.cat([x[:, None], y[:, :n]], dim=1), past_kv_cache=kv)  # [b, n+1, V]
        run.forwards += 1
        ok, nxt = _judge(logits, y[:, :n], draft, picker, n)  # ok [b,n]; nxt [b,n+1]: the token after i kept drafts
        accepted = torch.where(live, ok.long().cumprod(1).sum(1), -1)
        m = int(accepted[live].min()) if bool(live.any()) else n
        run.rounds.append(DraftRound(draft.tokens, draft.confidences, n, accepted, m))
        run.verified += n * int(live.sum())
        run.accepted += int(accepted[live].sum())
        start = x
        for i in range(m):
            run.emit(y[:, i])
            if run.finished:
                return
        # the next token: a row that kept more than m drafts has its accepted y_{m+1}, the others their pick
        x = run.emit(torch.where(accepted > m, y[:, m], nxt[:, m]) if m < n else nxt[:, m])
        if m < n and not run.finished:  # the cache ran rejected drafts: back to the kept tokens
            kv.restore(before)
            model(torch.cat([start[:, None], y[:, :m]], dim=1), past_kv_cache=kv, return_type=None)
            run.forwards += 1


def _to_verify(confidences: torch.Tensor, live: torch.Tensor, threshold: float | None, K: int) -> int:
    """How many drafts to verify: all K, or per row the drafts whose predicted survival Π σ(c_j) is
    >= threshold, the most over the live rows (a row that wanted fewer costs nothing to check further)."""
    if threshold is None:
        return K
    survival = torch.sigmoid(confidences.float()).cumprod(1)  # [b,K]
    wanted = (survival >= threshold).long().cumprod(1).sum(1)
    return int(wanted[live].max()) if bool(live.any()) else 0


def _judge(logits: torch.Tensor, y: torch.Tensor, draft, picker: _Picker, n: int):
    """The acceptance rule: logits [b,n+1,V] of the main model at x, y_1..y_n; y [b,n] the drafts.
    -> ok [b,n] (draft i kept by its own test), nxt [b,n+1] (the token to emit after i kept drafts:
    the main pick where i = n, else the correction at the first rejection)."""
    if picker.greedy:
        main = logits.argmax(-1)  # [b,n+1]
        return y == main[:, :n], main
    p = picker.probs(logits)  # [b,n+1,V]
    q = draft.probs[:, :n]
    p_y, q_y = p[:, :n].gather(-1, y[..., None])[..., 0], q.gather(-1, y[..., None])[..., 0]
    u = torch.rand(p_y.shape, generator=picker.generator, device=p_y.device)
    ok = u * q_y < p_y  # kept with probability min(1, p/q)
    residual = torch.cat([(p[:, :n] - q).clamp(min=0), p[:, n:]], dim=1)  # after all n: the bonus from p_n
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p)  # p == q: a rejection cannot happen
    b = residual.shape[0]
    nxt = picker.draw(residual.flatten(0, 1)).view(b, n + 1)
    return ok, nxt


def speculate_mtp(model, run, kv: V4KVCache) -> None:
    """Greedy decoding with the MTP head as a one-token drafter.

    Invariant at the top of the loop: the cache holds positions 0..p-1, `x` (position p) is
    emitted but not yet run, and `draft` is the MTP head's guess for position p+1 (the MTP block
    at p-1 reads x, and predicts two ahead). One forward over [x, draft] gives the greedy token
    after x and, if that equals the draft, the one after the draft too. On a mismatch the cache is
    rolled back and [x, greedy token] is run instead, so the cache only ever holds the greedy path.
    """
    if run.finished:
        return
    logits, (mtp_logits,) = model(run.tokens, past_kv_cache=kv, mtp=True, logits_to_keep=1)
    run.forwards += 1
    x, draft = run.emit(logits[:, -1].argmax(-1)), mtp_logits[:, -1].argmax(-1)
    while not run.finished:
        draft = torch.where(run.done, run.pad, draft)  # a finished row feeds pads, as plain decoding does
        before = kv.snapshot()
        logits, (mtp_logits,) = model(torch.stack([x, draft], dim=1), past_kv_cache=kv, mtp=True)
        run.forwards += 1
        greedy = torch.where(run.done, run.pad, logits[:, 0].argmax(-1))
        live = ~run.done
        run.verified += int(live.sum())
        if not bool((greedy == draft).all()):
            run.accepted += int(((greedy == draft) & live).sum())  # rows that agreed still count
            kv.restore(before)
            logits, (mtp_logits,) = model(torch.stack([x, greedy], dim=1), past_kv_cache=kv, mtp=True)
            run.forwards += 1
        else:
            run.accepted += int(live.sum())
        run.emit(greedy)
        if run.finished:
            break
        x, draft = run.emit(logits[:, 1].argmax(-1)), mtp_logits[:, 1].argmax(-1)

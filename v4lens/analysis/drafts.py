"""What a drafter's users ask of it (DSpark, V4-Flash-0731 / V4-Pro-0813).

- `draft_calibration`: is the confidence head calibrated? Per draft position k, the observed
  survival (drafts 0..k all kept by the acceptance rule) against the predicted survival
  Π_{j<=k} σ(c_j), and the conditional rate (k kept given 0..k-1 kept) against σ(c_k); plus a
  reliability curve over bins of predicted survival. Reads the rounds of
  `generate(..., speculative=True)`.
- `draft_sources`: how much of each draft comes from the stages and how much from the Markov
  head: the drafted token's share of the base logits U_k (the stages through the shared head) and
  of the Markov bias markov_w2 · markov_w1[y_k], and where the bias changed the pick.

    out = model.generate(prompt, max_new_tokens=200, speculative=True, return_type="generation")
    cal = draft_calibration(out)            # cal.observed, cal.predicted, cal.bins ...
    _, draft = model(tokens, draft=True)
    src = draft_sources(draft)              # src.stage_logit, src.markov_logit, src.markov_decided
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftCalibration:
    """Calibration of the confidence head over speculative rounds (K = block size).

    counts [K]: drafts checked at position k (verified, in a live row); observed [K]: the fraction
    of them whose drafts 0..k were all kept; predicted [K]: the mean predicted survival
    Π_{j<=k} σ(c_j) over the same drafts. conditional_counts [K], conditional_observed [K],
    conditional_predicted [K]: the same for k given that 0..k-1 were kept (rate of k kept vs the
    mean σ(c_k)). bins: (edges [n+1], predicted mean [n], observed [n], counts [n]) of the predicted
    survival of every checked draft (NaN in an empty bin). Rates are NaN where nothing was checked.
    """

    counts: torch.Tensor
    observed: torch.Tensor
    predicted: torch.Tensor
    conditional_counts: torch.Tensor
    conditional_observed: torch.Tensor
    conditional_predicted: torch.Tensor
    bins: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

    def rows(self) -> list[dict]:
        """One dict per draft position, "draft" 1..K as the figures label them (for a table or a DataFrame)."""
        return [
            {"draft": k + 1, "checked": int(self.counts[k]), "observed_survival": float(self.observed[k]),
             "predicted_survival": float(self.predicted[k]), "kept_given_previous": float(self.conditional_observed[k]),
             "mean_confidence": float(self.conditional_predicted[k])}
            for k in range(self.counts.shape[0])
        ]  # fmt: skip


def draft_calibration(rounds, n_bins: int = 10) -> DraftCalibration:
    """rounds: a `Generation` (`generate(..., speculative=True, return_type="generation")` on a DSpark model),
    or its list of `DraftRound`s (several generations' lists may be concatenated)."""
    rounds = getattr(rounds, "rounds", rounds)
    if not isinstance(rounds, (list, tuple)) or not rounds:
        raise ValueError("draft_calibration needs the rounds of a DSpark speculative generation "
                         "(generate(..., speculative=True, return_type='generation') on a DSpark model); got "
                         f"{'an empty list' if isinstance(rounds, (list, tuple)) else type(rounds).__name__}")  # fmt: skip
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    K = rounds[0].drafts.shape[1]
    sigma, kept, checked, given = [], [], [], []  # each [rows, K]
    for r in rounds:
        live = r.accepted >= 0
        accepted, conf = r.accepted[live].cpu(), r.confidences[live].float().cpu()
        k = torch.arange(K)
        sigma.append(torch.sigmoid(conf))  # σ(c_k)
        checked.append((k < r.verified).expand(accepted.shape[0], K))
        kept.append(accepted[:, None] > k)
        given.append(accepted[:, None] >= k)  # drafts 0..k-1 were kept
    sigma, kept, checked, given = (torch.cat(t) for t in (sigma, kept, checked, given))
    survival = sigma.cumprod(1)  # predicted Π_{j<=k} σ(c_j)

    def rate(values, mask):  # mean over the masked rows per position, NaN where none
        n = mask.sum(0)
        return n, torch.where(n > 0, (values.double() * mask).sum(0) / n.clamp(min=1), float("nan"))

    counts, observed = rate(kept, checked)
    _, predicted = rate(survival, checked)
    cond = checked & given
    conditional_counts, conditional_observed = rate(kept, cond)
    _, conditional_predicted = rate(sigma, cond)

    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    p, o = survival[checked].double(), kept[checked].double()
    which = torch.bucketize(p, edges[1:-1])  # bin index of every checked draft
    bin_counts = torch.bincount(which, minlength=n_bins)

    def mean(values):  # per bin, NaN where empty
        return torch.where(bin_counts > 0, torch.bincount(which, values, n_bins) / bin_counts.clamp(min=1), float("nan"))

    return DraftCalibration(counts, observed, predicted, conditional_counts, conditional_observed, conditional_predicted,
                            (edges, mean(p), mean(o), bin_counts))  # fmt: skip


@dataclass
class DraftSources:
    """Where each drafted token y_{k+1} came from ([b,K] each, fp32 unless said).

    tokens (int64): the drafts; stage_logit: U_k[y], the stages' logit for it (through the shared
    head); markov_logit: the Markov bias markov_w2 · markov_w1[y_k] at y; stage_choice (int64):
    argmax U_k, what the stages alone would pick; markov_decided (bool): the draft differs from
    stage_choice (the Markov bias, or sampling, changed the pick); margin_stage, margin_markov:
    each part's share of the logit margin of y over stage_choice (their sum is ℓ_k[y] - ℓ_k[choice],
    0 where they are the same token); stage_prob, draft_prob: y's probability under softmax(U_k)
    and under softmax(ℓ_k).
    """

    tokens: torch.Tensor
    stage_logit: torch.Tensor
    markov_logit: torch.Tensor
    stage_choice: torch.Tensor
    markov_decided: torch.Tensor
    margin_stage: torch.Tensor
    margin_markov: torch.Tensor
    stage_prob: torch.Tensor
    draft_prob: torch.Tensor


def draft_sources(draft) -> DraftSources:
    """draft: the `Draft` of `model(tokens, draft=True)` (or of `draft_from_cache`)."""
    if getattr(draft, "base_logits", None) is None or getattr(draft, "markov_bias", None) is None:
        raise ValueError("draft_sources needs a Draft with base_logits and markov_bias (what model(..., draft=True) returns)")
    y = draft.tokens[..., None]
    base, bias, logits = (t.detach().float() for t in (draft.base_logits, draft.markov_bias, draft.logits))
    choice = base.argmax(-1, keepdim=True)

    def at(t, i):  # t [b,K,V] at the token ids i [b,K,1] -> [b,K]
        return t.gather(-1, i)[..., 0]

    return DraftSources(
        tokens=draft.tokens, stage_logit=at(base, y), markov_logit=at(bias, y), stage_choice=choice[..., 0],
        markov_decided=draft.tokens != choice[..., 0],
        margin_stage=at(base, y) - at(base, choice), margin_markov=at(bias, y) - at(bias, choice),
        stage_prob=at(base.softmax(-1), y), draft_prob=at(logits.softmax(-1), y),
    )  # fmt: skip

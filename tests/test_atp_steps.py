"""Attribution patching with integrated gradients: `atp_*(..., steps=N)`
averages the gradient at N points along the straight path from the corrupted activations to the patch
(α = 0, 1/N, …, (N−1)/N). steps=1 is plain AtP, unchanged; on a saturating metric, where the gradient at
the corrupted run is nearly zero and plain AtP is 10–100× off, steps=N comes close to real patching."""

from __future__ import annotations

import pytest
import torch

import v4lens
from v4lens import patching as P
from v4lens import tasks

pytestmark = pytest.mark.usefixtures("single_thread")


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, 17] - logits[:, -1, 18]).mean()


@pytest.fixture(scope="module")
def pair(tiny256, tokens_2x40):
    clean = tokens_2x40[:, :24].clone()
    corrupted = clean.clone()
    corrupted[:, 10] = (corrupted[:, 10] + 101) % 256
    with torch.no_grad():
        return clean, corrupted, tiny256.run_with_cache(clean)[1]


def _plain_atp_attn_out(model, tokens, clean_cache, metric) -> torch.Tensor:
    """Attribution patching written out: Σ_batch,d (clean - corrupted) · ∂metric/∂attn_out -> [layer, pos]."""
    names = [f"blocks.{l}.hook_attn_out" for l in range(model.cfg.n_layers)]
    acts = {}

    def keep(act, hook):
        acts[hook.name] = act
        return act

    logits = model.run_with_hooks(tokens, fwd_hooks=[(n, keep) for n in names])
    grads = torch.autograd.grad(metric(logits), [acts[n] for n in names])
    return torch.stack([((clean_cache[n] - acts[n].detach()) * g).sum(-1).sum(0) for n, g in zip(names, grads)])


def test_one_step_is_plain_atp_exactly(tiny256, pair):
    _, corrupted, clean_cache = pair
    plain = _plain_atp_attn_out(tiny256, corrupted, clean_cache, logit_diff)
    for kw in ({"steps": 1}, {}):  # steps=1 is the default
        est = P.atp_attn_out(tiny256, corrupted, clean_cache, logit_diff, **kw)
        torch.testing.assert_close(est, plain, atol=0, rtol=0)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="steps"):
            P.atp_attn_out(tiny256, corrupted, clean_cache, logit_diff, steps=bad)


def test_steps_converge_to_the_patch_of_a_whole_layer(tiny256, pair):
    """A [layer] family patches everything the path moves, so the path integral is exactly the
    patch's effect: the left Riemann sum's error shrinks like 1/N."""
    clean, _, _ = pair
    with torch.no_grad():
        real = P.get_act_patch_hc_comb_fixed(tiny256, clean, None, logit_diff, "uniform") - logit_diff(tiny256(clean))
    err = {n: float((P.atp_hc_comb_fixed(tiny256, clean, None, logit_diff, "uniform", steps=n) - real).norm()
                    / real.norm()) for n in (1, 4, 16)}  # fmt: skip
    assert err[4] < err[1] / 2.5 and err[16] < err[4] / 2.5, err


@pytest.fixture(scope="module")
def recall():
    """tiny-recall on its task; the corrupted prompts query another key of the same records, and the
    metric is the probability of the clean answer: ~1 clean, ~0 corrupted, flat near the corrupted run."""
    model = v4lens.load("tiny-recall")
    batch = tasks.recall_batch(4, torch.Generator().manual_seed(0))
    clean, qp, answer = batch["tokens"], int(batch["query_pos"][0]), batch["answer"]
    corrupted = clean.clone()
    for r in range(len(clean)):
        keys = clean[r, tasks.HEADER_LEN : tasks.HEADER_LEN + 16 : tasks.RECORD_LEN].tolist()
        corrupted[r, qp] = next(k for k in keys if k != clean[r, qp])
    rows = torch.arange(len(clean))

    def prob(logits: torch.Tensor) -> torch.Tensor:
        return logits[rows, qp].softmax(-1)[rows, answer].mean()

    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean)
        assert prob(clean_logits) > 0.9 and prob(model(corrupted)) < 0.05
    return model, corrupted, clean_cache, prob


@pytest.mark.parametrize("family", ["attn_out", "mlp_out"])
def test_steps_follow_a_saturating_metric_where_plain_atp_is_far_off(recall, family):
    model, corrupted, clean_cache, prob = recall
    sweep, atp = getattr(P, f"get_act_patch_{family}"), getattr(P, f"atp_{family}")
    with torch.no_grad():
        real = sweep(model, corrupted, clean_cache, prob, batch_size=32) - prob(model(corrupted))  # [layer, pos]
    err = {n: float((atp(model, corrupted, clean_cache, prob, steps=n) - real).norm() / real.norm()) for n in (1, 16)}
    assert real.abs().max() > 0.5  # some single patch brings the answer back
    assert err[1] > 0.9  # plain AtP sees almost nothing: its estimate is a few percent of the real effects
    assert err[16] < 0.35, err

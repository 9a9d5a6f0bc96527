"""The drafter's analyses and figures: confidence calibration over speculative rounds, stages vs Markov head."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import perturb

import v4lens
from v4lens.analysis import draft_calibration, draft_sources
from v4lens.speculative import DraftRound

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    return perturb(v4lens.load("tiny-dspark", d_vocab=256, dspark_noise_token_id=7, seed=0), seed=3, scale=0.2).eval()


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_calibration_counts_and_rates_by_hand():
    """Two rounds, K = 3. Round 1: 3 verified, rows kept 2 and 0 drafts; round 2: 2 verified, row 0 kept 2,
    row 1 had finished (-1, ignored)."""
    conf = torch.tensor([[_logit(0.8), _logit(0.5), _logit(0.5)], [_logit(0.4), _logit(0.9), _logit(0.9)]])
    r1 = DraftRound(torch.zeros(2, 3, dtype=torch.long), conf, 3, torch.tensor([2, 0]), 0)
    r2 = DraftRound(torch.zeros(2, 3, dtype=torch.long), conf, 2, torch.tensor([2, -1]), 2)
    cal = draft_calibration([r1, r2], n_bins=4)
    assert cal.counts.tolist() == [3, 3, 2]  # position 2 was checked in round 1 only (both rows)
    torch.testing.assert_close(cal.observed, torch.tensor([2 / 3, 2 / 3, 0.0], dtype=torch.float64))
    surv = torch.tensor([[0.8, 0.4, 0.2], [0.4, 0.36, 0.324]], dtype=torch.float64)
    expected = torch.stack([(surv[0, k] * 2 + surv[1, k]) / 3 for k in range(2)] + [(surv[0, 2] + surv[1, 2]) / 2])
    torch.testing.assert_close(cal.predicted, expected, rtol=1e-6, atol=1e-6)
    # conditional: position 1 given position 0 kept -> rows (r1,row0) and (r2,row0): both kept
    assert cal.conditional_counts.tolist() == [3, 2, 1]
    torch.testing.assert_close(cal.conditional_observed, torch.tensor([2 / 3, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(cal.conditional_predicted[1], torch.tensor(0.5, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    edges, predicted, observed, counts = cal.bins  # 8 checked drafts over [0, .25, .5, .75, 1]
    assert counts.tolist() == [1, 5, 0, 2] and edges.shape == (5,)
    torch.testing.assert_close(observed[[0, 1, 3]], torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64))
    torch.testing.assert_close(predicted[1], torch.tensor((0.4 * 3 + 0.36 + 0.324) / 5, dtype=torch.float64))
    assert predicted[2].isnan() and observed[2].isnan()
    assert cal.rows()[0]["checked"] == 3
    with pytest.raises(ValueError, match="rounds"):
        draft_calibration([])


def test_calibration_of_a_generation_reads_its_rounds(model):
    out = model.generate(torch.tensor([[3, 1, 4, 1, 5]]), max_new_tokens=15, stop_at_eos=False, speculative=True,
                         return_type="generation")
    cal = draft_calibration(out)
    kept = torch.tensor([r.accepted[0] > 0 for r in out.rounds if r.verified > 0], dtype=torch.float64)
    assert int(cal.counts[0]) == kept.numel() and float(cal.observed[0]) == pytest.approx(float(kept.mean()))


def test_sources_split_the_margin_and_find_the_markov_decisions(model):
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, draft = model(tokens, draft=True)
    src = draft_sources(draft)
    choice_logit = draft.logits.gather(-1, src.stage_choice[..., None])[..., 0]
    y_logit = draft.logits.gather(-1, draft.tokens[..., None])[..., 0]
    torch.testing.assert_close(src.margin_stage + src.margin_markov, y_logit - choice_logit, rtol=1e-5, atol=1e-5)
    assert torch.equal(src.markov_decided, draft.tokens != draft.base_logits.argmax(-1))
    assert bool((src.margin_stage <= 0).all()) and bool((src.margin_stage + src.margin_markov >= -1e-5).all())
    with torch.no_grad():  # the Markov head decides some drafts here; without its bias none
        model.dspark.markov_w2.mul_(20)
        try:
            _, strong = model(tokens, draft=True)
            with model.hooks(fwd_hooks=[("dspark.hook_markov_bias", lambda x, hook: x * 0)]):
                _, zero = model(tokens, draft=True)
        finally:
            model.dspark.markov_w2.div_(20)
    assert bool(draft_sources(strong).markov_decided.any())
    # the hook zeroes the bias in the returned logits only (the walk already ran): the sources follow it
    assert torch.equal(draft_sources(zero).margin_markov, torch.zeros_like(zero.tokens, dtype=torch.float32))
    with pytest.raises(ValueError, match="base_logits"):
        draft_sources(type(draft)(draft.tokens, draft.logits, draft.confidences))


def test_figures_build_and_export(model, tmp_path):
    from v4lens import plot

    out = model.generate(torch.tensor([[3, 1, 4, 1, 5]]), max_new_tokens=10, stop_at_eos=False, speculative=True,
                         return_type="generation")
    fig = plot.draft_calibration_plot(out)
    assert len(fig.data) == 4 and fig.data[0].y[0] == pytest.approx(float(draft_calibration(out).observed[0]))
    _, draft = model(torch.tensor([[3, 1, 4, 1, 5]]), draft=True)
    bars = plot.draft_sources_bars(model, draft)
    assert len(bars.data[0].x) == model.cfg.dspark_block_size
    plot.save(bars, tmp_path / "sources.html")
    assert (tmp_path / "sources.html").stat().st_size > 1000


def test_draft_attention_draws_a_stage_and_block_figures_refuse_stages(model):
    from v4lens import plot

    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]])
    (_, _), cache = model.run_with_cache(tokens, draft=True)
    K, L = model.cfg.dspark_block_size, model.cfg.window_size
    fig = plot.draft_attention(model, cache, stage=1, head=0)
    z = torch.tensor(fig.data[0].z)
    assert z.shape == (K, L + K + 1)  # block queries x [ring, block, sink]
    expected = torch.cat([cache["dspark.stages.1.attn.hook_pattern"][0, 0], cache["dspark.stages.1.attn.hook_sink"][0, 0][:, None]], 1)
    torch.testing.assert_close(z, expected.float(), rtol=0, atol=1e-6)
    assert torch.allclose(z.sum(1), torch.ones(K), atol=1e-5)  # each row: candidates + sink = 1
    assert fig.data[0].x[L].startswith(f"{tokens.shape[1]}·anchor")
    with pytest.raises(ValueError, match="draft_attention"):
        plot.attention_pattern(model, cache, layer="dspark.stages.0", head=0)
    with pytest.raises(ValueError, match="draft_attention"):
        plot.router_heatmap(model, cache, layer="dspark.stages.0")
    with pytest.raises(ValueError, match="stage"):
        plot.draft_attention(model, cache, stage=3)

"""DSpark with a decoding cache (its context ring) and speculative decoding with the drafter:
greedy equals plain greedy, sampling has the main model's distribution, rounds and thresholds."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb

import v4lens
from v4lens.model.dspark import draft_from_cache
from v4lens.model.kv_cache import V4KVCache

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    """tiny-dspark (window 8), d_vocab 256, fp32, perturbed off its init. Read-only."""
    return perturb(v4lens.load("tiny-dspark", d_vocab=256, dspark_noise_token_id=7, seed=0), seed=3, scale=0.2).eval()


def _tokens(b: int, S: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (b, S), generator=torch.Generator().manual_seed(seed))


def _same_draft(a, b, atol=5e-5):
    assert torch.equal(a.tokens, b.tokens)
    for field in ("logits", "confidences", "base_logits", "markov_bias"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-4, atol=atol)


# ---------------------------------------------------------------- the context ring
@pytest.mark.parametrize("splits", [(5,), (3, 9), (1, 1, 1, 10), (13,)])
def test_a_chunked_sequence_drafts_as_one_forward(model, splits):
    """Prefill lengths below and above the window (8): the ring holds the last W context vectors of the
    whole sequence, whatever the chunking, and draft=True on the last chunk equals the full forward's."""
    tokens = _tokens(2, sum(splits) + 2, seed=1)
    with torch.no_grad():
        _, full = model(tokens, draft=True)
        cache, start = V4KVCache(), 0
        for n in (*splits, 2):
            chunk = tokens[:, start : start + n]
            start += n
            out = model(chunk, past_kv_cache=cache, draft=start == tokens.shape[1])
        _, cached = out
    assert cache.dspark_context.shape == (2, min(model.cfg.window_size, tokens.shape[1]), model.cfg.d_model)
    _same_draft(full, cached)


def test_drafting_from_the_cache_fires_the_same_hooks_as_a_full_forward(model):
    tokens = _tokens(1, 12, seed=2)
    def names(name):
        return name.startswith(("dspark.stages.", "dspark.hook_d"))

    with torch.no_grad():
        (_, full), full_cache = model.run_with_cache(tokens, draft=True, draft_anchor=5, names_filter=names)
        cache = V4KVCache()
        model(tokens, past_kv_cache=cache, return_type=None)  # fills the ring too
        act = {}
        hooks = [(n, lambda x, hook: act.__setitem__(hook.name, x.clone())) for n in full_cache]
        with model.hooks(fwd_hooks=hooks):
            drafted = draft_from_cache(model, cache, 5)
    _same_draft(full, drafted)
    assert set(act) == set(full_cache.keys())
    for name, value in act.items():
        torch.testing.assert_close(value, full_cache[name], rtol=0, atol=2e-5, msg=name)


def test_the_ring_follows_snapshot_restore_and_the_transaction(model):
    tokens = _tokens(1, 10, seed=3)
    cache = V4KVCache()
    with torch.no_grad():
        model(tokens[:, :6], past_kv_cache=cache)
        snap = cache.snapshot()
        ring = cache.dspark_context
        model(tokens[:, 6:], past_kv_cache=cache)
        assert cache.dspark_context.shape[1] == 8 and not torch.equal(cache.dspark_context[:, -1], ring[:, -1])
        cache.restore(snap)
        assert cache.dspark_context is ring

        def boom(x, hook):
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"), model.hooks(fwd_hooks=[("dspark.hook_main_x", boom)]):
            model(tokens[:, 6:], past_kv_cache=cache)
        assert cache.dspark_context is ring and cache.length == 6


def test_draft_from_cache_refuses_what_it_cannot_use(model):
    with pytest.raises(ValueError, match="no DSpark context"):
        draft_from_cache(model, V4KVCache(), 3)
    cache = V4KVCache()
    with torch.no_grad():
        model(_tokens(2, 4), past_kv_cache=cache)
    with pytest.raises(ValueError, match="draft_anchor"):
        draft_from_cache(model, cache, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="draft_anchor"):
        draft_from_cache(model, cache, 256)
    with pytest.raises(ValueError, match="DSpark"):
        draft_from_cache(v4lens.load("tiny", d_vocab=256), cache, 1)


# ---------------------------------------------------------------- speculative decoding
def _greedy_continuation(model, prompt, n):
    return model.generate(prompt, max_new_tokens=n, stop_at_eos=False, return_type="generation").new_tokens


def test_greedy_speculative_equals_plain_greedy_with_accepted_rejected_and_mixed_rounds(model):
    """An oracle hook makes the drafter right on a schedule: all drafts right, none, or the first j."""
    prompt = _tokens(1, 6, seed=4)
    n = 44
    truth = _greedy_continuation(model, prompt, n)[0]
    K = model.cfg.dspark_block_size
    schedule = iter([K, 0, 2, K, 1, 3, K, 0, 4] * 10)
    sequence = torch.cat([prompt[0], truth])
    anchor = {}

    def remember_anchor(index, hook):  # stage 0's keys end at the block's last position p+K (anchor at p+1)
        anchor["pos"] = int(index[0, 0, -1]) - K + 1
        return index

    def oracle(drafts, hook):  # drafts guess positions anchor+1 .. anchor+K: the first `right` are made true
        right = next(schedule)
        true = sequence[anchor["pos"] + 1 : anchor["pos"] + 1 + K]
        out = drafts.clone()
        out[0, : min(right, true.shape[0])] = true[:right]
        if right < true.shape[0]:
            out[0, right] = (true[right] + 1) % 256  # surely wrong
        return out

    hooks = [("dspark.stages.0.attn.hook_key_index", remember_anchor), ("dspark.hook_drafts", oracle)]
    out = model.generate(prompt, max_new_tokens=n, stop_at_eos=False, speculative=True, fwd_hooks=hooks,
                         return_type="generation")
    assert torch.equal(out.new_tokens[0], truth)
    kept = [r.kept for r in out.rounds]
    assert K in kept and 0 in kept and any(0 < k < K for k in kept)
    assert sum(k + 1 for k in kept) + 1 == n  # every round emitted its kept drafts and one token (+ the prefill's)
    assert out.forwards < n  # fewer main-model forwards than plain decoding's n
    rate = sum(int(r.accepted.sum()) for r in out.rounds) / sum(r.verified for r in out.rounds)
    assert out.draft_acceptance == pytest.approx(rate)


def test_greedy_speculative_equals_plain_greedy_on_a_batch_with_eos(model):
    prompt = _tokens(3, 7, seed=5)
    plain = model.generate(prompt, max_new_tokens=25, eos_token_id=17, return_type="generation")
    spec = model.generate(prompt, max_new_tokens=25, eos_token_id=17, speculative=True, return_type="generation")
    assert torch.equal(plain.tokens, spec.tokens)
    assert all(r.accepted.shape == (3,) and 0 <= r.kept <= r.verified for r in spec.rounds)


def test_confidence_threshold_decides_how_many_drafts_are_verified(model):
    prompt = _tokens(1, 5, seed=6)
    plain = model.generate(prompt, max_new_tokens=12, stop_at_eos=False, return_type="generation")
    K = model.cfg.dspark_block_size
    counts = set()
    for threshold in (None, 1e-9, 0.5, 0.9, 1.0):
        out = model.generate(prompt, max_new_tokens=12, stop_at_eos=False, speculative=True, draft_threshold=threshold,
                             return_type="generation")
        assert torch.equal(out.tokens, plain.tokens)
        emitted = 1  # the prefill's token
        for r in out.rounds:
            survival = torch.sigmoid(r.confidences[0]).cumprod(0)
            wanted = K if threshold is None else int((survival >= threshold).long().cumprod(0).sum())
            assert r.verified == min(wanted, 12 - emitted - 1)  # never more than the budget left
            counts.add(r.verified)
            emitted += r.kept + 1
    assert K in counts and len(counts) > 2  # the thresholds chose different numbers of drafts
    with pytest.raises(ValueError, match="draft_threshold"):
        model.generate(prompt, max_new_tokens=3, speculative=True, draft_threshold=0)
    with pytest.raises(ValueError, match="draft_threshold"):
        model.generate(prompt, max_new_tokens=3, draft_threshold=0.5)


def _chi_square_of_speculative_sampling(N=1500):
    """Speculative sampling at temperature 1 on a 16-token vocabulary, N rows: the first two new tokens
    (the second one verified against a draft) -> (chi-square against the model's exact joint, its 0.999
    quantile). The drafter is made sharp and biased (markov_w2 x 8) so rejections and residual draws matter."""
    m = perturb(v4lens.load("tiny-dspark", d_vocab=16, dspark_noise_token_id=7, seed=1), seed=4, scale=0.3).eval()
    with torch.no_grad():
        m.dspark.markov_w2.mul_(8)
        prompt = torch.tensor([[1, 2, 3, 4, 5]])
        first = m(prompt)[0, -1].softmax(-1)  # token 1 ~ first; token 2 ~ p(. | prompt, token 1)
        second = torch.stack([m(torch.cat([prompt, torch.tensor([[t]])], 1))[0, -1].softmax(-1) for t in range(16)])
    out = m.generate(prompt.repeat(N, 1), max_new_tokens=3, temperature=1.0, seed=0, speculative=True, stop_at_eos=False,
                     return_type="generation")
    observed = torch.bincount(out.new_tokens[:, 0] * 16 + out.new_tokens[:, 1], minlength=256).double()
    expected = (first[:, None] * second).flatten().double() * N
    order = expected.argsort(descending=True)  # pool the rare cells so every cell expects >= 5
    big, small = order[expected[order] >= 5], order[expected[order] < 5]
    obs = torch.cat([observed[big], observed[small].sum()[None]])
    exp = torch.cat([expected[big], expected[small].sum()[None]])
    chi2, dof = float(((obs - exp) ** 2 / exp).sum()), obs.numel() - 1
    limit = dof * (1 - 2 / (9 * dof) + 3.09 * (2 / (9 * dof)) ** 0.5) ** 3  # Wilson-Hilferty, z(0.999) = 3.09
    return chi2, limit, out.rounds[0]


def test_sampled_speculative_decoding_has_the_main_models_distribution():
    chi2, limit, first_round = _chi_square_of_speculative_sampling()
    assert chi2 < limit, (chi2, limit)
    N = first_round.accepted.shape[0]
    assert first_round.verified == 1 and 0.05 < int(first_round.accepted.sum()) / N < 0.95  # kept and rejected drafts


def test_the_chi_square_test_catches_a_sampler_that_keeps_every_draft(monkeypatch):
    import v4lens.speculative as spec

    judge = spec._judge

    def keep_all(logits, y, draft, picker, n):
        ok, nxt = judge(logits, y, draft, picker, n)
        return torch.ones_like(ok), nxt

    monkeypatch.setattr(spec, "_judge", keep_all)
    chi2, limit, _ = _chi_square_of_speculative_sampling()
    assert chi2 > limit, (chi2, limit)


def test_speculative_arguments(model):
    prompt = _tokens(1, 4)
    with pytest.raises(ValueError, match="use_cache"):
        model.generate(prompt, max_new_tokens=3, speculative=True, use_cache=False)
    with pytest.raises(ValueError, match="draft module"):
        v4lens.load("tiny-recall").generate(torch.tensor([[1, 2]]), max_new_tokens=2, speculative=True)
    with pytest.raises(ValueError, match="mtp=True"):
        model.generate(prompt, max_new_tokens=3, mtp=True)
    out = model.generate(prompt, max_new_tokens=1, speculative=True, return_type="generation")
    assert out.new_tokens.shape == (1, 1) and out.rounds == []


def test_chunked_run_with_cache_of_a_dspark_model_equals_one_forward(model):
    """chunk_len runs the input through a cache: the taps of every chunk are assembled, the draft follows
    the last chunk, and without draft=True no dspark hook appears (as in one plain forward)."""
    tokens = _tokens(2, 13, seed=8)
    with torch.no_grad():
        (_, full_draft), full = model.run_with_cache(tokens, draft=True)
        (_, chunk_draft), chunked = model.run_with_cache(tokens, draft=True, chunk_len=4)
        _, plain = model.run_with_cache(tokens, chunk_len=5)
    _same_draft(full_draft, chunk_draft)
    assert set(full.keys()) == set(chunked.keys())
    for name in full:
        torch.testing.assert_close(chunked[name].float(), full[name].float(), rtol=1e-4, atol=5e-5, msg=name)
    assert not any(name.startswith("dspark.") for name in plain)


def test_cli_generate_speculative_on_a_dspark_model(capsys):
    from v4lens.cli import main as cli_main

    assert cli_main(["generate", "tiny-dspark", "--prompt", "Hi", "--max-new-tokens", "6", "--speculative"]) == 0
    assert "DSpark drafts kept" in capsys.readouterr().err

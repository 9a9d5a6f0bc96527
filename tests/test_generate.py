"""Generation with hooks: greedy, sampling, EOS, hooks, caches, MTP read-out, the decoding cache and
speculative decoding with the MTP head."""

from __future__ import annotations

import pytest
import torch

import v4lens
from v4lens.generate import sample_next

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    return v4lens.load("tiny-recall")


@pytest.fixture(scope="module")
def prompt():
    from v4lens.tasks import recall_batch

    batch = recall_batch(3, generator=torch.Generator().manual_seed(7))
    return batch["tokens"][:, :-1], batch["answer"]  # stop right after the query key


def test_greedy_equals_an_argmax_loop_and_recalls(model, prompt):
    tokens, answer = prompt
    out = model.generate(tokens, max_new_tokens=4, stop_at_eos=False, return_type="generation")
    expected = tokens
    with torch.no_grad():
        for _ in range(4):
            expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.tokens, expected) and out.new_tokens.shape == (3, 4)
    assert torch.equal(out.new_tokens[:, 0], answer)  # the trained model answers the recall query


def test_sampling_is_seeded_and_filters_behave():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(sample_next(logits, 1.0, generator=g1), sample_next(logits, 1.0, generator=g2))
    assert torch.equal(sample_next(logits, 0.7, top_k=1), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 0.7, top_p=1e-6), logits.argmax(-1))
    top3 = logits.topk(3, dim=-1).indices
    for s in range(20):
        picked = sample_next(logits, 2.0, top_k=3, generator=torch.Generator().manual_seed(s))
        assert bool((picked[:, None] == top3).any(-1).all())


def test_sampled_generation_reproducible(model, prompt):
    tokens, _ = prompt
    a = model.generate(tokens, 5, temperature=1.0, seed=11, stop_at_eos=False, return_type="generation")
    b = model.generate(tokens, 5, temperature=1.0, seed=11, stop_at_eos=False, return_type="generation")
    assert torch.equal(a.tokens, b.tokens)


def test_eos_stops_and_pads(model, prompt):
    tokens, answer = prompt
    out = model.generate(tokens, 6, eos_token_id=int(answer[0]), return_type="generation")  # row 0 "ends" at once
    assert int(out.new_tokens[0, 0]) == int(answer[0])
    assert bool((out.new_tokens[0, 1:] == model.cfg.pad_token_id).all())
    one = model.generate(tokens[:1], 6, eos_token_id=int(answer[0]), return_type="generation")
    assert one.new_tokens.shape == (1, 1)  # stopped after EOS


def test_hooks_act_at_every_step_and_caches_are_kept(model, prompt):
    tokens, answer = prompt
    calls = []

    def no_picks(picks, hook):
        calls.append(picks.shape[1])
        return torch.full_like(picks, -1)

    hooks = [("blocks.1.attn.indexer.hook_topk", no_picks)]
    names = ["blocks.1.attn.indexer.hook_topk"]
    out = model.generate(tokens, 3, stop_at_eos=False, fwd_hooks=hooks, cache_steps=True, names_filter=names, use_cache=False,
                         return_type="generation")
    S = tokens.shape[1]
    assert calls == [S, S + 1, S + 2]  # without the decoding cache: the whole, growing sequence at each step
    assert not torch.equal(out.new_tokens[:, 0], answer)  # without the indexer's picks recall fails
    assert len(out.caches) == 3 and bool((out.caches[1]["blocks.1.attn.indexer.hook_topk"] == -1).all())
    assert not model.hook_dict["blocks.1.attn.indexer.hook_topk"]._forward_hooks  # nothing left attached

    calls.clear()
    cached = model.generate(tokens, 3, stop_at_eos=False, fwd_hooks=hooks, cache_steps=True, names_filter=names,
                            return_type="generation")
    assert calls == [S, 1, 1]  # with it: the prompt, then one new position per step
    assert torch.equal(cached.tokens, out.tokens) and cached.caches[2]["blocks.1.attn.indexer.hook_topk"].shape[1] == 1


@pytest.fixture(scope="module")
def tiny_mtp():
    from conftest import perturb

    return perturb(v4lens.load("tiny", d_vocab=256, seed=0), seed=3)


def test_cached_decoding_equals_full_forwards_across_many_boundaries(tiny_mtp):
    """40 steps cross 5 windows (W=8), 10 CSA and 6-7 HCA (m=6) compressions, batch of 2."""
    tokens = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    cached = tiny_mtp.generate(tokens, 40, stop_at_eos=False, mtp=True, return_type="generation")
    full = tiny_mtp.generate(tokens, 40, stop_at_eos=False, mtp=True, use_cache=False, return_type="generation")
    assert torch.equal(cached.tokens, full.tokens) and torch.equal(cached.mtp_drafts, full.mtp_drafts)
    assert len(set(cached.new_tokens[0].tolist())) > 5  # not a degenerate repetition
    sampled = [tiny_mtp.generate(tokens, 20, temperature=1.0, top_p=0.9, seed=4, use_cache=c,
                                 return_type="generation") for c in (True, False)]
    assert torch.equal(sampled[0].tokens, sampled[1].tokens)


def test_speculative_decoding_equals_greedy(tiny_mtp):
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    greedy = tiny_mtp.generate(tokens, 30, stop_at_eos=False, return_type="generation")
    spec = tiny_mtp.generate(tokens, 30, stop_at_eos=False, speculative=True, return_type="generation")
    assert torch.equal(spec.tokens, greedy.tokens) and greedy.forwards == 30
    assert spec.mtp_acceptance is not None and 0 <= spec.mtp_acceptance <= 1
    for n in (0, 1, 2, 5):  # the budget is exact
        assert tiny_mtp.generate(tokens, n, stop_at_eos=False, speculative=True,
                                 return_type="generation").new_tokens.shape == (2, n)


def test_speculative_rollback_with_mixed_verdicts(tiny_mtp):
    """An MTP head made right two times in three (a hook puts the true greedy token on top): the
    kept drafts and the rolled-back ones interleave, and the output is still plain greedy."""
    tokens = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(5))
    greedy = tiny_mtp.generate(tokens, 30, stop_at_eos=False, return_type="generation").tokens[0]
    last = {}

    def query_position(index, hook):  # the window's last column is the query itself: its absolute position
        last["q"] = int(index[0, -1, -1])

    def oracle_draft(logits, hook):
        q = last["q"]  # the draft at q guesses token q + 2
        if q + 2 < len(greedy) and q % 3:
            logits = logits.clone()
            logits[:, -1, greedy[q + 2]] += 1e4
        return logits

    hooks = [("blocks.0.attn.hook_key_index", query_position), ("mtp.0.hook_logits", oracle_draft)]
    spec = tiny_mtp.generate(tokens, 30, stop_at_eos=False, speculative=True, fwd_hooks=hooks, return_type="generation")
    assert torch.equal(spec.tokens[0], greedy)
    assert 0.4 < spec.mtp_acceptance < 0.9 and spec.forwards < 30


def test_speculative_accepts_and_rejects_per_batch(tiny_mtp):
    """Hooks force the main head to say 7 always and the MTP head to draft 7 for row 0 and 9 for row 1:
    row 1's drafts are rejected, so every verification is rolled back; with both rows drafting 7 each
    forward yields two tokens. Output always equals greedy decoding under the same hooks."""
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))

    def force(row_tokens):
        def hook(logits, hook):
            logits = logits.clone()
            for row, tok in enumerate(row_tokens):
                logits[row, :, tok] += 1e4
            return logits

        return hook

    main = ("hook_logits", force([7, 7]))
    for drafts, acceptance, forwards in (([7, 9], 0.5, 1 + 2 * 10), ([7, 7], 1.0, 1 + 10)):
        hooks = [main, ("mtp.0.hook_logits", force(drafts))]
        spec = tiny_mtp.generate(tokens, 21, stop_at_eos=False, speculative=True, fwd_hooks=hooks,
                                 return_type="generation")
        greedy = tiny_mtp.generate(tokens, 21, stop_at_eos=False, fwd_hooks=hooks, return_type="generation")
        assert torch.equal(spec.tokens, greedy.tokens) and bool((spec.new_tokens == 7).all())
        assert spec.mtp_acceptance == acceptance and spec.forwards == forwards
    with pytest.raises(ValueError, match="greedy"):
        tiny_mtp.generate(tokens, 3, speculative=True, temperature=1.0)


def test_stream_callback_text_and_chat_input():
    tiny = v4lens.load("tiny")
    seen = []
    out = tiny.generate("The capital of France is", 3, stop_at_eos=False, stream=seen.append, return_type="generation")
    assert len(seen) == 3 and torch.equal(torch.stack(seen, 1), out.new_tokens)
    assert out.text == [tiny.to_string(out.new_tokens[0])]
    texts = ["Hi", "A much longer prompt than that"]  # different lengths: each continues as if alone
    both = tiny.generate(texts, 2, stop_at_eos=False, return_type="generation")
    assert [tiny.generate(t, 2, stop_at_eos=False, return_type="generation").text[0] for t in texts] == both.text
    chat = tiny.generate([{"role": "user", "content": "Hi"}], 2, chat=True, stop_at_eos=False, return_type="generation")
    rendered = tiny.to_tokens(v4lens.tokenizer.render_chat([{"role": "user", "content": "Hi"}]), prepend_bos=False)
    assert torch.equal(chat.tokens[:, : rendered.shape[1]], rendered)


def test_mtp_drafts_and_acceptance():
    tiny = v4lens.load("tiny")
    tokens = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    out = tiny.generate(tokens, 5, stop_at_eos=False, mtp=True, return_type="generation")
    assert torch.equal(out.mtp_drafts, tiny.generate(tokens, 5, stop_at_eos=False, mtp=True, use_cache=False,
                                                     return_type="generation").mtp_drafts)
    assert out.mtp_drafts.shape == (2, 5) and bool((out.mtp_drafts[:, -1] == -1).all())
    hits = (out.mtp_drafts[:, :-1] == out.new_tokens[:, 1:]).float().mean().item()
    assert out.mtp_acceptance == pytest.approx(hits)
    with pytest.raises(ValueError, match="MTP"):
        v4lens.load("tiny-recall").generate(tokens % 128, 2, mtp=True)

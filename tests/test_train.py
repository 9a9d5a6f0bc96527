"""v4lens.train: task layouts, a short retrain, router-bias balancing, determinism, the shipped tiny-recall."""

from __future__ import annotations

import pytest
import torch

import v4lens
import v4lens.weights.loading
from v4lens import train as T

pytestmark = pytest.mark.usefixtures("single_thread")

# tiny-recall's stated held-out recall accuracy (v4lens/data/tiny-recall/README.md) minus a margin
SHIPPED_MIN_ACC = 0.90


def small_cfg(**kw):
    return v4lens.preset("tiny-recall", **kw)


def test_recall_batch_layout():
    gen = torch.Generator().manual_seed(0)
    b = T.recall_batch(64, gen)
    tokens, q, k, ans = b["tokens"], b["query_pos"], b["key_pos"], b["answer"]
    n = tokens.shape[1]
    assert tokens.dtype == q.dtype == k.dtype == ans.dtype == torch.long
    assert tokens.shape == (64, T.HEADER_LEN + T.RECORD_LEN * 4 + 3) and q.shape == k.shape == ans.shape == (64,)
    rows = torch.arange(64)
    assert (q == n - 2).all() and (tokens[:, 0] == T.BOS).all() and (tokens[rows, q - 1] == T.QUERY).all()
    assert (tokens[rows, q + 1] == ans).all()  # the answer is the last token
    assert (tokens[rows, k] == tokens[rows, q]).all()  # the query repeats the key ...
    assert (tokens[rows, k + 1] == ans).all()  # ... whose value (right after it) is the answer
    window = v4lens.preset("tiny-recall").window_size
    assert (q - (k + 1) >= window).all()  # key and value both outside the query's sliding window
    assert ((k - T.HEADER_LEN) % T.RECORD_LEN == 0).all()  # records sit on compression blocks
    keys = tokens[:, T.HEADER_LEN : n - 3 : T.RECORD_LEN]
    assert all(len(set(row.tolist())) == keys.shape[1] for row in keys)  # distinct keys
    assert (keys >= T.KEY_IDS.start).all() and (keys < T.KEY_IDS.stop).all()
    assert (ans >= T.VALUE_IDS.start).all() and (ans < T.VALUE_IDS.stop).all()
    # far placement holds for other sizes too, and the generator makes batches reproducible
    b2 = T.recall_batch(32, torch.Generator().manual_seed(1), n_pairs=14, min_gap=12)
    assert (b2["query_pos"] - b2["key_pos"] > 12).all()
    b3 = T.recall_batch(32, torch.Generator().manual_seed(1), n_pairs=14, min_gap=12)
    assert all(torch.equal(b2[x], b3[x]) for x in b2)


def test_induction_batch_layout():
    b = T.induction_batch(8, torch.Generator().manual_seed(0), length=10)
    tokens, mask = b["tokens"], b["mask"]
    assert tokens.shape == mask.shape == (8, 21) and mask.dtype == torch.bool
    assert (tokens[:, 0] == T.BOS).all() and torch.equal(tokens[:, 1:11], tokens[:, 11:])
    assert mask[:, 11:20].all() and mask.sum() == 8 * 9  # second copy, except its last token
    pos = mask[0].nonzero()[:, 0]
    assert torch.equal(tokens[:, pos + 1], tokens[:, pos - 9])  # each masked next token is the copy's


def test_short_retrain_loss_falls():
    model, h = T.train(small_cfg(), steps=40, batch_size=16, lr=1e-2, seed=0, eval_every=0, progress=False,
                       eval_batch_size=64)  # fmt: skip
    first, last = sum(h["loss"][:5]) / 5, sum(h["loss"][-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert h["final"]["step"] == 40 and 0.0 <= h["final"]["acc"] <= 1.0
    assert not model.training and all(b.attn.indexer.topk == 2 for b in model.blocks if b.attn.indexer)


def test_bias_balancing_corrects_a_skewed_router():
    model = T.build_model(small_cfg(), seed=0)
    layers = T.learned_moe_layers(model)
    assert layers == [1, 2]  # layer 0 is hash-routed
    with torch.no_grad():
        for i in layers:
            model.blocks[i].mlp.gate.bias.copy_(torch.tensor([0.05, 0.0, 0.0, 0.0]))
    hash_table = model.blocks[0].mlp.gate.tid2eid.clone()
    # lr=0: only the bias update moves anything
    _, h = T.train(model, steps=8, batch_size=16, lr=0.0, seed=0, eval_every=0, progress=False,
                   bias_update_speed=0.01, eval_batch_size=16)  # fmt: skip
    for i in layers:
        bias = model.blocks[i].mlp.gate.bias
        assert bias[0] < 0.05 - 0.01 and (bias[1:] > 0).any()  # overloaded down, underloaded up
    assert h["load_cv"][-1] < h["load_cv"][0]
    assert torch.equal(model.blocks[0].mlp.gate.tid2eid, hash_table)


def test_update_router_biases_rule():
    model = T.build_model(small_cfg(), seed=0)
    before = model.blocks[1].mlp.gate.bias.clone()
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [-1, 0]])  # loads 4, 2, 1, 0; mean 7/4
    cv = T.update_router_biases(model, {1: ids}, speed=0.5)
    assert torch.equal(model.blocks[1].mlp.gate.bias - before, torch.tensor([-0.5, -0.5, 0.5, 0.5]))
    assert cv[1] > 0


def test_determinism_and_checkpoint(tmp_path):
    kw = dict(steps=5, batch_size=8, lr=1e-2, seed=3, eval_every=0, progress=False, eval_batch_size=16)
    m1, h1 = T.train(small_cfg(), out=tmp_path / "a", **kw)
    m2, h2 = T.train(small_cfg(), **kw)
    assert h1["loss"] == h2["loss"]
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[n], s2[n]) for n in s1)
    m3, _ = T.train(small_cfg(), **{**kw, "seed": 4})
    assert not torch.equal(m3.embed.weight, m1.embed.weight)
    assert {"config.json", "model.safetensors", "train.json"} <= {p.name for p in (tmp_path / "a").iterdir()}
    loaded = v4lens.load(tmp_path / "a")
    assert all(torch.equal(loaded.state_dict()[n], s1[n]) for n in s1)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        T.main(["--help"])
    assert e.value.code == 0 and "--seed" in capsys.readouterr().out


@pytest.mark.skipif(
    v4lens.weights.loading.shipped_checkpoint("tiny-recall") is None, reason="no trained tiny-recall checkpoint shipped yet"
)
def test_shipped_tiny_recall():
    model = v4lens.load("tiny-recall")
    assert model.cfg.name == "tiny-recall" and not model.training
    assert "csa" in model.cfg.layer_types() and model.cfg.index_topk == 2
    batch = T.recall_batch(512, torch.Generator().manual_seed(T.EVAL_SEED + 1))
    acc = T.task_accuracy(model, batch)
    assert acc >= SHIPPED_MIN_ACC, acc
    # the indexer matters: without its picks (every query's top-k emptied) the answer is lost
    def no_picks(topk, hook):
        return torch.full_like(topk, -1)

    with model.hooks(fwd_hooks=[("blocks.1.attn.indexer.hook_topk", no_picks)]):
        assert T.task_accuracy(model, batch) < acc - 0.3
    bf16 = v4lens.load("tiny-recall", dtype="bf16")
    assert bf16.cfg.dtype == torch.bfloat16 and T.task_accuracy(bf16, batch) >= SHIPPED_MIN_ACC - 0.05

"""SAELens trains sparse autoencoders on tiny-recall's hooks with its own runner (v4lens.saelens), and
they splice back into the model with a hook.

SAELens pins transformer-lens < 4; v4lens also runs on transformer-lens 3.9+, so both install in one
venv (docs/saelens.md). Where sae_lens is not importable, the SAELens tests skip with the reason; the
splice hook's stream handling is tested here everywhere, with a stand-in SAE.
"""

from __future__ import annotations

import os

import sys
from types import SimpleNamespace

import pytest
import torch

import v4lens
from v4lens import saelens
from v4lens.tasks import recall_batch

pytestmark = pytest.mark.usefixtures("single_thread")
NAME = "blocks.1.hook_streams_post"  # [b, p, n=4, d=64] on tiny-recall


@pytest.fixture(scope="module")
def sl():
    try:
        import sae_lens
    except ImportError as e:  # not installed, or installed beside transformer-lens 4 (it needs < 4)
        if os.environ.get("V4LENS_REQUIRE_SAELENS"):  # scripts/test_saelens.sh: a broken set-up must fail
            raise
        pytest.skip(f"sae_lens is not importable ({e}); SAELens pins transformer-lens<4: install both in a venv "
                    "with `pip install -e . 'sae-lens==6.54.12'` (transformer-lens 3.9, see docs/saelens.md)")  # fmt: skip
    return sae_lens


@pytest.fixture(scope="module")
def recall():
    model = v4lens.load("tiny-recall")
    train = recall_batch(128, generator=torch.Generator().manual_seed(0))["tokens"]  # [128, 23]
    held_out = recall_batch(128, generator=torch.Generator().manual_seed(1))
    _, cache = model.run_with_cache(held_out["tokens"], names_filter=[NAME])
    return SimpleNamespace(model=model, train=train, held_out=held_out, acts=cache[NAME])  # acts [128, 23, 4, 64]


def fvu(sae, x: torch.Tensor) -> float:
    """Fraction of variance unexplained by the SAE's reconstruction; predicting the mean scores 1."""
    with torch.no_grad():
        err = (sae(x) - x).pow(2).sum()
    return float(err / (x - x.flatten(0, 1).mean(0)).pow(2).sum())


def recall_accuracy(model, batch, fwd_hooks=()) -> float:
    with torch.no_grad():
        logits = model.run_with_hooks(batch["tokens"], fwd_hooks=list(fwd_hooks))
    rows = torch.arange(len(batch["answer"]))
    return float((logits[rows, batch["query_pos"]].argmax(-1) == batch["answer"]).float().mean())


def train(recall, stream, epochs: int = 3, **config):
    return saelens.train_sae(recall.model, NAME, recall.train, stream=stream, d_sae=256, lr=1e-2, seed=0,
                             train_batch_size_tokens=128, store_batch_size_prompts=16,
                             training_tokens=epochs * recall.train.numel(), **config)  # fmt: skip


# ---------------------------------------------------------------- SAELens's runner on tiny-recall
def test_an_sae_on_all_four_streams_reconstructs_and_splices_back(sl, recall):
    sae = train(recall, "all")
    assert isinstance(sae, sl.TrainingSAE) and sae.cfg.d_in == 4 * 64
    assert sae.cfg.metadata.hook_name == NAME and sae.cfg.metadata.hook_head_index is None
    x = saelens.sae_view(recall.acts, "all")  # [128, 23, 256], held-out prompts
    assert fvu(sae, x) < 0.5  # the mean reconstruction scores 1
    # spliced back in place of all four streams, recall survives; the mean in their place kills it
    mean = recall.acts.mean((0, 1))  # [4, 64]
    assert recall_accuracy(recall.model, recall.held_out) == 1.0
    assert recall_accuracy(recall.model, recall.held_out, [(NAME, saelens.splice_hook(sae))]) >= 0.8
    assert recall_accuracy(recall.model, recall.held_out, [(NAME, lambda a, hook: mean.expand_as(a))]) <= 0.2


def test_an_sae_on_one_stream_reads_and_replaces_that_stream_only(sl, recall, tmp_path):
    sae = train(recall, 2, epochs=1)
    assert sae.cfg.d_in == 64 and sae.cfg.metadata.hook_head_index == 2  # SAELens selected stream 2
    assert fvu(sae, recall.acts[:, :, 2]) < 0.8
    spliced = saelens.splice_hook(sae)(recall.acts, hook=SimpleNamespace(name=NAME))
    with torch.no_grad():
        assert torch.equal(spliced[:, :, 2], sae(recall.acts[:, :, 2]))
    for other in (0, 1, 3):
        assert torch.equal(spliced[:, :, other], recall.acts[:, :, other])
    # the stream is recorded with the SAE: one saved and loaded by SAELens splices the same way
    sae.save_inference_model(str(tmp_path))
    loaded = sl.SAE.load_from_disk(str(tmp_path))
    with torch.no_grad():
        assert torch.allclose(saelens.splice_hook(loaded)(recall.acts, hook=None), spliced, atol=1e-6)


def test_training_with_saelens_evals_on_a_stream_hook(sl, recall, tmp_path, monkeypatch):
    """SAELens evaluates while it logs to W&B; its evaluator splices the SAE over the whole [b, p, n, d]
    value and crashes. make_runner's evaluates through splice_hook (W&B offline, into tmp_path)."""
    from sae_lens.llm_sae_training_runner import LLMSaeEvaluator
    from sae_lens.training.activation_scaler import ActivationScaler

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = sl.LoggingConfig(log_to_wandb=True, wandb_project="v4lens-test", wandb_log_frequency=2,
                              eval_every_n_wandb_logs=2)  # fmt: skip
    runner = saelens.make_runner(recall.model, NAME, recall.train, stream="all", d_sae=64, seed=0, lr=1e-2, logger=logger,
                                 train_batch_size_tokens=128, store_batch_size_prompts=16, n_eval_batches=2)  # fmt: skip
    results, evaluate = [], runner.evaluator
    runner.evaluator = lambda *args: results.append(evaluate(*args)) or results[-1]
    sae = runner.run()
    assert isinstance(evaluate, saelens.StreamEvaluator) and results  # it ran during training
    last = results[-1]
    assert 0 < last["reconstruction_quality"]["explained_variance"] <= 1 and last["sparsity"]["l0"] > 0
    losses = last["model_performance_preservation"]
    assert torch.isfinite(torch.tensor([losses["ce_loss_with_sae"], losses["ce_loss_without_sae"]])).all()
    sael = LLMSaeEvaluator(model=recall.model, activations_store=runner.activations_store, eval_batch_size_prompts=None,
                           n_eval_batches=1, model_kwargs={})  # fmt: skip
    with pytest.raises(RuntimeError, match="size of tensor"):
        sael(sae, runner.activations_store, ActivationScaler())


def test_make_runner_refuses_a_stream_hook_without_a_stream_and_a_wrong_width(sl, recall):
    with pytest.raises(ValueError, match=r"4 streams .* stream=0\.\.3 or stream='all'"):
        saelens.make_runner(recall.model, NAME, recall.train)
    with pytest.raises(ValueError, match="sae.d_in=64 but .* is 256 wide"):
        saelens.make_runner(recall.model, NAME, recall.train, stream="all",
                            sae=sl.StandardTrainingSAEConfig(d_in=64, d_sae=128))  # fmt: skip
    with pytest.raises(KeyError, match="hook_streams_post"):  # v4lens's names, with near matches
        saelens.make_runner(recall.model, "blocks.1.hook_resid_post", recall.train)


# ---------------------------------------------------------------- the splice hook (no SAELens needed)
class Doubler(torch.nn.Module):
    """A stand-in SAE whose reconstruction is twice its input, trained (as SAELens records it) on `stream`."""

    def __init__(self, d_in: int, stream=None):
        super().__init__()
        self.cfg = SimpleNamespace(d_in=d_in, metadata=SimpleNamespace(hook_head_index=stream))
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def forward(self, x):
        return 2 * x


def test_splice_hook_replaces_the_trained_stream_all_streams_or_a_3d_value():
    act, hook = torch.randn(2, 5, 4, 8), SimpleNamespace(name=NAME)
    one = saelens.splice_hook(Doubler(8, stream=1))(act, hook)
    assert torch.equal(one[:, :, 1], 2 * act[:, :, 1]) and torch.equal(one[:, :, [0, 2, 3]], act[:, :, [0, 2, 3]])
    assert torch.equal(saelens.splice_hook(Doubler(32))(act, hook), 2 * act)  # width n*d: all streams
    assert torch.equal(saelens.splice_hook(Doubler(8), stream=3)(act, hook)[:, :, 3], 2 * act[:, :, 3])
    flat = torch.randn(2, 5, 8)  # e.g. blocks.1.hook_attn_out
    assert torch.equal(saelens.splice_hook(Doubler(8))(flat, hook), 2 * flat)
    with pytest.raises(ValueError, match=r"reads d_in=8 but stream='all' of \(2, 5, 4, 8\) gives 32"):
        saelens.splice_hook(Doubler(8))(act, hook)
    with pytest.raises(ValueError, match=r"stream=0\.\.3 or stream='all', got stream=4"):
        saelens.sae_view(act, 4)


def test_splice_hook_runs_in_the_model(tiny256, tokens_2x40):
    _, clean = tiny256.run_with_cache(tokens_2x40, names_filter=["hook_logits"])
    with tiny256.hooks(fwd_hooks=[(NAME, saelens.splice_hook(Doubler(tiny256.cfg.d_model, stream=0)))]):
        _, spliced = tiny256.run_with_cache(tokens_2x40, names_filter=[NAME, "hook_logits"])
    assert not torch.allclose(spliced["hook_logits"], clean["hook_logits"])


def test_without_sae_lens_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # `import sae_lens` now fails as if it were missing
    with pytest.raises(ImportError, match="pip install sae-lens"):
        saelens.make_runner(None, NAME, torch.zeros(1, 4, dtype=torch.long), stream=0)

"""Train SAELens sparse autoencoders on a v4lens model's hooks, and splice them back with a hook.

SAELens (`pip install sae-lens`: it brings transformer-lens 3.x, which v4lens also runs on) trains
on any TransformerLens `HookedRootModule`, so its `LanguageModelSAETrainingRunner` drives a
`HookedV4` given as `override_model`. What this module adds is what SAELens cannot know about V4:

- The residual is n streams, `blocks.{l}.hook_streams_*` [b, p, n, d]. `stream=i` trains on stream
  i (SAELens's `hook_head_index`: the SAE reads [b, p, d]); `stream="all"` on the n streams side by
  side (d_in = n*d). The same argument picks a head of `attn.hook_z` [b, p, h, c] or a slot of
  `mlp.hook_expert_out`. Hooks with one vector per position ([b, p, d]: `hook_attn_out`,
  `hook_mlp_out`, `attn_hc.hook_out`, ...) take no stream.
- `token_dataset(tokens)`: token ids [N, S] as SAELens's pretokenized dataset (one row per sequence).
- `splice_hook(sae)`: a forward hook that replaces the hooked value by the SAE's reconstruction (of
  the stream it was trained on only), for `model.hooks(...)` / `run_with_hooks`.
- SAELens's own evaluation during training (run when it logs to W&B) splices the SAE over the whole
  value of the hook, every stream of a [b, p, n, d] one; `make_runner` gives such runs an evaluator
  that splices through `splice_hook` instead.

    from v4lens import saelens
    sae = saelens.train_sae(model, "blocks.1.hook_streams_post", tokens, stream=0, d_sae=256)
    with model.hooks(fwd_hooks=[("blocks.1.hook_streams_post", saelens.splice_hook(sae))]):
        logits = model(tokens)
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from .model import HookedV4

ALL = "all"  # stream="all": the n streams (or heads) side by side


def _sae_lens():
    try:
        import sae_lens
    except ImportError as e:
        raise ImportError(
            f"v4lens.saelens needs SAELens ({e}): pip install sae-lens (it installs transformer-lens 3.x, "
            "which v4lens runs on)"
        ) from e
    return sae_lens


def token_dataset(tokens: torch.Tensor):
    """Token ids [N, S] -> a `datasets.Dataset` with a "tokens" column: SAELens's pretokenized format."""
    from datasets import Dataset

    if tokens.ndim != 2 or tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"tokens must be integer ids [N, S], got {tuple(tokens.shape)} {tokens.dtype}")
    return Dataset.from_dict({"tokens": tokens.tolist()})


def sae_view(act: torch.Tensor, stream) -> torch.Tensor:
    """What an SAE reads of a hooked value: [b, p, n, d] -> stream i [b, p, d] or all [b, p, n*d];
    [b, p, d] as it is (stream None)."""
    if act.ndim == 4:
        if stream == ALL:
            return act.flatten(-2)
        if isinstance(stream, int) and 0 <= stream < act.shape[2]:
            return act[:, :, stream]
        raise ValueError(f"a value {tuple(act.shape)} with {act.shape[2]} streams (or heads) on axis 2 needs "
                         f"stream=0..{act.shape[2] - 1} or stream='all', got stream={stream!r}")  # fmt: skip
    if act.ndim == 3 and stream is None:
        return act
    raise ValueError(f"an SAE reads [b, p, n, d] (with a stream) or [b, p, d] (stream None) values, "
                     f"got {tuple(act.shape)} with stream={stream!r}")  # fmt: skip


def _write_view(act: torch.Tensor, view: torch.Tensor, stream) -> torch.Tensor:
    """`act` with `sae_view(act, stream)` replaced by `view` (a new tensor)."""
    if act.ndim == 3:
        return view
    if stream == ALL:
        return view.reshape(act.shape)
    out = act.clone()
    out[:, :, stream] = view
    return out


def _stream_of(sae, act: torch.Tensor, stream):
    """The stream `sae` reads in `act`: the one given, else the one it was trained on (SAELens keeps it as
    `hook_head_index`), else all of a 4-D value."""
    if stream is not None:
        return stream
    trained = getattr(getattr(sae.cfg, "metadata", None), "hook_head_index", None)
    return trained if trained is not None else (ALL if act.ndim == 4 else None)


def splice_hook(sae, stream=None):
    """A forward hook replacing the hooked value by `sae`'s reconstruction of it.

    `stream` defaults to the stream `sae` was trained on (all n streams for an SAE of width n*d);
    the other streams pass unchanged. The SAE runs as a module, so hooks on it (e.g. on
    `hook_sae_acts_post`, its feature activations) act during the splice.

    >>> with model.hooks(fwd_hooks=[(sae.cfg.metadata.hook_name, splice_hook(sae))]):
    ...     logits = model(tokens)
    """

    def hook(act: torch.Tensor, hook):
        where = _stream_of(sae, act, stream)
        x = sae_view(act, where)  # [b, p, d_in]
        if x.shape[-1] != sae.cfg.d_in:
            raise ValueError(f"{getattr(hook, 'name', 'splice_hook')}: the SAE reads d_in={sae.cfg.d_in} but stream={where!r} of "
                             f"{tuple(act.shape)} gives {x.shape[-1]}")  # fmt: skip
        rec = sae(x.to(sae.device, sae.dtype)).to(act.device, act.dtype)
        return _write_view(act, rec, where)

    return hook


def hook_d_in(model: HookedV4, hook_name: str, tokens: torch.Tensor, stream=None) -> int:
    """The width an SAE on `hook_name` (and `stream`) reads, from one run of `tokens[:1]` made as SAELens
    makes it (stopping after the hook's block)."""
    stop_after = _sae_lens().util.extract_stop_at_layer_from_tlens_hook_name  # "blocks.1.x" -> 2
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[:1], names_filter=[hook_name], prepend_bos=False,
                                        stop_at_layer=stop_after(hook_name))  # fmt: skip
    if hook_name not in cache.cache_dict:
        raise ValueError(f"hook {hook_name!r} did not fire on a run that stops after its block "
                         "(docs/hooks.md lists the hooks and when they fire)")  # fmt: skip
    return sae_view(cache[hook_name], stream).shape[-1]


def make_runner(model: HookedV4, hook_name: str, tokens: torch.Tensor, stream=None, d_sae: int | None = None,
                sae=None, **config):  # fmt: skip
    """SAELens's `LanguageModelSAETrainingRunner` for an SAE on `hook_name` of `model`, trained on `tokens`.

    tokens: [N, S] ids, one epoch by default (`training_tokens`). `sae`: a SAELens training-SAE config
    (any architecture, its d_in the hook's width); by default a standard (ReLU + L1) SAE of width
    d_sae (default 8 * d_in). `config`: any `LanguageModelSAERunnerConfig` field (lr,
    train_batch_size_tokens, logger, ...). Call `.run()` for the trained SAE.
    """
    sl = _sae_lens()
    d_in = hook_d_in(model, hook_name, tokens, stream)
    if sae is None:
        sae = sl.StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae or 8 * d_in)
    elif sae.d_in != d_in:
        raise ValueError(f"sae.d_in={sae.d_in} but {hook_name} with stream={stream!r} is {d_in} wide")
    context = tokens.shape[1]
    batch = config.get("train_batch_size_tokens", 4096)
    defaults = {
        "model_name": model.cfg.name or "v4lens", "model_class_name": "HookedV4", "hook_name": hook_name,
        "hook_head_index": stream if isinstance(stream, int) else None,  # SAELens selects the stream
        "context_size": context, "is_dataset_tokenized": True, "streaming": False, "prepend_bos": False,
        "training_tokens": tokens.numel(), "train_batch_size_tokens": batch,
        # SAELens's mixing buffer holds n_batches_in_buffer * context tokens and must hold a batch
        "n_batches_in_buffer": max(20, math.ceil(2 * batch / context)),
        "device": str(model.W_E.device), "dtype": "float32", "checkpoint_path": None, "output_path": None,
        "verbose": False, "logger": sl.LoggingConfig(log_to_wandb=False),
    }  # fmt: skip
    cfg = sl.LanguageModelSAERunnerConfig(sae=sae, **(defaults | config))
    runner = sl.LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=token_dataset(tokens))
    if stream is not None:
        runner.evaluator = StreamEvaluator(model, runner.activations_store, cfg.eval_batch_size_prompts,
                                           cfg.n_eval_batches)  # fmt: skip
    return runner


def train_sae(model: HookedV4, hook_name: str, tokens: torch.Tensor, stream=None, d_sae: int | None = None,
              sae=None, **config):  # fmt: skip
    """Train an SAE on `hook_name` (and `stream`) of `model` over `tokens` [N, S] with SAELens's runner;
    returns SAELens's trained SAE (see `make_runner` for the arguments)."""
    return make_runner(model, hook_name, tokens, stream, d_sae, sae, **config).run()


class StreamEvaluator:
    """SAELens's in-training evaluation for an SAE on one stream or all streams of a [b, p, n, d] hook.

    SAELens's own splices the SAE over the whole hooked value; this one splices through `splice_hook`.
    Returns the metrics SAELens logs, under its names: next-token loss without / with the SAE spliced
    in, explained variance, MSE and L0 of the SAE on the hook's values.
    """

    def __init__(self, model: HookedV4, store, batch_prompts: int | None = None, n_batches: int = 10):
        self.model, self.store, self.batch_prompts, self.n_batches = model, store, batch_prompts, n_batches

    @torch.no_grad()
    def __call__(self, sae, data_provider=None, activation_scaler=None) -> dict:
        name = sae.cfg.metadata.hook_name
        pause = getattr(data_provider, "paused", None)  # a prefetching provider shares the store
        sums = dict.fromkeys(("ce_loss_without_sae", "ce_loss_with_sae", "mse", "l0", "var", "err"), 0.0)
        with pause() if pause else nullcontext():
            for _ in range(self.n_batches):
                tokens = self.store.get_batch_tokens(self.batch_prompts)  # [b, S]
                loss, cache = self.model.run_with_cache(tokens, names_filter=[name], return_type="loss",
                                                        prepend_bos=False)  # fmt: skip
                x = sae_view(cache[name], _stream_of(sae, cache[name], None)).to(sae.device, sae.dtype)
                feats = sae.encode(x)  # [b, S, d_sae]
                err = x - sae.decode(feats)
                spliced = self.model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(name, splice_hook(sae))])
                sums["ce_loss_without_sae"] += float(loss)
                sums["ce_loss_with_sae"] += float(spliced)
                sums["mse"] += float(err.pow(2).mean())
                sums["l0"] += float((feats != 0).float().sum(-1).mean())
                sums["err"] += float(err.pow(2).sum())
                sums["var"] += float((x - x.flatten(0, 1).mean(0)).pow(2).sum())
        n = self.n_batches
        return {
            "model_performance_preservation": {k: sums[k] / n for k in ("ce_loss_without_sae", "ce_loss_with_sae")},
            "reconstruction_quality": {"explained_variance": 1 - sums["err"] / sums["var"], "mse": sums["mse"] / n},
            "sparsity": {"l0": sums["l0"] / n},
        }

"""Train small DeepSeek-V4 models on synthetic tasks (nanoGPT-style, CPU-friendly).

    python -m v4lens.train --preset tiny-recall --seed 0 --steps 600 --out ckpt/

Tasks: `v4lens.tasks` (key->value recall beyond the sliding window, induction; token layout there).

Training (`train`):
* loss: cross-entropy on the task positions only (the answer for recall, the masked positions for
  induction), plus the Lightning-Indexer loss below.
* AdamW (betas 0.9/0.95), linear warm-up then cosine decay to lr/10, gradient clipping at 1.0.
  Weight decay applies to matrices only (embedding, head, attention, experts, router weight,
  compressor projections); norms, mHC parameters (`*_hc.*`, `hc_head.*`), attention sinks,
  compressor position biases `ape` get none. The router biases `gate.bias` are not in the
  optimiser at all: they only steer expert selection (no gradient reaches them).
* Auxiliary-loss-free load balancing (DeepSeek-V3 §2.1.2, V4 keeps it): after each optimiser
  step, for every learned (non-hash) MoE layer, count how many (token, slot) picks each expert
  got in that step's forward (from `blocks.{l}.mlp.hook_expert_ids`, empty slots -1 ignored) and
  set `bias_e += bias_update_speed * sign(mean_load - load_e)` (overloaded experts go down,
  underloaded ones up). Hash layers route by a fixed table and are left alone.
* Lightning Indexer: its top-k selection is discrete, so the LM loss never reaches it. As in
  DeepSeek-V3.2 it is trained by a KL loss towards the main attention: for each CSA layer and
  query, the target is the attention probability the query's heads put on each compressed entry
  (summed over heads, renormalised over the entries it attended, detached); the indexer's
  distribution is the softmax of its scores over the same entries; loss = KL(target || indexer),
  averaged over queries that attended at least one entry, times `indexer_loss_coef`. The indexer's
  inputs are detached, so this loss trains only the indexer and the LM loss only the rest.
  The first `dense_indexer_frac` of the steps run with dense selection (top-k = every visible
  entry: V3.2's dense warm-up, so the attention can learn to use every entry while the indexer
  learns to imitate it); the rest use the config's `index_topk`. Evaluation always uses the
  config's top-k.
* Determinism: the weights come from `init_weights(model, seed)`, the training batches from a
  `torch.Generator` seeded with `seed`, the held-out eval batch from a fixed generator
  (EVAL_SEED). `threads=1` (the CLI default) runs torch on one intra-op thread, which makes a run
  bit-reproducible on one machine; more threads may change float reduction order.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .model import HookedV4
from .model.config import V4Config
from .model.presets import preset
from .tasks import (  # re-exported: `from v4lens.train import recall_batch` keeps working
    BOS,
    EOS,
    EVAL_SEED,
    FILLER_IDS,
    HEADER_LEN,
    KEY_IDS,
    PAD,
    QUERY,
    RECORD_LEN,
    SEP,
    TASKS,
    VALUE_IDS,
    induction_batch,
    make_batch,
    recall_batch,
    target_mask,
    task_accuracy,
    task_loss,
)  # fmt: skip

__all__ = [
    "build_model", "evaluate", "main", "train", "BOS", "EOS", "EVAL_SEED", "FILLER_IDS", "HEADER_LEN", "KEY_IDS",
    "PAD", "QUERY", "RECORD_LEN", "SEP", "TASKS", "VALUE_IDS", "induction_batch", "make_batch", "recall_batch",
    "target_mask", "task_accuracy", "task_loss",
]  # fmt: skip


# ---------------------------------------------------------------------- training helpers
def param_groups(model: HookedV4, weight_decay: float) -> list[dict]:
    """Decay matrices only; no decay for norms, mHC, sinks, `ape`; router biases left out entirely."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if name.endswith("gate.bias"):
            continue
        is_hc = "_hc." in name or name.startswith("hc_head.")
        (decay if p.ndim >= 2 and not is_hc else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learned_moe_layers(model: HookedV4) -> list[int]:
    return [i for i, blk in enumerate(model.blocks) if not blk.mlp.hashed]


def indexer_layers(model: HookedV4) -> list[int]:
    return [i for i, blk in enumerate(model.blocks) if blk.attn.indexer is not None]


@torch.no_grad()
def update_router_biases(model: HookedV4, expert_ids: dict[int, torch.Tensor], speed: float) -> dict[int, float]:
    """bias_e += speed · sign(mean_load - load_e) per learned MoE layer; returns each layer's load CV."""
    cvs = {}
    E = model.cfg.n_routed_experts
    for layer, ids in expert_ids.items():
        ids = ids[ids >= 0]
        load = torch.bincount(ids, minlength=E).float()
        bias = model.blocks[layer].mlp.gate.bias
        bias.add_(speed * torch.sign(load.mean() - load).to(bias.device))
        cvs[layer] = (load.std(unbiased=False) / load.mean().clamp(min=1e-9)).item()
    return cvs


def indexer_kl(pattern: torch.Tensor, key_index: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """KL(attention over compressed entries || indexer softmax over the same entries), mean over queries.

    pattern [b,h,p,K] (attention), key_index [b,p,K] (S+w = entry w), scores [b,p,T] (indexer)."""
    b, S, T = scores.shape
    comp = key_index >= S
    entry = torch.where(comp, key_index - S, T)  # raw-token and empty columns land in a spare column T
    mass = pattern.detach().float().sum(1)  # [b,p,K]
    target = torch.zeros(b, S, T + 1, device=scores.device).scatter_add_(-1, entry, mass)[..., :T]
    selected = torch.zeros(b, S, T + 1, dtype=torch.bool, device=scores.device).scatter_(-1, entry, True)[..., :T]
    total = target.sum(-1, keepdim=True)
    valid = total[..., 0] > 1e-6
    if not valid.any():
        return scores.sum() * 0.0
    target = target[valid] / total[valid]
    logq = scores[valid].float().masked_fill(~selected[valid], float("-inf")).log_softmax(-1)
    terms = torch.where(target > 0, target * (target.clamp(min=1e-30).log() - logq.clamp(min=-1e4)), 0.0)
    return terms.sum(-1).mean()


@contextmanager
def _detached_indexer_inputs(model: HookedV4):
    """The indexer learns only from its KL loss (V3.2): detach x and q_latent where it reads them."""
    handles = [
        model.blocks[i].attn.indexer.register_forward_pre_hook(lambda m, a: (a[0].detach(), a[1].detach(), *a[2:]))
        for i in indexer_layers(model)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _set_indexer_topk(model: HookedV4, topk: int) -> None:
    for i in indexer_layers(model):
        model.blocks[i].attn.indexer.topk = topk


@torch.no_grad()
def evaluate(model: HookedV4, batch: dict) -> dict:
    """Task loss and accuracy on a batch, in eval mode with the config's indexer top-k."""
    was_training = model.training
    model.eval()
    _set_indexer_topk(model, model.cfg.index_topk)
    tokens = batch["tokens"].to(model.device)
    logits = model(tokens)
    out = {"loss": task_loss(logits, batch).item(), "acc": task_accuracy(model, batch)}
    model.train(was_training)
    return out


def build_model(cfg: V4Config, seed: int) -> HookedV4:
    from .weights.loading import build_empty, init_weights

    model = build_empty(cfg)
    init_weights(model, seed)
    return model


# ---------------------------------------------------------------------- the loop
def train(
    cfg_or_model: V4Config | HookedV4 | str,
    task: str = "recall",
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    eval_every: int = 100,
    out: str | Path | None = None,
    progress: bool = True,
    bias_update_speed: float = 1e-3,
    weight_decay: float = 0.1,
    warmup_frac: float = 0.05,
    dense_indexer_frac: float = 0.3,
    indexer_loss_coef: float = 1.0,
    eval_batch_size: int = 512,
    save_every: int | None = None,
    threads: int | None = None,
    task_kwargs: dict | None = None,
    overwrite: bool = False,
) -> tuple[HookedV4, dict]:
    """Train a model (a config or preset name: fresh random init from `seed`; a HookedV4: in place).

    Returns (model in eval mode, history). history: `step`/`loss`/`kl`/`lr` per step, `load_cv`
    (mean load CV over learned MoE layers, per step), `eval` (dicts with step, loss, acc, and for
    "mix" both tasks), `final` (the last eval), `time_s`, `args`. With `out`, the final model is
    written there (transformers' layout) together with `train.json` (args + history); `save_every`
    also writes `out/step-{N}/` checkpoints. `out` is checked before training: a non-empty folder
    that is not a checkpoint v4lens wrote is refused unless `overwrite` (see `weights.atomic`).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    args = {k: v for k, v in locals().items() if k not in ("cfg_or_model", "out")}
    args["out"] = str(out) if out is not None else None
    if out is not None:  # a refused or unwritable `out` fails now, not after the training
        _check_out(out, overwrite)
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if isinstance(cfg_or_model, HookedV4):
        model = cfg_or_model
    else:
        cfg = preset(cfg_or_model) if isinstance(cfg_or_model, str) else cfg_or_model
        model = build_model(cfg, seed)
    args["config"] = model.cfg.name
    task_kwargs = dict(task_kwargs or {})
    gen = torch.Generator().manual_seed(seed)
    eval_gen = torch.Generator().manual_seed(EVAL_SEED)
    eval_tasks = ["recall", "induction"] if task == "mix" else [task]
    eval_batches = {t: make_batch(t, eval_batch_size, eval_gen, eval=True, **task_kwargs) for t in eval_tasks}

    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))
    warmup = max(1, int(warmup_frac * steps))
    dense_steps = int(dense_indexer_frac * steps)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    moe_layers, idx_layers = learned_moe_layers(model), indexer_layers(model)
    captured: dict[str, torch.Tensor] = {}

    def keep(tensor, hook):
        captured[hook.name] = tensor

    fwd_hooks = [(f"blocks.{i}.mlp.hook_expert_ids", keep) for i in moe_layers]
    for i in idx_layers:
        fwd_hooks += [(f"blocks.{i}.attn.hook_pattern", keep), (f"blocks.{i}.attn.hook_key_index", keep),
                      (f"blocks.{i}.attn.indexer.hook_scores", keep)]  # fmt: skip

    history: dict = {"step": [], "loss": [], "kl": [], "lr": [], "load_cv": [], "eval": []}

    def run_eval(step: int) -> dict:
        row: dict = {"step": step}
        for t, batch in eval_batches.items():
            r = evaluate(model, batch)
            if len(eval_batches) == 1:
                row.update(r)
            else:
                row.update({f"{t}_loss": r["loss"], f"{t}_acc": r["acc"]})
        history["eval"].append(row)
        return row

    from tqdm.auto import tqdm

    from .weights.saving import write_checkpoint

    start = time.time()
    model.train()
    bar = tqdm(range(steps), desc=f"train {model.cfg.name}", disable=not progress)
    for step in bar:
        _set_indexer_topk(model, 10**9 if step < dense_steps else model.cfg.index_topk)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        batch = make_batch(task, batch_size, gen, step=step, **task_kwargs)
        captured.clear()
        with model.hooks(fwd_hooks=fwd_hooks), _detached_indexer_inputs(model):
            logits = model(batch["tokens"].to(model.device))
        loss = task_loss(logits, batch)
        kl = sum(
            (indexer_kl(captured[f"blocks.{i}.attn.hook_pattern"], captured[f"blocks.{i}.attn.hook_key_index"],
                        captured[f"blocks.{i}.attn.indexer.hook_scores"]) for i in idx_layers),
            start=torch.zeros((), device=logits.device),
        )  # fmt: skip
        opt.zero_grad(set_to_none=True)
        (loss + indexer_loss_coef * kl).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        cvs = update_router_biases(
            model, {i: captured[f"blocks.{i}.mlp.hook_expert_ids"] for i in moe_layers}, bias_update_speed
        )
        history["step"].append(step)
        history["loss"].append(loss.item())
        history["kl"].append(kl.item())
        history["lr"].append(lr_at(step))
        history["load_cv"].append(sum(cvs.values()) / len(cvs) if cvs else 0.0)
        if (eval_every and (step + 1) % eval_every == 0) or step + 1 == steps:
            row = run_eval(step + 1)
            bar.set_postfix({k: round(v, 3) for k, v in row.items() if k != "step"})
        elif step % 10 == 0:
            bar.set_postfix(loss=round(loss.item(), 3), kl=round(kl.item(), 3))
        if out is not None and save_every and (step + 1) % save_every == 0 and step + 1 != steps:
            write_checkpoint(Path(out) / f"step-{step + 1}", model.state_dict(), model.cfg, overwrite=overwrite)
    if not history["eval"] or history["eval"][-1]["step"] != steps:
        run_eval(steps)
    _set_indexer_topk(model, model.cfg.index_topk)
    history["final"] = history["eval"][-1]
    history["time_s"] = time.time() - start
    history["args"] = args
    model.eval()
    if out is not None:  # the checkpoint and its train.json, written together (atomically)
        record = json.dumps({"args": args, "final": history["final"], "time_s": round(history["time_s"], 1),
                             "eval": history["eval"], "torch": torch.__version__}, indent=2) + "\n"  # fmt: skip
        write_checkpoint(out, model.state_dict(), model.cfg, overwrite=overwrite,
                         extra_files={"train.json": record}, ours=_step_checkpoints(out))  # fmt: skip
    return model, history


def _step_checkpoints(out: str | Path) -> list[str]:
    """The `step-N` checkpoints (this run's or an earlier one's) in `out`: train's own, not a user's files."""
    from .weights.atomic import manifest_files

    out = Path(out)
    return [p.name for p in out.glob("step-*") if p.is_dir() and manifest_files(p) is not None] if out.is_dir() else []


def _check_out(out: str | Path, overwrite: bool) -> None:
    """The rule every checkpoint writer follows (`weights.atomic.check_target`), applied to --out."""
    from .weights.atomic import check_target

    check_target(out, overwrite, ours=_step_checkpoints(out))


# ---------------------------------------------------------------------- CLI
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m v4lens.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny-recall", help="config preset to train from random init")
    p.add_argument("--task", default="recall", choices=TASKS)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--bias-update-speed", type=float, default=1e-3, help="γ of the aux-loss-free router balancing")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dense-indexer-frac", type=float, default=0.3, help="fraction of steps with dense indexer selection")
    p.add_argument("--n-pairs", type=int, default=None, help="recall: records per sequence")
    p.add_argument("--n-keys", type=int, default=None, help="recall: how many key ids to draw from")
    p.add_argument("--n-values", type=int, default=None, help="recall: how many value ids to draw from")
    p.add_argument("--length", type=int, default=None, help="induction: length of the repeated sequence")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = bit-reproducible)")
    p.add_argument("--out", default=None, help="directory for the final checkpoint (+ train.json)")
    p.add_argument("--overwrite", action="store_true", help="let --out be a non-empty folder v4lens did not write")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    task_kwargs = {k: getattr(a, k) for k in ("n_pairs", "n_keys", "n_values", "length") if getattr(a, k) is not None}
    if a.out is not None:
        try:
            _check_out(a.out, a.overwrite)
        except OSError as e:  # a usage error: exit 2 with one line, before any training
            p.exit(2, f"{p.prog}: error: --out: {e}\n")
    _, history = train(
        a.preset, task=a.task, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
        eval_every=a.eval_every, out=a.out, progress=not a.no_progress, bias_update_speed=a.bias_update_speed,
        weight_decay=a.weight_decay, dense_indexer_frac=a.dense_indexer_frac, save_every=a.save_every,
        threads=a.threads, task_kwargs=task_kwargs, overwrite=a.overwrite,
    )  # fmt: skip
    print(json.dumps({"final": history["final"], "time_s": round(history["time_s"], 1)}))


if __name__ == "__main__":
    main()

"""Nothing assumes CPU: no tensor made on the host meets a model tensor inside v4lens's code.

There is no GPU here, so CUDA's device-mismatch errors cannot happen. Instead a TorchFunctionMode
marks the tensors that would stay on the host if the model lived on a GPU — those a factory
(`torch.arange`, `torch.tensor`, `torch.zeros`, ...) makes without `device=`, and `.cpu()` copies —
follows them through the ops that use only host tensors, and records every op that combines one
of them with any other tensor (the model's weights and inputs, and whatever was made from them
or moved with `.to(device)`), and every `.numpy()` of such another tensor: on a GPU each raises.
Exempt, as on CUDA: 0-dim host tensors (a CPU scalar joins any device), indexing with host
indices, and `copy_` (copies cross devices). Each test runs a family of the public API on a tiny
model under the mode.
"""

from __future__ import annotations

import re
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode, resolve_name

import v4lens
import v4lens.activations as acts
import v4lens.plot as vplot
from v4lens import chat, experts, patching, stats

pytestmark = pytest.mark.usefixtures("single_thread")

FACTORIES = {
    torch.tensor, torch.as_tensor, torch.from_numpy, torch.arange, torch.zeros, torch.ones, torch.empty, torch.full,
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.eye, torch.linspace, torch.logspace,
    torch.empty_strided, torch.scalar_tensor, torch.tril_indices, torch.triu_indices,
}  # fmt: skip
CROSS_DEVICE_OK = {"torch.Tensor.__getitem__", "torch.Tensor.__setitem__", "torch.Tensor.copy_"}
HOST_ONLY = {"torch.Tensor.numpy", "torch.Tensor.__array__"}


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def _mark(out, host: bool) -> None:
    for t in _tensors(out):
        try:
            t._v4lens_host = host
        except (AttributeError, RuntimeError):  # a tensor subclass without a __dict__
            pass


def _is_host(t: torch.Tensor) -> bool:
    return getattr(t, "_v4lens_host", False)


class HostTensors(TorchFunctionMode):
    """Records (op, shapes, where) for every op that mixes a host tensor of >= 1 dim with another tensor."""

    def __init__(self):
        super().__init__()
        self.mixed: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = resolve_name(func) or repr(func)
        inputs = [*_tensors(args), *_tensors(kwargs)]
        if func in FACTORIES:
            made_from_tensor = func is torch.as_tensor and isinstance(args[0], torch.Tensor)
            _mark(out, host="device" not in kwargs and not made_from_tensor)
            return out
        if name == "torch.Tensor.cpu" or (name == "torch.Tensor.to" and "cpu" in [*args[1:], kwargs.get("device")]):
            _mark(out, host=True)
            return out
        if name == "torch.Tensor.cuda" or (
            name == "torch.Tensor.to"
            and (any(isinstance(a, (torch.device, torch.Tensor, str)) for a in args[1:]) or "device" in kwargs)
        ):
            _mark(out, host=False)  # moved to wherever the model is
            return out
        if name in HOST_ONLY and inputs and not _is_host(inputs[0]):  # numpy reads host memory only
            self.mixed.append(f"{name} of a tensor on the model's device at {_site()}")
            return out
        host = [t for t in inputs if _is_host(t) and t.dim() > 0]
        if host and not all(_is_host(t) for t in inputs) and name not in CROSS_DEVICE_OK:
            self.mixed.append(f"{name} with host {[tuple(t.shape) for t in host]} at {_site()}")
        if inputs and all(_is_host(t) for t in inputs):
            _mark(out, host=True)
        return out


def _site() -> str:
    """file:line of the innermost v4lens frame calling the op."""
    where = [f for f in traceback.extract_stack()[:-2] if "/v4lens/" in f.filename]
    return f"{where[-1].filename.split('/v4lens/')[-1]}:{where[-1].lineno}" if where else "(outside v4lens)"


def run_host_checked(*calls) -> list[str]:
    with HostTensors() as mode:
        for call in calls:
            call()
    return mode.mixed


@pytest.fixture(scope="module")
def model():
    m = v4lens.load("tiny", d_vocab=256, seed=0)
    m.set_use_attn_result(True)
    m.set_use_expert_out(True)
    return m


@pytest.fixture(scope="module")
def runs(model):
    gen = torch.Generator().manual_seed(3)
    clean, corrupted = (torch.randint(0, 256, (2, 24), generator=gen) for _ in range(2))
    _, cache = model.run_with_cache(clean)
    return clean, corrupted, cache


def metric(logits):
    return logits[:, -1, 3].mean() - logits[:, -1, 5].mean()


def test_the_check_sees_a_host_tensor_meet_a_weight_and_lets_scalars_moves_and_indices_pass(model):
    w = model.blocks[0].attn.wkv
    (mixed,) = run_host_checked(lambda: w[:3] + torch.ones(3, w.shape[1]))
    assert re.fullmatch(rf"torch\.Tensor\.(__)?add(__)? with host \[\(3, {w.shape[1]}\)\] at \(outside v4lens\)", mixed)
    derived = lambda: torch.arange(3).float()[:, None] * 2 + w[:3]  # host-only ops stay host
    assert len(run_host_checked(derived)) == 1
    (numpy,) = run_host_checked(lambda: w.detach().numpy())
    assert numpy == "torch.Tensor.numpy of a tensor on the model's device at (outside v4lens)"
    mixed = run_host_checked(
        lambda: w * torch.tensor(2.0),  # a 0-dim CPU tensor joins any device
        lambda: w[torch.tensor([0, 2])],  # host indices
        lambda: w[:3] + torch.ones(3, w.shape[1]).to(w.device),
        lambda: w[:3] + torch.ones(3, w.shape[1], device=w.device),
        lambda: torch.zeros_like(w) + w,
        lambda: torch.ones(4) / torch.ones(4).sum(),  # host with host
        lambda: w.detach().cpu().numpy(),
    )
    assert mixed == []


def test_forward_caching_and_the_cache_s_readers_make_no_host_tensor(model, runs, tmp_path):
    clean, _, cache = runs
    mask = torch.tensor([[1] * 24, [0] * 4 + [1] * 20])
    mixed = run_host_checked(
        lambda: model(clean, return_type="loss"),
        lambda: model(clean, mtp=True),
        lambda: model(clean, attention_mask=mask),
        lambda: model.run_with_cache(clean, pos_slice=[-2, -1]),
        lambda: model.run_with_cache(clean, chunk_len=7),
        lambda: model.run_with_cache(clean, offload_dir=tmp_path, return_type=None),
        lambda: model(cache["blocks.2.hook_streams_pre"], start_at_layer=2, tokens=clean),
        lambda: cache.logit_lens(k=5),
        lambda: cache.decompose_resid(return_labels=True),
        lambda: cache.get_full_resid_decomposition(),
        lambda: v4lens.decompose(model, tokens=clean, target=(3, 5), heads=True, experts=True),
        lambda: v4lens.stream_lineage(model, cache),
        lambda: v4lens.token_attention(model, cache, layer=1, queries=[-1]),
    )
    assert mixed == []


def test_patching_and_expert_edits_make_no_host_tensor(model, runs):
    clean, corrupted, reference = runs[0][:1, :8], runs[1][:1, :8], runs[2]  # short: the sweeps run per position
    _, cache = model.run_with_cache(clean)
    sweeps = ["get_act_patch_streams", "get_act_patch_routing", "get_act_patch_indexer_topk", "get_act_patch_sink",
              "get_act_patch_hc", "get_act_patch_hc_comb_fixed", "get_act_patch_expert_out", "atp_streams"]  # fmt: skip

    def force_picks():
        with patching.force_indexer_picks(model, [1], include=[0], exclude=[2]):
            model(clean)

    def swapped_hash_routes():
        with patching.override_hash_routes(model, swap=(1, 2)):
            model(clean)

    mixed = run_host_checked(
        *[lambda fn=fn: getattr(patching, fn)(model, corrupted, cache, metric) for fn in sweeps],
        force_picks,
        swapped_hash_routes,
        lambda: model.run_with_hooks(
            clean, fwd_hooks=experts.ablate_expert_hooks(model, 2, 5, how="mean", reference=reference)
        ),
        lambda: model.run_with_hooks(
            clean, fwd_hooks=experts.ablate_expert_hooks(model, 2, 5, how="resample", reference=reference)
        ),
        lambda: model.run_with_hooks(clean, fwd_hooks=experts.forbid_expert_hooks(model, 1, 3)),
        lambda: model.run_with_hooks(clean, fwd_hooks=experts.force_expert_hooks(model, 1, [3, 4])),
        lambda: model.run_with_hooks(corrupted, fwd_hooks=experts.patch_expert_hooks(model, 2, 1, cache)),
        lambda: experts.expert_sweep(model, clean, metric, how="zero"),
    )
    assert mixed == []


def test_generation_of_every_kind_makes_no_host_tensor(model, runs):
    clean, _, _ = runs
    dspark = v4lens.load("tiny-dspark", seed=0)
    mixed = run_host_checked(
        lambda: model.generate(clean[:1, :8], 4, verbose=False),
        lambda: dspark(["a short text", "and a somewhat longer one"], padding_side="left"),  # the real vocabulary
        lambda: dspark.generate("a prompt", 3, verbose=False),
        lambda: model.generate(clean[:, :8], 3, do_sample=True, top_p=0.9, seed=0, verbose=False),
        lambda: model.generate(
            clean[:, :8], 3, attention_mask=torch.tensor([[1] * 8, [0] * 3 + [1] * 5]), verbose=False
        ),
        lambda: model.generate(clean[:1, :8], 3, use_cache=False, verbose=False),
        lambda: model.generate(clean[:1, :8], 3, cache_steps=True, mtp=True, return_type="generation", verbose=False),
        lambda: model.generate(clean[:1, :8], 6, speculative=True, verbose=False),
        lambda: dspark.generate(clean[:1, :8], 8, speculative=True, verbose=False),
        lambda: dspark.generate(
            clean[:1, :8], 8, speculative=True, temperature=0.7, seed=0, draft_threshold=0.3, verbose=False
        ),
    )
    assert mixed == []


def test_statistics_figures_and_bulk_collection_make_no_host_tensor(model, runs, tmp_path):
    clean, _, cache = runs
    figures = [("router_heatmap", {"layer": 2}), ("indexer_scores", {"layer": 1}), ("comb_grid", {}),
               ("attention_pattern", {"layer": 1, "head": 0}), ("sink_mass", {}), ("expert_load", {}),
               ("routed_vs_shared", {}), ("stream_norms", {}), ("pre_post_weights", {}),
               ("sinkhorn_convergence", {"layer": 1}), ("compressed_entries", {"layer": 1})]  # fmt: skip
    summaries = ["load_balance", "expert_usage", "hash_vs_learned", "sinkhorn_summary", "indexer_recall_summary",
                 "sink_mass_frame"]  # fmt: skip
    rows = [clean[0], clean[1, :10]]
    mixed = run_host_checked(
        *[lambda fn=fn: getattr(stats, fn)(model, cache) for fn in summaries],
        *[lambda fn=fn, kw=kw: getattr(vplot, fn)(model, cache, **kw) for fn, kw in figures],
        lambda: acts.collect(
            model,
            rows,
            ["blocks.2.hook_streams_post"],
            tmp_path / "run",
            positions="last",
            batch_size=2,
            progress=False,
        ),
    )
    assert mixed == []


def test_conversation_statistics_make_no_host_tensor():
    model = v4lens.load("tiny", seed=0)  # the real vocabulary, for the chat format's tokens
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    seg = chat.segments(messages, model, thinking=True)
    _, cache = model.run_with_cache(seg.tokens())
    mixed = run_host_checked(
        lambda: stats.indexer_picks_by_segment(model, cache, seg),
        lambda: stats.expert_load_by_segment(model, cache, seg),
        lambda: stats.sink_mass_by_segment(model, cache, seg),
        lambda: vplot.router_heatmap(model, cache, layer=2, segments=seg),
    )
    assert mixed == []

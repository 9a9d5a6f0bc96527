"""On a CUDA device: the same model as on the CPU, the same decisions, and every workflow runs there.

Skipped where no GPU is visible (CI, this project's usual machine); `scripts/device_check.sh` runs it
on a lent GPU. `V4LENS_TEST_DEVICE=cpu` runs the same file against the CPU itself (a check of the
tests, not of a device). fp32 with TF32 off: the same arithmetic as the CPU up to reduction order (~1e-7 per
op), so logits agree to ~1e-5 and the discrete decisions (expert ids, indexer picks) are the same
on these weights (a flip would need a near-tie of ~1e-6). `tests/test_device_agnostic.py` checks,
without a GPU, that no tensor is made on the host inside the model's code.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import perturb

import v4lens
from v4lens import patching
from v4lens.model.kv_cache import V4KVCache

DEVICE = os.environ.get("V4LENS_TEST_DEVICE", "cuda")
KIND = torch.device(DEVICE).type
pytestmark = pytest.mark.skipif(KIND == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")

DECISIONS = ("hook_expert_ids", "hook_topk", "hook_key_index")


@pytest.fixture(scope="module", autouse=True)
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(scope="module")
def models():
    cpu = perturb(v4lens.load("tiny", d_vocab=256, seed=0), seed=3)
    gpu = perturb(v4lens.load("tiny", d_vocab=256, seed=0, device=DEVICE), seed=3)
    return cpu, gpu


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (2, 61), generator=torch.Generator().manual_seed(0))


def test_the_seed_builds_the_same_weights_on_the_gpu(models):
    cpu, gpu = models
    assert all(p.device.type == KIND for p in gpu.parameters())
    gpu_weights = gpu.state_dict()
    assert all(torch.equal(t, gpu_weights[name].cpu()) for name, t in cpu.state_dict().items())


def test_forward_hooks_and_decisions_match_the_cpu(models, tokens):
    cpu, gpu = models
    ref_logits, ref = cpu.run_with_cache(tokens)
    logits, cache = gpu.run_with_cache(tokens.to(DEVICE))
    assert logits.device.type == KIND and cache["blocks.1.attn.indexer.hook_topk"].device.type == KIND
    torch.testing.assert_close(logits.cpu(), ref_logits, rtol=1e-4, atol=1e-5)
    for name, want in ref.items():
        if name.endswith(DECISIONS) or not want.is_floating_point():
            assert torch.equal(cache[name].cpu(), want), name
        else:
            torch.testing.assert_close(cache[name].cpu(), want, rtol=1e-4, atol=1e-4, msg=name)
    _, on_host = gpu.run_with_cache(tokens.to(DEVICE), device="cpu")
    assert on_host["blocks.0.hook_streams_post"].device.type == "cpu"


def test_decoding_token_by_token_on_the_gpu_equals_one_forward(models, tokens):
    _, gpu = models
    tokens = tokens.to(DEVICE)
    with torch.no_grad():
        full = gpu(tokens)
        kv = V4KVCache()
        steps = [gpu(tokens[:, :5], past_kv_cache=kv)] + [
            gpu(tokens[:, s : s + 1], past_kv_cache=kv) for s in range(5, 61)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_generation_of_each_kind_gives_the_cpu_s_tokens(models, tokens):
    cpu, gpu = models
    prompt = tokens[:1, :12]
    want = cpu.generate(prompt, 10, verbose=False)
    assert torch.equal(gpu.generate(prompt.to(DEVICE), 10, verbose=False).cpu(), want)
    assert torch.equal(gpu.generate(prompt.to(DEVICE), 10, speculative=True, verbose=False).cpu(), want)
    sampled = gpu.generate(prompt.to(DEVICE), 10, do_sample=True, top_p=0.9, seed=0, verbose=False)
    assert torch.equal(sampled, gpu.generate(prompt.to(DEVICE), 10, do_sample=True, top_p=0.9, seed=0, verbose=False))


def test_hook_edits_and_patching_on_the_gpu(models, tokens):
    cpu, gpu = models
    clean, corrupted = tokens[:1, :16], tokens[1:, :16]

    def reroute(ids, hook):
        return torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)

    def reroute_on_the_host(ids, hook):
        return torch.arange(ids.shape[-1]).expand_as(ids)

    name = "blocks.2.mlp.hook_expert_ids"
    edited = gpu.run_with_hooks(clean.to(DEVICE), fwd_hooks=[(name, reroute)])
    torch.testing.assert_close(
        edited.cpu(), cpu.run_with_hooks(clean, fwd_hooks=[(name, reroute)]), rtol=1e-4, atol=1e-5
    )
    if KIND != "cpu":
        with pytest.raises(ValueError, match="on cpu"):
            gpu.run_with_hooks(clean.to(DEVICE), fwd_hooks=[(name, reroute_on_the_host)])
        assert not gpu.hook_dict[name].fwd_hooks  # nothing left attached

    def metric(logits):
        return logits[:, -1, 3].sum() - logits[:, -1, 5].sum()

    results = []
    for model, device in ((cpu, "cpu"), (gpu, DEVICE)):
        _, clean_cache = model.run_with_cache(clean.to(device))
        results.append(patching.get_act_patch_streams(model, corrupted.to(device), clean_cache, metric).cpu())
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-4)


def test_checkpoints_load_straight_onto_the_gpu_and_bf16_runs(models, tokens, tmp_path):
    cpu, _ = models
    cpu.save_pretrained(tmp_path / "ckpt")
    loaded = v4lens.load(tmp_path / "ckpt", device=DEVICE)
    assert all(p.device.type == KIND for p in loaded.parameters())
    torch.testing.assert_close(loaded(tokens.to(DEVICE)).cpu(), cpu(tokens), rtol=1e-4, atol=1e-5)
    # bf16 costs the same on the device as on the CPU (there: ~7% relative, 93% of the argmaxes on tiny)
    ref = cpu(tokens)
    on_host = v4lens.load(tmp_path / "ckpt", dtype="bf16")(tokens)
    logits = v4lens.load(tmp_path / "ckpt", device=DEVICE, dtype="bf16")(tokens.to(DEVICE)).cpu()
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert relative_error(logits, ref) < 2 * relative_error(on_host, ref) + 0.02
    assert top1(logits, ref) >= top1(on_host, ref) - 0.15


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).detach().norm() / ref.detach().norm())


def top1(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.argmax(-1) == ref.argmax(-1)).float().mean())

"""Routed experts kept off the compute device (`load(path, expert_offload=...)`): the router's picks are
brought over one expert at a time through a bounded cache, and nothing of the output changes."""

from __future__ import annotations

import pytest
import torch
from conftest import two_chunks
from test_at_rest import _quantised_checkpoint

import v4lens
from v4lens.weights.expert_offload import OffloadedExperts
from v4lens.weights.memory import model_bytes

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, _ = _quantised_checkpoint(tmp_path_factory.mktemp("dspark"), "tiny-dspark")
    return path


@pytest.mark.parametrize("source, keep", [("disk", False), ("cpu", False), ("cpu", True), ("disk", True)])
def test_offloaded_experts_give_the_resident_models_outputs(checkpoint, source, keep):
    ref = v4lens.load(checkpoint)
    model = v4lens.load(checkpoint, expert_offload=source, expert_cache="64KB", keep_quantized=keep)
    assert isinstance(model.blocks[1].mlp.experts.w2, OffloadedExperts)
    assert model.expert_cache.misses == 0  # nothing brought over yet
    tokens = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (a, da), cache_a = ref.run_with_cache(tokens, draft=True)
        (b, db), cache_b = model.run_with_cache(tokens, draft=True)
    assert torch.equal(a, b) and torch.equal(da.logits, db.logits)
    assert all(torch.equal(cache_a[k], cache_b[k]) for k in cache_a)
    assert 0 < model.expert_cache.bytes <= 64 * 1024
    with torch.inference_mode():
        assert torch.equal(two_chunks(ref, tokens, 4), two_chunks(model, tokens, 4))
    prompt = tokens[:1, :5]
    assert torch.equal(ref.generate(prompt, 5, stop_at_eos=False, speculative=True),
                       model.generate(prompt, 5, stop_at_eos=False, speculative=True))  # fmt: skip


def test_only_the_picked_experts_move_and_the_cache_keeps_them(checkpoint):
    model = v4lens.load(checkpoint, expert_offload="disk", expert_cache="1GB")
    resident = v4lens.load(checkpoint)
    experts = sum(p.numel() * p.element_size() for n, p in resident.named_parameters() if ".mlp.experts.w" in n)
    assert model_bytes(model) == model_bytes(resident) - experts  # the experts are not resident
    tokens = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(1))
    _, cache = model.run_with_cache(tokens)
    picked = sum(3 * len(torch.unique(cache[n][cache[n] >= 0])) for n in cache if n.endswith("mlp.hook_expert_ids"))
    assert model.expert_cache.misses == picked  # w1, w2, w3 of each expert a layer's tokens picked, once each
    before = model.expert_cache.misses
    with torch.no_grad():
        model(tokens)
    assert model.expert_cache.misses == before and model.expert_cache.hits >= picked  # all from the cache now


def test_whole_tensor_use_edits_and_bad_options_are_refused(checkpoint):
    model = v4lens.load(checkpoint, expert_offload="cpu")
    w = model.blocks[1].mlp.experts.w1
    with pytest.raises(RuntimeError, match="expert_offload"):
        w.sum()
    with pytest.raises(RuntimeError, match="expert_offload"), torch.no_grad():
        w.mul_(2)
    with pytest.raises(ValueError, match="expert_offload must be"):
        v4lens.load(checkpoint, expert_offload="gpu")
    with pytest.raises(ValueError, match="preset"):
        v4lens.load("tiny", expert_offload="cpu")
    with pytest.raises(ValueError, match="device_map"):
        v4lens.load(checkpoint, expert_offload="cpu", device_map={"embed": "cpu"})
    with pytest.raises(ValueError, match="expert_cache"):
        v4lens.load(checkpoint, expert_offload="cpu", expert_cache="lots")


def test_saving_an_offloaded_model_writes_the_experts(checkpoint, tmp_path):
    """Each expert is read back once to be written: the save equals the resident model's."""
    from safetensors.torch import load_file

    v4lens.load(checkpoint).save_pretrained(tmp_path / "resident", format="official")
    v4lens.load(checkpoint, expert_offload="disk", expert_cache="64KB").save_pretrained(tmp_path / "off", format="official")
    a, b = load_file(tmp_path / "resident" / "model.safetensors"), load_file(tmp_path / "off" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_the_cache_stays_bounded_when_threads_share_it():
    from concurrent.futures import ThreadPoolExecutor

    from v4lens.weights.expert_offload import ExpertCache

    cache = ExpertCache(max_bytes=10 * 4 * 16)  # ten experts of 16 fp32 values
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: cache.get(i % 25, lambda: torch.full((16,), float(i % 25))), range(2000)))
    assert cache.bytes == sum(v.numel() * v.element_size() for v in cache.entries.values()) <= 640
    assert cache.hits + cache.misses == 2000 and len(cache.entries) <= 10


def test_reads_run_ahead_of_compute_on_one_thread_and_change_nothing(checkpoint):
    """Once a layer's router has picked, the experts it uses are read in the background in the order the MoE
    takes them; at most `ahead` reads are held beyond the cache; a failed read surfaces in the forward."""
    import threading

    ref = v4lens.load(checkpoint)
    model = v4lens.load(checkpoint, expert_offload="disk", expert_cache="1B")  # nothing fits: every use a read
    threads, held = set(), []
    cache = model.expert_cache
    for name, w in model.named_parameters():
        if isinstance(w, OffloadedExperts):
            def fetch(e, inner=w.fetch):
                threads.add(threading.current_thread().name)
                held.append(len(cache._pending))
                return inner(e)
            w.fetch = fetch
    tokens = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ref(tokens), model(tokens))
    assert cache.prefetched > 0.8 * cache.misses and cache.bytes == 0
    assert any(t.startswith("v4lens-experts") for t in threads) and max(held) <= cache.ahead
    cache.ahead = 0  # read-ahead off: every read on the forward's own thread
    threads.clear()
    before = cache.prefetched
    with torch.no_grad():
        assert torch.equal(ref(tokens), model(tokens))
    assert cache.prefetched == before and not any(t.startswith("v4lens-experts") for t in threads)
    cache.ahead = 6
    w = model.blocks[1].mlp.experts.w3

    def broken(e):
        raise OSError(f"expert {e} unreadable")

    w.fetch = broken
    with pytest.raises(OSError, match="unreadable"), torch.no_grad():
        model(tokens)


def test_max_memory_counts_the_expert_cache_and_experts_held_in_host_memory(checkpoint):
    from v4lens.weights.memory import ModelTooLargeError

    resident = model_bytes(v4lens.load(checkpoint, expert_offload="disk", expert_cache="1KB"))
    v4lens.load(checkpoint, expert_offload="disk", expert_cache="1KB", max_memory=resident + 1_000_000)
    with pytest.raises(ModelTooLargeError, match="expert_offload"):  # the 4 MB cache no longer fits beside the rest
        v4lens.load(checkpoint, expert_offload="disk", expert_cache="4MB", max_memory=resident + 1_000_000)
    with pytest.raises(ModelTooLargeError):  # "cpu" on a CPU device: the experts are in the same memory
        v4lens.load(checkpoint, expert_offload="cpu", expert_cache="1KB", max_memory=resident + 1_000_000)

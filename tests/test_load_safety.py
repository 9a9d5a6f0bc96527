"""Loading never gives a silently wrong model and never reads outside the checkpoint or past memory:
duplicate tensors, the shard index, paths escaping the folder, corrupt FP8/FP4 scales, non-finite
weights, models larger than the machine, oversized config.json files, and preset names that are
also local folders."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import v4lens
from v4lens.model.config import preset
from v4lens.weights import loading
from v4lens.weights.quant import quantize_fp4, quantize_fp8

pytestmark = pytest.mark.usefixtures("single_thread")
TOKENS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]])


@pytest.fixture(scope="module")
def model():
    return v4lens.load("tiny", d_vocab=256, seed=3)


def _sharded(model, folder: Path) -> tuple[Path, dict[str, str]]:
    """A sharded checkpoint in a fresh folder; returns it and its index's weight_map."""
    model.save_pretrained(folder, max_shard_size="100KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    return folder, index["weight_map"]


def _write_index(folder: Path, weight_map: dict[str, str]) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# ---------------------------------------------------------------------- a tensor in two files
def test_tensor_in_two_files_is_an_error_naming_both(model, tmp_path):
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    save_file({"model.layers.0.attn.wkv.weight": torch.zeros(32, 64)}, folder / "extra.safetensors")
    both = r"model\.layers\.0\.attn\.wkv\.weight.*extra\.safetensors.*model\.safetensors"
    with pytest.raises(ValueError, match=both):
        v4lens.load(folder)


def test_index_decides_which_file_holds_a_tensor(model, tmp_path):
    folder, weight_map = _sharded(model, tmp_path / "ckpt")
    shards = sorted(set(weight_map.values()))
    key = next(k for k, f in weight_map.items() if f == shards[0] and k.endswith("wq_a.weight"))
    # the same tensor, zeroed, in a later shard (listed in the index for other tensors) and in a stray file
    last = load_file(folder / shards[-1])
    last[key] = torch.zeros_like(load_file(folder / shards[0])[key])
    save_file(last, folder / shards[-1], metadata={"format": "pt"})
    save_file({key: last[key]}, folder / "zz-stray.safetensors")
    with pytest.warns(UserWarning, match=r"zz-stray\.safetensors.*not in .*index"):
        loaded = v4lens.load(folder)
    assert torch.equal(loaded.state_dict()["blocks.0.attn.wq_a"], model.state_dict()["blocks.0.attn.wq_a"])
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), model(TOKENS))


def test_index_entry_naming_the_wrong_file_is_an_error(model, tmp_path):
    folder, weight_map = _sharded(model, tmp_path / "ckpt")
    shards = sorted(set(weight_map.values()))
    key = next(k for k, f in weight_map.items() if f == shards[0])
    weight_map[key] = shards[1]
    _write_index(folder, weight_map)
    with pytest.raises(ValueError, match=rf"{key}.*{shards[1]}"):
        v4lens.load(folder)


# ---------------------------------------------------------------------- index entries escaping the folder
def _move_out(folder: Path, weight_map: dict[str, str], outside: Path) -> str:
    """Move the first shard to `outside`; returns its name in the index."""
    shard = min(weight_map.values())
    outside.parent.mkdir(parents=True, exist_ok=True)
    (folder / shard).rename(outside)
    return shard


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_index_entries_must_stay_inside_the_folder(model, tmp_path, how):
    folder, weight_map = _sharded(model, tmp_path / "ckpt")
    outside = tmp_path / "elsewhere" / "outside.safetensors"
    shard = _move_out(folder, weight_map, outside)
    entry = {"dotdot": "../elsewhere/outside.safetensors", "absolute": str(outside), "symlink": shard}[how]
    if how == "symlink":
        (folder / shard).symlink_to(outside)
    else:
        _write_index(folder, {k: entry if f == shard else f for k, f in weight_map.items()})
    with pytest.raises(ValueError, match=rf"{entry}.*outside.*{folder}"):
        v4lens.load(folder)


def test_symlink_out_of_a_folder_without_index_is_refused(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").rename(tmp_path / "outside.safetensors")
    (tmp_path / "ckpt" / "model.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors.*outside the checkpoint folder"):
        v4lens.load(tmp_path / "ckpt")


def test_hub_cache_symlinks_still_load(model, tmp_path):
    """transformers' cache: snapshots/<rev>/<file> are symlinks into the repo's blobs/ folder."""
    repo = tmp_path / "models--org--tiny"
    folder, _ = _sharded(model, tmp_path / "plain")
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(folder.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        f.rename(blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    loaded = v4lens.load(snapshot)
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), model(TOKENS))


# ---------------------------------------------------------------------- corrupt weights
def _quantised(model, folder: Path, scale_format: str) -> Path:
    """An official-layout checkpoint with one FP8 linear and one FP4 expert."""
    model.save_pretrained(folder, format="official")
    tensors = load_file(folder / "model.safetensors")
    w = tensors.pop("layers.1.attn.wq_b.weight")
    q, s = quantize_fp8(w, scale_format=scale_format)
    tensors["layers.1.attn.wq_b.weight"], tensors["layers.1.attn.wq_b.scale"] = q, s
    w = tensors.pop("layers.2.ffn.experts.3.w2.weight")
    tensors["layers.2.ffn.experts.3.w2.weight"], tensors["layers.2.ffn.experts.3.w2.scale"] = quantize_fp4(w)
    save_file(tensors, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize(
    "key, scale_format, bad",
    [
        ("layers.1.attn.wq_b.scale", "fp32", 0.0),
        ("layers.1.attn.wq_b.scale", "fp32", float("nan")),
        ("layers.1.attn.wq_b.scale", "fp32", float("inf")),
        ("layers.1.attn.wq_b.scale", "fp32", -1.0),
        ("layers.1.attn.wq_b.scale", "e8m0", float("nan")),  # e8m0 has no zero or inf; 0xFF is NaN
        ("layers.2.ffn.experts.3.w2.scale", "e8m0", float("nan")),
    ],
)
def test_bad_quantisation_scales_are_errors_naming_the_tensor(model, tmp_path, key, scale_format, bad):
    folder = _quantised(model, tmp_path / "q", scale_format)
    assert v4lens.load(folder) is not None  # the clean quantised checkpoint loads
    tensors = load_file(folder / "model.safetensors")
    scale = tensors[key].float()
    scale.view(-1)[0] = bad
    tensors[key] = scale.to(tensors[key].dtype)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=rf"{key}.*finite and > 0"):
        v4lens.load(folder)


def test_non_finite_weights_warn_once_with_the_tensor_names(model, tmp_path):
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.attn.wkv.weight"][0, 0] = float("nan")
    tensors["model.layers.2.attn.wq_a.weight"][1, 1] = float("inf")
    save_file(tensors, folder / "model.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        v4lens.load(folder)
    found = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert len(found) == 1, [str(w.message) for w in caught]
    assert "model.layers.0.attn.wkv.weight" in found[0] and "model.layers.2.attn.wq_a.weight" in found[0]
    with warnings.catch_warnings(record=True) as caught:  # a clean checkpoint does not warn
        warnings.simplefilter("always")
        model.save_pretrained(tmp_path / "clean")
        v4lens.load(tmp_path / "clean")
    assert not [w for w in caught if "non-finite" in str(w.message)]


# ---------------------------------------------------------------------- memory before allocating
@pytest.fixture
def no_allocation(monkeypatch):
    """Building any model fails the test: the memory check must refuse before anything is allocated."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built: the memory check came too late")

    monkeypatch.setattr(loading, "HookedV4", refuse)


def test_flash_is_refused_before_allocating(no_allocation):
    with pytest.raises(MemoryError, match=r"flash.*GB.*mini-3b") as err:
        v4lens.load("flash")
    assert isinstance(err.value, ValueError)  # callers catching bad arguments catch it too
    with pytest.raises(MemoryError, match="flash"):
        v4lens.load("flash", dtype="bf16")


def test_huge_config_sizes_are_refused_before_allocating(no_allocation):
    with pytest.raises(MemoryError, match="GB"):
        v4lens.load("tiny", d_model=1 << 16, d_vocab=1 << 20)


def test_max_memory_is_respected(model, tmp_path):
    with pytest.raises(MemoryError, match=r"max_memory"):
        v4lens.load("tiny", d_vocab=256, max_memory="100KB")
    assert v4lens.load("tiny", d_vocab=256, max_memory="1GB").cfg.d_vocab == 256
    assert v4lens.load("tiny", d_vocab=256, max_memory=10**9).cfg.d_vocab == 256
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(MemoryError, match=r"max_memory"):
        v4lens.load(tmp_path / "ckpt", max_memory=100_000)
    for bad in ("lots", -1, 0, True, "1.5 parsecs", float("nan")):
        with pytest.raises((ValueError, TypeError), match="max_memory"):
            v4lens.load("tiny", d_vocab=256, max_memory=bad)


def test_mini_3b_fits_a_24gb_machine(monkeypatch):
    """mini-3b is 13 GB in fp32: a machine with 20 GB free builds it, one with 10 GB free is told why not."""
    from v4lens.weights import memory

    monkeypatch.setattr(memory, "free_bytes", lambda device: 20 * 10**9)
    memory.check_memory(preset("mini-3b"), "cpu")
    memory.check_memory(preset("mini-3b", dtype="bf16"), "cpu")
    monkeypatch.setattr(memory, "free_bytes", lambda device: 10 * 10**9)
    with pytest.raises(MemoryError, match=r"mini-3b.*12\.\d GB.*10\.0 GB"):
        memory.check_memory(preset("mini-3b"), "cpu")
    memory.check_memory(preset("mini-3b", dtype="bf16"), "cpu")


def test_free_memory_is_read():
    from v4lens.weights import memory

    assert memory.free_bytes("cpu") > 10**7
    assert memory.free_bytes("meta") is None


# ---------------------------------------------------------------------- config.json size
def test_config_json_symlinked_to_dev_zero_is_refused(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").symlink_to("/dev/zero")
    with pytest.raises(ValueError, match=r"config\.json.*MiB"):
        v4lens.load(folder)


def test_oversized_config_json_is_refused(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "deepseek_v4", "padding": "x" * (2 << 20)}))
    with pytest.raises(ValueError, match=r"config\.json.*MiB"):
        v4lens.load(folder)


# ---------------------------------------------------------------------- a preset name that is also a folder
@pytest.mark.parametrize("name", ["tiny", "tiny-recall"])
def test_preset_name_that_is_also_a_folder_is_ambiguous(model, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    model.save_pretrained(tmp_path / name)
    with pytest.raises(ValueError, match=rf"'{name}'.*\./{name}.*preset='{name}'"):
        v4lens.load(name)
    for path in (f"./{name}", tmp_path / name, str(tmp_path / name), Path(name)):
        assert v4lens.load(path).cfg.d_vocab == 256, path
    if name == "tiny":
        assert v4lens.load(preset="tiny").cfg.d_vocab == 129280
        assert v4lens.load(preset="tiny", d_vocab=512).cfg.d_vocab == 512


def test_preset_keyword():
    assert v4lens.load(preset="tiny", d_vocab=256).cfg.name == "tiny"
    with pytest.raises(ValueError, match="preset"):
        v4lens.load("tiny", preset="tiny")
    with pytest.raises(ValueError, match="nope"):
        v4lens.load(preset="nope")

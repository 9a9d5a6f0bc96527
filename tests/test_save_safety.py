"""Writing checkpoints never loses a file: save_pretrained, slice_checkpoint and train's --out.

v4lens replaces only files it wrote (listed in the checkpoint's manifest), refuses a foreign
non-empty folder unless overwrite=True, never writes a slice into its own source, and saves
atomically: a failed save leaves the old checkpoint exactly as it was.
"""

from __future__ import annotations

import errno
import json
import re

import pytest
import torch

import v4lens
from v4lens import train as T
from v4lens.cli import main as cli_main
from v4lens.weights import saving
from v4lens.weights.slicing import slice_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

TOKENS = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def old_new():
    """Two different tiny models (d_vocab 256): the checkpoint on disk and the one saved over it."""
    return v4lens.load("tiny", d_vocab=256, seed=0), v4lens.load("tiny", d_vocab=256, seed=1)


def snapshot(folder):
    """Every file under `folder` (hidden ones included) -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def logits(model_or_path):
    model = v4lens.load(model_or_path) if not isinstance(model_or_path, v4lens.HookedV4) else model_or_path
    with torch.no_grad():
        return model(TOKENS)


def leftovers(root):
    """Temporary or backup folders a save left anywhere under `root`."""
    return [p for p in root.rglob("*") if re.search(r"tmp|old|bak", p.name) and p.name.startswith(".")]


def foreign_folder(path):
    """A folder written by someone else: v4lens-like names, and files v4lens never writes."""
    path.mkdir()
    (path / "README.md").write_text("my notes\n")
    (path / "config.json").write_text("{}\n")
    (path / "model.safetensors").write_bytes(b"someone else's weights")
    (path / "model-00001-of-00002.safetensors").write_bytes(b"more of them")
    (path / "data").mkdir()
    (path / "data" / "x.txt").write_text("keep me\n")
    return path


# ---------------------------------------------------------------------- 1. only v4lens's own files are replaced
def test_save_refuses_a_folder_v4lens_did_not_write(old_new, tmp_path):
    model, _ = old_new
    folder = foreign_folder(tmp_path / "theirs")
    before = snapshot(folder)
    with pytest.raises(FileExistsError, match=r"theirs.*README\.md.*overwrite=True"):
        model.save_pretrained(folder)
    assert snapshot(folder) == before
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_only_the_files_v4lens_writes(old_new, tmp_path):
    model, _ = old_new
    folder = foreign_folder(tmp_path / "theirs")
    model.save_pretrained(folder, overwrite=True)
    assert (folder / "README.md").read_text() == "my notes\n" and (folder / "data" / "x.txt").read_text() == "keep me\n"
    assert not (folder / "model-00001-of-00002.safetensors").exists()  # a stale shard would be read too
    assert torch.equal(logits(folder), logits(model))
    assert leftovers(tmp_path) == []


def test_resaving_a_v4lens_checkpoint_keeps_the_users_files(old_new, tmp_path):
    old, new = old_new
    folder = tmp_path / "ckpt"
    old.save_pretrained(folder, max_shard_size="300KB")
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    (folder / "README.md").write_text("what this checkpoint is\n")
    (folder / "plots").mkdir()
    (folder / "plots" / "a.png").write_bytes(b"png")
    new.save_pretrained(folder, format="official")  # one file now: the old shards and index must go
    names = {p.name for p in folder.iterdir()}
    assert {"README.md", "plots", "model.safetensors", "config.json"} <= names
    assert not any(n.startswith("model-") or n.endswith("index.json") for n in names), names
    assert (folder / "README.md").read_text() == "what this checkpoint is\n" and (folder / "plots" / "a.png").exists()
    assert torch.equal(logits(folder), logits(new))
    # the manifest lists what v4lens wrote, and nothing of the user's
    listed = json.loads((folder / "v4lens-checkpoint.json").read_text())["files"]
    assert "model.safetensors" in listed and "config.json" in listed and "README.md" not in listed


def test_save_into_a_file_or_under_one_is_refused(old_new, tmp_path):
    model, _ = old_new
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(OSError, match=re.escape(str(tmp_path / "file"))):
            model.save_pretrained(bad)
    assert (tmp_path / "file").read_text() == "x"


# ---------------------------------------------------------------------- 2. a slice never writes into its source
@pytest.fixture(scope="module")
def source(old_new, tmp_path_factory):
    """A small official-layout checkpoint (3 shards) and a target config.json equal to its config."""
    model, _ = old_new
    path = tmp_path_factory.mktemp("source") / "src"
    model.save_pretrained(path, format="official", max_shard_size="400KB")
    target = path.parent / "target.json"
    target.write_text(json.dumps(model.cfg.to_official()))
    return path, target


def test_slice_refuses_an_output_that_is_in_or_around_the_source(old_new, source, tmp_path):
    model, _ = old_new
    path, _ = source
    before = snapshot(path.parent)
    link = tmp_path / "link"
    link.symlink_to(path, target_is_directory=True)
    for out in (path, path / "sub", path.parent, link, link / "sub"):
        with pytest.raises(ValueError, match=rf"out.*{re.escape(str(out))}.*source.*{re.escape(str(path))}"):
            slice_checkpoint(path, model.cfg, out, progress=False)
    assert snapshot(path.parent) == before


def test_cli_slice_src_src_keeps_the_source(source):
    path, target = source
    before = snapshot(path)
    assert cli_main(["slice", str(path), str(path), "--target", str(target), "--format", "hf"]) != 0
    assert snapshot(path) == before
    assert v4lens.load(path).cfg.d_vocab == 256


def test_slice_refuses_a_foreign_folder_before_slicing(old_new, source, tmp_path, monkeypatch):
    model, _ = old_new
    path, _ = source
    folder = foreign_folder(tmp_path / "theirs")
    before = snapshot(folder)
    monkeypatch.setattr("v4lens.weights.slicing.make_plan", lambda *a, **k: pytest.fail("sliced before checking"))
    with pytest.raises(FileExistsError, match="theirs"):
        slice_checkpoint(path, model.cfg, folder, progress=False)
    assert snapshot(folder) == before


def test_slice_writes_slice_json_into_the_checkpoint(old_new, source, tmp_path):
    model, _ = old_new
    path, _ = source
    out = tmp_path / "sliced"
    slice_checkpoint(path, model.cfg, out, dtype="float32", progress=False)
    listed = json.loads((out / "v4lens-checkpoint.json").read_text())["files"]
    assert "slice.json" in listed and "config.json" in listed
    assert torch.equal(logits(out), logits(model))
    slice_checkpoint(path, model.cfg, out, dtype="float32", progress=False)  # again: its own files, accepted


# ---------------------------------------------------------------------- 3. atomic saves
def _fail_after_first_shard(monkeypatch, error):
    real = saving.write_file
    calls = []

    def write_file(path, tensors, metadata=None):
        if calls:
            raise error
        calls.append(path)
        real(path, tensors, metadata)

    monkeypatch.setattr(saving, "write_file", write_file)
    return calls


def test_a_full_disk_mid_save_leaves_the_old_checkpoint(old_new, tmp_path, monkeypatch):
    old, new = old_new
    folder = tmp_path / "ckpt"
    old.save_pretrained(folder, max_shard_size="300KB")
    (folder / "README.md").write_text("mine\n")
    before = snapshot(folder)
    calls = _fail_after_first_shard(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match="No space left"):
        new.save_pretrained(folder, max_shard_size="300KB")
    assert calls  # one new shard was written before the disk filled up
    assert snapshot(folder) == before
    assert torch.equal(logits(folder), logits(old))
    assert leftovers(tmp_path) == []


def test_a_failed_save_to_a_new_folder_leaves_nothing(old_new, tmp_path, monkeypatch):
    _, new = old_new
    _fail_after_first_shard(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError):
        new.save_pretrained(tmp_path / "a" / "b" / "new", max_shard_size="300KB")
    assert list(tmp_path.iterdir()) == []


def test_a_crash_between_config_and_weights_keeps_the_old_pair(old_new, tmp_path, monkeypatch):
    old, _ = old_new
    folder = tmp_path / "ckpt"
    old.save_pretrained(folder)
    before = snapshot(folder)
    bigger = v4lens.load("tiny", d_vocab=300, seed=2)  # another config.json

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # a kill between writing config.json and the weights

    monkeypatch.setattr(saving, "write_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        bigger.save_pretrained(folder)
    assert snapshot(folder) == before  # the new config.json never reached the folder
    assert torch.equal(logits(folder), logits(old))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("fail_at", [1, 2, 6, 11, 12, 13])  # moving the old files aside (10), the new ones in (3)
def test_a_failure_while_moving_files_into_place_restores_the_old_checkpoint(old_new, tmp_path, monkeypatch, fail_at):
    from v4lens.weights import atomic

    old, new = old_new
    folder = tmp_path / "ckpt"
    old.save_pretrained(folder, max_shard_size="300KB")
    (folder / "notes.txt").write_text("mine\n")
    before = snapshot(folder)
    real, moves = atomic._move, []

    def move(src, dst):
        moves.append(src)
        if len(moves) == fail_at:
            raise OSError(errno.EIO, "I/O error")
        real(src, dst)

    monkeypatch.setattr(atomic, "_move", move)
    with pytest.raises(OSError, match="I/O error"):
        new.save_pretrained(folder)
    assert len(list(folder.glob("model-*"))) == 7 and len(moves) == 2 * fail_at - 1  # failed there, then put back
    assert snapshot(folder) == before
    assert torch.equal(logits(folder), logits(old))
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------- 19. dtype and shard size
def test_save_dtype_must_be_one_v4lens_loads(old_new, tmp_path):
    model, _ = old_new
    for bad in (torch.float16, torch.int8, torch.float64, "fp8", "fp16", 3):
        with pytest.raises(ValueError, match="dtype"):
            model.save_pretrained(tmp_path / "bad", dtype=bad)
        assert not (tmp_path / "bad").exists()
    model.save_pretrained(tmp_path / "bf16", dtype="bf16")
    assert v4lens.load(tmp_path / "bf16", dtype="bf16").blocks[1].attn.wq_b.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "fp32", dtype="float32")
    assert torch.equal(logits(tmp_path / "fp32"), logits(model))


def test_shard_size_must_be_positive(old_new, tmp_path):
    model, _ = old_new
    for bad in ("0GB", "0.0000000001KB", -1, 0, "abc", "-5MB", True, 1.5):
        with pytest.raises(ValueError, match="max_shard_size"):
            model.save_pretrained(tmp_path / "bad", max_shard_size=bad)
        assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------- 17 (train --out)
def test_train_checks_out_before_training(tmp_path, monkeypatch):
    folder = foreign_folder(tmp_path / "theirs")
    before = snapshot(folder)
    monkeypatch.setattr(T, "build_model", lambda *a, **k: pytest.fail("trained before checking --out"))
    with pytest.raises(FileExistsError, match="theirs"):
        T.train("tiny-recall", steps=1, out=folder, progress=False)
    assert snapshot(folder) == before


def test_train_cli_refuses_a_bad_out_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(T, "train", lambda *a, **k: pytest.fail("trained before checking --out"))
    (tmp_path / "file").write_text("x")
    folder = foreign_folder(tmp_path / "theirs")
    for out in (tmp_path / "file", tmp_path / "file" / "sub", folder):
        with pytest.raises(SystemExit) as e:
            T.main(["--steps", "1", "--out", str(out)])
        assert e.value.code == 2
        assert "--out" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "x" and (folder / "README.md").read_text() == "my notes\n"


def test_train_saves_steps_and_final_checkpoint_and_can_rerun(tmp_path):
    kw = {"steps": 4, "batch_size": 4, "seed": 0, "eval_every": 0, "progress": False, "eval_batch_size": 8}
    kw["save_every"] = 2
    out = tmp_path / "run"
    T.train("tiny-recall", out=out, **kw)
    (out / "README.md").write_text("run notes\n")
    assert {"config.json", "model.safetensors", "train.json", "step-2", "README.md"} <= {p.name for p in out.iterdir()}
    model, _ = T.train("tiny-recall", out=out, **{**kw, "seed": 1})  # a rerun into its own folder is fine
    assert (out / "README.md").read_text() == "run notes\n"
    assert json.loads((out / "train.json").read_text())["args"]["seed"] == 1
    assert torch.equal(v4lens.load(out).embed.weight, model.embed.weight)
    assert leftovers(tmp_path) == []

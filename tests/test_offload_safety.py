"""`offload_dir` / `open_offloaded` keep files safe and answers right: v4lens writes only into an
empty folder or one of its own offload folders and replaces only the files it wrote there; a run
is complete or absent (a failed run leaves the previous one as it was); a folder is reopened only
when complete, with the model that wrote it, and only through files inside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import v4lens
from v4lens.analysis.caching import caching_hooks, run_with_cache
from v4lens.model.fingerprint import weights_fingerprint

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = ["blocks.0.hook_streams_post", "blocks.2.hook_streams_post", "blocks.3.hook_streams_post"]


def _run(model, tokens, out, **kw):
    kw.setdefault("names_filter", NAMES)
    with torch.no_grad():
        return run_with_cache(model, tokens, pos_slice=[1, 7], offload_dir=out, **kw)[1]


def _files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def _boom(tensor, hook):
    raise RuntimeError("a hook failed half-way")


# ------------------------------------------------------------------------- own files only
def test_a_folder_of_user_files_is_refused_and_left_alone(tiny256, tokens_2x40, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "index.json").write_text('{"my": "notes"}')
    (out / "tokens.bin").write_bytes(b"my data")
    before = _files(out)
    with pytest.raises(FileExistsError, match="mine.*not a v4lens offload"):
        _run(tiny256, tokens_2x40, out)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary left beside it


def test_a_reused_offload_folder_replaces_only_its_own_files(tiny256, tokens_2x40, tmp_path):
    first = _run(tiny256, tokens_2x40, tmp_path)
    (tmp_path / "notes.txt").write_text("keep me")
    second = _run(tiny256, tokens_2x40, tmp_path, names_filter=NAMES[:1])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["index.json", "notes.txt", "tokens.bin",
                                                                  "positions.bin", f"{NAMES[0]}.bin"])  # fmt: skip
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert second[NAMES[0]].untyped_storage().filename == str(tmp_path / f"{NAMES[0]}.bin")
    assert torch.equal(first[NAMES[0]], second[NAMES[0]])  # the first cache's maps survive the replacement
    assert list(v4lens.open_offloaded(tmp_path, tiny256).keys()) == NAMES[:1]
    # a user's file where the new run would put one of its own: refused, the previous run kept
    (tmp_path / f"{NAMES[2]}.bin").write_bytes(b"not v4lens's")
    with pytest.raises(FileExistsError, match="blocks.3.hook_streams_post.bin"):
        _run(tiny256, tokens_2x40, tmp_path)
    assert (tmp_path / f"{NAMES[2]}.bin").read_bytes() == b"not v4lens's"
    assert list(v4lens.open_offloaded(tmp_path, tiny256).keys()) == NAMES[:1]


# ------------------------------------------------------------------------- complete or absent
@pytest.mark.parametrize("chunk_len", [None, 16])
def test_a_failed_run_leaves_the_previous_run_intact(tiny256, tokens_2x40, tmp_path, chunk_len):
    out = tmp_path / "run"
    _run(tiny256, tokens_2x40, out)
    before = _files(out)
    with tiny256.hooks(fwd_hooks=[("blocks.2.hook_streams_post", _boom)]), pytest.raises(RuntimeError, match="half"):
        _run(tiny256, tokens_2x40, out, chunk_len=chunk_len)
    assert _files(out) == before  # nothing partial, no temporary folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    reopened = v4lens.open_offloaded(out, tiny256)
    assert sorted(reopened.keys()) == sorted(NAMES)
    # into a new folder: nothing at all is left
    with tiny256.hooks(fwd_hooks=[("blocks.2.hook_streams_post", _boom)]), pytest.raises(RuntimeError, match="half"):
        _run(tiny256, tokens_2x40, tmp_path / "new", chunk_len=chunk_len)
    assert not (tmp_path / "new").exists()


def test_open_offloaded_refuses_an_incomplete_or_foreign_index(tiny256, tokens_2x40, tmp_path):
    _run(tiny256, tokens_2x40, tmp_path)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["format"] == "v4lens-offload" and index["complete"] is True
    (tmp_path / "index.json").write_text(json.dumps({**index, "complete": False}))
    with pytest.raises(ValueError, match="not complete"):
        v4lens.open_offloaded(tmp_path, tiny256)
    (tmp_path / "index.json").write_text(json.dumps(index["tensors"]))  # an index without the marker
    with pytest.raises(ValueError, match="not a v4lens offload"):
        v4lens.open_offloaded(tmp_path, tiny256)
    with pytest.raises(FileNotFoundError, match="index.json"):
        v4lens.open_offloaded(tmp_path / "nowhere", tiny256)


def test_caching_hooks_alone_cannot_offload(tiny256, tmp_path):
    with pytest.raises(ValueError, match="run_with_cache"):
        caching_hooks(tiny256, offload_dir=tmp_path)


# ------------------------------------------------------------------------- the model that wrote it
def test_open_offloaded_refuses_another_model(tiny256, tokens_2x40, tmp_path):
    _run(tiny256, tokens_2x40, tmp_path)
    with pytest.raises(ValueError, match="another model.*weights"):
        v4lens.open_offloaded(tmp_path, v4lens.load("tiny", d_vocab=256, seed=1))
    with pytest.raises(ValueError, match="another model.*d_vocab"):
        v4lens.open_offloaded(tmp_path, v4lens.load("tiny", seed=0))
    v4lens.open_offloaded(tmp_path, v4lens.load("tiny", d_vocab=256, seed=0))  # an identical copy is fine


def test_weights_fingerprint_is_the_same_in_another_process(tiny256):
    code = "import v4lens; from v4lens.model.fingerprint import weights_fingerprint as f; " \
           "print(f(v4lens.load('tiny', d_vocab=256, seed=0)))"  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert got.stdout.strip() == weights_fingerprint(tiny256)


# ------------------------------------------------------------------------- files outside the folder
@pytest.mark.parametrize("form", ["dotdot", "absolute", "symlink"])
def test_open_offloaded_refuses_index_entries_outside_the_folder(tiny256, tokens_2x40, tmp_path, form):
    out = tmp_path / "run"
    _run(tiny256, tokens_2x40, out)
    name = NAMES[1]
    outside = tmp_path / "secret.bin"
    outside.write_bytes((out / f"{name}.bin").read_bytes())  # the right size: only the place is wrong
    index = json.loads((out / "index.json").read_text())
    if form == "symlink":
        (out / f"{name}.bin").unlink()
        (out / f"{name}.bin").symlink_to(outside)
    else:
        index["tensors"][name]["file"] = "../secret.bin" if form == "dotdot" else str(outside)
        (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{name}.*outside"):
        v4lens.open_offloaded(out, tiny256)

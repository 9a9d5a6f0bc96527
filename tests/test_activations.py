"""Bulk activations (v4lens.activations): right-padded length-bucketed batches equal each row run alone,
chosen positions per row, an on-disk store of shards that resumes after a crash without duplicates,
memory bounded by a shard, and the store read back as a torch Dataset."""

from __future__ import annotations

import gc
import json

import pytest
import torch

import v4lens
import v4lens.activations as acts
from v4lens.activations import store as store_module
from v4lens.activations.collect import forward_plan

pytestmark = pytest.mark.usefixtures("single_thread")
STREAM = "blocks.2.hook_streams_post"


def ragged(n: int, lo: int = 3, hi: int = 41, seed: int = 0) -> list[torch.Tensor]:
    """n rows of random tokens for tiny256, lengths in [lo, hi)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(L),), generator=g) for L in torch.randint(lo, hi, (n,), generator=g)]


def by_key(store) -> dict:
    """(row, position) -> {hook: tensor} over the whole store, checking no pair is stored twice."""
    out = {}
    for i in range(len(store)):
        item = store[i]
        key = (item["row"], item["position"])
        assert key not in out, f"{key} stored twice"
        out[key] = {h: item[h].clone() for h in store.hooks}
    return out


def collectable(model) -> list[str]:
    """Every hook of the model that collect accepts (per position, independent of the padded length)."""
    names = []
    for name in model.hook_dict:
        try:
            acts.check_hooks(model, [name])
        except ValueError:
            continue
        names.append(name)
    return names


# ---------------------------------------------------------------- padding: each row = the row run alone
def test_right_padded_batch_equals_each_row_alone(tiny256, tmp_path):
    """Lengths 37, 40, 13 straddle the CSA (m = 4) and HCA (m = 6) block boundaries; one batch of 3
    rows padded to 40. Every collectable hook, at every real position, equals the row run alone."""
    g = torch.Generator().manual_seed(7)
    rows = [torch.randint(0, 256, (L,), generator=g) for L in (37, 40, 13)]
    hooks = collectable(tiny256)
    assert "blocks.2.attn.hook_z" in hooks and "blocks.1.mlp.hook_expert_ids" in hooks and "hook_logits" in hooks
    assert "blocks.0.attn.hook_pattern" in hooks  # sliding layer: its K = W candidates do not depend on the length
    store = acts.collect(tiny256, rows, hooks, tmp_path / "s", positions="all", batch_size=3, progress=False)
    assert len(store.manifest["shards"]) == 1 and store.n_rows == 3
    got = by_key(store)
    assert sorted(got) == [(r, p) for r, t in enumerate(rows) for p in range(len(t))]  # no padded position
    for r, t in enumerate(rows):
        _, cache = tiny256.run_with_cache(t[None], names_filter=hooks)
        for name in hooks:
            from v4lens.analysis.layout import position_axis

            alone = cache[name][0].movedim(position_axis(name) - 1, 0)  # [L, ...]
            stored = torch.stack([got[(r, p)][name] for p in range(len(t))])
            torch.testing.assert_close(stored, alone, msg=lambda m, name=name, r=r: f"{name}, row {r}: {m}")


@pytest.mark.parametrize("name", ["blocks.1.attn.hook_key_index", "blocks.2.attn.hook_pattern",
                                  "blocks.3.attn.indexer.hook_topk", "blocks.1.attn.indexer.hook_scores",
                                  "blocks.2.attn.compressor.hook_kv", "blocks.1.attn.indexer.hook_kv",
                                  "mtp.0.hook_streams_post"])  # fmt: skip
def test_hooks_that_depend_on_the_padded_length_are_refused(tiny256, tmp_path, name):
    with pytest.raises(ValueError, match=rf"cannot collect {name.replace('.', '[.]')}: .*run_with_cache"):
        acts.collect(tiny256, ragged(2), [name], tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()  # refused before any work
    with pytest.raises(KeyError, match="unknown hook"):
        acts.check_hooks(tiny256, ["blocks.2.hook_resid_post"])


def test_forward_runs_only_as_far_as_the_hooks(tiny256, tmp_path):
    assert forward_plan(["hook_embed"]) == {"stop_at_layer": 0}
    assert forward_plan(["blocks.0.hook_mlp_out", "blocks.2.attn.hook_z"]) == {"stop_at_layer": 3}
    assert forward_plan(["blocks.0.hook_mlp_out", "hook_logits"]) == {"return_type": "logits"}
    rows = ragged(5)
    store = acts.collect(tiny256, rows, ["hook_logits", "hook_embed"], tmp_path / "s", batch_size=2, progress=False)
    got = by_key(store)
    for r, t in enumerate(rows):
        torch.testing.assert_close(got[(r, len(t) - 1)]["hook_logits"], tiny256(t[None])[0, -1])


# ---------------------------------------------------------------- positions
def test_positions_rules(tiny256, tmp_path):
    rows = ragged(7, seed=3)
    full = by_key(acts.collect(tiny256, rows, [STREAM], tmp_path / "all", positions="all", batch_size=3,
                               progress=False))  # fmt: skip
    masks = [torch.arange(len(t)) % 3 == 0 for t in rows]
    padded = torch.zeros(len(rows), 50, dtype=torch.bool)  # a padded [rows, 50] mask: extra entries False
    for r, m in enumerate(masks):
        padded[r, : len(m)] = m
    expect = {
        "last": [(r, len(t) - 1) for r, t in enumerate(rows)],
        0: [(r, 0) for r in range(len(rows))],
        -2: [(r, len(t) - 2) for r, t in enumerate(rows)],
        "mask": [(r, p) for r, m in enumerate(masks) for p in m.nonzero()[:, 0].tolist()],
        "function": [(r, p) for r, t in enumerate(rows) for p in range(len(t)) if t[p] % 2 == 0],
        "indices": [(r, p) for r in range(len(rows)) for p in sorted({1, len(rows[r]) - 1})],
    }
    given = {"last": "last", 0: 0, -2: -2, "mask": padded, "function": lambda t: t % 2 == 0,
             "indices": [[1, -1]] * len(rows)}  # fmt: skip
    for key, rule in given.items():
        store = acts.collect(tiny256, rows, [STREAM], tmp_path / str(key), positions=rule, batch_size=3,
                             progress=False)  # fmt: skip
        got = by_key(store)
        assert sorted(got) == sorted(expect[key]), key
        for k, v in got.items():
            torch.testing.assert_close(v[STREAM], full[k][STREAM])
        for i in range(len(store)):
            item = store[i]
            assert item["token"] == rows[item["row"]][item["position"]]
    with pytest.raises(ValueError, match=r"row \d+: a boolean mask needs one entry per token"):
        acts.collect(tiny256, rows, [STREAM], tmp_path / "bad1", positions=[torch.ones(2, dtype=torch.bool)] * 7,
                     progress=False)  # fmt: skip
    with pytest.raises(IndexError, match="position 99 is out of range"):
        acts.collect(tiny256, rows, [STREAM], tmp_path / "bad2", positions=99, progress=False)


def test_rows_as_dicts_and_texts(tiny256, tmp_path, monkeypatch):
    ids = torch.tensor([5, 6, 7, 8, 0, 0])
    mask = torch.tensor([1, 1, 1, 1, 0, 0])
    # tiny256 has no tokenizer for its 256 ids: a stand-in that maps characters to ids, BOS = 0
    monkeypatch.setattr(tiny256, "to_tokens", lambda text, prepend_bos=True: torch.tensor(
        [[0] * prepend_bos + [ord(c) % 256 for c in text]]))  # fmt: skip
    data = [{"input_ids": ids, "attention_mask": mask}, {"tokens": [5, 6, 7]}, "abc", {"text": "abcdefgh"}]
    store = acts.collect(tiny256, data, [STREAM], tmp_path / "s", positions="all", max_len=5, progress=False)
    assert [store.tokens(r).tolist() for r in range(4)] == [[5, 6, 7, 8], [5, 6, 7], [0, 97, 98, 99],
                                                            [0, 97, 98, 99, 100]]  # fmt: skip
    assert len(store) == 4 + 3 + 4 + 5
    with pytest.raises(ValueError, match=r"dataset row 1: token ids must lie in \[0, 256\)"):
        acts.collect(tiny256, [[1, 2], [3, 300]], [STREAM], tmp_path / "bad", progress=False)


# ---------------------------------------------------------------- crashes and resuming
class Crashing:
    """The rows, but the iterator raises after `after` rows (a crash mid-collection)."""

    def __init__(self, rows, after):
        self.rows, self.after = rows, after

    def __len__(self):
        return len(self.rows)

    def __iter__(self):
        for i, row in enumerate(self.rows):
            if i == self.after:
                raise RuntimeError("simulated crash")
            yield row


KW = {"positions": "all", "batch_size": 4, "bucket_rows": 8, "shard_size": "24KB", "progress": False}


def test_resume_after_a_crash_stores_each_row_once(tiny256, tmp_path):
    rows = ragged(30, seed=5)
    reference = by_key(acts.collect(tiny256, rows, [STREAM], tmp_path / "ref", **KW))
    with pytest.raises(RuntimeError, match="simulated crash"):
        acts.collect(tiny256, Crashing(rows, after=19), [STREAM], tmp_path / "s", **KW)
    partial = acts.open_store(tmp_path / "s", model=tiny256)
    assert not partial.complete and 0 < partial.n_rows < len(rows)
    assert set(partial.row_ids().tolist()) == set(range(16))  # the two whole buckets read before the crash
    store = acts.collect(tiny256, rows, [STREAM], tmp_path / "s", **KW)  # the same arguments: resumes
    assert store.complete and sorted(store.row_ids().tolist()) == list(range(len(rows)))
    got = by_key(store)
    assert got.keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(got[k][STREAM], v[STREAM])  # the same batches: bit for bit
    again = acts.collect(tiny256, rows, [STREAM], tmp_path / "s", **KW)  # complete: nothing to add
    assert again.manifest["shards"] == store.manifest["shards"]
    longer = acts.collect(tiny256, rows + ragged(4, seed=11), [STREAM], tmp_path / "s", **KW)  # appends the new rows
    assert longer.complete and sorted(longer.row_ids().tolist()) == list(range(len(rows) + 4))


def test_resume_after_a_kill_between_shard_and_manifest(tiny256, tmp_path, monkeypatch):
    """The process dies after a shard file is in place but before the manifest lists it (and leaves a
    temporary file): the next run ignores and rewrites both, and stores every row exactly once."""
    rows = ragged(30, seed=6)
    reference = by_key(acts.collect(tiny256, rows, [STREAM], tmp_path / "ref", **KW))
    real, calls = store_module.write_manifest, []

    def dies_on_third(folder, manifest):
        calls.append(1)
        if len(calls) == 3:  # 1: the new store, 2: after shard 0, 3: after shard 1
            raise KeyboardInterrupt
        real(folder, manifest)

    monkeypatch.setattr(store_module, "write_manifest", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        acts.collect(tiny256, rows, [STREAM], tmp_path / "s", **KW)
    monkeypatch.undo()
    (tmp_path / "s" / ".v4lens-tmp-0123-shard-00002.safetensors").write_bytes(b"half a shard")
    listed = json.loads((tmp_path / "s" / "manifest.json").read_text())["shards"]
    assert [s["file"] for s in listed] == ["shard-00000.safetensors"]
    assert (tmp_path / "s" / "shard-00001.safetensors").exists()  # on disk, not listed: not stored
    store = acts.collect(tiny256, rows, [STREAM], tmp_path / "s", **KW)
    got = by_key(store)  # asserts no (row, position) twice
    assert got.keys() == reference.keys() and sorted(store.row_ids().tolist()) == list(range(len(rows)))
    for k, v in reference.items():
        assert torch.equal(got[k][STREAM], v[STREAM])
    assert not list((tmp_path / "s").glob(".v4lens-tmp-*"))


def test_store_refuses_other_folders_collections_and_datasets(tiny256, tmp_path):
    rows = ragged(6, seed=8)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty and holds no activation store"):
        acts.collect(tiny256, rows, [STREAM], tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    acts.collect(tiny256, rows, [STREAM], tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match="hooks: .*there"):
        acts.collect(tiny256, rows, ["blocks.1.hook_streams_post"], tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match="positions: 'last' there, 'all' here"):
        acts.collect(tiny256, rows, [STREAM], tmp_path / "s", positions="all", progress=False)
    changed = [rows[0][:-1]] + rows[1:]
    with pytest.raises(ValueError, match="dataset row 0 .* the dataset changed"):
        acts.collect(tiny256, changed, [STREAM], tmp_path / "s", progress=False)
    other = v4lens.load("tiny", d_vocab=256, seed=1)
    with pytest.raises(ValueError, match="different weights"):
        acts.collect(other, rows, [STREAM], tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match="another model"):
        acts.open_store(tmp_path / "s", model=other)
    store = acts.collect(other, changed, [STREAM], tmp_path / "s", overwrite=True, progress=False)
    assert store.tokens(0).tolist() == changed[0].tolist() and len(list((tmp_path / "s").glob("shard-*"))) == 1


# ---------------------------------------------------------------- memory and reading back
def live_cpu_bytes(exclude: set[int]) -> int:
    """Bytes of the distinct CPU tensor storages alive in this process, other than `exclude` (data_ptrs)."""
    seen, total = set(exclude), 0
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":
            s = obj.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


def test_memory_is_bounded_by_a_shard_not_the_dataset(tiny256, tmp_path):
    """80 rows x 8 positions x [4, 64] fp32 = 640 KB collected in batches of 32 KB into 64 KB shards:
    while it runs, the tensors alive never hold more than a few shards' worth (a collector that kept
    every batch, or a shard buffer never emptied, would hold up to all of it)."""
    rows = ragged(80, lo=8, hi=9, seed=9)
    weights = {t.untyped_storage().data_ptr() for t in tiny256.state_dict().values()}
    weights |= {t.untyped_storage().data_ptr() for t in rows}
    seen = []

    def measured():
        for i, row in enumerate(rows):
            if i % 16 == 15:
                seen.append(live_cpu_bytes(weights))
            yield row

    store = acts.collect(tiny256, measured(), [STREAM], tmp_path / "s", positions="all", batch_size=4,
                         bucket_rows=4, shard_size="64KB", progress=False)  # fmt: skip
    total = sum(store[i][STREAM].numel() * 4 for i in range(len(store)))
    assert total == 80 * 8 * 4 * 64 * 4 and len(store.manifest["shards"]) == 10
    assert max(seen) < total / 4, (seen, total)
    batch = 4 * 8 * 4 * 64 * 4
    sizes = [(tmp_path / "s" / s["file"]).stat().st_size for s in store.manifest["shards"]]
    assert max(sizes) < 64_000 + batch + 4096  # a shard: at most one batch past shard_size (+ header, ids)


def test_store_reads_back_as_a_dataset(tiny256, tmp_path):
    rows = ragged(9, seed=10)
    acts.collect(tiny256, rows, [STREAM, "blocks.1.mlp.hook_expert_ids"], tmp_path / "s", positions="all",
                 batch_size=4, dtype=torch.bfloat16, progress=False)  # fmt: skip
    store = acts.open_store(tmp_path / "s", model=tiny256)
    assert isinstance(store, torch.utils.data.Dataset) and len(store) == sum(len(t) for t in rows)
    assert store.hook_dtypes == {STREAM: torch.bfloat16, "blocks.1.mlp.hook_expert_ids": torch.int64}
    assert store.hook_shapes[STREAM] == (4, 64) and "positions of 9 rows" in repr(store)
    loader = torch.utils.data.DataLoader(store, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    batch = next(iter(loader))
    assert batch[STREAM].shape == (16, 4, 64) and batch["row"].shape == (16,)
    assert batch["blocks.1.mlp.hook_expert_ids"].shape == (16, tiny256.cfg.n_activated_experts)
    item = store[-1]
    assert item["token"] == rows[item["row"]][item["position"]]
    shard = next(store.shards())
    assert shard[STREAM].shape[0] == shard["row"].shape[0] and shard["row_ids"].numel() == 9
    with pytest.raises(IndexError, match="out of range"):
        store[len(store)]
    with pytest.raises(FileNotFoundError, match="no activation store"):
        acts.open_store(tmp_path)


def test_progress_bar(tiny256, tmp_path, capsys):
    acts.collect(tiny256, ragged(3), [STREAM], tmp_path / "s")
    err = capsys.readouterr().err
    assert "collect" in err and "3/3" in err

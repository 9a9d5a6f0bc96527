"""Placing a model over devices with accelerate (`load(..., device_map=...)`): blocks on other devices or on
disk give the resident model's logits, hooks, decoding and drafts; bad maps are refused before anything moves."""

from __future__ import annotations

import pytest
import torch
from conftest import two_chunks

import v4lens

pytestmark = pytest.mark.usefixtures("single_thread")
SMALL = {"d_vocab": 512, "dspark_noise_token_id": 7}


def _map(name: str, disk=(1, 2)) -> dict:
    n_layers = 4
    out = {"embed": "cpu", "hc_head": "cpu", "ln_final": "cpu", "head": "cpu"}
    out |= {f"blocks.{i}": "disk" if i in disk else "cpu" for i in range(n_layers)}
    out |= {"dspark": "cpu"} if name == "tiny-dspark" else {"mtp": "cpu"}
    return out


@pytest.mark.parametrize("name", ["tiny", "tiny-dspark"])
def test_blocks_on_disk_give_the_resident_models_outputs(name, tmp_path):
    ref = v4lens.load(name, **SMALL)
    placed = v4lens.load(name, device_map=_map(name), offload_folder=tmp_path / "offload", **SMALL)
    assert placed.blocks[1].attn.wq_a.is_meta and not placed.blocks[0].attn.wq_a.is_meta  # on disk until used
    tokens = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(0))
    extra = {"draft": True} if name == "tiny-dspark" else {"mtp": True}
    with torch.no_grad():
        (a, a_draft), cache_a = ref.run_with_cache(tokens, **extra)
        (b, b_draft), cache_b = placed.run_with_cache(tokens, **extra)
    assert torch.equal(a, b) and set(cache_a.keys()) == set(cache_b.keys())
    assert all(torch.equal(cache_a[k], cache_b[k]) for k in cache_a)
    if name == "tiny-dspark":
        assert torch.equal(a_draft.tokens, b_draft.tokens) and torch.equal(a_draft.logits, b_draft.logits)
    with torch.no_grad():
        chunked = two_chunks(ref, tokens, 4)
        assert torch.equal(two_chunks(placed, tokens, 4), chunked)
    prompt = tokens[:1, :5]
    assert torch.equal(ref.generate(prompt, 6, stop_at_eos=False), placed.generate(prompt, 6, stop_at_eos=False))
    assert placed.blocks[1].attn.wq_a.is_meta  # and back on disk
    with torch.inference_mode():  # the blocks read back inside inference mode: decoding works there too
        assert torch.equal(two_chunks(placed, tokens, 4), chunked)


def test_auto_places_by_budget(tmp_path):
    placed = v4lens.load("tiny", device_map="auto", max_memory={"cpu": "1GB"}, **SMALL)
    assert set(placed.v4lens_device_map.values()) == {"cpu"}
    tokens = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(placed(tokens), v4lens.load("tiny", **SMALL)(tokens))
    squeezed = v4lens.load("tiny", device_map="auto", max_memory={"cpu": "700KB", "disk": "1GB"},
                           offload_folder=tmp_path / "o", **SMALL)  # fmt: skip
    assert "disk" in squeezed.v4lens_device_map.values() and squeezed.v4lens_device_map["head"] == "cpu"
    with torch.no_grad():
        assert torch.equal(squeezed(tokens), v4lens.load("tiny", **SMALL)(tokens))


def test_auto_keeps_the_drafters_heads_on_the_main_device_and_may_move_its_stages(tmp_path):
    """A plan that sends the DSpark stages to disk keeps main_proj, the Markov and confidence heads (read outside
    any block) with the embedding; drafts equal the resident model's. "balanced" is accepted the same way."""
    ref = v4lens.load("tiny-dspark", **SMALL)
    main = sum(t.numel() * t.element_size() for n, t in ref.state_dict().items() if not n.startswith(("blocks.", "dspark.stages.")))
    placed = v4lens.load("tiny-dspark", device_map="balanced", max_memory={"cpu": main + 700_000, "disk": "1GB"},
                         offload_folder=tmp_path / "o", **SMALL)  # fmt: skip
    dmap = placed.v4lens_device_map
    assert dmap["dspark.stages"] == "disk" and dmap["dspark.main_proj"] == dmap["head"] == "cpu"
    tokens = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        (a, da), (b, db) = ref(tokens, draft=True), placed(tokens, draft=True)
    assert torch.equal(a, b) and torch.equal(da.logits, db.logits)
    assert placed.dspark.stages[0].attn.wq_a.is_meta  # read back for its forward only


def test_a_folder_holding_files_is_refused_as_offload_folder(tmp_path):
    """Its files are left as they were, and no stale index.json is taken for the blocks' weights."""
    folder = tmp_path / "used"
    folder.mkdir()
    (folder / "index.json").write_text("{}")
    with pytest.raises(ValueError, match="is not empty"):
        v4lens.load("tiny", device_map=_map("tiny"), offload_folder=folder, **SMALL)
    assert [p.name for p in folder.iterdir()] == ["index.json"] and (folder / "index.json").read_text() == "{}"


@pytest.mark.parametrize("change, message", [
    ({"blocks.9": "cpu"}, "not a module"),
    ({"blocks.0": "gpu"}, "not a device"),
    ({"head": "disk"}, "must share one device"),
    ({"mtp": "disk"}, "must sit on the main device"),
])  # fmt: skip
def test_a_malformed_map_is_refused_before_anything_moves(change, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        v4lens.load("tiny", device_map=_map("tiny") | change, offload_folder=tmp_path, **SMALL)
    incomplete = {k: v for k, v in _map("tiny").items() if k != "blocks.3"}
    with pytest.raises(ValueError, match="does not place blocks.3"):
        v4lens.load("tiny", device_map=incomplete, offload_folder=tmp_path, **SMALL)
    with pytest.raises(ValueError, match="offload_folder"):
        v4lens.load("tiny", device_map=_map("tiny"), **SMALL)
    with pytest.raises(ValueError, match="max_memory"):
        v4lens.load("tiny", device_map="auto", **SMALL)
    with pytest.raises(ValueError, match="per-device dict"):
        v4lens.load("tiny", device_map="auto", max_memory="1GB", **SMALL)
    with pytest.raises(ValueError, match="cannot be placed whole"):
        v4lens.load("tiny", device_map="auto", max_memory={"cpu": "10KB"}, **SMALL)


def test_weights_kept_quantised_are_placed_whole_and_refuse_disk(tmp_path):
    from test_at_rest import _quantised_checkpoint

    from v4lens.weights.at_rest import QuantizedWeight

    path, _ = _quantised_checkpoint(tmp_path, "tiny")
    everything_on_cpu = {k: "cpu" for k in _map("tiny")}
    placed = v4lens.load(path, keep_quantized=True, device_map=everything_on_cpu)
    assert isinstance(placed.blocks[1].mlp.experts.w1, QuantizedWeight)
    tokens = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(placed(tokens), v4lens.load(path)(tokens))
    with pytest.raises(ValueError, match="kept quantised"):
        v4lens.load(path, keep_quantized=True, device_map=_map("tiny"), offload_folder=tmp_path / "o")


@pytest.mark.parametrize("format", ["official", "hf"])
def test_a_checkpoint_loads_straight_into_its_placement(format, tmp_path):
    v4lens.load("tiny-dspark", **SMALL).save_pretrained(tmp_path / "ckpt", format=format)
    ref = v4lens.load(tmp_path / "ckpt")
    placed = v4lens.load(tmp_path / "ckpt", device_map=_map("tiny-dspark", disk=(0, 3)), offload_folder=tmp_path / "o")
    assert placed.blocks[0].attn.wq_a.is_meta and (tmp_path / "o" / "index.json").exists()
    tokens = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        (a, da), (b, db) = ref(tokens, draft=True), placed(tokens, draft=True)
    assert torch.equal(a, b) and torch.equal(da.logits, db.logits)
    broken = tmp_path / "broken"  # a bad checkpoint fails before anything is written to the offload folder
    v4lens.load("tiny", **SMALL).save_pretrained(broken, format=format)
    with pytest.raises(ValueError):
        v4lens.load(broken, d_model=32, device_map=_map("tiny"), offload_folder=tmp_path / "o2")
    assert not (tmp_path / "o2").exists()


_PEAK = """
import json, sys, torch, v4lens
torch.set_num_threads(1)
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
path, mode, folder = sys.argv[1], sys.argv[2], sys.argv[3]
before = rss("VmRSS:")
if mode == "disk":
    device_map = {"embed": "cpu", "hc_head": "cpu", "ln_final": "cpu", "head": "cpu"}
    device_map |= {f"blocks.{i}": "disk" for i in range(4)}
    model = v4lens.load(path, device_map=device_map, offload_folder=folder)
else:
    model = v4lens.load(path)
with torch.no_grad():
    logits = model(torch.arange(1, 9)[None] % 512)
print(json.dumps({"peak": rss("VmHWM:") - before, "sum": float(logits.double().sum())}))
"""


def test_blocks_on_disk_bound_the_memory(tmp_path):
    """Four 50 MB blocks (32 experts of width 512, fp32), no draft module: loaded straight to disk, the
    process's peak grows by about two blocks (one read back, its file pages while it is copied) plus the small
    main modules, not by the whole model, and the logits are the resident ones."""
    import json
    import subprocess
    import sys

    big = dict(SMALL, d_model=256, moe_inter_dim=512, n_routed_experts=32, n_mtp_layers=0, compress_ratios=(0, 4, 6, 4))
    model = v4lens.load("tiny", **big)
    block = sum(p.numel() * p.element_size() for p in model.blocks[1].parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(tmp_path / "ckpt", format="official")
    del model
    runs = {}
    for mode in ("resident", "disk"):
        out = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / "ckpt"), mode, str(tmp_path / "o")],
                             capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    assert runs["disk"]["sum"] == runs["resident"]["sum"]
    assert block > 40e6 and runs["resident"]["peak"] > 0.9 * total
    assert runs["disk"]["peak"] < 2.5 * block + 60e6, (runs, block, total)  # 60 MB: torch's own first-use allocations
    assert runs["disk"]["peak"] < runs["resident"]["peak"] - 1.5 * block

"""Memory per weight mode and accelerate placement, from the config alone (v4lens.weights.placement)."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import v4lens
from v4lens.cli import main as cli_main
from v4lens.model.presets import preset
from v4lens.weights.placement import plan_placement, weight_bytes
from v4lens.weights.quant import quantize_fp4, quantize_fp8

_FP8 = re.compile(r"\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$|\.indexer\.wq_b\.weight$|shared_experts\.w[123]\.weight$"
                  r"|\.(main_proj|e_proj|h_proj)\.weight$")  # fmt: skip
_FP4 = re.compile(r"\.experts\.\d+\.w[123]\.weight$")


@pytest.mark.parametrize("name", ["tiny-dspark", "tiny"])
def test_stored_bytes_are_the_bytes_of_a_release_shaped_checkpoint(name, tmp_path):
    """Save a bf16 model in the official layout, quantise it as DeepSeek ships (FP8 matrices, FP4 experts, e8m0
    scales; int32 hash tables): its tensors' bytes are weight_bytes(cfg).total("stored") exactly."""
    model = v4lens.load(name, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "out", format="official")
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    for key in [k for k in tensors if _FP8.search(k) or _FP4.search(k)]:
        q, s = (quantize_fp4 if _FP4.search(key) else quantize_fp8)(tensors.pop(key).float())
        tensors[key], tensors[key.removesuffix(".weight") + ".scale"] = q, s
    # the release's other dtypes: fp32 mHC, sinks, ape and router bias; bf16 the rest (norms and compressors that
    # v4lens holds in fp32 included); int32 hash tables
    fp32 = re.compile(r"(hc_(attn|ffn|head)_(fn|base|scale)|attn_sink|\.ape|gate\.bias)$")
    for key, t in tensors.items():
        if t.dtype == torch.int64:
            tensors[key] = t.to(torch.int32)
        elif t.dtype == torch.float32 and not fp32.search(key):
            tensors[key] = t.to(torch.bfloat16)
    save_file(tensors, tmp_path / "q.safetensors")
    on_disk = sum(t.numel() * t.element_size() for t in tensors.values())
    wb = weight_bytes(model.cfg)
    assert wb.total("stored") == on_disk
    expert_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if ".experts." in k and ".shared" not in k)
    assert wb.experts["stored"] == expert_bytes
    assert wb.total("bf16") == sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_the_releases_sizes_as_shipped():
    """V4-Flash-0731 ≈ 167 GB and V4-Pro-0813 ≈ 893 GB as shipped (the release records); bf16 ≈ 3.4-3.7× that."""
    flash, pro = weight_bytes(preset("flash-0731")), weight_bytes(preset("pro-0813"))
    assert flash.total("stored") / 1e9 == pytest.approx(167, rel=0.01)
    assert pro.total("stored") / 1e9 == pytest.approx(893, rel=0.01)
    assert 3.4 < flash.total("bf16") / flash.total("stored") < 3.8
    assert flash.experts["stored"] > 0.9 * flash.total("stored")  # the experts are what an offload moves


def test_placement_fills_devices_in_order_and_never_splits_a_block():
    cfg = preset("flash-0731")
    one_gpu = plan_placement(cfg, {0: "141GB", "cpu": "512GB"}, mode="stored")
    assert set(one_gpu.device_map.values()) == {0, "cpu"}
    assert one_gpu.device_map["embed"] == 0 and one_gpu.device_map["blocks.0"] == 0
    assert all(re.fullmatch(r"[a-z_]+(\.\d+)?|dspark\.(stages|[a-z_0-9]+)", m) for m in one_gpu.device_map)  # whole blocks
    # what is read outside a block forward sits with the embedding; the drafter's stages may go elsewhere
    assert {one_gpu.device_map[m] for m in one_gpu.device_map if not m.startswith(("blocks.", "dspark.stages"))} == {0}
    assert one_gpu.device_map["dspark.stages"] == "cpu" and one_gpu.device_map["dspark.main_proj"] == 0
    assert any("dspark (its own tensors)" in line for line in one_gpu.summary() if line.startswith("cuda:0"))
    assert one_gpu.bytes_per_device[0] <= 141e9 and sum(one_gpu.bytes_per_device.values()) == pytest.approx(
        weight_bytes(cfg).total("stored"), rel=1e-9)  # fmt: skip
    gpus = plan_placement(cfg, {i: "141GB" for i in range(8)}, mode="bf16")
    assert len(set(gpus.device_map.values())) >= 5  # 609 GB over 141 GB devices
    blocks = [gpus.device_map[f"blocks.{i}"] for i in range(cfg.n_layers)]
    assert blocks == sorted(blocks)  # in layer order
    cpu_disk = plan_placement(cfg, {"cpu": "256GB", "disk": "4TB"}, mode="bf16")
    assert "disk" in cpu_disk.device_map.values()
    assert any("blocks." in line and "disk" in line for line in cpu_disk.summary())


def test_balanced_spreads_the_blocks_over_the_gpus():
    cfg = preset("flash-0731")
    budget = {i: "141GB" for i in range(8)} | {"cpu": "512GB"}
    packed, balanced = plan_placement(cfg, budget, "stored"), plan_placement(cfg, budget, "stored", balanced=True)
    assert set(packed.device_map.values()) == {0, 1}  # 167 GB: the first GPU full, the rest on the second
    assert set(balanced.device_map.values()) == set(range(8))
    assert max(balanced.bytes_per_device.values()) < 0.5 * max(packed.bytes_per_device.values())
    blocks = [balanced.device_map[f"blocks.{i}"] for i in range(cfg.n_layers)]
    assert blocks == sorted(blocks) and balanced.device_map["head"] == 0


def test_placement_errors_name_the_problem():
    cfg = preset("flash-0731")
    with pytest.raises(ValueError, match="left over"):
        plan_placement(cfg, {0: "141GB", "cpu": "400GB"}, mode="bf16")  # 609 GB > 541 GB
    with pytest.raises(ValueError, match="cannot be placed whole"):
        plan_placement(cfg, {0: "1GB", "cpu": "2GB"}, mode="stored")
    with pytest.raises(ValueError, match="unknown device"):
        plan_placement(cfg, {"gpu0": "1GB"})
    with pytest.raises(ValueError, match="mode"):
        plan_placement(cfg, {"cpu": "1TB"}, mode="fp8")
    with pytest.raises(ValueError, match=r"must sit together on the first device, 0, whose budget is 2.00 GB"):
        plan_placement(cfg, {0: "2GB", "cpu": "1TB"}, mode="stored")  # blocks fit, the head and embedding do not


def test_info_memory_prints_modes_and_placements(capsys):
    assert cli_main(["info", "flash-0731", "--memory", "--max-memory", "0=141GB,cpu=400GB"]) == 0
    out = capsys.readouterr().out
    assert "166.9 GB" in out and "609.1 GB" in out
    assert "cuda:0: embed, hc_head, ln_final, head, dspark (its own tensors), blocks.0-" in out and "does not fit" in out  # bf16 does not fit 141 + 400 GB
    assert cli_main(["info", "flash-0731", "--max-memory", "0=1GB"]) != 0  # --max-memory needs --memory
    assert cli_main(["info", "flash-0731", "--memory", "--max-memory", "0:1GB"]) != 0

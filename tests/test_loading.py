"""Loading local checkpoints: names mapped, errors that name the tensor and both shapes, no pickles."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import v4lens
from v4lens.weights.names import canonical_name


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model written by transformers' save_pretrained (the layout `load` must read)."""
    from v4lens.weights.hf import hf_model_like

    model = v4lens.load("tiny", d_vocab=512, seed=5)
    out = tmp_path_factory.mktemp("hf")
    hf_model_like(model).save_pretrained(out)
    return model, out


def _rewrite(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_canonical_names_cover_all_layouts():
    assert canonical_name("model.layers.3.self_attn.q_a_proj.weight") == "blocks.3.attn.wq_a"
    assert canonical_name("layers.3.attn.wq_a.weight") == "blocks.3.attn.wq_a"
    assert canonical_name("model.layers.1.attn.norm.weight") == "blocks.1.attn.kv_norm.w"  # HF save quirk
    assert canonical_name("model.layers.1.self_attn.compressor.indexer.kv_norm.weight") == (
        "blocks.1.attn.indexer.compressor.norm.w"
    )
    assert canonical_name("layers.1.attn.indexer.compressor.ape") == "blocks.1.attn.indexer.compressor.ape"
    assert canonical_name("model.layers.0.mlp.gate.e_score_correction_bias") == "blocks.0.mlp.gate.bias"
    assert canonical_name("layers.2.ffn.experts.17.w3.weight", with_expert=True) == ("blocks.2.mlp.experts.w3", 17)
    assert canonical_name("hc_head_fn") == "hc_head.fn" and canonical_name("norm.weight") == "ln_final.w"
    assert canonical_name("mtp.0.norm.weight") == "mtp.0.ln_final.w"
    assert canonical_name("mtp.0.hc_attn_base") == "mtp.0.attn_hc.base"
    assert canonical_name("mtp.0.e_proj.weight") == "mtp.0.e_proj"
    assert canonical_name("mtp.0.emb.tok_emb.weight") is None


def test_mtp_tensors_load_when_present(saved, tmp_path):
    model, src = saved
    mtp = {f"mtp.0.{k}": v for k, v in _official_mtp(model).items()}
    ckpt = _rewrite(src, tmp_path / "with_mtp", lambda t: t.update(mtp))
    loaded = v4lens.load(ckpt)
    assert loaded.cfg.n_mtp_layers == 1
    tokens = torch.randint(0, 512, (1, 24))
    with torch.no_grad():
        assert torch.equal(loaded(tokens, mtp=True)[1][0], model(tokens, mtp=True)[1][0])


def _official_mtp(model):
    """The MTP block's tensors under DeepSeek's official names (inverse of canonical_name)."""
    out = {}
    for name, p in model.mtp[0].named_parameters():
        for official in _candidates(name):
            key, expert = canonical_name("mtp.0." + official, with_expert=True)
            if key == "mtp.0." + name:
                out[official] = (p[expert] if expert is not None else p).detach().clone()
                break
        else:
            if name.startswith("mlp.experts."):
                w = name.rsplit(".", 1)[1]
                for e in range(p.shape[0]):
                    out[f"ffn.experts.{e}.{w}.weight"] = p[e].detach().clone()
            else:
                raise AssertionError(f"no official name for {name}")
    for name, b in model.mtp[0].named_buffers():
        out[name.replace("mlp.", "ffn.")] = b.clone()
    return out


def _candidates(name):
    n = name.replace("mlp.", "ffn.").replace("attn_hc.", "hc_attn_").replace("mlp_hc.", "hc_ffn_")
    n = n.replace("ffn_hc.", "hc_ffn_").replace("hc_head.", "hc_head_").replace("ln1.w", "attn_norm.weight")
    n = n.replace("ln2.w", "ffn_norm.weight").replace("ln_final.w", "norm.weight")
    yield n
    yield n + ".weight"
    yield n.replace(".w", ".weight")


def test_missing_tensor_is_named(saved, tmp_path):
    _, src = saved
    ckpt = _rewrite(src, tmp_path / "missing", lambda t: t.pop("model.layers.1.attn.wq_a.weight"))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"missing tensors.*blocks\.1\.attn\.wq_a"):
        v4lens.load(ckpt)


def test_missing_expert_is_named(saved, tmp_path):
    _, src = saved
    ckpt = _rewrite(src, tmp_path / "no_expert", lambda t: t.pop("model.layers.2.ffn.experts.5.w2.weight"))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"experts\.w2.*\[5\]"):
        v4lens.load(ckpt)


def test_misshaped_tensor_names_both_shapes(saved, tmp_path):
    _, src = saved

    def edit(t):
        t["model.layers.0.attn.wkv.weight"] = torch.zeros(31, 64)

    ckpt = _rewrite(src, tmp_path / "shape", edit)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"wkv\.weight has shape \(31, 64\).*\(32, 64\)"):
        v4lens.load(ckpt)


def test_unexpected_tensor_is_named(saved, tmp_path):
    _, src = saved
    ckpt = _rewrite(src, tmp_path / "extra", lambda t: t.update({"model.layers.0.attn.bogus": torch.zeros(2)}))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="unexpected tensors.*bogus"):
        v4lens.load(ckpt)


def test_pickles_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v4"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ValueError, match="safetensors only"):
        v4lens.load(tmp_path)


def test_corrupt_file_is_named(saved, tmp_path):
    _, src = saved
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    data = (src / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        v4lens.load(bad)


def test_unknown_directory_layout(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="expected|neither"):
        v4lens.load(tmp_path)
    with pytest.raises(ValueError, match="neither a preset"):
        v4lens.load(tmp_path / "nowhere")


def test_garbage_file_is_named(saved, tmp_path):
    _, src = saved
    bad = tmp_path / "garbage"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    (bad / "model.safetensors").write_bytes((64).to_bytes(8, "little") + b"{not json at all" + b" " * 60)
    with pytest.raises(ValueError, match=r"cannot read safetensors file .*garbage/model\.safetensors"):
        v4lens.load(bad)

"""docs/hooks.md stays true.

1. Every hook name a model exposes (tiny: every layer type, hash and learned MoE, opt-in hooks,
   an MTP block, also a CSA one) is in the doc's catalogue, and every full hook name the doc
   mentions exists for some layer.
2. The "Firing order" section, expanded for a config, is exactly the order in which the hooks
   fire (with and without MTP, opt-in hooks, hash layers of every type, small query chunks, an
   input too short for any compressed entry).

Only the public API is used (`v4lens.load`, `v4lens.preset`, `model.hook_dict`, `model.hooks`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import v4lens

DOC = Path(__file__).parents[1] / "docs" / "hooks.md"
VOCAB = 256  # names and order do not depend on the vocabulary; a small head keeps this fast

# configs (overrides of the tiny preset) whose models together expose every documented name
OPTIN = {"use_attn_result": True, "use_expert_out": True}
ALL_HASH = {"n_hash_layers": 4}  # hash MoE on CSA and HCA blocks too
# learned MoE on the sliding block, small query chunks, and a CSA MTP block
NO_HASH_CSA_MTP = {"n_hash_layers": 0, "compress_ratios": (0, 4, 6, 4, 4), "attn_chunk_size": 5}
CONFIGS = {"plain": {}, "optin": OPTIN, "all_hash": ALL_HASH, "no_hash_csa_mtp": NO_HASH_CSA_MTP}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def doc() -> str:
    assert DOC.is_file(), f"missing {DOC}"
    return DOC.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def models():
    models = {key: v4lens.load("tiny", d_vocab=VOCAB, seed=0, **kw) for key, kw in CONFIGS.items()}
    models["dspark"] = v4lens.load("tiny-dspark", d_vocab=VOCAB, dspark_noise_token_id=7, seed=0)  # the DSpark names
    return models


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------- parsing the doc
def template(name: str) -> str:
    """blocks.3.attn.hook_q -> blocks.{l}.attn.hook_q; mtp.0.hook_logits -> mtp.{i}.hook_logits."""
    name = re.sub(r"^blocks\.\d+\.", "blocks.{l}.", name)
    name = re.sub(r"^dspark\.stages\.\d+\.", "dspark.stages.{s}.", name)
    return re.sub(r"^mtp\.\d+\.", "mtp.{i}.", name)


def section(text: str, title: str) -> str:
    """The body of '## title', up to the next '## ' heading."""
    m = re.search(rf"^## {re.escape(title)}[ \t]*\n(.*?)(?=^## |\Z)", text, re.DOTALL | re.MULTILINE)
    assert m, f"docs/hooks.md has no '## {title}' section"
    return m.group(1)


def catalogue(text: str) -> set[str]:
    """The names in the first column of the catalogue's tables."""
    names = {m.group(1) for m in re.finditer(r"^\|\s*`([^`]+)`\s*\|", section(text, "Catalogue"), re.MULTILINE)}
    assert len(names) > 50, "the catalogue's tables were not found"
    return names


def mentioned(text: str) -> set[str]:
    """Every full v4lens hook name in backticks or in the order lists (the bridge's own names,
    first column of the interoperability tables, are not v4lens names and are left out)."""
    interop = section(text, "TransformerLens interoperability")
    ours = text.replace(interop, "")
    ours += "\n".join(line.split("|")[2] for line in interop.splitlines() if line.count("|") >= 3)
    tokens = re.findall(r"`([^`\s]+)`", ours)
    for block in re.findall(r"```text\n(.*?)```", section(text, "Firing order"), re.DOTALL):
        tokens += [line.split("#")[0].strip() for line in block.splitlines()]
    tokens = [template(t) for t in tokens]  # examples name real layers: blocks.1.… -> blocks.{l}.…
    full = re.compile(r"^((blocks\.\{l\}|mtp\.\{i\})\.)?([a-z0-9_]+\.)*hook_[a-z_]+$")
    top_level = re.compile(r"^(hook_(embed|logits)|hc_head\.|ln_final\.)")
    return {
        t for t in tokens
        if full.match(t) and (t.startswith(("blocks.{l}.", "mtp.{i}.")) or top_level.match(t))
    }  # fmt: skip


def order_lists(text: str) -> dict[str, list[tuple[str, str]]]:
    """{'top' | 'sliding' | 'csa' | 'hca' | 'mtp': [(name, comment), ...]} from the fenced list
    under each '### ' heading of the Firing order section (keyed by the heading's first word)."""
    lists = {}
    body = section(text, "Firing order")
    for heading, part in re.findall(r"^### (.+?)\n(.*?)(?=^### |\Z)", body, re.DOTALL | re.MULTILINE):
        block = re.search(r"```text\n(.*?)```", part, re.DOTALL)
        if block is None:
            continue
        entries = []
        for line in block.group(1).splitlines():
            name, _, comment = line.partition("#")
            if name.strip():
                entries.append((name.strip(), comment.strip()))
        lists[heading.split()[0].lower()] = entries
    missing = {"top", "sliding", "csa", "hca", "mtp"} - set(lists)
    assert not missing, f"Firing order: no list for {sorted(missing)}"
    return lists


def expected_order(lists, cfg, mtp: bool) -> list[str]:
    """The documented firing order, expanded for config `cfg`."""

    def keep(comment: str, hashed: bool) -> bool:
        if "hash layers only" in comment:
            return hashed
        if "use_attn_result only" in comment:
            return bool(cfg.use_attn_result)
        if "use_expert_out only" in comment:
            return bool(cfg.use_expert_out)
        if "mtp=True only" in comment:
            return mtp
        return True

    def block(prefix: str, layer: int, hashed: bool) -> list[str]:
        kind = cfg.layer_type(layer)
        return [n.replace("blocks.{l}", prefix) for n, c in lists[kind] if keep(c, hashed)]

    out = []
    for name, comment in lists["top"]:
        if not keep(comment, False):
            continue
        if name == "blocks.{l}.*":
            for layer in range(cfg.n_layers):
                out += block(f"blocks.{layer}", layer, layer < cfg.n_hash_layers)  # the first n_hash_layers
        elif name == "mtp.{i}.*":
            for i in range(cfg.n_mtp_layers):
                for n, c in lists["mtp"]:
                    if n == "mtp.{i}.<block hooks>":
                        out += block(f"mtp.{i}", cfg.n_layers + i, False)  # MTP blocks never hash
                    elif keep(c, False):
                        out.append(n.replace("{i}", str(i)))
        else:
            out.append(name)
    return out


def fired(model, tokens, **kwargs) -> list[str]:
    """Hook names in the order they fire, recorded on every hook point."""
    seen = []

    def record(x, hook):
        seen.append(hook.name)

    with torch.no_grad(), model.hooks(fwd_hooks=[(name, record) for name in model.hook_dict]):
        model(tokens, **kwargs)
    return seen


def first_difference(got: list[str], want: list[str]) -> str:
    i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return (f"first difference at #{i}: fired {got[i:i + 3]}, documented {want[i:i + 3]} "
            f"({len(got)} fired, {len(want)} documented)")  # fmt: skip


# ---------------------------------------------------------------------- the tests
def test_every_exposed_hook_is_documented(doc, models):
    documented = catalogue(doc)
    for key, model in models.items():
        undocumented = sorted({template(n) for n in model.hook_dict} - documented)
        assert not undocumented, f"{key}: hooks missing from docs/hooks.md: {undocumented}"


def test_every_documented_name_exists(doc, models):
    exposed = {template(n) for model in models.values() for n in model.hook_dict}
    for kind, names in (("catalogue", catalogue(doc)), ("mentioned", mentioned(doc))):
        unknown = sorted(names - exposed)
        assert not unknown, f"docs/hooks.md names hooks that no layer has ({kind}): {unknown}"


@pytest.mark.parametrize(
    "key, mtp, length",
    [("plain", True, 24), ("plain", False, 24), ("plain", True, 3), ("optin", True, 24), ("all_hash", True, 24),
     ("no_hash_csa_mtp", True, 24)],
)  # fmt: skip
def test_firing_order_is_the_documented_one(doc, models, tokens, key, mtp, length):
    cfg = v4lens.preset("tiny", d_vocab=VOCAB, **CONFIGS[key])
    want = expected_order(order_lists(doc), cfg, mtp)
    got = fired(models[key], tokens[:, :length], mtp=mtp)
    assert len(set(got)) == len(got), "a hook fired more than once in one forward"
    assert got == want, f"{key}, mtp={mtp}, {length} tokens: {first_difference(got, want)}"
    if mtp:  # with MTP every hook point fires
        assert set(got) == set(models[key].hook_dict)

"""The package's rooms (docs/architecture.md): what each may import, no import cycles, small modules,
the old flat module paths still resolving, and no reference to files a user of the package lacks."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "v4lens"

# room -> the rooms it may import from (itself always); the tools at the top may import anything
ALLOWED = {
    "model": set(),
    "weights": {"model"},
    "analysis": {"model"},
    "plot": {"model", "analysis"},
}
# The model room's only outward imports: HookedV4's doors (hooked.py), imported on first use.
MODEL_DOORS = {"v4lens.tokenizer", "v4lens.generate", "v4lens.weights.saving", "v4lens.analysis.caching"}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(path: Path) -> str:
    name = module_name(path)
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def v4lens_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported v4lens module, at module level?) for every import statement in the file."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_of(path).split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from . import stats` imports the submodule v4lens.analysis.stats
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for t in targets:
            if t == "v4lens" or t.startswith("v4lens."):
                found.append((t, id(node) in top_level))
    return found


def room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def test_rooms_import_only_what_they_may():
    wrong = []
    for name, path in MODULES.items():
        here = room(name)
        if here is None:
            continue  # the tools at the top (cli, demo, generate, train, ...) may use every room
        for target, top in v4lens_imports(path):
            there = room(target)
            if there == here or there in ALLOWED[here]:
                continue
            if here == "model" and name == "v4lens.model.hooked" and not top and target in MODEL_DOORS:
                continue  # HookedV4's documented doors to the other rooms
            wrong.append(f"{name} imports {target}")
    assert not wrong, "imports against the room rules (docs/architecture.md):\n" + "\n".join(wrong)


def test_room_rules_can_fail():
    """The checker sees both relative and nested imports (a rule it could not break would prove nothing)."""
    hooked = v4lens_imports(MODULES["v4lens.model.hooked"])
    assert ("v4lens.analysis.caching", False) in hooked and ("v4lens.model.block", True) in hooked
    assert ("v4lens.analysis.stats", True) in v4lens_imports(MODULES["v4lens.analysis"])


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    colour: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        colour[node] = 1  # on the current path
        for nxt in sorted(graph[node]):
            if colour.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in colour:
                visit(nxt, stack + [nxt])
        colour[node] = 2

    for name in sorted(graph):
        if name not in colour:
            visit(name, [name])
    return cycles


def test_no_import_cycles_at_module_level():
    graph = {name: {t for t, top in v4lens_imports(path) if top and t in MODULES and t != name}
             for name, path in MODULES.items()}  # fmt: skip
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]  # the finder finds one
    assert not import_cycles(graph)


def test_modules_are_small():
    big = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them by idea): {big}"


@pytest.mark.parametrize(
    "old, attribute",
    [
        ("v4lens.config", "preset"), ("v4lens.kv_cache", "V4KVCache"), ("v4lens.hf", "hf_model_like"),
        ("v4lens.cache", "run_with_cache"), ("v4lens.cache", "position_axis"), ("v4lens.cache", "open_offloaded"),
        ("v4lens.lens", "logit_lens"), ("v4lens.loading", "load"), ("v4lens.slicing", "default_layers"),
        ("v4lens.patching", "atp_streams"), ("v4lens.patching", "force_indexer_picks"), ("v4lens.stats", "sink_mass"),
        ("v4lens.train", "recall_batch"), ("v4lens.train", "QUERY"), ("v4lens.model", "HookedV4"),
        ("v4lens.decomposition", "decompose"), ("v4lens.indexer", "topk_lowest_index_first"),
    ],
)  # fmt: skip
def test_old_flat_paths_still_import(old, attribute):
    module = importlib.import_module(old)
    assert hasattr(module, attribute)


def test_old_flat_path_is_the_same_module():
    import v4lens.lens  # the alias

    import v4lens
    import v4lens.analysis.lens

    assert sys.modules["v4lens.lens"] is v4lens.analysis.lens
    assert v4lens.analysis.lens.__spec__.name == "v4lens.analysis.lens"  # the alias did not overwrite it
    assert v4lens.V4KVCache is importlib.import_module("v4lens.model.kv_cache").V4KVCache
    with pytest.raises(AttributeError, match="no attribute 'no_such_module'"):
        v4lens.no_such_module  # noqa: B018


def test_import_v4lens_loads_no_oracle_and_no_plotting():
    """`import v4lens` stays light: transformers' model code and plotly load only when used."""
    code = "import sys, v4lens; print(sorted(m for m in ('plotly', 'v4lens.weights.hf', 'v4lens.plot') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_repository_speaks_to_its_users():
    """No reference to design files outside the repository or to the project's issue tracker."""
    pattern = re.compile(r"shared/|issue [0-9]|issue #[0-9]")
    places = [PACKAGE, ROOT / "notebooks", ROOT / "examples", ROOT / "docs", ROOT / "README.md", ROOT / "tests",
              ROOT / "benchmarks", ROOT / "scripts"]  # fmt: skip
    hits = []
    for place in places:
        files = [place] if place.is_file() else [p for p in place.rglob("*") if p.is_file()]
        for f in files:
            if f.suffix not in {".py", ".md", ".ipynb", ".json", ".txt", ".sh"} or f == Path(__file__).resolve():
                continue  # (this file holds the pattern itself)
            for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
                if pattern.search(line):
                    hits.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)

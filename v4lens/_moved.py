"""The flat module paths of earlier v4lens versions, kept working.

v4lens's modules now live in rooms (`model/`, `weights/`, `analysis/`, `plot/`); code written
against the flat layout (`from v4lens.cache import run_with_cache`, `import v4lens.config`,
`v4lens.hf.hf_model_like`) still runs: each old name is an alias of its new module — the same
module object, so `monkeypatch.setattr(v4lens.lens, ...)` patches the real thing. The one old
module that was split (`v4lens.cache`) becomes a module holding the public names of its parts.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

MOVED = {
    **{f"v4lens.{m}": f"v4lens.model.{m}" for m in (
        "attention", "block", "compressor", "config", "head", "hyper_connections", "indexer", "kv_cache", "moe",
        "mtp", "norm", "params", "rope",
    )},  # fmt: skip
    **{f"v4lens.{m}": f"v4lens.weights.{m}" for m in ("hf", "loading", "names", "quant", "safetensors_io", "saving",
                                                        "slicing")},  # fmt: skip
    **{f"v4lens.{m}": f"v4lens.analysis.{m}" for m in ("decomposition", "lens", "patching", "stats")},
    "v4lens.cache": ("v4lens.analysis.layout", "v4lens.analysis.cache", "v4lens.analysis.caching",
                     "v4lens.analysis.offload"),
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str | tuple[str, ...]):
        self.target = target
        self.spec = None

    def create_module(self, spec):
        if isinstance(self.target, tuple):  # a split module: its parts' public names in one namespace
            module = types.ModuleType(spec.name, f"Alias of {', '.join(self.target)}.")
            for part in map(importlib.import_module, self.target):
                module.__dict__.update({k: v for k, v in vars(part).items() if not k.startswith("_")})
            return module
        module = importlib.import_module(self.target)
        self.spec = module.__spec__  # the import system sets __spec__ to the alias's: put it back below
        return module

    def exec_module(self, module) -> None:
        if self.spec is not None:
            module.__spec__ = self.spec


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Resolves an old flat path (`v4lens.cache`) to the module that replaced it."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())


# submodules `import v4lens` does not load itself, reachable as attributes all the same (`v4lens.plot.save`)
LAZY = ("activations", "chat", "cli", "demo", "generate", "plot", "speculative", "tasks", "train", "utils")


def moved_attribute(name: str):
    """`v4lens.<name>` for a submodule not imported yet or an old flat module (`v4lens.cache.run_with_cache`)."""
    if f"v4lens.{name}" not in MOVED and name not in LAZY:
        raise AttributeError(f"module 'v4lens' has no attribute {name!r}")
    return importlib.import_module(f"v4lens.{name}")

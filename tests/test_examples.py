"""The example scripts: each answers --help, and runs on the tiny model with small inputs.

Every `examples/*.py` runs as a subprocess (`--model tiny`, working directory a temporary folder)
and must exit 0 and write the files it promises. A new example needs an entry in CASES. The whole
module takes ≈ 40–60 s on a busy 2-core machine (each run pays ~3 s of `import torch`; the --help
checks share one interpreter).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
EXAMPLES = sorted(p.stem for p in EXAMPLES_DIR.glob("*.py") if not p.name.startswith("_"))
TIMEOUT_S = 300
SHORT = "The quick brown fox jumps over the lazy dog"

# name -> (arguments after --model tiny, files it must write (relative to the working directory), text in stdout)
CASES: dict[str, tuple[list[str], list[str], list[str]]] = {
    "quickstart": (["--dtype", "fp32"], [], ["prediction:", "re-routing layer 3"]),
    "router_heatmap": (["--layer", "0", "--prompt", SHORT, "--out", "router.html"], ["router.html"],
                       ["hash (tid2eid) routing", "load balance"]),
    "sinkhorn": (["--prompt", SHORT, "--layers", "0,1", "--out", "comb.html", "--convergence", "conv.html"],
                 ["comb.html", "conv.html"], ["mixing matrices", "row sums"]),
    "indexer_picks": (["--layer", "1", "--exclude", "0", "--include", "5", "--out", "picks.html"], ["picks.html"],
                      ["recall vs dense attention", "forced picks at the last query"]),
    "patch_streams": (["--atp", "--top", "3", "--out", "patch.html", "--save", "patch.pt"],
                      ["patch.html", "patch.pt"], ["sweep: (4, 12)", "attribution patching: Pearson"]),
    "logit_lens": (["--prompt", SHORT, "--per-stream", "--csv", "lens.csv", "--out", "lens.html"],
                   ["lens.html", "lens.csv"], ["3_post", "stream 3"]),
    "recall_circuit": (["--n", "8", "--out", "recall.html"], ["recall.html"],
                       ["value swapped in context", "logit attribution"]),
    "generate_with_hooks": (["--layer", "3", "--new", "6", "--dtype", "fp32", "--save", "gen.pt"], ["gen.pt"],
                            ["greedy:", "routed to experts 0..1", "same tokens as greedy"]),
    "export_figures": (["--prompt", SHORT, "--formats", "html,png", "--out-dir", "figs"],
                       ["figs/index.html", "figs/router_heatmap.html", "figs/comb_grid.html",
                        "figs/attention_pattern.html", "figs/logit_lens.html"], ["9 figures"]),
}  # fmt: skip


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # tiny models are per-op overhead: one intra-op thread is faster on a busy machine
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def test_every_example_has_a_case():
    assert set(EXAMPLES) == set(CASES), "add the new example to CASES in tests/test_examples.py"


# every example's --help in one interpreter (one import of torch and v4lens, not one per example)
_HELP_ALL = """
import contextlib, io, json, os, runpy, sys
out = {}
sys.path.insert(0, os.path.dirname(sys.argv[1]))  # as when a script runs: its folder first (examples/_common.py)
for path in sys.argv[1:]:
    sys.argv, buf, code = [path, "--help"], io.StringIO(), None
    try:
        with contextlib.redirect_stdout(buf):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        code = e.code
    out[path] = [code, buf.getvalue()]
print(json.dumps(out))
"""


def test_help(tmp_path):
    paths = [str(EXAMPLES_DIR / f"{name}.py") for name in EXAMPLES]
    proc = _run(["-c", _HELP_ALL, *paths], tmp_path)
    assert proc.returncode == 0, proc.stderr
    import json

    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, path in zip(EXAMPLES, paths):
        code, text = results[path]
        assert code in (0, None), f"{name} --help exited {code}"
        assert "usage:" in text and "--model" in text, f"{name} --help printed:\n{text}"


@pytest.mark.parametrize("name", EXAMPLES)
def test_runs_on_tiny(name, tmp_path):
    args, files, texts = CASES[name]
    proc = _run([str(EXAMPLES_DIR / f"{name}.py"), "--model", "tiny", *args], tmp_path)
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    for f in files:
        assert (tmp_path / f).is_file() and (tmp_path / f).stat().st_size > 0, f"{name} did not write {f}"
    for text in texts:
        assert text in proc.stdout, f"{name}: {text!r} not in its output:\n{proc.stdout}"
    if name == "export_figures":  # PNGs where a Chromium exists, a clear message where none does
        from v4lens.plot import find_browser

        if find_browser():
            assert (tmp_path / "figs" / "comb_grid.png").stat().st_size > 0
        else:
            assert "images skipped" in proc.stdout

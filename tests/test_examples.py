"""The example scripts: each answers --help, and runs on the tiny model with small inputs.

Every `examples/*.py` runs as a script (`--model tiny`, working directory a temporary folder) and
must exit 0 and write the files it promises. A new example needs an entry in CASES. All of them
(and every --help) run one after another in a single subprocess, so `import torch` and v4lens are
paid once, not once per script.
"""

from __future__ import annotations

import json
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
    "quickstart": (["--dtype", "fp32", "--device", "cpu"], [], ["prediction:", "re-routing layer 3"]),
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


# Every example runs in ONE interpreter (one import of torch and v4lens, ~4 s, not one per
# example): each gets its own argv, working directory, captured stdout/stderr and fresh globals
# (runpy), and the state a script may change globally (autograd, threads) is reset before the next.
_RUN_ALL = """
import contextlib, io, json, os, runpy, sys, time, traceback
jobs, out = json.loads(sys.argv[1]), {}
sys.path.insert(0, os.path.dirname(jobs[0]["path"]))  # as when a script runs: its folder first (_common.py)
for job in jobs:
    os.chdir(job["cwd"])
    sys.argv, stdout, stderr, code, t0 = [job["path"], *job["args"]], io.StringIO(), io.StringIO(), None, time.time()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            runpy.run_path(job["path"], run_name="__main__")
    except SystemExit as e:
        code = e.code
    except BaseException:
        code, _ = 1, stderr.write(traceback.format_exc())
    finally:
        if "torch" in sys.modules:
            sys.modules["torch"].set_grad_enabled(True)
            sys.modules["torch"].set_num_threads(1)
    out[job["key"]] = {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(), "s": time.time() - t0}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory) -> dict:
    """{"help:<name>" | "tiny:<name>": {code, stdout, stderr, s}} for every example, from one interpreter."""
    jobs = []
    for name in EXAMPLES:
        path = str(EXAMPLES_DIR / f"{name}.py")
        jobs.append({"key": f"help:{name}", "path": path, "args": ["--help"], "cwd": str(tmp_path_factory.mktemp("h"))})
        if name in CASES:
            args = ["--model", "tiny", *CASES[name][0]]
            jobs.append({"key": f"tiny:{name}", "path": path, "args": args, "cwd": str(tmp_path_factory.mktemp(name))})
    # tiny models are per-op overhead: one intra-op thread is faster on a busy machine
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _RUN_ALL, json.dumps(jobs)], check=False, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip
    assert proc.returncode == 0, f"the example runner failed\n{proc.stderr}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for job in jobs:
        results[job["key"]]["cwd"] = Path(job["cwd"])
    return results


def test_every_example_has_a_case():
    assert set(EXAMPLES) == set(CASES), "add the new example to CASES in tests/test_examples.py"


@pytest.mark.parametrize("name", EXAMPLES)
def test_help(name, example_runs):
    run = example_runs[f"help:{name}"]
    assert run["code"] in (0, None), f"{name} --help exited {run['code']}\n{run['stderr']}"
    assert "usage:" in run["stdout"] and "--model" in run["stdout"], f"{name} --help printed:\n{run['stdout']}"


@pytest.mark.parametrize("name", EXAMPLES)
def test_runs_on_tiny(name, example_runs):
    _, files, texts = CASES[name]
    run = example_runs[f"tiny:{name}"]
    cwd = run["cwd"]
    assert run["code"] in (0, None), f"exit {run['code']}\n--- stdout\n{run['stdout']}\n--- stderr\n{run['stderr']}"
    for f in files:
        assert (cwd / f).is_file() and (cwd / f).stat().st_size > 0, f"{name} did not write {f}"
    for text in texts:
        assert text in run["stdout"], f"{name}: {text!r} not in its output:\n{run['stdout']}"
    if name == "export_figures":  # PNGs where a Chromium exists, a clear message where none does
        from v4lens.plot import find_browser

        if find_browser():
            assert (cwd / "figs" / "comb_grid.png").stat().st_size > 0
        else:
            assert "images skipped" in run["stdout"]


def test_a_failing_example_is_reported(tmp_path, monkeypatch):
    """The runner reports a script's exception as exit 1 with its traceback, and goes on to the next."""
    bad, good = tmp_path / "bad.py", tmp_path / "good.py"
    bad.write_text("print('before'); raise ValueError('boom')")
    good.write_text("import sys; print('args', sys.argv[1:]); sys.exit(0)")
    jobs = [{"key": "bad", "path": str(bad), "args": [], "cwd": str(tmp_path)},
            {"key": "good", "path": str(good), "args": ["-x"], "cwd": str(tmp_path)}]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _RUN_ALL, json.dumps(jobs)], check=True, capture_output=True,
                          text=True, timeout=TIMEOUT_S)  # fmt: skip
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["bad"]["code"] == 1 and "ValueError: boom" in results["bad"]["stderr"]
    assert results["bad"]["stdout"] == "before\n"
    assert results["good"]["code"] == 0 and results["good"]["stdout"] == "args ['-x']\n"

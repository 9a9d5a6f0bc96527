#!/usr/bin/env python
"""Forward-pass benchmark: v4lens against transformers' `DeepseekV4ForCausalLM`, same weights.

Both models are built from the same seeded random init (`v4lens.load(preset)`, then
`v4lens.weights.hf.hf_model_like`), run on the same random tokens under `torch.inference_mode()`,
and timed after a short warm-up. Every configuration runs in its own fresh worker process
(this script re-invoked with `--worker`), so peak-memory numbers are not polluted by the
other model or by earlier runs:

* CPU: peak RSS minus the RSS just before the run (after loading, warm-up, gc and
  malloc_trim). The kernel's high-water mark is reset first (`echo 5 > /proc/self/clear_refs`);
  where that is not allowed a 1 ms RSS sampler thread is used instead.
* CUDA (`--device cuda`): `torch.cuda.max_memory_allocated()` minus the allocated memory
  just before the run.

Reported per dtype and sequence length:

* v4lens vs transformers: time, tokens/s, peak memory, speed-up, memory ratio;
* v4lens hook overhead: `run_with_cache` (every hook point cached) vs plain forward, and
  plain forward with idle hook points vs the same code with every HookPoint stripped
  (its class swapped for one whose `__call__` returns its input, so not even
  `nn.Module.__call__` runs). Each worker first checks that stripping is exact (bit-identical
  logits) and really bypasses hooks (a hook on every point fires when idle, never when stripped).

Roofline (benchmarks/roofline.py): a separate worker per dtype, with the model workers'
threads, measures this machine's matmul ceiling (FLOP/s of a 4096³ GEMM in that dtype); each
v4lens row then reports tokens/s ÷ (ceiling ÷ matmul FLOPs per token), the share of the
ceiling the forward reaches (`roofline.forward_flops_per_token`: matmuls only, see there).

`--scaling` measures peak memory against sequence length (default: mini-3b cut to 4 layers,
bf16, 1k-8k) for v4lens and transformers, and reports the growth exponent and the
v4lens/transformers memory ratio at the longest length.

`--chunk-len N` prefills lengths above `--chunk-above` (default N) chunk by chunk through the
incremental cache (`model(chunk, past_kv_cache=V4KVCache(), logits_to_keep=1)`), keeping
only the last position's logits: long prompts without logits for every position. Such rows are
labelled "chunked prefill (chunk N)"; each such worker first checks the chunked last-position
logits against one full forward on the warm-up tokens.

`--device cuda` runs everything on the GPU (`torch.cuda.synchronize()` around every timing) and
first checks CUDA against CPU logits on the same weights (`--check-len` tokens, CPU fp32 as the
reference; tolerances and their justification at FP32_REL_TOL below); a failure is reported
and makes the script exit 1.

Examples (see benchmarks/README.md):

    python benchmarks/bench_forward.py --preset tiny --lengths 64,128 --dtypes fp32,bf16
    python benchmarks/bench_forward.py --preset mini-3b --dtypes bf16 \\
        --lengths 1024,2048,4096,8192 --hf-max-len 4096 --cache-max-len 4096 --out results.md
    python benchmarks/bench_forward.py --scaling --out scaling.md
    python benchmarks/bench_forward.py --preset mini-3b --lengths 8192,32768 --chunk-len 4096 \
        --hf-max-len 4096 --no-stripped
    python benchmarks/bench_forward.py --device cuda --preset mini-3b --lengths 1024,4096
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

MARK = "@@BENCH "  # prefix of the worker's machine-readable stdout lines
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing v4lens
    sys.path.insert(0, str(REPO))


# ============================================================================ memory probes
def _proc_status(field: str, pid: int | str = "self") -> int | None:
    """A `kB` field of /proc/<pid>/status, in bytes (None where unavailable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so the next baseline is a clean one."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class HostPeak:
    """Peak RSS of this process during a window, minus the RSS at its start."""

    def __init__(self):
        self.method = "VmHWM reset via /proc/self/clear_refs"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            if _proc_status("VmHWM") is None:
                raise OSError("no VmHWM")
        except OSError:
            self.method = "RSS sampled every 1 ms"
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> None:
        gc.collect()
        _malloc_trim()
        self.base = _proc_status("VmRSS") or 0
        if self.method.startswith("VmHWM"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _proc_status("VmRSS") or self.base
        else:
            self._peak = self.base
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _proc_status("VmRSS") or 0)
            time.sleep(0.001)

    def stop(self) -> int:
        if self.method.startswith("VmHWM"):
            peak = _proc_status("VmHWM") or 0
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _proc_status("VmRSS") or 0)
        return max(0, peak - self.base)


class CudaPeak:
    """`torch.cuda.max_memory_allocated()` during a window, minus what was allocated at its start."""

    method = "torch.cuda.max_memory_allocated"

    def start(self) -> None:
        import torch

        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def stop(self) -> int:
        import torch

        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - self.base)


# ============================================================================ hook stripping
def _stripped_class():
    from torch import nn

    class StrippedHookPoint(nn.Module):
        """A HookPoint reduced to the identity: `__call__` itself returns the input, so neither
        `nn.Module.__call__` nor any forward hook (local or global) runs."""

        def forward(self, x):
            return x

        def __call__(self, x):
            return x

    return StrippedHookPoint


class strip_hook_points:
    """Context manager: every HookPoint of `model` becomes a `StrippedHookPoint` (restored on exit)."""

    def __init__(self, model):
        from transformer_lens.hook_points import HookPoint

        self.points = [m for m in model.modules() if isinstance(m, HookPoint)]
        self.cls = _stripped_class()

    def __enter__(self):
        self.saved = [(m, m.__class__) for m in self.points]
        for m in self.points:
            m.__class__ = self.cls
        return self

    def __exit__(self, *exc):
        for m, cls in self.saved:
            m.__class__ = cls
        return False


def check_stripping(model, tokens) -> dict:
    """Stripping is exact (bit-identical logits) and bypasses hooks (none fires while stripped)."""
    import torch

    idle = model(tokens)
    with strip_hook_points(model) as s:
        stripped = model(tokens)
    n_points = len(s.points)
    calls: list[str] = []

    def count(act, hook):
        calls.append(hook.name)
        return act

    for name in model.hook_dict:
        model.add_hook(name, count)
    try:
        model(tokens)
        fired_idle, distinct_idle = len(calls), len(set(calls))
        calls.clear()
        with strip_hook_points(model):
            model(tokens)
        fired_stripped = len(calls)
    finally:
        model.reset_hooks(including_permanent=False)
    model(tokens)
    remaining = len(calls) - fired_stripped  # after reset_hooks: nothing may fire either
    out = {
        "hook_points": n_points,
        "logits_bit_identical": bool(torch.equal(idle, stripped)),
        "hook_calls_with_hooks": fired_idle,
        "distinct_hook_points_fired": distinct_idle,
        "hook_calls_while_stripped": fired_stripped,
        "restored": all(type(m) is cls for m, cls in s.saved) and remaining == 0,  # (v4lens's are CheckedHookPoint)
    }
    out["ok"] = out["logits_bit_identical"] and fired_idle > 0 and fired_stripped == 0 and out["restored"]
    return out


# ============================================================================ CUDA vs CPU check
# Tolerances of the CUDA-vs-CPU logits check (--device cuda), against CPU fp32 logits:
#
# * CUDA fp32: the same arithmetic as the CPU (TF32 is switched off for the check), only the
#   order of the reductions differs (~1e-7 relative per op). A rare MoE routing flip at a
#   near-tie can still move one token's logits by a few per cent, hence a norm-wise relative
#   error below 5e-3 and top-1 agreement of at least 98 % rather than bit-level bounds.
# * CUDA bf16: bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3); rounded at every
#   op through a few dozen layers, logits of a trained model typically end 1-3 % off, so a
#   relative error below 5e-2 with top-1 agreement of at least 90 % leaves headroom while a real
#   bug (a wrong kernel, a lost fp32 island, mis-scaled rotary) shows as an O(1) error. But
#   random-init weights have nearly flat logits (max |logit| ~4 on mini-3b) and bf16 noise flips
#   their MoE routing: two correct bf16 implementations on the CPU agree on only ~30 % of argmaxes
#   there (benchmarks/results/mini3b_bf16.md). So the same bf16 weights are also run on the CPU,
#   and the CUDA bf16 bounds widen to what bf16 itself costs on the CPU: relative error up to
#   max(5e-2, 2 x CPU bf16's) and top-1 agreement down to min(0.9, CPU bf16's - 0.1).
FP32_REL_TOL, FP32_TOP1_MIN = 5e-3, 0.98
BF16_REL_TOL, BF16_TOP1_MIN = 5e-2, 0.90


def _logits_diff(test, ref) -> dict:
    """How far `test` logits [b, p, V] are from `ref` (both fp32 on the CPU)."""
    d = test - ref
    return {
        "max_abs_diff": float(d.abs().max()),
        "max_abs_ref": float(ref.abs().max()),
        "rel_err": float(d.norm() / ref.norm().clamp_min(1e-30)),
        "top1_agreement": float((test.argmax(-1) == ref.argmax(-1)).float().mean()),
    }


def device_check_worker(spec: dict) -> None:
    """Same weights, same `check_len` random tokens: logits on the CPU (fp32, then bf16) and on
    CUDA (fp32, then bf16), compared with the CPU fp32 logits; fails (after reporting) outside
    the tolerances above. The model is built once on the CPU in fp32 and moved with `.to`, so
    every run sees exactly the same (rounded) weights."""
    import torch

    torch.set_num_threads(spec["threads"])
    import v4lens

    # spec["check_device"] = "cpu" runs this whole code path without a GPU (a test of the script only)
    cuda = torch.device(spec.get("check_device", "cuda"))
    on_gpu = cuda.type == "cuda"
    if on_gpu:
        check_cuda("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (TF32 would cost ~1e-3)
        torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    model = v4lens.load(spec["preset"], device="cpu", dtype=torch.float32, seed=spec["seed"], **spec["overrides"])
    load_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    lo = min(3, model.cfg.d_vocab - 1)
    tokens = torch.randint(lo, model.cfg.d_vocab, (1, spec["length"]), generator=gen)
    logits = {}
    with torch.inference_mode():
        logits["cpu fp32"] = model(tokens).float()
        model.to(cuda)
        logits["cuda fp32"] = model(tokens.to(cuda)).float().cpu()
        model.to(torch.bfloat16)
        logits["cuda bf16"] = model(tokens.to(cuda)).float().cpu()
        model.to("cpu")
        if on_gpu:
            torch.cuda.empty_cache()
        logits["cpu bf16"] = model(tokens).float()
    ref = logits["cpu fp32"]
    diffs = {k: _logits_diff(v, ref) for k, v in logits.items() if k != "cpu fp32"}
    diffs["cuda bf16 vs cpu bf16"] = _logits_diff(logits["cuda bf16"], logits["cpu bf16"])
    base = diffs["cpu bf16"]
    bf16_rel = max(BF16_REL_TOL, 2 * base["rel_err"])
    bf16_top1 = min(BF16_TOP1_MIN, base["top1_agreement"] - 0.1)
    verdict = {
        "cuda fp32": diffs["cuda fp32"]["rel_err"] < FP32_REL_TOL and diffs["cuda fp32"]["top1_agreement"] >= FP32_TOP1_MIN,
        "cuda bf16": diffs["cuda bf16"]["rel_err"] < bf16_rel and diffs["cuda bf16"]["top1_agreement"] >= bf16_top1,
    }  # fmt: skip
    result = {
        "tokens": int(tokens.shape[1]),
        "load_s": load_s,
        "gpu": torch.cuda.get_device_name(0) if on_gpu else f"no GPU: '{cuda}' stood in for CUDA (script test)",
        "diffs": diffs,
        "tolerances": {
            "cuda fp32": {"rel_err_below": FP32_REL_TOL, "top1_at_least": FP32_TOP1_MIN},
            "cuda bf16": {"rel_err_below": bf16_rel, "top1_at_least": bf16_top1},
        },
        "verdict": verdict,
        "ok": all(verdict.values()),
    }
    _emit("device_check", **result)
    if not result["ok"]:
        raise SystemExit("CUDA vs CPU logits check FAILED: " + "; ".join(device_check_lines(result)))
    _emit("done")


def device_check_lines(check: dict) -> list[str]:
    """One line per comparison of a device_check result (for the log and the report's Checks)."""
    out = []
    for key, d in check["diffs"].items():
        tol = check["tolerances"].get(key)
        against = "" if " vs " in key else " vs cpu fp32"
        line = (
            f"{key}{against}: rel. error {d['rel_err']:.2e}, max |Δ| {d['max_abs_diff']:.3g} "
            f"(max |logit| {d['max_abs_ref']:.3g}), top-1 agreement {d['top1_agreement']:.1%}"
        )
        if tol:
            ok = check["verdict"][key]
            line += (
                f": {'OK' if ok else 'FAILED'} (needs rel. error < {tol['rel_err_below']:.2g}, "
                f"top-1 ≥ {tol['top1_at_least']:.0%})"
            )
        elif key == "cpu bf16":
            line += " (the bf16 baseline the CUDA bf16 bounds scale with)"
        else:
            line += " (informational)"
        out.append(line)
    return out


# ============================================================================ worker
def _emit(kind: str, **payload) -> None:
    print(MARK + json.dumps({"kind": kind, **payload}), flush=True)


def _cache_bytes(cache) -> tuple[int, int]:
    """Bytes held by a run_with_cache cache (each storage counted once) and its number of entries."""
    seen, total = set(), 0
    for t in cache.cache_dict.values():
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total, len(cache.cache_dict)


def chunked_prefill(model, tokens, chunk_len: int):
    """Prefill `tokens` chunk by chunk through an incremental `V4KVCache`, the head run on each
    chunk's last position only (`logits_to_keep=1`); returns the last position's logits [b, V]."""
    from v4lens.model.kv_cache import V4KVCache

    cache, last = V4KVCache(), None
    for part in tokens.split(chunk_len, dim=1):
        last = model(part, past_kv_cache=cache, logits_to_keep=1)[:, -1]
    return last


def worker_setup(spec: dict) -> SimpleNamespace:
    """What every benchmark worker starts with: torch's threads set and transformers quiet; the
    device, a peak-memory probe for it and a `sync()`; the model (and, for an "hf" job,
    transformers' with the same weights) and its load time; the random tokens [batch, length]
    every worker of this seed sees, and their warm-up prefix."""
    import torch

    import v4lens
    from v4lens.model.config import resolve_dtype

    torch.set_num_threads(spec["threads"])
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    dtype = resolve_dtype(spec["dtype"])
    # build outside inference mode (the threaded init and the weight copy need ordinary tensors)
    t0 = time.perf_counter()
    model = v4lens.load(spec["preset"], device=device, dtype=dtype, seed=spec["seed"], **spec["overrides"])
    hf = None
    if spec["job"] == "hf":
        from v4lens.weights.hf import hf_model_like

        hf = hf_model_like(model, dtype=dtype, device=device)
    load_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    lo = min(3, model.cfg.d_vocab - 1)
    tokens = torch.randint(lo, model.cfg.d_vocab, (spec["batch"], spec["length"]), generator=gen).to(device)
    warm = tokens[:, : max(1, min(spec["length"], spec["warmup_len"]))]
    return SimpleNamespace(
        device=device, cuda=cuda, probe=CudaPeak() if cuda else HostPeak(), sync=sync,
        model=model, hf=hf, load_s=load_s, tokens=tokens, warm=warm,
    )  # fmt: skip


def logits_parity(model, hf, warm) -> dict:
    """The weights really are the same: v4lens against transformers' logits on the warm-up tokens."""
    ours = model(warm).float()
    theirs = hf(input_ids=warm, use_cache=False).logits.float()
    return {
        "max_abs_diff": float((ours - theirs).abs().max()),
        "max_abs_logit": float(ours.abs().max()),
        "argmax_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()),
        "tokens": int(warm.shape[1]),
    }


def roofline_worker(spec: dict) -> None:
    """Measure one hardware limit with the model workers' threads, in a process of its own:
    spec["measure"] "matmul" (FLOP/s of a GEMM in spec["dtype"]), "bandwidth" (bytes/s read) or "gemv"
    (bytes/s of weight read by one-row bf16 products)."""
    import roofline
    import torch

    torch.set_num_threads(spec["threads"])
    route = None
    if spec["measure"] == "matmul":
        value = roofline.matmul_ceiling(spec["dtype"], spec["device"], threads=spec["threads"])
        route = roofline.bf16_route(spec["device"]) if spec["dtype"] in ("bf16", "bfloat16") else spec["dtype"]
    elif spec["measure"] == "gemv":
        value = roofline.gemv_rate(spec["device"], threads=spec["threads"])
    else:
        value = roofline.read_bandwidth(spec["device"], threads=spec["threads"])
    _emit("roofline", measure=spec["measure"], value=value, threads=torch.get_num_threads(), route=route)
    _emit("done")


def roofline_results(results: list[dict]) -> dict:
    """{dtype (matmul ceiling), "bandwidth" or "gemv": {"status", "value" (None if it failed), "threads", "why"}}."""
    out = {}
    for r in results:
        spec = r["spec"]
        if spec["job"] != "roofline":
            continue
        ev = next((e for e in r["events"] if e["kind"] == "roofline"), None)
        key = spec["dtype"] if spec["measure"] == "matmul" else spec["measure"]
        last = next((x.strip() for x in reversed(r.get("stderr_tail") or []) if x.strip()), "")
        out[key] = {"status": r["status"], "value": ev["value"] if ev else None,
                    "threads": ev["threads"] if ev else spec["threads"], "why": last[:300],
                    "route": (ev or {}).get("route") or key}  # fmt: skip
    return out


def run_worker(spec: dict) -> None:
    import torch

    if spec["job"] == "device-check":
        device_check_worker(spec)
        return
    if spec["job"] == "roofline":
        roofline_worker(spec)
        return
    job = spec["job"]
    w = worker_setup(spec)
    cuda, probe, sync = w.cuda, w.probe, w.sync
    model, hf, load_s, tokens, warm = w.model, w.hf, w.load_s, w.tokens, w.warm

    with torch.inference_mode():
        parity = None
        if job == "hf":
            parity = logits_parity(model, hf, warm)
            del model  # measure transformers alone
            gc.collect()
            _malloc_trim()
            if cuda:
                torch.cuda.empty_cache()

            def fn():
                return hf(input_ids=tokens, use_cache=False).logits

            hf(input_ids=warm, use_cache=False)  # warm-up
        elif job == "v4lens-cache":

            def fn():
                return model.run_with_cache(tokens)

            model.run_with_cache(warm)  # warm-up
        elif spec.get("chunk_len"):
            chunk = spec["chunk_len"]

            def fn():
                return chunked_prefill(model, tokens, chunk)

            # warm-up through the cache in (at least) two chunks, and check it against a full forward
            warm_chunk = max(1, min(chunk, warm.shape[1] // 2))
            got = chunked_prefill(model, warm, warm_chunk).float()
            want = model(warm)[:, -1].float()
            d = got - want
            _emit("chunk_check", tokens=int(warm.shape[1]), chunk=warm_chunk,
                  max_abs_diff=float(d.abs().max()), max_abs_logit=float(want.abs().max()),
                  rel_err=float(d.norm() / want.norm().clamp_min(1e-30)),
                  argmax_agreement=float((got.argmax(-1) == want.argmax(-1)).float().mean()))  # fmt: skip
            del got, want, d
        else:

            def fn():
                return model(tokens)

            model(warm)  # warm-up

        sync()
        gc.collect()
        _malloc_trim()
        base_mem = torch.cuda.memory_allocated() if cuda else _proc_status("VmRSS")
        _emit("loaded", load_s=load_s, base_mem=base_mem, parity=parity, mem_method=probe.method,
              threads=torch.get_num_threads())  # fmt: skip

        def measure(f):
            probe.start()
            sync()
            t0 = time.perf_counter()
            out = f()
            sync()
            dt = time.perf_counter() - t0
            extra = {}
            if job == "v4lens-cache" and f is fn:
                extra["cache_bytes"], extra["cache_entries"] = _cache_bytes(out[1])
            peak = probe.stop()
            del out
            return dt, peak, extra

        # 1. the measured runs (the first one starts right after the post-load baseline)
        for r in range(spec["repeat"]):
            dt, peak, extra = measure(fn)
            _emit(
                "run", mode="cache" if job == "v4lens-cache" else "forward", rep=r, time_s=dt, peak_bytes=peak, **extra
            )

        # 2. idle hook points vs stripped, interleaved (alternating order) in the same process
        if job == "v4lens" and spec["stripped"]:
            check = check_stripping(model, warm)
            _emit("strip_check", **check)
            if not check["ok"]:
                raise RuntimeError(f"hook stripping check failed: {check}")

            def stripped():
                with strip_hook_points(model):
                    return fn()

            for r in range(spec["repeat"]):
                order = [("idle", fn), ("stripped", stripped)]
                for mode, f in order if r % 2 == 0 else order[::-1]:
                    dt, peak, _ = measure(f)
                    _emit("run", mode=mode, rep=r, time_s=dt, peak_bytes=peak)
    _emit("done")


# ============================================================================ orchestration
def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def config_overrides(args) -> dict:
    """Config field overrides from --layers and --set (the preset's layer pattern is kept)."""
    import v4lens

    over = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        over[key.strip()] = _parse_value(value.strip())
    if args.layers is not None:
        base = v4lens.preset(args.preset, **{k: v for k, v in over.items() if k != "n_layers"})
        n, ratios = args.layers, list(base.compress_ratios)
        tail = ratios[base.n_layers :]  # the MTP blocks' ratios, if the preset lists them
        over.setdefault("compress_ratios", tuple(ratios[:n] + tail) if n <= base.n_layers else None)
        if over["compress_ratios"] is None:
            raise SystemExit(f"--layers {n} > the preset's {base.n_layers} layers: give --set compress_ratios=(...)")
        over["n_layers"] = n
        over.setdefault("n_hash_layers", min(base.n_hash_layers, n))
    return over


def machine_info(args) -> dict:
    import torch

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_total = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    from importlib import metadata

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for key, dist in (("transformers", "transformers"), ("transformer_lens", "transformer-lens"), ("v4lens", "v4lens")):
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[key] = getattr(__import__(key), "__version__", None) if key == "v4lens" else None
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        commit = commit + ("+dirty" if dirty else "") if commit else None
    except OSError:
        commit = None
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": args.threads,
        "mem_total_bytes": mem_total,
        "platform": platform.platform(),
        "versions": versions,
        "git_commit": commit,
        "device": args.device,
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_snapshot():
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its reaped children)."""
    import resource

    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    except (OSError, ValueError, IndexError):
        return None
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        own += r.ru_utime + r.ru_stime
    return busy, own


def _other_cores(a, b, wall) -> float | None:
    """Average number of cores that processes other than this benchmark kept busy between two snapshots."""
    if a is None or b is None or wall <= 0:
        return None
    return max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / wall)


def run_job(spec: dict, args, log, script: str | Path | None = None) -> dict:
    """Run one worker (`script --worker SPEC`, default this file); watch its RSS (kill above
    --max-rss-gb) and its time (kill after --job-timeout)."""
    cmd = [sys.executable, str(Path(script or __file__).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(REPO))
    if str(REPO) not in env["PYTHONPATH"].split(os.pathsep):
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env["PYTHONPATH"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO))
    events: list[dict] = []
    err_tail: list[str] = []

    def read_out():
        for line in proc.stdout:
            if line.startswith(MARK):
                events.append(json.loads(line[len(MARK) :]))
                ev = events[-1]
                if ev["kind"] == "run":
                    log(
                        f"    {ev['mode']:<8} rep {ev['rep']}: {ev['time_s']:.3f} s, peak +{fmt_bytes(ev['peak_bytes'])}"
                    )
                elif ev["kind"] == "loaded":
                    log(f"    loaded in {ev['load_s']:.1f} s, baseline {fmt_bytes(ev['base_mem'])}")
                elif ev["kind"] == "device_check":
                    for line in device_check_lines(ev):
                        log("    " + line)
                elif ev["kind"] == "unsupported":
                    log(f"    unsupported: {ev['reason']}")

    def read_err():
        for line in proc.stderr:
            err_tail.append(line.rstrip())
            del err_tail[:-40]

    readers = [threading.Thread(target=read_out, daemon=True), threading.Thread(target=read_err, daemon=True)]
    for t in readers:
        t.start()
    cpu0 = _cpu_snapshot()
    t0, max_rss, status = time.perf_counter(), 0, None
    limit = args.max_rss_gb * 2**30 if args.max_rss_gb else None
    try:
        while proc.poll() is None:
            rss = _proc_status("VmRSS", proc.pid) or 0
            max_rss = max(max_rss, rss)
            if limit and rss > limit:
                status = "killed-rss"
                proc.kill()
                break
            if args.job_timeout and time.perf_counter() - t0 > args.job_timeout:
                status = "timeout"
                proc.kill()
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        proc.kill()
        raise
    proc.wait()
    for t in readers:
        t.join(timeout=5)
    rc = proc.returncode
    wall = time.perf_counter() - t0
    other_cores = _other_cores(cpu0, _cpu_snapshot(), wall)
    if other_cores is not None and other_cores > 0.1:
        log(f"    note: other processes used {other_cores:.2f} cores on average during this worker")
    if status is None:
        status = "ok" if rc == 0 and any(e["kind"] == "done" for e in events) else "error"
    result = {
        "spec": spec,
        "status": status,
        "returncode": rc,
        "wall_s": wall,
        "other_processes_cores": other_cores,
        "max_total_rss_bytes": max_rss,
        "events": events,
    }
    if status != "ok":
        result["stderr_tail"] = err_tail[-20:]
        log(f"    -> {status} (rc {rc})" + ("\n      " + "\n      ".join(err_tail[-8:]) if status == "error" else ""))
    return result


def build_jobs(args) -> list[dict]:
    jobs = []
    common = {
        "preset": args.preset, "overrides": args.overrides, "batch": args.batch, "repeat": args.repeat,
        "warmup_len": args.warmup_len, "threads": args.threads, "device": args.device, "seed": args.seed,
    }  # fmt: skip
    if args.device_check:  # first: a broken CUDA path should show before the long runs
        jobs.append(dict(common, job="device-check", dtype="fp32+bf16", length=args.check_len))
    if not args.scaling:  # the hardware limit the v4lens rows are compared with: one worker per dtype
        jobs += [dict(common, job="roofline", measure="matmul", dtype=dtype, length=0) for dtype in args.dtypes]
    for dtype in args.dtypes:
        for length in args.lengths:
            base = dict(common, dtype=dtype, length=length)
            chunk = chunk_of(length, args.chunk_len, args.chunk_above)
            jobs.append(dict(base, job="v4lens", stripped=args.stripped, chunk_len=chunk))
            if args.hf:
                if args.hf_max_len and length > args.hf_max_len:
                    jobs.append(dict(base, job="hf", skip=f"skipped (> --hf-max-len {args.hf_max_len})"))
                else:
                    jobs.append(dict(base, job="hf"))
            if args.cache:
                if chunk:
                    jobs.append(dict(base, job="v4lens-cache", skip="skipped (chunked prefill: no run_with_cache)"))
                elif args.cache_max_len and length > args.cache_max_len:
                    jobs.append(
                        dict(base, job="v4lens-cache", skip=f"skipped (> --cache-max-len {args.cache_max_len})")
                    )
                else:
                    jobs.append(dict(base, job="v4lens-cache"))
    return jobs


# ============================================================================ summaries
def device_check_summary(job: dict) -> dict:
    """The device-check worker's result: its status and the comparison it emitted (if it got that far)."""
    check = next((e for e in job.get("events", []) if e["kind"] == "device_check"), None)
    return {"status": job["status"], "check": check, "stderr_tail": job.get("stderr_tail")}


def summarise(job: dict, max_rss_gb) -> dict:
    """Per job: best (min) time per mode, max peak per mode, and why it is missing if it is."""
    out = {"status": job["status"], "modes": {}}
    loaded = next((e for e in job.get("events", []) if e["kind"] == "loaded"), None)
    out["base_mem"] = loaded["base_mem"] if loaded else None
    out["load_s"] = loaded["load_s"] if loaded else None
    out["parity"] = loaded.get("parity") if loaded else None
    check = next((e for e in job.get("events", []) if e["kind"] == "strip_check"), None)
    out["strip_check"] = check
    out["chunk_check"] = next((e for e in job.get("events", []) if e["kind"] == "chunk_check"), None)
    for e in job.get("events", []):
        if e["kind"] != "run":
            continue
        m = out["modes"].setdefault(e["mode"], {"times": [], "peaks": []})
        m["times"].append(e["time_s"])
        m["peaks"].append(e["peak_bytes"])
        for k in ("cache_bytes", "cache_entries"):
            if k in e:
                m[k] = e[k]
    for m in out["modes"].values():
        m["time_s"] = min(m["times"])
        m["peak_bytes"] = max(m["peaks"])
    # short cell text; the long reason goes into the notes under the tables
    if job["status"] == "killed-rss":
        out["why"], out["note"] = "killed", f"killed: the worker's RSS exceeded --max-rss-gb {max_rss_gb:g}"
        if out["base_mem"] is not None:  # the run needed more than this on top of its baseline
            out["peak_lower_bound"] = max_rss_gb * 2**30 - out["base_mem"]
    elif job["status"] == "timeout":
        out["why"], out["note"] = "timeout", "timeout: the worker ran past --job-timeout"
    elif job["status"] == "error":
        last = next((line.strip() for line in reversed(job.get("stderr_tail") or []) if line.strip()), "")
        out["why"] = "error"
        out["note"] = (
            "error: the worker failed" + (f": {last[:300]}" if last else "") + " (stderr_tail in the JSON report)"
        )
    elif job["status"].startswith("skipped"):
        out["why"], out["note"] = "skipped", job["status"].replace("skipped (", "skipped: ").rstrip(")")
    return out


def fmt_time(s):
    if s is None:
        return "—"
    return f"{s:.0f}" if s >= 100 else f"{s:.1f}" if s >= 10 else f"{s:.2f}" if s >= 1 else f"{s:.3f}"


def fmt_rate(x):
    if x is None:
        return "—"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def fmt_bytes(b):
    if b is None:
        return "—"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB"


def fmt_pct(fraction):
    """A share as per cent: one decimal, two significant digits below 1 % (tiny models reach 0.05 %)."""
    pct = 100 * fraction
    return f"{pct:.1f} %" if pct >= 1 else f"{pct:.2g} %"


def fmt_ratio(r, prefix=""):
    return "—" if r is None else f"{prefix}{r:.2f}×"


def _cell(s: dict | None, mode: str, what: str, tokens: int):
    """One table cell: time, tok/s or peak for `mode` of a job summary, or why it is missing."""
    if s is None:
        return "—"
    m = s["modes"].get(mode)
    if m is None:
        if what == "peak" and "peak_lower_bound" in s:
            return "> " + fmt_bytes(s["peak_lower_bound"])
        return s.get("why", "—")
    if what == "time":
        return fmt_time(m["time_s"])
    if what == "rate":
        return fmt_rate(tokens / m["time_s"])
    return fmt_bytes(m["peak_bytes"])


def _get(s, mode, key):
    if s is None or mode not in s["modes"]:
        return None
    return s["modes"][mode][key]


def _table(columns, rows, label=str) -> list[str]:
    """Markdown table: columns are (header, fn(length, row, tokens) -> str, tag); label(length) is the first cell."""
    out = ["| seq len | " + " | ".join(c[0] for c in columns) + " |", "|---:|" + "---:|" * len(columns)]
    for n, row, tok in rows:
        out.append(f"| {label(n)} | " + " | ".join(c[1](n, row, tok) for c in columns) + " |")
    return out + [""]


def _ratio_cell(num, den, lower_bound_den=None):
    if num and den:
        return fmt_ratio(num / den)
    if num and lower_bound_den:  # the denominator is at least this (its worker was killed)
        return fmt_ratio(num / lower_bound_den, "< ")
    return "—"


def _compare_columns():
    v4 = lambda r: r.get("v4lens")
    hf = lambda r: r.get("hf")
    return [
        ("v4lens time (s)", lambda n, r, t: _cell(v4(r), "forward", "time", t), False),
        ("v4lens tok/s", lambda n, r, t: _cell(v4(r), "forward", "rate", t), False),
        ("v4lens peak mem", lambda n, r, t: _cell(v4(r), "forward", "peak", t), False),
        ("HF time (s)", lambda n, r, t: _cell(hf(r), "forward", "time", t), True),
        ("HF tok/s", lambda n, r, t: _cell(hf(r), "forward", "rate", t), True),
        ("HF peak mem", lambda n, r, t: _cell(hf(r), "forward", "peak", t), True),
        ("speed-up (HF time ÷ v4lens time)",
         lambda n, r, t: _ratio_cell(_get(hf(r), "forward", "time_s"), _get(v4(r), "forward", "time_s")), True),
        ("memory ratio (v4lens peak ÷ HF peak)",
         lambda n, r, t: _ratio_cell(_get(v4(r), "forward", "peak_bytes"), _get(hf(r), "forward", "peak_bytes"),
                                     (hf(r) or {}).get("peak_lower_bound")), True),
    ]  # fmt: skip


def _ceiling_column(report: dict, dtype: str, title: str | None = None):
    """The v4lens rows' share of the matmul ceiling: (tokens/s) ÷ (ceiling ÷ FLOPs per token)."""
    ceiling = ((report.get("roofline") or {}).get(dtype) or {}).get("value")
    flops = report.get("forward_flops") or {}

    def cell(n, r, tokens):
        seconds, per_token = _get(r.get("v4lens"), "forward", "time_s"), flops.get(str(n))
        if not (ceiling and seconds and per_token):
            return "—"
        return fmt_pct(tokens / seconds * per_token / ceiling)

    return (title or f"v4lens % of {dtype} matmul ceiling", cell, False)


def roofline_lines(report: dict, kind: str) -> list[str]:
    """Header bullets: the measured limit(s) and the work per token / step they are compared with."""
    roof = report.get("roofline") or {}
    out = []
    for key, r in roof.items():
        threads = f"{r['threads']} thread{'s' if r['threads'] != 1 else ''}"
        if r["value"] is None:
            out.append(f"- roofline: the {key} measurement **{r['status']}**{': ' + r['why'] if r['why'] else ''}")
        elif key == "bandwidth":
            out.append(
                f"- roofline: read bandwidth {r['value'] / 1e9:.1f} GB/s (`.sum()` of a 1 GiB bf16 tensor, best of 3, "
                f"{threads}, own worker; benchmarks/roofline.py)"
            )
        elif key == "gemv":
            out.append(
                f"- roofline: one-row bf16 products read their weight at {r['value'] / 1e9:.1f} GB/s (`v4lens.model.linear"
                f".linear` of x [1, 4096] with a 512 MiB weight, the kernel a decoding step's projections run on, best of 3, "
                f"{threads}, own worker; benchmarks/roofline.py)"
            )
        else:
            route = "" if r.get("route", key) == key else f" multiplied in {r['route']}, as v4lens does on this CPU"
            out.append(
                f"- roofline: {key} matmul ceiling {r['value'] / 1e12:.3g} TFLOP/s ({key} 4096³ GEMM{route}, best of 3, "
                f"{threads}, own worker; benchmarks/roofline.py)"
            )
    if kind == "forward" and report.get("forward_flops"):
        out.append(
            "- matmul work per token (`roofline.forward_flops_per_token`: GEMMs only, visible candidates only): "
            + ", ".join(
                f"{len_label(int(n), report['args'])}: {f / 1e9:.3g} GFLOP" for n, f in report["forward_flops"].items()
            )
        )
    return out


def _hook_columns():
    v4 = lambda r: r.get("v4lens")
    c = lambda r: r.get("v4lens-cache")

    def size(n, r, t):
        b, k = _get(c(r), "cache", "cache_bytes"), _get(c(r), "cache", "cache_entries")
        return "—" if b is None else f"{fmt_bytes(b)} ({k} tensors)"

    return [
        ("forward (s)", lambda n, r, t: _cell(v4(r), "forward", "time", t), None),
        ("run_with_cache (s)", lambda n, r, t: _cell(c(r), "cache", "time", t), "cache"),
        ("cache ÷ forward",
         lambda n, r, t: _ratio_cell(_get(c(r), "cache", "time_s"), _get(v4(r), "forward", "time_s")), "cache"),
        ("cache peak mem", lambda n, r, t: _cell(c(r), "cache", "peak", t), "cache"),
        ("cache size", size, "cache"),
        ("idle hooks (s)", lambda n, r, t: _cell(v4(r), "idle", "time", t), "strip"),
        ("hooks stripped (s)", lambda n, r, t: _cell(v4(r), "stripped", "time", t), "strip"),
        ("idle ÷ stripped",
         lambda n, r, t: _ratio_cell(_get(v4(r), "idle", "time_s"), _get(v4(r), "stripped", "time_s")), "strip"),
    ]  # fmt: skip


def header_lines(report: dict, title: str, protocol: str) -> list[str]:
    """The report's title and its machine / software / model / protocol / date lines (shared with
    bench_decode.py)."""
    args, mach, cfg = report["args"], report["machine"], report["config"]
    L = []
    L.append(f"# v4lens {title}: {cfg['preset']}{' ' + cfg['overrides_text'] if cfg['overrides_text'] else ''}\n")
    v = mach["versions"]
    L.append(
        f"- machine: {mach['cpu']}, {mach['usable_cpus']} usable of {mach['logical_cpus']} logical CPUs, "
        f"{fmt_bytes(mach['mem_total_bytes'])} RAM" + (f", GPU {mach['gpu']}" if mach.get("gpu") else "")
    )
    L.append(
        f"- software: torch {v['torch']} ({mach['threads']} threads, device {mach['device']}), "
        f"transformers {v['transformers']}, transformer-lens {v['transformer_lens']}, v4lens {v['v4lens']} "
        f"(git {mach['git_commit']}), Python {v['python']}"
    )
    pc = cfg["param_counts"]
    L.append(
        f"- model: {cfg['preset']} ({pc['total'] / 1e9:.3f} B params, {pc['active'] / 1e9:.3f} B active), "
        f"{cfg['n_layers']} layers, compress ratios {cfg['compress_ratios']}; batch {args['batch']}, random tokens (seed {args['seed']})"
    )
    L.append(f"- protocol: {protocol}")
    others = [j["other_processes_cores"] for j in report["jobs"] if j.get("other_processes_cores") is not None]
    L.append(
        f"- date {mach['date']}; total wall time {report['wall_s'] / 60:.1f} min"
        + (
            f"; CPU used by other processes during a worker: at most {max(others):.2f} cores on average"
            if others
            else ""
        )
    )
    if others and max(others) > 0.25:
        L.append(
            f"- **warning**: other processes kept up to {max(others):.2f} cores busy during the run: "
            "times (and the small ratios) are unreliable; rerun on a quiet machine"
        )
    L.append("")
    return L


def render(report: dict) -> str:
    args = report["args"]
    title = "Memory scaling" if args["scaling"] else "Forward-pass benchmark"
    protocol = (
        f"fresh worker process per configuration, `torch.inference_mode()`, warm-up on "
        f"{args['warmup_len']} tokens, best of {args['repeat']} timed run(s); peak memory = {report['mem_method']} "
        f"minus the memory just before the run (after load + warm-up); transformers with `use_cache=False`, eager attention"
    )
    L = header_lines(report, title, protocol)
    L[-1:-1] = roofline_lines(report, "forward")  # before the header's closing blank line

    S = report["summary"]  # (dtype, length) -> {"v4lens": .., "hf": .., "v4lens-cache": ..}
    if args["scaling"]:
        L += render_scaling(report)
    else:
        L += render_summary(report)
        for dtype in args["dtypes"]:
            L.append(f"## {dtype}\n")
            rows = [(n, S[f"{dtype}/{n}"], n * args["batch"]) for n in args["lengths"]]
            title = "v4lens vs transformers" if args["hf"] else "v4lens (transformers skipped)"
            how = "plain forward, logits for every position"
            if any(chunk_of(n, args.get("chunk_len"), args.get("chunk_above")) for n in args["lengths"]):
                how += "; chunked rows: v4lens last-position logits only"
            L.append(f"### {title} ({how})\n")
            label = lambda n: len_label(n, args)
            cols = [c for c in _compare_columns() if args["hf"] or not c[2]]
            cols.insert(2, _ceiling_column(report, dtype))  # after v4lens tok/s
            L += _table(cols, rows, label)
            if args["cache"] or args["stripped"]:
                L.append("### v4lens hook overhead\n")
                L += _table(
                    [
                        c
                        for c in _hook_columns()
                        if (args["cache"] or c[2] != "cache") and (args["stripped"] or c[2] != "strip")
                    ],
                    rows,
                    label,
                )
    L += render_checks(report)
    return "\n".join(L) + "\n"


def render_summary(report) -> list[str]:
    """One row per (dtype, length) with the headline numbers (the table for the top-level README)."""
    args, S = report["args"], report["summary"]
    cols = [c for c in _compare_columns() if c[0] in ("v4lens tok/s", "v4lens peak mem")]
    if args["hf"]:
        cols += [
            c for c in _compare_columns() if c[0] in ("HF tok/s", "HF peak mem") or c[0].startswith(("speed", "memory"))
        ]
        order = ["v4lens tok/s", "HF tok/s", "speed-up", "v4lens peak mem", "HF peak mem", "memory ratio"]
        cols.sort(key=lambda c: next(i for i, o in enumerate(order) if c[0].startswith(o)))
    hooks = _hook_columns()
    if args["cache"]:
        cols += [c for c in hooks if c[0] == "cache ÷ forward"]
    if args["stripped"]:
        cols += [c for c in hooks if c[0] == "idle ÷ stripped"]
    at = 1  # the share of the matmul ceiling goes after v4lens tok/s; its ceiling is the row's dtype's
    header = cols[:at] + [_ceiling_column(report, "", "v4lens % of matmul ceiling")] + cols[at:]
    L = ["## Summary\n", "| dtype | " + _table(header, [])[0].removeprefix("| ")]
    L.append("|---|" + _table(header, [])[1].removeprefix("|"))
    for dtype in args["dtypes"]:
        dtype_cols = cols[:at] + [_ceiling_column(report, dtype)] + cols[at:]
        for n in args["lengths"]:
            row, tok = S[f"{dtype}/{n}"], n * args["batch"]
            L.append(f"| {dtype} | {len_label(n, args)} | " + " | ".join(c[1](n, row, tok) for c in dtype_cols) + " |")
    return L + [""]


def render_checks(report) -> list[str]:
    S, args = report["summary"], report["args"]
    notes = sorted({s["note"] for row in S.values() for s in row.values() if s and s.get("note")})
    if any(chunk_of(n, args.get("chunk_len"), args.get("chunk_above")) for n in args["lengths"]):
        notes.append(
            f"chunked prefill (chunk {args['chunk_len']}): lengths above {args['chunk_above']} run v4lens as "
            "`model(chunk, past_kv_cache=cache)` over the chunks of one `V4KVCache`, keeping only the last "
            "chunk's last-position logits (fp32 [b, V]); transformers, where it ran, still returns every "
            "position's logits (one forward), so its column is not the same work"
        )
    L = ["## Notes\n"] + [f"- {n}" for n in notes] + [""] if notes else []
    checks_at = len(L)
    L.append("## Checks\n")
    base, parity = {}, {}
    for key, row in S.items():
        dtype = key.split("/")[0]
        for impl, s in row.items():
            if s and s.get("base_mem") is not None:
                base.setdefault((dtype, impl), s["base_mem"])
            if impl == "hf" and s and s.get("parity"):
                parity.setdefault(dtype, []).append(s["parity"])
    for dtype, ps in parity.items():
        L.append(
            f"- same weights, {dtype}: v4lens vs transformers logits on the warm-up tokens "
            f"({len(ps)} worker(s), up to {max(p['tokens'] for p in ps)} tokens): max |Δ| {max(p['max_abs_diff'] for p in ps):.3g} "
            f"(max |logit| {max(p['max_abs_logit'] for p in ps):.3g}), argmax agreement "
            f"{min(p['argmax_agreement'] for p in ps):.1%}"
        )
    chunk_checks = [s["chunk_check"] for row in S.values() for s in [row.get("v4lens")] if s and s.get("chunk_check")]
    if chunk_checks:
        c = max(chunk_checks, key=lambda c: c["rel_err"])
        L.append(
            f"- chunked prefill vs one forward ({len(chunk_checks)} worker(s), last-position logits of the "
            f"{c['tokens']} warm-up tokens in chunks of {c['chunk']}): worst rel. error {c['rel_err']:.2e}, "
            f"max |Δ| {c['max_abs_diff']:.3g} (max |logit| {c['max_abs_logit']:.3g}), argmax agreement "
            f"{min(x['argmax_agreement'] for x in chunk_checks):.0%}"
        )
    dc = report.get("device_check")
    if dc:
        if dc.get("check"):
            c = dc["check"]
            L.append(
                f"- CUDA vs CPU logits ({c['gpu']}, same weights built on the CPU in fp32 and moved, {c['tokens']} "
                f"random tokens): {'OK' if c['ok'] else '**FAILED**'}"
            )
            L += [f"  - {line}" for line in device_check_lines(c)]
        else:
            last = next((x.strip() for x in reversed(dc.get("stderr_tail") or []) if x.strip()), "")
            L.append(
                f"- CUDA vs CPU logits: **{dc['status']}**{': ' + last[:300] if last else ''} (stderr_tail in the JSON report)"
            )
    checks = [(k, s["strip_check"]) for k, row in S.items() for s in [row.get("v4lens")] if s and s.get("strip_check")]
    if checks:
        ok = all(c["ok"] for _, c in checks)
        c = checks[0][1]
        L.append(
            f"- hook stripping ({len(checks)} worker(s)): {'OK' if ok else 'FAILED'}: logits bit-identical with "
            f"{c['hook_points']} HookPoints stripped; a hook on every point fired {c['hook_calls_with_hooks']} times "
            f"({c['distinct_hook_points_fired']} distinct points) with hooks live, {c['hook_calls_while_stripped']} while stripped"
        )
    if base:
        L.append(
            "- memory before the timed runs (weights + runtime; the peak columns are on top of this): "
            + ", ".join(f"{impl} {dtype} {fmt_bytes(b)}" for (dtype, impl), b in sorted(base.items()))
        )
    if len(L) == checks_at + 1:
        del L[checks_at:]
    return L + [""]


def render_scaling(report) -> list[str]:
    args, S = report["args"], report["summary"]
    L = []
    for dtype in args["dtypes"]:
        L.append(f"## Peak memory vs sequence length ({dtype}, plain forward)\n")
        L.append(
            "| seq len | v4lens peak mem | v4lens marginal MiB / 1k tok | HF peak mem | HF marginal MiB / 1k tok "
            "| memory ratio (v4lens ÷ HF) | v4lens time (s) | HF time (s) |"
        )
        L.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
        pts = {"v4lens": [], "hf": []}

        def marginal(points, n, p):
            """MiB per 1k tokens from the previous measured length to this one."""
            last = [q for q in points if q[0] < n]
            if not p or not last:
                return "—"
            n0, p0 = last[-1]
            return f"{(p - p0) / 2**20 / ((n - n0) / 1024):.0f}"

        for n in args["lengths"]:
            row = S[f"{dtype}/{n}"]
            v4, hf = row.get("v4lens"), row.get("hf")
            vp, hp = _get(v4, "forward", "peak_bytes"), _get(hf, "forward", "peak_bytes")
            for impl, p in (("v4lens", vp), ("hf", hp)):
                if p:
                    pts[impl].append((n, p))
            L.append(
                f"| {len_label(n, args)} | {_cell(v4, 'forward', 'peak', n)} | {marginal(pts['v4lens'], n, vp)} "
                f"| {_cell(hf, 'forward', 'peak', n)} | {marginal(pts['hf'], n, hp)} "
                f"| {_ratio_cell(vp, hp, (hf or {}).get('peak_lower_bound'))} "
                f"| {_cell(v4, 'forward', 'time', n)} | {_cell(hf, 'forward', 'time', n)} |"
            )
        L.append("")
        for impl, p in pts.items():
            if len(p) < 2:
                continue
            (n0, m0), (n1, m1) = p[0], p[-1]
            expo = math.log(m1 / m0) / math.log(n1 / n0)
            line = f"- {impl}: peak ×{m1 / m0:.2f} from {n0} to {n1} tokens (×{n1 / n0:g}): log-log slope {expo:.2f}"
            if len(p) >= 3:
                (a0, p0), (a1, p1) = p[0], p[1]
                (b0, q0), (b1, q1) = p[-2], p[-1]
                s_first, s_last = (p1 - p0) / (a1 - a0), (q1 - q0) / (b1 - b0)
                quad = (b0 + b1) / (a0 + a1)  # what the ratio of marginal costs would be if memory ~ L²
                if s_first > 0:
                    r = s_last / s_first
                    kind = "about linear" if r <= 1 + (quad - 1) / 6 else "super-linear"
                    line += (
                        f"; marginal cost per token ×{r:.2f} from the first step ({a0}→{a1}) to the last "
                        f"({b0}→{b1}) (1 if linear, {quad:.0f} if quadratic): {kind}"
                    )
            L.append(line)
        n_last = args["lengths"][-1]
        row = S[f"{dtype}/{n_last}"]
        v4, hf = row.get("v4lens"), row.get("hf")
        vp, hp = _get(v4, "forward", "peak_bytes"), _get(hf, "forward", "peak_bytes")
        if vp and hp:
            L.append(
                f"- memory ratio at {n_last} tokens: v4lens ÷ HF = {vp / hp:.2f} ({'≤' if vp / hp <= 0.5 else '>'} 1/2)"
            )
        elif vp and hf and hf.get("peak_lower_bound"):
            r = vp / hf["peak_lower_bound"]
            L.append(
                f"- memory ratio at {n_last} tokens: transformers was killed at --max-rss-gb, so its peak was above "
                f"{fmt_bytes(hf['peak_lower_bound'])}: v4lens ÷ HF < {r:.2f}"
            )
        L.append("")
    return L


# ============================================================================ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See benchmarks/README.md for what each column means.")  # fmt: skip
    p.add_argument("--preset", default="mini-3b", help="v4lens preset (default mini-3b)")
    p.add_argument("--layers", type=int, help="keep only the preset's first N layers (MTP ratios kept)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a V4Config field, e.g. --set d_vocab=4096 (repeatable)",
    )
    p.add_argument("--lengths", help="comma-separated sequence lengths (default 1024,2048,4096,8192)")
    p.add_argument("--dtypes", help="comma-separated dtypes: bf16, fp32 (default bf16)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--repeat", type=int, default=1, help="timed runs per configuration; the best is reported (default 1)"
    )
    p.add_argument("--warmup-len", type=int, default=128, help="tokens in the untimed warm-up forward (default 128)")
    p.add_argument("--threads", type=int, help="torch threads in each worker (default: all usable CPUs)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-hf", action="store_true", help="do not run transformers")
    p.add_argument("--hf-max-len", type=int, help="skip transformers above this length (its attention is dense)")
    p.add_argument("--no-cache", action="store_true", help="do not time run_with_cache")
    p.add_argument(
        "--cache-max-len", type=int, help="skip run_with_cache above this length (it stores every activation)"
    )
    p.add_argument("--no-stripped", action="store_true", help="do not time idle vs stripped hook points")
    p.add_argument("--chunk-len", type=int,
                   help="v4lens: prefill lengths above --chunk-above chunk by chunk (chunks of N tokens) through "
                        "the incremental cache (v4lens.model.kv_cache), keeping only the last position's logits")  # fmt: skip
    p.add_argument("--chunk-above", type=int, help="with --chunk-len: chunk lengths above this (default: --chunk-len)")
    p.add_argument("--check-len", type=int, default=256,
                   help="--device cuda: tokens of the CUDA-vs-CPU logits check (default 256)")  # fmt: skip
    p.add_argument("--no-device-check", action="store_true", help="--device cuda: skip the CUDA-vs-CPU logits check")
    p.add_argument("--max-rss-gb", type=float, help="kill a worker whose RSS exceeds this (default 75%% of RAM)")
    p.add_argument(
        "--job-timeout", type=float, default=3600, help="kill a worker after this many seconds (default 3600)"
    )
    p.add_argument("--scaling", action="store_true",
                   help="memory-scaling mode: plain forward only; defaults to --preset mini-3b --layers 4 "
                        "--lengths 1024,2048,4096,8192 --dtypes bf16")  # fmt: skip
    p.add_argument(
        "--out", action="append", metavar="PATH", help="also write the report: *.json (raw) or *.md (repeatable)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args

    explicit = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    if args.scaling and "--layers" not in explicit and args.preset == "mini-3b":
        args.layers = 4
    args.lengths = [int(x) for x in (args.lengths or "1024,2048,4096,8192").split(",") if x.strip()]
    args.dtypes = [x.strip() for x in (args.dtypes or "bf16").split(",") if x.strip()]
    from v4lens.model.config import resolve_dtype

    for d in args.dtypes:
        resolve_dtype(d)  # fail early on a typo
    args.hf = not args.skip_hf
    if args.chunk_len is not None and args.chunk_len < 1:
        raise SystemExit("--chunk-len must be at least 1")
    if args.chunk_above is not None and args.chunk_len is None:
        raise SystemExit("--chunk-above needs --chunk-len")
    if args.chunk_len and args.chunk_above is None:
        args.chunk_above = args.chunk_len
    args.device_check = args.device == "cuda" and not args.no_device_check
    args.cache = not (args.no_cache or args.scaling)
    args.stripped = not (args.no_stripped or args.scaling)
    return finish_common_args(args)


def finish_common_args(args):
    """Defaults every benchmark's parser shares: threads (the usable CPUs), --max-rss-gb (75% of
    RAM), the CUDA check, the config overrides."""
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if args.max_rss_gb is None:
        try:
            with open("/proc/meminfo") as f:
                total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
        except (OSError, StopIteration):
            total = None
        args.max_rss_gb = round(0.75 * total / 2**30, 1) if total else 0
    check_cuda(args.device)
    args.overrides = config_overrides(args)
    return args


def check_cuda(device: str) -> None:
    """Fail early, with a clear message, when --device cuda cannot work here."""
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise SystemExit(f"--device cuda: torch.cuda.is_available() is False ({why}; torch {torch.__version__})")


def chunk_of(length: int, chunk_len: int | None, chunk_above: int | None) -> int | None:
    """The chunk size this length is prefilled with (--chunk-len above --chunk-above), else None."""
    return chunk_len if chunk_len and length > (chunk_above or chunk_len) else None


def len_label(length: int, args: dict) -> str:
    """The seq-len cell: the length, and how it was run when that is not one plain forward."""
    chunk = chunk_of(length, args.get("chunk_len"), args.get("chunk_above"))
    return f"{length} — chunked prefill (chunk {chunk})" if chunk else str(length)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(json.loads(args.worker))
        return 0

    t_start, log, cfg = start_run(args)
    jobs = build_jobs(args)
    results = run_jobs(jobs, args, log)
    summary, device_check = summarise_jobs(results, lambda r: summarise(r, args.max_rss_gb))
    report = base_report(args, cfg, results, summary, device_check, t_start)
    if not args.scaling:
        report["roofline"] = roofline_results(results)
        report["forward_flops"] = forward_flops(args, cfg)
    return publish(render(report), report, args, log)


def forward_flops(args, cfg) -> dict[str, float]:
    """{length: matmul FLOPs per token of its v4lens row}; a chunked prefill computes logits for
    each chunk's last position only."""
    import roofline

    out = {}
    for n in args.lengths:
        chunk = chunk_of(n, args.chunk_len, args.chunk_above)
        out[str(n)] = roofline.forward_flops_per_token(cfg, n, -(-n // chunk) if chunk else None)
    return out


# ============================================================================ shared with bench_decode.py
def start_run(args):
    """(start time, a logger to stderr unless --quiet, the benchmarked config)."""
    import v4lens

    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    return time.perf_counter(), log, v4lens.preset(args.preset, **args.overrides)


def run_jobs(jobs: list[dict], args, log, script=None) -> list[dict]:
    """Every job in its own worker process, in order; skipped jobs are recorded as such."""
    results = []
    for i, spec in enumerate(jobs, 1):
        label = f"[{i}/{len(jobs)}] {spec['job']:<12} {spec['dtype']:>5} L={spec['length']}"
        if "skip" in spec:
            log(f"{label}: {spec['skip']}")
            results.append({"spec": spec, "status": spec["skip"], "events": []})
            continue
        log(label)
        results.append(run_job(spec, args, log, script=script))
    return results


def summarise_jobs(results: list[dict], summarise_one) -> tuple[dict, dict | None]:
    """{"dtype/length": {job: summary}} and the device check's summary (None without one)."""
    summary: dict[str, dict] = {}
    device_check = None
    for r in results:
        s = r["spec"]
        if s["job"] == "device-check":
            device_check = device_check_summary(r)
            continue
        if s["job"] == "roofline":  # roofline_results reads these
            continue
        summary.setdefault(f"{s['dtype']}/{s['length']}", {})[s["job"]] = summarise_one(r)
    return summary, device_check


def base_report(args, cfg, results, summary, device_check, t_start) -> dict:
    """The report every benchmark writes: arguments, machine, model config, jobs and their summaries."""
    mem_method = next((e["mem_method"] for r in results for e in r["events"] if e["kind"] == "loaded"), "peak memory")
    return {
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "set")} | {"set": args.set},
        "machine": machine_info(args),
        "config": {
            "preset": args.preset,
            "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in args.overrides.items()},
            "overrides_text": " ".join(f"{k}={v}" for k, v in args.overrides.items() if k != "compress_ratios"),
            "n_layers": cfg.n_layers,
            "compress_ratios": list(cfg.compress_ratios),
            "param_counts": cfg.param_counts(),
        },
        "mem_method": mem_method,
        "jobs": results,
        "summary": summary,
        "device_check": device_check,
        "wall_s": time.perf_counter() - t_start,
    }


def publish(text: str, report: dict, args, log) -> int:
    """Print the markdown, write it and the JSON to --out paths; exit status 1 if any job failed."""
    print(text)
    for path in args.out or []:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            path.write_text(json.dumps(report, indent=1, default=str) + "\n")
        else:
            path.write_text(text)
        log(f"wrote {path}")
    return 1 if any(r["status"] == "error" for r in report["jobs"]) else 0


if __name__ == "__main__":
    sys.exit(main())

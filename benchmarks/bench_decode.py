#!/usr/bin/env python
"""Decode benchmark: greedy generation speed of v4lens against transformers, same weights.

Both models are built as in bench_forward.py (`v4lens.load(preset)`, then
`v4lens.weights.hf.hf_model_like`: the same seeded random weights) and continue the same random prompt
greedily, each in its own fresh worker process (this script re-invoked with `--worker`):

* v4lens: `model.generate(tokens, max_new_tokens=N, stop_at_eos=False)` (the incremental
  decoding cache, `use_cache=True` by default: prefill, then one token per forward);
* transformers: `hf.generate(tokens, max_new_tokens=N, min_new_tokens=N, do_sample=False,
  use_cache=True)` (eager attention, its own cache);
* with `--speculative`: v4lens `model.generate(..., speculative=True)` (MTP speculative
  decoding) in a third worker, with its acceptance rate (`result.mtp_acceptance`) and whether it
  produced exactly the plain greedy tokens.

How prefill and decode are separated: each worker times `generate(prompt, 1 new token)` and
`generate(prompt, N new tokens)` (alternating their order over `--repeat`, best time of each).
The 1-token run is the prefill: the prompt's forward and the first new token (time to first
token, including `generate`'s own set-up). The N-token run does the same prefill plus N − 1 decode
steps, each one forward of the model; a forward pre-hook on the model (v4lens's `HookedV4`,
transformers' `DeepseekV4ForCausalLM`) notes when each forward starts, and the time from the
second forward's start to the end of the call is the decode steps alone (sampling included), so

    decode tok/s = batch × (N − 1) / (end of the N-token call − start of its second forward)

counts only tokens made by decode steps and only the time they took. (Taking t(N) − t(1) instead
lets the prefill's noise in: at a 4k prompt on this shared machine two prefills differed by 7 s,
as much as the 31 steps took. Speculative decoding, not one forward per token, is still timed that
way.) On CUDA the clock starts after a synchronisation at the second forward. On a shared machine
whose speed drifts over minutes, `--rounds R` runs the v4lens and transformers workers R times,
alternating which goes first, and reports the best of all rounds, so a slow phase does not fall on
one side only.
Peak memory is that of the N-token run (prefill activations + the cache grown over N tokens), on
CPU as peak RSS over the RSS before the call, on CUDA `torch.cuda.max_memory_allocated()` over the
allocated memory before it (see bench_forward.py).

"same greedy tokens" compares the two continuations position by position: matching positions
out of N, and the length of the common prefix (after a first difference the two sequences
continue from different contexts, so later mismatches are expected). In fp32 they should be
identical; in bf16 near-ties of random-init logits can flip.

Roofline (benchmarks/roofline.py): a separate worker, with the model workers' threads, measures
this machine's read bandwidth (`.sum()` of a 1 GiB bf16 tensor); each v4lens row then reports
the share of that bound a decode step reaches: (bytes per step ÷ bandwidth) ÷ (seconds per step),
with `roofline.decode_bytes_per_step(cfg, prompt length)`: the weights one token reads (the
k activated + 1 shared experts, not all of them) and the decoding cache it reads. A second probe
times the kernel a step's projections run on (`roofline.gemv_rate`: a one-row bf16 product with a
512 MiB weight); "% of GEMV bound" is the same share against that rate, which is what a step can
reach with PyTorch's kernels where they are compute-bound (below the bandwidth: a CPU without
native bf16 products widens every weight to fp32).

On `--device cuda` a separate worker first checks CUDA against CPU logits on the same weights
(bench_forward.py's check, `--check-len` tokens; tolerances justified there).

Examples (see benchmarks/README.md):

    python benchmarks/bench_decode.py --preset tiny --prompt-lengths 64 --new-tokens 8
    python benchmarks/bench_decode.py --preset mini-3b --dtypes bf16 --prompt-lengths 1024,4096 \\
        --new-tokens 32 --speculative --out benchmarks/results/decode_mini3b_bf16.md
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # bench_forward.py sits next to this file
    sys.path.insert(0, str(HERE))

import bench_forward as bf  # memory probes, worker orchestration, report header, formatting

REPO = bf.REPO
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# ============================================================================ worker
def run_worker(spec: dict) -> None:
    import torch

    if spec["job"] == "device-check":
        bf.device_check_worker(spec)
        return
    if spec["job"] == "roofline":
        bf.roofline_worker(spec)
        return
    job, n_new = spec["job"], spec["new_tokens"]
    # the same prompt in every worker (and the same tokens as bench_forward.py for the same seed)
    w = bf.worker_setup(spec)
    cuda, probe, sync = w.cuda, w.probe, w.sync
    model, hf, load_s, tokens, warm = w.model, w.hf, w.load_s, w.tokens, w.warm

    with torch.inference_mode():
        parity = None
        if job == "hf":
            parity = bf.logits_parity(model, hf, warm)
            pad = model.cfg.pad_token_id
            del model  # measure transformers alone
            gc.collect()
            bf._malloc_trim()
            if cuda:
                torch.cuda.empty_cache()

            def generate(toks, n):
                out = hf.generate(
                    toks, attention_mask=torch.ones_like(toks), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, use_cache=True, pad_token_id=pad,
                )  # fmt: skip
                return out[:, toks.shape[1] :], None
        else:
            extra = {"speculative": True} if job == "v4lens-spec" else {}
            if job == "v4lens-compiled":
                model.set_compiled_head(True)  # compiled in the warm-up below

            def generate(toks, n):
                r = model.generate(toks, max_new_tokens=n, stop_at_eos=False, return_type="generation", **extra)
                return r.new_tokens, getattr(r, "mtp_acceptance", None)

        t_warm = time.perf_counter()
        generate(warm, 2)  # warm-up: a prefill and one decode step on a short prompt
        warmup_s = time.perf_counter() - t_warm
        # when each forward starts: the decode steps of one generate are timed from the second one on
        starts: list[float] = []

        def mark(*_):
            if len(starts) == 1:
                sync()  # the prefill's work is done before the steps' clock starts (CUDA)
            starts.append(time.perf_counter())

        if job in ("v4lens", "v4lens-compiled", "hf"):  # (a speculative round is not one forward per token)
            (hf if job == "hf" else model).register_forward_pre_hook(mark)

        sync()
        gc.collect()
        bf._malloc_trim()
        base_mem = torch.cuda.memory_allocated() if cuda else bf._proc_status("VmRSS")
        bf._emit("loaded", load_s=load_s, base_mem=base_mem, parity=parity, mem_method=probe.method,
                 threads=torch.get_num_threads(), warmup_s=warmup_s)  # fmt: skip

        for r in range(spec["repeat"]):
            for n in (1, n_new) if r % 2 == 0 else (n_new, 1):
                probe.start()
                sync()
                starts.clear()
                t0 = time.perf_counter()
                new, acceptance = generate(tokens, n)
                sync()
                t1 = time.perf_counter()
                dt = t1 - t0
                peak = probe.stop()
                info = {}
                if n == n_new:
                    info = {"acceptance": acceptance, "n_generated": int(new.shape[1])}
                    if len(starts) == n_new:  # one forward per token: the steps after the prefill, timed alone
                        info["steps_s"] = t1 - starts[1]
                    if r == 0:
                        info["tokens"] = new.tolist()
                bf._emit("run", mode="prefill" if n == 1 else "generate", rep=r, time_s=dt, peak_bytes=peak, **info)
                del new
    bf._emit("done")


# ============================================================================ orchestration
def build_jobs(args) -> list[dict]:
    jobs = []
    common = {
        "preset": args.preset, "overrides": args.overrides, "batch": args.batch, "repeat": args.repeat,
        "warmup_len": args.warmup_len, "threads": args.threads, "device": args.device, "seed": args.seed,
        "new_tokens": args.new_tokens,
    }  # fmt: skip
    if args.device_check:  # first: a broken CUDA path should show before the long runs
        jobs.append(dict(common, job="device-check", dtype="fp32+bf16", length=args.check_len))
    # the hardware limit the v4lens rows are compared with (the probe tensor is bf16 whatever the model dtype)
    jobs.append(dict(common, job="roofline", measure="bandwidth", dtype="bf16", length=0))
    jobs.append(dict(common, job="roofline", measure="gemv", dtype="bf16", length=0))
    for dtype in args.dtypes:
        for length in args.prompt_lengths:
            base = dict(common, dtype=dtype, length=length)
            pair = [dict(base, job="v4lens")] + ([dict(base, job="v4lens-compiled")] if args.compiled_head else [])
            if args.hf:
                if args.hf_max_len and length > args.hf_max_len:
                    pair.append(dict(base, job="hf", skip=f"skipped (> --hf-max-len {args.hf_max_len})"))
                else:
                    pair.append(dict(base, job="hf"))
            for r in range(args.rounds):  # odd rounds run transformers first: a slow phase hits both alike
                jobs += [dict(job, round=r) for job in (pair if r % 2 == 0 else pair[::-1])]
                if any("skip" in job for job in pair):
                    pair = [job for job in pair if "skip" not in job]  # a skipped job is listed once
            if args.speculative:
                jobs.append(dict(base, job="v4lens-spec"))
    return jobs


def merge_rounds(results: list[dict]) -> list[dict]:
    """One result per (job, dtype, length, roofline measure): the timed runs of every round together (the best is
    reported), everything else from the first round; a round that failed marks the whole job."""
    merged: dict[tuple, dict] = {}
    for r in results:
        s = r["spec"]
        key = (s["job"], s["dtype"], s["length"], s.get("measure"))  # (the roofline probes differ by measure)
        if key not in merged:
            merged[key] = dict(r, events=list(r["events"]))
            continue
        first = merged[key]
        first["events"] += [e for e in r["events"] if e["kind"] == "run"]
        if first["status"] == "ok" and r["status"] != "ok":
            first["status"], first["stderr_tail"] = r["status"], r.get("stderr_tail")
    return list(merged.values())


def summarise(job: dict, args) -> dict:
    """bench_forward's per-job summary (best time / largest peak per mode) plus the decode numbers."""
    out = bf.summarise(job, args.max_rss_gb)
    events = job.get("events", [])
    runs = [e for e in events if e["kind"] == "run" and e["mode"] == "generate"]
    out["tokens"] = next((e["tokens"] for e in runs if "tokens" in e), None)
    acc = [e["acceptance"] for e in runs if e.get("acceptance") is not None]
    out["acceptance"] = sum(acc) / len(acc) if acc else None
    out["n_generated"] = runs[0]["n_generated"] if runs else None
    loaded = next((e for e in events if e["kind"] == "loaded"), None)
    out["warmup_s"] = loaded.get("warmup_s") if loaded else None
    t1, tn = bf._get(out, "prefill", "time_s"), bf._get(out, "generate", "time_s")
    steps = args.batch * (args.new_tokens - 1)
    timed = [e["steps_s"] for e in runs if "steps_s" in e]
    if runs and len(timed) == len(runs):  # the decode steps timed alone (one forward per token)
        out["decode_s"], out["decode_how"] = min(timed), "steps"
    else:  # t(N) - t(1): the prefill cancels out, but its noise does not
        out["decode_s"], out["decode_how"] = (tn - t1 if t1 is not None and tn is not None else None), "difference"
    out["decode_rate"] = steps / out["decode_s"] if out["decode_s"] and out["decode_s"] > 0 else None
    return out


def token_match(a, b, n: int) -> dict | None:
    """Position-by-position agreement of two continuations [b][n] (first n tokens of each)."""
    if a is None or b is None:
        return None
    same = total = 0
    prefix = n
    for ra, rb in zip(a, b):
        ra, rb = ra[:n], rb[:n]
        eq = [x == y for x, y in zip(ra, rb)]
        same += sum(eq)
        total += max(len(ra), len(rb))
        prefix = min(prefix, next((i for i, e in enumerate(eq) if not e), len(eq)))
    return {"same": same, "total": total, "prefix": prefix, "identical": same == total}


def _match_cell(m):
    if m is None:
        return "—"
    if m["identical"]:
        return f"{m['same']}/{m['total']} (identical)"
    return f"{m['same']}/{m['total']} (same first {m['prefix']})"


def decode_bytes(args, cfg) -> dict[str, dict[str, float]]:
    """{dtype: {prompt length: bytes a decode step must read}} (the first step's context: the prompt)."""
    import roofline

    size = {"bf16": 2, "bfloat16": 2, "fp32": 4, "float32": 4}
    return {
        d: {str(n): roofline.decode_bytes_per_step(cfg, n, size[d], batch=args.batch) for n in args.prompt_lengths}
        for d in args.dtypes
    }


def _bandwidth_cell(report, dtype, n, s, limit: str = "bandwidth"):
    """(bytes per step ÷ rate) ÷ measured seconds per decode step, in per cent; `limit`: the rate, the read
    bandwidth ("bandwidth") or the one-row product's ("gemv")."""
    bandwidth = ((report.get("roofline") or {}).get(limit) or {}).get("value")
    nbytes = (report.get("decode_bytes") or {}).get(dtype, {}).get(str(n))
    seconds = (s or {}).get("decode_s")
    if not (bandwidth and nbytes and seconds and seconds > 0):
        return "—"
    per_step = seconds / (report["args"]["new_tokens"] - 1)
    return bf.fmt_pct(nbytes / bandwidth / per_step)


def _decode_cell(s, what):
    if s is None:
        return "—"
    if what == "rate":
        return bf.fmt_rate(s.get("decode_rate")) if s.get("decode_rate") else "—"
    if what == "prefill":
        return bf._cell(s, "prefill", "time", 0)
    if what == "total":
        return bf._cell(s, "generate", "time", 0)
    return bf._cell(s, "generate", "peak", 0)


def _rounds_text(args: dict) -> str:
    rounds = args.get("rounds", 1)
    if rounds == 1:
        return ""
    return f" over {rounds} rounds of workers (v4lens first, then transformers first, ...; best of all)"


def render(report: dict) -> str:
    args, S = report["args"], report["summary"]
    n_new = args["new_tokens"]
    protocol = (
        f"fresh worker process per configuration, `torch.inference_mode()`, greedy; warm-up: generate 2 tokens "
        f"after min(prompt, {args['warmup_len']}) prompt tokens; timed: generate 1 token (= prefill) and {n_new} tokens, best of "
        f"{args['repeat']} each{_rounds_text(args)}; decode tok/s = batch × ({n_new} − 1) ÷ (time from the start of the "
        f"{n_new}-token call's second forward to its end; speculative: t({n_new}) − t(1)); peak memory = "
        f"{report['mem_method']} during the {n_new}-token generate, minus the memory just before it; "
        f"v4lens `generate(stop_at_eos=False)` (incremental decoding cache); transformers "
        f"`generate(do_sample=False, min_new_tokens={n_new}, use_cache=True)`, eager attention"
    )
    L = bf.header_lines(report, "Decode benchmark", protocol)
    L[-1:-1] = bf.roofline_lines(report, "decode") + [
        f"- bytes a decode step must read at least ({dtype}; `roofline.decode_bytes_per_step`: weights one token uses "
        "+ the cache it reads): " + ", ".join(f"prompt {n}: {b / 2**30:.3f} GiB" for n, b in per_len.items())
        for dtype, per_len in (report.get("decode_bytes") or {}).items()
    ]  # before the header's closing blank line
    for dtype in args["dtypes"]:
        L.append(f"## {dtype}\n")
        title = "v4lens vs transformers" if args["hf"] else "v4lens (transformers skipped)"
        L.append(f"### {title} (greedy, {n_new} new tokens)\n")
        cols = ["prompt len", "v4lens prefill (s)", f"v4lens total, {n_new} tok (s)", "v4lens decode tok/s",
                "v4lens % of bandwidth bound", "v4lens % of GEMV bound", "v4lens peak mem"]  # fmt: skip
        if args["hf"]:
            cols += ["HF prefill (s)", f"HF total, {n_new} tok (s)", "HF decode tok/s", "HF peak mem",
                     "decode speed-up (v4lens ÷ HF tok/s)", "same greedy tokens (v4lens vs HF)"]  # fmt: skip
        L += _header(cols)
        for n in args["prompt_lengths"]:
            row = S[f"{dtype}/{n}"]
            v4, hf = row.get("v4lens"), row.get("hf")
            cells = [str(n)] + [_decode_cell(v4, w) for w in ("prefill", "total", "rate")]
            cells += [_bandwidth_cell(report, dtype, n, v4), _bandwidth_cell(report, dtype, n, v4, "gemv")]
            cells.append(_decode_cell(v4, "peak"))
            if args["hf"]:
                cells += [_decode_cell(hf, w) for w in ("prefill", "total", "rate", "peak")]
                cells.append(bf._ratio_cell((v4 or {}).get("decode_rate"), (hf or {}).get("decode_rate")))
                cells.append(_match_cell(report["matches"][f"{dtype}/{n}"]["hf"]))
            L.append("| " + " | ".join(cells) + " |")
        L.append("")
        if args.get("compiled_head"):
            L += _compiled_head_table(report, dtype)
        if args["speculative"]:
            L.append(
                f"### v4lens speculative decoding (MTP drafts, `generate(speculative=True)`, {n_new} new tokens)\n"
            )
            cols = ["prompt len", "plain decode tok/s", "speculative prefill (s)", "speculative decode tok/s",
                    "speed-up (speculative ÷ plain)", "MTP acceptance", "same tokens as plain greedy",
                    "speculative peak mem"]  # fmt: skip
            L += _header(cols)
            for n in args["prompt_lengths"]:
                row = S[f"{dtype}/{n}"]
                v4, sp = row.get("v4lens"), row.get("v4lens-spec")
                acc = (sp or {}).get("acceptance")
                L.append(
                    f"| {n} | {_decode_cell(v4, 'rate')} | {_decode_cell(sp, 'prefill')} | {_decode_cell(sp, 'rate')} "
                    f"| {bf._ratio_cell((sp or {}).get('decode_rate'), (v4 or {}).get('decode_rate'))} "
                    f"| {'—' if acc is None else f'{acc:.1%}'} | {_match_cell(report['matches'][f'{dtype}/{n}']['spec'])} "
                    f"| {_decode_cell(sp, 'peak')} |"
                )
            L.append("")
    short = sorted(
        {
            f"{key} {impl}: generated {s['n_generated']} tokens, not {n_new}"
            for key, row in S.items()
            for impl, s in row.items()
            if s and s.get("n_generated") not in (None, n_new)
        }
    )
    L += bf.render_checks(
        {"summary": S, "args": {"lengths": args["prompt_lengths"]}, "device_check": report.get("device_check")}
    )
    if short:
        L += ["## Warnings\n"] + [f"- {w}" for w in short] + [""]
    return "\n".join(L) + "\n"


def _header(cols: list[str]) -> list[str]:
    """A markdown table's header and its right-aligned rule."""
    return ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]


def _compiled_head_table(report: dict, dtype: str) -> list[str]:
    """The compiled one-row head (`set_compiled_head`) against the eager head, same run."""
    args, S = report["args"], report["summary"]
    L = ["### v4lens with the compiled one-row head (`model.set_compiled_head(True)`)\n"]
    cols = ["prompt len", "eager head: decode tok/s", "compiled head: decode tok/s", "speed-up (compiled ÷ eager)",
            "compiled ÷ HF tok/s", "compiled % of bandwidth bound", "warm-up (s), compiled / eager",
            "same greedy tokens as the eager head"]  # fmt: skip
    L += _header(cols)
    for n in args["prompt_lengths"]:
        row = S[f"{dtype}/{n}"]
        v4, co, hf = (row.get(k) or {} for k in ("v4lens", "v4lens-compiled", "hf"))
        warm = " / ".join("—" if s.get("warmup_s") is None else f"{s['warmup_s']:.1f}" for s in (co, v4))
        L.append(
            f"| {n} | {_decode_cell(v4, 'rate')} | {_decode_cell(co, 'rate')} "
            f"| {bf._ratio_cell(co.get('decode_rate'), v4.get('decode_rate'))} "
            f"| {bf._ratio_cell(co.get('decode_rate'), hf.get('decode_rate'))} "
            f"| {_bandwidth_cell(report, dtype, n, co or None)} | {warm} "
            f"| {_match_cell(report['matches'][f'{dtype}/{n}']['compiled'])} |"
        )
    return [*L, ""]


# ============================================================================ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See benchmarks/README.md for what each column means.")  # fmt: skip
    p.add_argument("--preset", default="mini-3b", help="v4lens preset (default mini-3b)")
    p.add_argument("--layers", type=int, help="keep only the preset's first N layers (MTP ratios kept)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a V4Config field (repeatable)")
    p.add_argument("--prompt-lengths", help="comma-separated prompt lengths (default 1024)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to generate after the prompt (default 32)")
    p.add_argument("--dtypes", help="comma-separated dtypes: bf16, fp32 (default bf16)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1, help="timed runs of each generate; the best is reported (1)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the v4lens and transformers workers this many times, alternating which goes first; "
                        "the best of all rounds is reported (1)")  # fmt: skip
    p.add_argument("--warmup-len", type=int, default=128, help="prompt tokens of the untimed warm-up (default 128)")
    p.add_argument("--threads", type=int, help="torch threads in each worker (default: all usable CPUs)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-hf", action="store_true", help="do not run transformers")
    p.add_argument("--hf-max-len", type=int, help="skip transformers above this prompt length")
    p.add_argument("--speculative", action="store_true",
                   help="also time v4lens generate(speculative=True) (MTP speculative decoding)")  # fmt: skip
    p.add_argument("--compiled-head", action="store_true",
                   help="also run v4lens with `set_compiled_head(True)` (alongside the eager head, same rounds)")  # fmt: skip
    p.add_argument("--check-len", type=int, default=256,
                   help="--device cuda: tokens of the CUDA-vs-CPU logits check (default 256)")  # fmt: skip
    p.add_argument("--no-device-check", action="store_true", help="--device cuda: skip the CUDA-vs-CPU logits check")
    p.add_argument("--max-rss-gb", type=float, help="kill a worker whose RSS exceeds this (default 75%% of RAM)")
    p.add_argument("--job-timeout", type=float, default=3600, help="kill a worker after this many seconds (3600)")
    p.add_argument("--out", action="append", metavar="PATH", help="also write the report: *.json or *.md (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    args.prompt_lengths = [int(x) for x in (args.prompt_lengths or "1024").split(",") if x.strip()]
    args.dtypes = [x.strip() for x in (args.dtypes or "bf16").split(",") if x.strip()]
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be at least 2 (decode speed = the tokens after the first)")
    from v4lens.model.config import resolve_dtype

    for d in args.dtypes:
        resolve_dtype(d)  # fail early on a typo
    args.hf = not args.skip_hf
    args.device_check = args.device == "cuda" and not args.no_device_check
    return bf.finish_common_args(args)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(json.loads(args.worker))
        return 0

    t_start, log, cfg = bf.start_run(args)
    if args.speculative and not cfg.n_mtp_layers:
        log("note: --speculative needs MTP blocks (cfg.n_mtp_layers > 0); this config has none")
    jobs = build_jobs(args)
    results = merge_rounds(bf.run_jobs(jobs, args, log, script=__file__))
    summary, device_check = bf.summarise_jobs(results, lambda r: summarise(r, args))
    matches = {}  # "dtype/length" -> v4lens greedy tokens against transformers' / speculative's
    for key, row in summary.items():
        v4 = (row.get("v4lens") or {}).get("tokens")
        matches[key] = {
            "hf": token_match(v4, (row.get("hf") or {}).get("tokens"), args.new_tokens),
            "spec": token_match(v4, (row.get("v4lens-spec") or {}).get("tokens"), args.new_tokens),
            "compiled": token_match(v4, (row.get("v4lens-compiled") or {}).get("tokens"), args.new_tokens),
        }
    report = bf.base_report(args, cfg, results, summary, device_check, t_start) | {
        "matches": matches, "roofline": bf.roofline_results(results), "decode_bytes": decode_bytes(args, cfg),
    }  # fmt: skip
    return bf.publish(render(report), report, args, log)


if __name__ == "__main__":
    sys.exit(main())

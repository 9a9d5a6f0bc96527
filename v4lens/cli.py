"""The `v4lens` command line (`v4lens --help`, `v4lens COMMAND --help`).

    v4lens info mini-3b                                    # config, parameter counts, layer types
    v4lens run MODEL [--prompt "The capital of France is" [--chat] | --tokens 0,8,KEY_3]   # top next tokens
    v4lens viz [--model tiny-recall] [--prompt "..."] [--layers 2,3] --out figs/   # router / mHC / indexer figures
    v4lens slice SRC OUT --target mini-3b [--layers 0,1,4,...] [--experts 0-23] [--format official]

A MODEL is a preset name (tiny, tiny-recall, mini-3b; flash, flash-0731, pro, pro-0813 — config only) or a
checkpoint directory. Defaults take seconds anywhere: viz draws tiny-recall, --dtype is fp32 below 1B parameters
(tiny-recall was trained in fp32), bf16 above; with no --prompt / --tokens tiny-recall reads a recall example.
Exit codes: 0 done; 2 a malformed command line (bad option values, a --target that is no config, --out naming
a file); 1 any later failure (a value out of range for the loaded model too). Errors are one line on stderr,
without a traceback unless V4LENS_DEBUG=1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from .cli_info import info as _info

MAX_INDICES = 1 << 20  # far more than any axis of a V4 model has: a typo like 0-99999999999 is refused, not built


class UsageError(Exception):
    """A bad command-line value found after parsing (exit code 2, like argparse's own errors)."""


def _int_list(text: str) -> list[int]:
    """'0,1,4-7' -> [0, 1, 4, 5, 6, 7]."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, dash, hi = part.partition("-")
        try:
            first, last = (int(lo), int(hi)) if dash else (int(part), int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is neither an index nor a range LO-HI (ints >= 0)") from None
        if last < first:
            raise argparse.ArgumentTypeError(f"the range {part!r} runs backwards")
        if len(out) + last - first + 1 > MAX_INDICES:
            raise argparse.ArgumentTypeError(f"{text!r} lists over {MAX_INDICES:,} indices, more than any model has")
        out.extend(range(first, last + 1))
    return out


def _bounded_int(lo: int, hi: float = math.inf):
    """An argparse type: an int in [lo, hi) ("2.5" gets argparse's "invalid int value")."""

    def parse(text: str) -> int:
        if not lo <= (value := int(text)) < hi:
            raise argparse.ArgumentTypeError(f"{value} is not {f'>= {lo}' if hi == math.inf else f'in [{lo}, {hi})'}")
        return value

    parse.__name__ = "int"
    return parse


def _temperature(text: str) -> float:
    if not (math.isfinite(value := float(text)) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 0 (0 = greedy)")
    return value


def _top_p(text: str) -> float:
    if not 0 < (value := float(text)) <= 1:  # NaN too
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device name (e.g. cpu, cuda, cuda:1, mps)") from None
    try:  # an empty tensor proves the device exists here (a name torch parses may still be absent)
        torch.empty(0, device=device)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, AssertionError, ... by backend
        raise argparse.ArgumentTypeError(f"{text!r} is not available here ({str(e)[:160]})") from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="v4lens", description="v4lens: DeepSeek-V4 interpretability toolkit")
    commands = parser.add_subparsers(dest="command", required=True)

    sl = commands.add_parser(
        "slice",
        help="cut a smaller checkpoint (e.g. mini-3b) out of a larger one (e.g. V4-Flash)",
        description="Write a smaller checkpoint whose every tensor is a sub-block of the source's "
        "(FP8/FP4 dequantised). The rules are in `v4lens.weights.slicing`; the output's slice.json records them.",
    )
    sl.add_argument("src", help="source checkpoint directory (transformers or DeepSeek layout, FP8/FP4 allowed)")
    sl.add_argument("out", help="output directory")
    sl.add_argument("--target", default="mini-3b", help="a preset name or a config.json (default: mini-3b)")
    sl.add_argument("--layers", type=_int_list, help="source layer of each target layer, e.g. 0,1,4,5,...")
    sl.add_argument("--heads", type=_int_list, help="source heads to keep, grouped by target output group")
    sl.add_argument("--experts", type=_int_list, help="source experts to keep in every layer, e.g. 0-23")
    sl.add_argument("--hidden", type=_int_list, help="source hidden channels to keep (default: the first)")
    sl.add_argument("--format", choices=["hf", "official"], help="output layout (default: the source's)")
    sl.add_argument("--dtype", default="bfloat16", help="dtype of the written matrices (default: bfloat16)")
    sl.add_argument("--max-shard-size", default="5GB")
    sl.add_argument("--overwrite", action="store_true", help="write into a non-empty folder v4lens did not write")
    sl.set_defaults(run=_slice)

    info = commands.add_parser("info", help="config, parameter counts and layer types of a model",
                               description="Print a model's config, parameter counts (total, active per token) "
                               "and layer types, without building its weights.")  # fmt: skip
    info.add_argument("model", help="preset name or checkpoint directory")
    info.add_argument("--json", action="store_true", help="print the config as JSON")
    info.add_argument("--memory", action="store_true", help="the weights' memory per mode (fp32, bf16, as stored: "
                      "FP8 / FP4) and where accelerate would place them")  # fmt: skip
    info.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                      help="with --memory: the devices to place on, e.g. '0=141GB,cpu=512GB,disk=4TB' "
                      "(default: three reference machines)")  # fmt: skip
    info.set_defaults(run=_info)

    run = commands.add_parser("run", help="top next-token predictions (and the MTP head's) for a prompt",
                              description="Load a model, run one prompt and print the top-k next tokens "
                              "at the last position, and the MTP block's top-k for the token after.")  # fmt: skip
    _model_and_prompt_args(run, positional=True)
    run.add_argument("--top-k", type=_bounded_int(1), default=10)
    run.set_defaults(run=_run)

    gen = commands.add_parser("generate", help="generate text from a prompt, streaming tokens",
                              description="Load a model and continue a prompt with the decoding cache, printing "
                              "tokens as they come; greedy unless --temperature > 0; --speculative verifies the "
                              "draft module's guesses (MTP: greedy only; DSpark: greedy or sampled), the same "
                              "output distribution as plain decoding in fewer forwards.")  # fmt: skip
    _model_and_prompt_args(gen, positional=True)
    gen.add_argument("--max-new-tokens", type=_bounded_int(0), default=32)
    gen.add_argument("--temperature", type=_temperature, default=0.0)
    gen.add_argument("--top-k", type=_bounded_int(1), default=None)
    gen.add_argument("--top-p", type=_top_p, default=None)
    gen.add_argument("--sample-seed", type=_bounded_int(0, 2**64), default=None, help="seed of the sampler")
    gen.add_argument("--speculative", action="store_true", help="speculative decoding with the MTP head (greedy) or the DSpark drafter")
    gen.set_defaults(run=_generate)

    viz = commands.add_parser("viz", help="export router, Sinkhorn, indexer and attention figures",
                              description="Run one prompt with the activation cache and export figures as "
                              "HTML (offline) and PNG, with an index.html linking them: routing and mHC for "
                              "every layer, indexer / compressed entries / attention for --layers.")  # fmt: skip
    _model_and_prompt_args(viz, positional=False)
    viz.add_argument("--layers", type=_int_list, help="layers for indexer / attention figures (default: first CSA)")
    viz.add_argument("--head", type=_bounded_int(0), default=0, help="attention head to draw (default 0)")
    viz.add_argument("--out", required=True, help="output directory")
    viz.add_argument("--no-png", action="store_true", help="HTML only (PNG export needs Chromium)")
    viz.add_argument("--plotlyjs", default="directory", choices=["directory", "inline", "cdn"], help="plotly.js: "
                     "one copy beside the pages (default, offline), in each page (+4.8 MB) or from a CDN")  # fmt: skip
    viz.set_defaults(run=_viz)
    return parser


def _model_and_prompt_args(parser: argparse.ArgumentParser, positional: bool) -> None:
    """The options of the commands that run a model on a prompt: the model, dtype, device, seed, `--prompt`, `--chat`."""
    if positional:
        parser.add_argument("model", help="preset name or checkpoint directory")
    else:
        parser.add_argument("--model", default="tiny-recall", help="preset or checkpoint (default tiny-recall)")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="fp32 below 1B parameters, else bf16")
    parser.add_argument("--device", type=_device, default=None, help="e.g. cuda (default cpu)")
    parser.add_argument("--seed", type=_bounded_int(0, 2**32), default=0, help="seed of a preset's random weights")
    given = parser.add_mutually_exclusive_group()
    given.add_argument("--prompt", help="the prompt text (tiny-recall: token names, e.g. 'BOS FILL_1 KEY_3 VAL_7')")
    given.add_argument("--tokens", type=_token_list, help="token ids or names, comma separated, used as given (no BOS "
                       "added), e.g. 0,8,9,10,16,72 or BOS,QUERY,KEY_3")  # fmt: skip
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the V4 chat template (user turn)")


def _token_list(text: str) -> list[int | str]:
    """'0,8,KEY_3' -> [0, 8, 'KEY_3'] (commas or spaces between; digits are ids, anything else a token's text)."""
    items = [w for w in re.split(r"[,\s]+", text) if w]
    if not items or any(re.fullmatch(r"-\d+", w) for w in items):
        raise argparse.ArgumentTypeError(f"{text!r}: give token ids >= 0 or token names, comma separated")
    return [int(w) if w.isdigit() else w for w in items]


def _load_model(args):
    """The model, once its input is usable (a lone surrogate in --prompt or no input at all: usage errors)."""
    from .cli_info import config_of
    from .tasks import TOKEN_NAMES
    from .tokenizer import check_text, tokenizer_for
    from .weights.loading import load

    cfg = config_of(args.model)
    if args.prompt is None and (args.chat or (args.tokens is None and cfg.d_vocab != len(TOKEN_NAMES))):
        raise UsageError(f"{args.model} needs an input: give --prompt TEXT (--chat wraps it) or --tokens IDS")
    try:
        check_text(args.prompt or "", "--prompt")
    except ValueError as e:
        raise UsageError(str(e)) from None
    dtype = args.dtype or ("fp32" if cfg.param_counts()["total"] < 1e9 else "bf16")  # small: fp32 costs nothing
    model = load(args.model, dtype=dtype, device=args.device, seed=args.seed)
    model.tokenizer = tokenizer_for(model.cfg)  # tiny-recall's synthetic names, the V4 tokenizer otherwise
    return model


def _tokens(model, args):
    import torch

    from .tasks import recall_batch

    if args.tokens is not None:  # ids past the vocabulary: the model's own range check names them
        ids = [w if isinstance(w, int) else model.to_single_token(w) for w in args.tokens]
        return torch.tensor([ids], device=model.device)
    if args.prompt is None:  # the synthetic vocabulary: a recall example without its answer (its last token)
        tokens = recall_batch(1, torch.Generator().manual_seed(0))["tokens"][:, :-1].to(model.device)
        print(f"input (no --prompt or --tokens): {model.to_string(tokens[0])}", file=sys.stderr)
        return tokens
    if args.chat:
        chat = model.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                                   add_generation_prompt=True, tokenize=False)  # fmt: skip
        return model.to_tokens(chat, prepend_bos=False)  # the template starts with BOS
    return model.to_tokens(args.prompt)


def _run(args) -> int:
    model = _load_model(args)
    if args.top_k > model.cfg.d_vocab:
        raise ValueError(f"--top-k {args.top_k} is more than the model's vocabulary ({model.cfg.d_vocab} tokens)")
    tokens = _tokens(model, args)
    has_mtp = len(model.mtp) > 0
    out = model(tokens, mtp=True) if has_mtp else model(tokens)
    logits, mtp_logits = (out[0], out[1]) if has_mtp else (out, [])
    last = model.to_str_tokens(tokens[0, -1:], prepend_bos=False)
    print(f"{model.cfg.name}: {tokens.shape[1]} prompt tokens; last: {last}")
    _print_top(model, logits[0, -1], args.top_k, "next token (position t+1)")
    for j, extra in enumerate(mtp_logits):
        _print_top(model, extra[0, -1], args.top_k, f"MTP depth {j} (token t+{2 + j}, after the greedy draft)")
    return 0


def _generate(args) -> int:
    model = _load_model(args)
    tokens = _tokens(model, args)
    start, sep = time.perf_counter(), getattr(model.tokenizer, "word_separator", "")  # tiny-recall: " "
    out = model.generate(
        tokens, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.sample_seed, speculative=args.speculative, return_type="generation",
        stream=lambda ids: print(sep + model.to_string(ids[:1]), end="", flush=True),
    )  # fmt: skip
    seconds = time.perf_counter() - start
    n = out.new_tokens.shape[1]
    extra = f", MTP drafts kept {out.mtp_acceptance:.0%}" if out.mtp_acceptance is not None else ""
    if out.draft_acceptance is not None:
        extra = f", DSpark drafts kept {out.draft_acceptance:.0%} over {len(out.rounds)} rounds"
    print()
    print(f"[{n} tokens in {seconds:.1f} s, {out.forwards} forwards{extra}]", file=sys.stderr)
    return 0


def _viz(args) -> int:
    from tqdm.auto import tqdm

    from . import plot

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory for the figures (it is created if missing)")
    model = _load_model(args)
    tokens = _tokens(model, args)
    cfg = model.cfg
    if args.head >= cfg.n_heads:
        raise ValueError(f"--head {args.head}: the model has heads 0..{cfg.n_heads - 1}")
    layers = args.layers
    if layers is None:
        csa = [l for l in range(cfg.n_layers) if cfg.layer_type(l) == "csa"]
        layers = csa[:1] or [0]
    bad = [l for l in layers if not 0 <= l < cfg.n_layers]
    if bad:
        raise ValueError(f"--layers {bad}: the model has layers 0..{cfg.n_layers - 1}")
    _, cache = model.run_with_cache(tokens)

    # (section, name, thunk): figures are built one at a time while exporting
    jobs = [
        ("routing", "expert_load", lambda: plot.expert_load(model, cache)),
        ("routing", "routed_vs_shared", lambda: plot.routed_vs_shared(model, cache)),
        *[("routing", f"router_L{l}", lambda l=l: plot.router_heatmap(model, cache, l)) for l in range(cfg.n_layers)],
        ("mhc", "comb_grid", lambda: plot.comb_grid(model, cache)),
        ("mhc", "pre_post_weights", lambda: plot.pre_post_weights(model, cache)),
        ("mhc", "stream_norms", lambda: plot.stream_norms(model, cache)),
        *[
            ("mhc", f"sinkhorn_L{l}", lambda l=l: plot.sinkhorn_convergence(model, cache, l))
            for l in range(cfg.n_layers)
        ],
        ("attention", "sink_mass", lambda: plot.sink_mass(model, cache)),
    ]
    for l in layers:
        kind = cfg.layer_type(l)
        if kind == "csa":
            jobs.append(("retrieval", f"indexer_L{l}", lambda l=l: plot.indexer_scores(model, cache, l)))
        if kind != "sliding":
            jobs.append(("retrieval", f"entries_L{l}", lambda l=l: plot.compressed_entries(model, cache, l)))
        jobs.append(("attention", f"attention_L{l}_h{args.head}",
                     lambda l=l: plot.attention_pattern(model, cache, l, args.head)))  # fmt: skip

    out.mkdir(parents=True, exist_ok=True)
    written, png_error = [], None
    with plot.export_session():
        for section, name, build in tqdm(jobs, desc="figures"):
            fig = build()
            plot.save(fig, out / f"{name}.html", include_plotlyjs=args.plotlyjs)
            png = None
            if not args.no_png and png_error is None:
                try:
                    png = plot.save(fig, out / f"{name}.png").name
                except plot.ExportError as e:
                    png_error = str(e)
            written.append((section, name, png))
    _write_index(out, written, model, tokens, args.prompt if args.prompt is not None else model.to_string(tokens[0]))
    if png_error:
        print(f"v4lens viz: PNG export skipped — {png_error}", file=sys.stderr)
    print(f"wrote {len(written)} figures to {out}/ (open {out / 'index.html'})")
    return 0


def _write_index(out, written, model, tokens, prompt: str) -> None:
    import html

    sections: dict[str, list[str]] = {}
    for section, name, png in written:
        thumb = f'<img src="{png}" alt="{name}" loading="lazy">' if png else ""
        sections.setdefault(section, []).append(f'<a class="fig" href="{name}.html">{thumb}<span>{name}</span></a>')
    body = "\n".join(f"<h2>{s}</h2><div class=grid>{''.join(items)}</div>" for s, items in sections.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>v4lens — {html.escape(model.cfg.name)}</title>
<style>body{{font-family:Helvetica,Arial,sans-serif;margin:2em;color:#222}} .grid{{display:flex;flex-wrap:wrap;gap:12px}}
.fig{{display:flex;flex-direction:column;width:260px;text-decoration:none;color:#225;border:1px solid #ddd;padding:6px}}
.fig img{{width:100%}}</style></head><body>
<h1>v4lens — {html.escape(model.cfg.name)}</h1><p>Prompt ({tokens.shape[1]} tokens): <code>{html.escape(prompt)}</code></p>
{body}</body></html>
"""
    (out / "index.html").write_text(page, encoding="utf-8")


def _print_top(model, logits, k: int, title: str) -> None:
    probs = logits.float().softmax(-1)
    top = probs.topk(k)
    print(f"\n{title}:")
    for p, i in zip(top.values.tolist(), top.indices.tolist()):
        print(f"  {p:9.3g}  {i:>7d}  {model.to_string([i])!r}")


def _slice(args) -> int:
    from .model.config import V4Config
    from .model.presets import PRESETS
    from .weights.slicing import slice_checkpoint

    if args.target in PRESETS:
        target = args.target
    elif Path(args.target).is_file():
        try:
            with open(args.target, "rb") as f:
                data = f.read((1 << 20) + 1)  # a config is a few KB: never read a huge file whole
            if len(data) > 1 << 20:
                raise ValueError("larger than 1 MiB")
            raw = json.loads(data)
            if not isinstance(raw, dict):
                raise TypeError(f"it holds a JSON {type(raw).__name__}, not an object")
            target = V4Config.from_hf(raw) if "hidden_size" in raw else V4Config.from_official(raw)
        except (OSError, ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise UsageError(f"--target {args.target}: not a usable config.json ({e})") from None
    else:
        raise UsageError(f"--target {args.target!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json")
    plan = slice_checkpoint(
        args.src, target, args.out, layers=args.layers, heads=args.heads, experts=args.experts,
        hidden=args.hidden, format=args.format, dtype=args.dtype, max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )  # fmt: skip
    print(f"wrote {args.out}: {plan.tgt.n_layers} layers from source layers {plan.layers}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import torch

    args = build_parser().parse_args(argv)  # bad options: usage and a one-line error on stderr, SystemExit(2)
    try:
        with torch.no_grad():  # no command needs gradients (and main may run inside a caller's process)
            return args.run(args)
    except Exception as e:  # a user gets one line, not a traceback (V4LENS_DEBUG=1 shows it)
        if os.environ.get("V4LENS_DEBUG", "") not in ("", "0"):
            raise
        kind = "" if isinstance(e, (UsageError, ValueError, OSError)) else f"{type(e).__name__}: "
        message = " ".join(str(e).split("\n")).strip() or "(no message)"
        print(f"v4lens {args.command}: error: {kind}{message}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())

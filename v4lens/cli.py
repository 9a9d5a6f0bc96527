"""The `v4lens` command line.

v4lens slice SRC OUT --target mini-3b [--layers 0,1,4,...] [--experts 0-23] [--format official]
"""

from __future__ import annotations

import argparse
import json
import sys


def _int_list(text: str) -> list[int]:
    """'0,1,4-7' -> [0, 1, 4, 5, 6, 7]."""
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out.extend(range(int(lo), int(hi) + 1))
        elif part.strip():
            out.append(int(part))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="v4lens", description="v4lens: DeepSeek-V4 interpretability toolkit")
    commands = parser.add_subparsers(dest="command", required=True)

    sl = commands.add_parser(
        "slice",
        help="cut a smaller checkpoint (e.g. mini-3b) out of a larger one (e.g. V4-Flash)",
        description="Write a smaller checkpoint whose every tensor is a sub-block of the source's "
        "(FP8/FP4 dequantised). The rules are in `v4lens.slicing`; the output's slice.json records them.",
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
    sl.set_defaults(run=_slice)
    return parser


def _slice(args) -> int:
    from pathlib import Path

    from .config import PRESETS, V4Config
    from .slicing import slice_checkpoint

    if args.target in PRESETS:
        target = args.target
    elif Path(args.target).is_file():
        raw = json.loads(Path(args.target).read_text())
        target = V4Config.from_hf(raw) if "hidden_size" in raw else V4Config.from_official(raw)
    else:
        print(f"v4lens slice: --target {args.target!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json",
              file=sys.stderr)  # fmt: skip
        return 2
    plan = slice_checkpoint(
        args.src, target, args.out, layers=args.layers, heads=args.heads, experts=args.experts,
        hidden=args.hidden, format=args.format, dtype=args.dtype, max_shard_size=args.max_shard_size,
    )  # fmt: skip
    print(f"wrote {args.out}: {plan.tgt.n_layers} layers from source layers {plan.layers}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"v4lens {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

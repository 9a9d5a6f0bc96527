"""Logit lens: what every block boundary of the n-stream residual predicts at one position.

Reads each boundary (embed, 0_post, 1_post, ...) through hc_head -> final norm -> unembedding
(`cache.logit_lens`; the last row reproduces the model's logits exactly) and prints the top tokens
and the probability and rank of the actual next token; with --per-stream also what each of the n
streams predicts read alone at the final boundary. Writes `plot.logit_lens_table`. The cache keeps
only the stream hooks at the positions read (`pos_slice`), so long prompts stay cheap.

    python examples/logit_lens.py --model mini-3b --prompt "The capital of France is Paris" --out lens.html
    python examples/logit_lens.py --model tiny --position -2 --k 3 --per-stream --csv lens.csv
"""

from _common import load_model, parser, save_figure


def parse_args(argv=None):
    ap = parser(__doc__)
    ap.add_argument(
        "--model", default="mini-3b", help="preset (tiny, mini-3b) or checkpoint directory (default: mini-3b)"
    )
    ap.add_argument("--prompt", default="The Eiffel Tower is in the city of Paris")
    ap.add_argument(
        "--position",
        type=int,
        default=-2,
        help="position to read (default -2: its next token is the prompt's last, so there is a target)",
    )
    ap.add_argument("--k", type=int, default=5, help="top-k tokens per boundary (default 5)")
    ap.add_argument("--per-stream", action="store_true", help="also read each stream alone at the final boundary")
    ap.add_argument("--out", default="logit_lens.html", help="table figure (.html/.png/.svg/.pdf)")
    ap.add_argument("--csv", default=None, help="also write the table as CSV")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)

    from v4lens import plot
    from v4lens.analysis.layout import is_stream_name

    model = load_model(args)
    tokens = model.to_tokens(args.prompt)
    S = tokens.shape[1]
    position = args.position % S
    # the lens needs only the streams (and the tokens, for targets) at the position it reads
    _, cache = model.run_with_cache(tokens, names_filter=is_stream_name, pos_slice=[position])
    lens = cache.logit_lens(k=args.k, per_stream=args.per_stream)
    strs = model.to_str_tokens(tokens[0])
    target = repr(strs[position + 1]) if position + 1 < S else "(none: last position)"
    print(f"{args.model}: position {position} {strs[position]!r}, next token {target}")
    table = lens.table(batch=0, position=0)
    with __import__("pandas").option_context("display.max_colwidth", 80, "display.width", 160):
        print(table.to_string())
    if args.per_stream:
        print("\neach stream read alone at the final boundary (top-1):")
        top = lens.per_stream.top_ids[-1, 0, 0]  # [n, k]
        for s in range(top.shape[0]):
            print(f"  stream {s}: {model.to_string(top[s, 0])!r}")
    if args.csv:
        table.to_csv(args.csv)
        print("wrote", args.csv)
    fig = plot.logit_lens_table(lens, model, position=0, k=args.k)  # model= decodes the target
    save_figure(fig, args.out)


if __name__ == "__main__":
    main()

"""Indexer picks: which compressed entries the Lightning Indexer chooses, and what forcing them does.

For one CSA layer, prints the last queries' picks (entry ids with the tokens each entry pools), the
indexer's recall against dense attention over every visible entry (`stats.indexer_recall`, with the
chance level of random picks), and, with --include / --exclude, how forcing entries in or out of the
last query's picks (`patching.force_indexer_picks`) moves the logits. Writes `plot.indexer_scores`.

    python examples/indexer_picks.py --model mini-3b --repeat 40 --out indexer.html
    python examples/indexer_picks.py --model tiny --layer 1 --exclude 0 --include 5 --out picks.html
"""

from _common import load_model, parser, save_figure

DEFAULT_PROMPT = ("In the old library by the river, the archivist kept a ledger of every visitor, every borrowed "
                  "book and every late return, and each evening she read the day's names aloud. ")  # fmt: skip


def parse_args(argv=None):
    ap = parser(__doc__)
    ap.add_argument(
        "--model", default="mini-3b", help="preset (tiny, mini-3b) or checkpoint directory (default: mini-3b)"
    )
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="repeat the prompt this many times (mini-3b picks top-192 "
        "of S/4 entries: it needs > 768 tokens to be selective)",
    )
    ap.add_argument("--layer", type=int, default=None, help="CSA layer (default: the first one)")
    ap.add_argument("--show", type=int, default=4, help="print the picks of this many final queries (default 4)")
    ap.add_argument("--include", type=int, nargs="*", default=[], help="entries to force into the last query's picks")
    ap.add_argument("--exclude", type=int, nargs="*", default=[], help="entries to force out of the last query's picks")
    ap.add_argument("--out", default="indexer_scores.html", help="figure path (.html/.png/.svg/.pdf)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch

    from v4lens import patching, plot, stats

    model = load_model(args)
    cfg = model.cfg
    csa = [l for l in range(cfg.n_layers) if cfg.layer_type(l) == "csa"]
    layer = csa[0] if args.layer is None else args.layer
    if layer not in csa:
        raise SystemExit(f"--layer {layer} is not a CSA layer; CSA layers: {csa}")
    tokens = model.to_tokens(args.prompt * args.repeat)
    S, ratio, k = tokens.shape[1], 4, cfg.index_topk
    prefix = f"blocks.{layer}.attn"
    names = [
        f"{prefix}.hook_q",
        f"{prefix}.compressor.hook_kv",
        f"{prefix}.indexer.hook_topk",
        f"{prefix}.indexer.hook_scores",
    ]
    logits, cache = model.run_with_cache(tokens, names_filter=names)
    strs = model.to_str_tokens(tokens[0])

    def span(w):  # CSA entry w pools the overlapping window of tokens 4(w-1) .. 4w+3
        return "".join(strs[max(0, ratio * (w - 1)) : ratio * (w + 1)])

    print(
        f"{args.model}: layer {layer} (CSA, top-{k} of the visible entries), {S} tokens, "
        f"{cache[names[1]].shape[1]} compressed entries"
    )
    picks = cache[names[2]][0]
    for t in range(max(0, S - args.show), S):
        chosen = [w for w in picks[t].tolist() if w >= 0]
        shown = ", ".join(f"w{w} {span(w)!r}" for w in chosen[:6]) + (" ..." if len(chosen) > 6 else "")
        print(f"  query {t} ({(t + 1) // ratio} visible): {shown}")

    recall = stats.indexer_recall(model, cache, layer)[0]  # [p]
    visible = (torch.arange(S) + 1) // ratio
    selective = visible > k
    chance = (k / visible.clamp(min=1)).clamp(max=1)
    if selective.any():
        print(
            f"\nrecall vs dense attention over {int(selective.sum())} selective queries: "
            f"{recall[selective].mean():.3f} (random picks: {chance[selective].mean():.3f})"
        )
    else:
        print(f"\nno query sees more than {k} entries: the indexer keeps everything (use a longer --prompt / --repeat)")

    if args.include or args.exclude:
        with patching.force_indexer_picks(model, layer, include=args.include, exclude=args.exclude, queries=[S - 1]):
            edited, c = model.run_with_cache(tokens, names_filter=names[2])
        print(
            f"forced picks at the last query: {picks[-1].tolist()} -> {c[names[2]][0, -1].tolist()}; "
            f"max |delta logit| {(edited - logits)[0, -1].abs().max():.4f}"
        )

    fig = plot.indexer_scores(model, cache, layer=layer)
    save_figure(fig, args.out)


if __name__ == "__main__":
    main()

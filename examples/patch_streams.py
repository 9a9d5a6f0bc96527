"""Patch the n-stream residual: which (layer, position) of a clean run restores a corrupted one.

Runs `patching.get_act_patch_streams` (one corrupted forward per layer x position with that
block's clean streams patched in; `--per-stream` patches each of the n streams separately), prints
the strongest cells and, with --atp, compares them with the one-pass attribution-patching estimate
`patching.atp_streams`. The metric is the logit difference, at the last position, between the
clean run's top token (or --answer) and the corrupted run's top token (or --distractor). Writes
`plot.patching_heatmap` and, with --save, the result tensor.

    python examples/patch_streams.py --model tiny --out patch.html --atp
    python examples/patch_streams.py --model mini-3b --clean "The Eiffel Tower is in Paris" \\
        --corrupted "The Colosseum is in Paris" --where mid --out patch.html
"""

from _common import load_model, parser, save_figure


def parse_args(argv=None):
    ap = parser(__doc__)
    ap.add_argument(
        "--model",
        default="tiny",
        help="preset or checkpoint directory (default: tiny; the sweep runs "
        "n_layers x positions forwards, ~1 s each on mini-3b)",
    )
    ap.add_argument("--clean", default="The quick brown fox jumps over the lazy dog and the")
    ap.add_argument(
        "--corrupted",
        default="The quick brown cat jumps over the lazy dog and the",
        help="same number of tokens as --clean",
    )
    ap.add_argument("--answer", default=None, help="answer token (default: the clean run's top token)")
    ap.add_argument("--distractor", default=None, help="distractor token (default: the corrupted run's top token)")
    ap.add_argument("--where", default="pre", choices=["pre", "mid", "post"], help="hook_streams_{where} (default pre)")
    ap.add_argument("--per-stream", action="store_true", help="patch each stream separately -> [layer, pos, stream]")
    ap.add_argument("--atp", action="store_true", help="also estimate the sweep with attribution patching")
    ap.add_argument("--top", type=int, default=5, help="print the strongest cells (default 5)")
    ap.add_argument("--out", default="patch_streams.html", help="heatmap path (.html/.png/.svg/.pdf)")
    ap.add_argument("--save", default=None, help="save the result tensor with torch.save (.pt)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch

    from v4lens import patching, plot

    model = load_model(args)
    clean, corrupted = model.to_tokens(args.clean), model.to_tokens(args.corrupted)
    if clean.shape != corrupted.shape:
        raise SystemExit(f"--clean has {clean.shape[1]} tokens and --corrupted {corrupted.shape[1]}: they must match")
    clean_logits, clean_cache = model.run_with_cache(
        clean, names_filter=lambda n: n.endswith(f"hook_streams_{args.where}")
    )
    corrupted_logits = model(corrupted)
    answer = int(clean_logits[0, -1].argmax()) if args.answer is None else model.to_single_token(args.answer)
    distractor = (
        int(corrupted_logits[0, -1].argmax()) if args.distractor is None else model.to_single_token(args.distractor)
    )

    def metric(logits):
        return logits[:, -1, answer].mean() - logits[:, -1, distractor].mean()

    base_clean, base_corrupted = float(metric(clean_logits)), float(metric(corrupted_logits))
    print(
        f"{args.model}: metric = logit[{model.to_string(answer)!r}] - logit[{model.to_string(distractor)!r}] "
        f"at the last position; clean {base_clean:.4f}, corrupted {base_corrupted:.4f}"
    )
    result = patching.get_act_patch_streams(model, corrupted, clean_cache, metric, where=args.where,
                                            per_stream=args.per_stream)  # fmt: skip
    print(f"sweep: {tuple(result.shape)} (layer, position{', stream' if args.per_stream else ''})")
    effect = result - base_corrupted
    strs = model.to_str_tokens(corrupted[0])
    order = effect.abs().flatten().argsort(descending=True)[: args.top]
    gap = base_clean - base_corrupted
    for i in order.tolist():
        idx = list(torch.unravel_index(torch.tensor(i), effect.shape))
        l, p = int(idx[0]), int(idx[1])
        stream = f" stream {int(idx[2])}" if args.per_stream else ""
        share = f" ({float(effect[tuple(idx)]) / gap:+.0%} of clean - corrupted)" if abs(gap) > 1e-9 else ""
        print(f"  layer {l} pos {p} {strs[p]!r}{stream}: effect {float(effect[tuple(idx)]):+.4f}{share}")

    if args.atp:
        with torch.enable_grad():  # AtP needs one backward pass
            estimate = patching.atp_streams(model, corrupted, clean_cache, metric, where=args.where,
                                            per_stream=args.per_stream)  # fmt: skip
        a, b = effect.flatten(), estimate.flatten()
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
        print(
            f"attribution patching: Pearson r = {corr:.3f} with the real sweep, max |error| {(a - b).abs().max():.4f}"
        )

    if args.save:
        torch.save(result, args.save)
        print("saved", args.save)
    title = f"Patching clean hook_streams_{args.where} into the corrupted run"
    if args.per_stream:  # one heatmap cell per (layer, position): the strongest stream's effect
        fig = plot.patching_heatmap(effect.abs().amax(-1), model, corrupted, baseline=0.0,
                                    title=title + " · max |effect| over streams")  # fmt: skip
    else:
        fig = plot.patching_heatmap(result, model, corrupted, baseline=base_corrupted, title=title)
    save_figure(fig, args.out)


if __name__ == "__main__":
    main()

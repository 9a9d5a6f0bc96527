"""Sinkhorn mixing: measure every mHC comb matrix of a run and draw them.

Prints `stats.sinkhorn_summary` (row/column entropy, distance to the identity and to the nearest
permutation, Sinkhorn errors) for every attention and MoE half, and the n x n comb of one layer at
the last token; writes `plot.comb_grid` (every layer's comb, slider over positions) and, with
--convergence, `plot.sinkhorn_convergence` of that layer.

    python examples/sinkhorn.py --model mini-3b --layer 5 --out comb.html
    python examples/sinkhorn.py --model tiny --layers 0,1 --convergence sinkhorn.html
"""

from _common import load_model, parser, save_figure

DEFAULT_PROMPT = "Hyper-connections keep four residual streams and mix them with doubly stochastic matrices."


def parse_args(argv=None):
    ap = parser(__doc__)
    ap.add_argument(
        "--model", default="mini-3b", help="preset (tiny, mini-3b) or checkpoint directory (default: mini-3b)"
    )
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--layer", type=int, default=1, help="layer whose last-token comb is printed (default 1)")
    ap.add_argument("--hc", default="attn_hc", choices=["attn_hc", "mlp_hc"], help="which half of --layer")
    ap.add_argument(
        "--layers", default=None, help="comma-separated layers for the grid (default: all; mini-3b draws 28 columns)"
    )
    ap.add_argument("--out", default="comb_grid.html", help="comb grid figure (.html/.png/.svg/.pdf)")
    ap.add_argument("--convergence", default=None, help="also write the Sinkhorn convergence of --layer here")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch

    from v4lens import plot, stats

    model = load_model(args)
    if not 0 <= args.layer < model.cfg.n_layers:
        raise SystemExit(f"--layer must be in [0, {model.cfg.n_layers})")
    tokens = model.to_tokens(args.prompt)
    _, cache = model.run_with_cache(tokens, names_filter=stats.names_filter("sinkhorn_summary"))

    summary = stats.sinkhorn_summary(model, cache)
    n = model.cfg.hc_mult
    print(
        f"{args.model}: {len(summary)} mixing matrices (n = {n} streams, entropy max ln n = "
        f"{torch.log(torch.tensor(float(n))):.3f}), {tokens.shape[1]} tokens"
    )
    cols = ["layer", "layer_type", "hc", "row_entropy", "dist_identity", "dist_permutation", "frac_identity",
            "row_err_first", "row_err_final"]  # fmt: skip
    print(summary[cols].to_string(index=False, float_format=lambda x: f"{x:.3g}"))

    comb = cache[f"blocks.{args.layer}.{args.hc}.hook_comb"][0, -1]
    print(f"\nblocks.{args.layer}.{args.hc}.hook_comb at the last token (comb[j, k]: input j -> output k):")
    for row in comb.tolist():
        print("  " + "  ".join(f"{v:.3f}" for v in row))
    print(
        f"  row sums {[round(v, 4) for v in comb.sum(1).tolist()]}, "
        f"column sums {[round(v, 4) for v in comb.sum(0).tolist()]}"
    )

    layers = None if args.layers is None else [int(l) for l in args.layers.split(",")]
    figures = [(args.out, plot.comb_grid(model, cache, layers=layers))]
    if args.convergence:
        figures.append((args.convergence, plot.sinkhorn_convergence(model, cache, layer=args.layer, hc=args.hc)))
    with plot.export_session():
        for path, fig in figures:
            save_figure(fig, path)


if __name__ == "__main__":
    main()

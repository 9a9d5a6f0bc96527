"""Router heatmap: which experts each token of a prompt uses in one MoE layer, and how evenly.

Prints the layer's routing (hash table or learned top-k), the experts and weights of the last
tokens, and the load-balance statistics of every layer; writes `plot.router_heatmap` (token x
expert weights, chosen experts circled) as HTML, or PNG/SVG/PDF when Chromium is available.

    python examples/router_heatmap.py --model mini-3b --layer 2 --out router.html
    python examples/router_heatmap.py --model tiny --layer 0 --prompt "The quick brown fox" --out r.png
"""

from _common import load_model, parser

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog, and the dog chases the fox back into the woods."


def parse_args(argv=None):
    ap = parser(__doc__)
    ap.add_argument(
        "--model", default="mini-3b", help="preset (tiny, mini-3b) or checkpoint directory (default: mini-3b)"
    )
    ap.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to route")
    ap.add_argument("--layer", type=int, default=2, help="MoE layer to draw (default 2; hash layers work too)")
    ap.add_argument("--max-positions", type=int, default=64, help="positions drawn, ending at the last (default 64)")
    ap.add_argument("--show", type=int, default=5, help="print the routing of this many final tokens (default 5)")
    ap.add_argument("--out", default="router_heatmap.html", help="figure path: .html, .png, .svg or .pdf")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)

    from v4lens import plot, stats

    model = load_model(args)
    cfg = model.cfg
    if not 0 <= args.layer < cfg.n_layers:
        raise SystemExit(f"--layer must be in [0, {cfg.n_layers}) for {args.model}")
    tokens = model.to_tokens(args.prompt)
    routing_hooks = ("mlp.hook_expert_ids", "mlp.hook_expert_weights", "mlp.hook_router_scores")
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(routing_hooks))

    kind = "hash (tid2eid)" if cfg.is_hash_layer(args.layer) else "learned top-k"
    print(
        f"{args.model}: layer {args.layer} ({cfg.layer_type(args.layer)} attention, {kind} routing), "
        f"{cfg.n_routed_experts} experts, top-{cfg.n_activated_experts}, {tokens.shape[1]} tokens"
    )
    strs = model.to_str_tokens(tokens[0])
    ids = cache[f"blocks.{args.layer}.mlp.hook_expert_ids"][0]
    weights = cache[f"blocks.{args.layer}.mlp.hook_expert_weights"][0].float()
    for p in range(max(0, tokens.shape[1] - args.show), tokens.shape[1]):
        pairs = ", ".join(f"{e}:{w:.2f}" for e, w in zip(ids[p].tolist(), weights[p].tolist()))
        print(f"  {p:4d} {strs[p]!r:>16}  experts {pairs}")

    balance = stats.load_balance(model, cache)
    print("\nload balance per layer (entropy_norm 1 = perfectly even):")
    print(balance[["layer", "routing", "assignments", "cv", "max_over_mean", "entropy_norm", "frac_unused"]]
          .to_string(index=False, float_format=lambda x: f"{x:.3f}"))  # fmt: skip

    fig = plot.router_heatmap(model, cache, layer=args.layer, max_positions=args.max_positions)
    try:
        print("\nwrote", plot.save(fig, args.out))
    except plot.ExportError as e:
        print(f"\n{e}")


if __name__ == "__main__":
    main()

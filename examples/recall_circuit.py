"""The recall circuit of the trained tiny V4: where the answer comes from, and through what.

Loads `tiny-recall` (trained by `v4lens.train` on key->value recall with the queried record
outside the sliding window), then: accuracy on held-out sequences; accuracy with the queried
value swapped in context (a retrieving model answers the new value); accuracy with the CSA
layer's indexer picks removed; a stream-patching sweep (clean streams into the run with the
swapped value); and the exact logit attribution of the answer through mHC (top components).
Notebook 05 walks through the same steps.

    python examples/recall_circuit.py --out patch.html
    python examples/recall_circuit.py --n 128 --top 10
"""

from _common import load_model, parser, save_figure


def parse_args(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--model", default="tiny-recall", help="preset or checkpoint directory (default: tiny-recall)")
    ap.add_argument("--n", type=int, default=48, help="held-out sequences (default 48)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the held-out sequences")
    ap.add_argument("--top", type=int, default=6, help="attribution components to print")
    ap.add_argument("--out", help="write the stream-patching heatmap here (.html / .png)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch

    import v4lens
    from v4lens import patching, plot
    from v4lens.tasks import VALUE_IDS, recall_batch

    model = load_model(args)
    batch = recall_batch(args.n, generator=torch.Generator().manual_seed(args.seed))  # made on the CPU
    tokens, qpos, answer, key_pos = (batch[k].to(model.device) for k in ("tokens", "query_pos", "answer", "key_pos"))
    rows = torch.arange(len(tokens), device=model.device)

    def accuracy(logits, target):
        return (logits[rows, qpos].argmax(-1) == target).float().mean().item()

    other = VALUE_IDS.start + (answer - VALUE_IDS.start + 1) % 16  # a different value for every sequence
    corrupted = tokens.clone()
    corrupted[rows, key_pos + 1] = other
    no_picks = [(f"blocks.{l}.attn.indexer.hook_topk", lambda p, hook: torch.full_like(p, -1))
                for l in range(model.cfg.n_layers) if model.cfg.layer_type(l) == "csa"]  # fmt: skip
    clean_logits, clean_cache = model.run_with_cache(tokens)
    corrupt_logits = model(corrupted)
    print(f"accuracy: {accuracy(clean_logits, answer):.3f}")
    print(f"value swapped in context -> answers the new value: {accuracy(corrupt_logits, other):.3f}")
    print(f"indexer picks removed: {accuracy(model.run_with_hooks(tokens, fwd_hooks=no_picks), answer):.3f}")

    def diff(lg):
        return (lg[rows, qpos, answer] - lg[rows, qpos, other]).mean()

    clean_diff, corrupt_diff = diff(clean_logits), diff(corrupt_logits)
    sweep = patching.get_act_patch_streams(
        model, corrupted, clean_cache, lambda lg: (diff(lg) - corrupt_diff) / (clean_diff - corrupt_diff), where="post"
    )
    best = sweep.flatten().argmax()
    layer, pos = divmod(int(best), sweep.shape[1])
    print(f"stream patching [layer, pos] {tuple(sweep.shape)}: best cell layer {layer} pos {pos} ({sweep.max():.3f})")

    dec = v4lens.decompose(
        model, clean_cache, target=(answer, other), positions=[int(qpos[0])], heads=True, experts=True
    )
    print(f"logit attribution of answer - swapped value at position {int(qpos[0])} (sequence 0):")
    for label, value in dec.top(args.top):
        print(f"  {label:>16s} {value:+.3f}")
    if args.out:
        fig = plot.patching_heatmap(sweep, model=model, tokens=tokens, title="clean streams → value-swapped run")
        save_figure(fig, args.out)


if __name__ == "__main__":
    main()

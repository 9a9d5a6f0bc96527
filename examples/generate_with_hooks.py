"""Generate with hooks on: steer the routing while decoding, watch the indexer pick, draft with MTP.

Decodes incrementally (`V4KVCache`: window keys, compressor state and entries, indexer keys), so
each new token runs alone; the hooks act at every step. Three continuations of the prompt: plain
greedy, greedy with every token of `--layer` routed to experts 0..k-1 (an edit that changes what
is generated), and speculative decoding with the MTP head (the same tokens as plain greedy, with
the share of MTP drafts kept). Per step it records which compressed entries the first CSA layer's
indexer picked for the new token, and saves them with the tokens.

    python examples/generate_with_hooks.py --model mini-3b --prompt "The capital of France is" --new 16
    python examples/generate_with_hooks.py --model tiny --layer 3 --save generation.pt
"""

from _common import load_model, parser


def parse_args(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--model", default="mini-3b", help="preset (tiny, mini-3b) or checkpoint directory (default: mini-3b)")
    ap.add_argument("--prompt", default="The Eiffel Tower is in the city of")
    ap.add_argument("--new", type=int, default=12, help="tokens to generate (default 12)")
    ap.add_argument("--layer", type=int, default=None, help="layer whose routing is forced (default: the last)")
    ap.add_argument("--save", default=None, help="write tokens and indexer picks here (torch.save)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)

    import torch

    model = load_model(args)
    cfg = model.cfg
    tokens = model.to_tokens(args.prompt)
    layer = cfg.n_layers - 1 if args.layer is None else args.layer
    csa = next((l for l in range(cfg.n_layers) if cfg.layer_type(l) == "csa"), None)

    plain = model.generate(tokens, args.new, stop_at_eos=False, return_type="generation")
    print(f"{args.model}, prompt {args.prompt!r}\n  greedy: {plain.text[0]!r} ({plain.forwards} forwards)")

    def first_experts(ids, hook):
        return torch.arange(ids.shape[-1], device=ids.device).expand_as(ids).clone()

    picks = []

    def record_picks(topk, hook):
        picks.append(topk[0, -1].tolist())  # the newest position's picks (-1 = empty slot)

    hooks = [(f"blocks.{layer}.mlp.hook_expert_ids", first_experts)]
    if csa is not None:
        hooks.append((f"blocks.{csa}.attn.indexer.hook_topk", record_picks))
    steered = model.generate(tokens, args.new, stop_at_eos=False, fwd_hooks=hooks, return_type="generation")
    changed = int((steered.new_tokens != plain.new_tokens).sum())
    print(f"  layer {layer} routed to experts 0..{cfg.n_activated_experts - 1}: {steered.text[0]!r}"
          f" ({changed} of {args.new} tokens differ)")  # fmt: skip
    if csa is not None:
        print(f"  layer {csa} indexer picks for the last prompt token and the first new ones: {picks[:3]}")

    if cfg.n_mtp_layers:
        spec = model.generate(tokens, args.new, stop_at_eos=False, speculative=True, return_type="generation")
        same = torch.equal(spec.new_tokens, plain.new_tokens)
        print(f"  speculative (MTP drafts): {'same tokens as greedy' if same else 'differs from greedy (bf16 rounding)'}, "
              f"{spec.forwards} forwards, {spec.mtp_acceptance:.0%} of drafts kept")  # fmt: skip
    if args.save:
        torch.save({"prompt": tokens, "greedy": plain.new_tokens, "steered": steered.new_tokens, "picks": picks}, args.save)
        print("wrote", args.save)


if __name__ == "__main__":
    main()

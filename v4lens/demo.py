"""The README's first command: load mini-3b, render a chat prompt, run a cached forward, print what V4 decided.

    python -m v4lens.demo [--model mini-3b] [--dtype bf16] [--prompt "..."]
"""

from __future__ import annotations

import argparse
import time

import torch

import v4lens


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mini-3b", help="preset name or checkpoint directory (default mini-3b)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", default="Explain in one sentence why the sky is blue, then say it again in French.")
    ap.add_argument("--layer", type=int, default=None, help="CSA layer to show indexer picks for (default: first)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)

    t0 = time.time()
    model = v4lens.load(args.model, dtype=args.dtype, seed=args.seed)
    cfg = model.cfg
    counts = cfg.param_counts()
    print(f"loaded {cfg.name} ({args.dtype}) in {time.time() - t0:.1f}s: {counts['total'] / 1e9:.2f}B parameters, "
          f"{counts['active'] / 1e9:.2f}B active per token; layers: "
          + " ".join({"sliding": "S", "csa": "C", "hca": "H"}[t] for t in cfg.layer_types()))

    tok = model.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                   tokenize=False)
    tokens = model.to_tokens(chat)  # the template already starts with BOS: no second one
    print(f"\nprompt ({tokens.shape[1]} tokens): {chat!r}")

    t0 = time.time()
    (logits, (mtp_logits,)), cache = model.run_with_cache(tokens, mtp=True)
    print(f"cached forward with MTP: {time.time() - t0:.1f}s, {len(cache.cache_dict)} activations cached")
    top = logits[0, -1].topk(5)
    print("next-token top-5:", [(model.to_string([i]), round(float(v), 2)) for v, i in zip(top.values, top.indices)])
    print("MTP (token after next) top-3:", [model.to_string([i]) for i in mtp_logits[0, -1].topk(3).indices])

    print("\ntop experts per layer (tokens routed to each, whole prompt; * = hash-routed layer):")
    for layer in range(cfg.n_layers):
        ids = cache[f"blocks.{layer}.mlp.hook_expert_ids"].flatten()
        used = torch.bincount(ids, minlength=cfg.n_routed_experts).topk(3)
        mark = "*" if cfg.is_hash_layer(layer) else " "
        print(f"  L{layer:02d}{mark} " + ", ".join(f"e{int(e)}:{int(n)}" for n, e in zip(used.values, used.indices)))

    last = tokens.shape[1] - 1
    comb = cache["blocks.0.attn_hc.hook_comb"][0, last]
    print("\nSinkhorn comb matrix, layer 0 attention, last token (comb[j,k] = stream j -> stream k):")
    for row in comb:
        print("   " + " ".join(f"{float(v):.3f}" for v in row))
    print(f"   row sums {[round(float(s), 3) for s in comb.sum(1)]}, column sums {[round(float(s), 3) for s in comb.sum(0)]}")

    csa = [l for l in range(cfg.n_layers) if cfg.layer_type(l) == "csa"]
    if csa:
        layer = args.layer if args.layer is not None else csa[0]
        picks = cache[f"blocks.{layer}.attn.indexer.hook_topk"][0, last]
        picks = picks[picks >= 0].tolist()
        # CSA entry w pools window w-1's first halves and window w's second halves: tokens 4w-4 .. 4w+3
        spans = [f"{w}:[{max(0, w * 4 - 4)}..{w * 4 + 3}]" for w in sorted(picks)]
        print(f"\nindexer picks, layer {layer}, last token (entry:[source tokens]): {', '.join(spans) or 'none'}")

    sink = torch.stack([cache[f"blocks.{l}.attn.hook_sink"][0].mean(-1) for l in range(cfg.n_layers)])  # [L, H]
    print("\nsink mass (mean over positions), per layer: mean over heads / max head")
    print("   " + " ".join(f"L{l}:{float(s.mean()):.2f}/{float(s.max()):.2f}" for l, s in enumerate(sink)))
    if cfg.name in v4lens.PRESETS:
        print("\n(random-init scaffold: the weights are seeded noise, so the choices above are structure, not skill)")


if __name__ == "__main__":
    main()

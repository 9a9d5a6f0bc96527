"""Quickstart: load a model, cache a forward, read V4's routing decisions, edit one and see the effect.

    python examples/quickstart.py                # mini-3b, bf16 (~10 s to build, ~6.5 GB)
    python examples/quickstart.py --model tiny   # seconds
"""

import argparse

import torch

import v4lens

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="mini-3b")
ap.add_argument("--dtype", default="bf16")
ap.add_argument("--device", default=None, help="cpu (default), cuda, ...")
args = ap.parse_args()
torch.set_grad_enabled(False)

model = v4lens.load(args.model, device=args.device, dtype=args.dtype)
tokens = model.to_tokens("The Eiffel Tower is in the city of")
logits, cache = model.run_with_cache(tokens)
print("prediction:", repr(model.to_string(logits[0, -1].argmax())))

# which experts the last token used in each layer, and with what weight
for layer in range(model.cfg.n_layers):
    ids = cache[f"blocks.{layer}.mlp.hook_expert_ids"][0, -1].tolist()
    weights = cache[f"blocks.{layer}.mlp.hook_expert_weights"][0, -1].tolist()
    kind = "hash" if model.cfg.is_hash_layer(layer) else model.cfg.layer_type(layer)
    print(f"layer {layer:2d} ({kind:7s}) experts {ids} weights {[round(w, 2) for w in weights]}")

# an edit flows downstream: send every token of the last layer to the same experts
last = model.cfg.n_layers - 1
k = model.cfg.n_activated_experts


def same_experts(ids, hook):
    return torch.arange(k, device=ids.device).expand_as(ids).clone()


edited = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{last}.mlp.hook_expert_ids", same_experts)])
change = (edited[0, -1] - logits[0, -1]).abs().max()
print(f"re-routing layer {last} changes the last logits by up to {float(change):.3f}")

"""Write the tutorial notebooks of this folder (outputs stripped) from the cell lists below.

    python notebooks/make_notebooks.py            # rewrite every notebook of this folder
    python notebooks/make_notebooks.py --check    # exit 1 if a committed notebook differs from this file

Edit the cells here, regenerate, commit both. `tests/test_notebooks.py` executes every notebook of
the folder with nbclient (working directory notebooks/) and checks that none carries outputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

# The first code cell of every notebook. The renderer embeds plotly.js in the notebook itself
# (no CDN, no browser): figures render offline in JupyterLab, Notebook 7 and VS Code, and the
# headless CI run needs nothing extra.
SETUP = """\
import os
import warnings
from pathlib import Path

import plotly.io as pio
import torch

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notice when ipywidgets is absent
import v4lens
from v4lens import patching, plot, stats

torch.manual_seed(0)
torch.set_grad_enabled(False)  # inference only: nothing here needs gradients
pio.renderers.default = "plotly_mimetype+notebook"  # offline: plotly.js goes into the notebook, no CDN"""


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


# ============================================================================ 01 quickstart
NB01 = [
    md("""
# 01 · Quickstart: load, tokens, cache, hooks

v4lens is a hookable reimplementation of DeepSeek-V4 on TransformerLens's `HookedRootModule`:
every residual stream, mHC mixing matrix, indexer pick, expert choice and attention sink is a
named hook point you can cache, read and **edit**.

This notebook uses the `tiny` preset — the real V4 tokenizer and vocabulary (129,280 tokens), four
layers (sliding window, CSA, HCA, CSA) and an MTP block, d_model 64, seeded random weights — so it
runs in seconds on a laptop CPU. Every cell works unchanged with `v4lens.load("mini-3b", dtype="bf16")`
(3.2B parameters, 6.5 GB) or a checkpoint directory. The weights are random, so *predictions* are
meaningless; the *mechanics* (shapes, routing, mixing, edits propagating) are the real thing.
"""),
    code(SETUP),
    md("""
## Load a model

`load(preset_or_directory, dtype=None, device=None, seed=0)` builds the seeded scaffold
deterministically: the same weights on every machine, nothing downloaded.
"""),
    code("""
model = v4lens.load("tiny")
cfg = model.cfg
print(f"{cfg.n_layers} layers:", [cfg.layer_type(l) for l in range(cfg.n_layers)])
print("hash-routed MoE layers:", [l for l in range(cfg.n_layers) if cfg.is_hash_layer(l)])
print(f"d_model {cfg.d_model}, {cfg.hc_mult} residual streams, {cfg.n_heads} heads, "
      f"{cfg.n_routed_experts} routed experts (top-{cfg.n_activated_experts}), vocab {cfg.d_vocab:,}")
print(cfg.param_counts())
"""),
    md("""
## Tokens

`to_tokens` prepends BOS like TransformerLens; `to_str_tokens` shows what the model sees.
`v4lens.load_tokenizer()` also gives the V4 chat template.
"""),
    code("""
prompt = "The Eiffel Tower is in the city of"
tokens = model.to_tokens(prompt)
print(tokens.shape)
print(model.to_str_tokens(tokens[0]))

tok = v4lens.load_tokenizer()
tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=False)
"""),
    md("""
## Forward: logits, loss, multi-token prediction

Logits are fp32 `[batch, pos, vocab]` at every position. With `mtp=True` the MTP block also runs:
its logits at position t predict token t+2. On random weights the loss sits near ln V ≈ 11.77.
"""),
    code("""
logits = model(tokens)
loss = model(tokens, return_type="loss")
logits, (mtp_logits,) = model(tokens, mtp=True)
print("logits", tuple(logits.shape), logits.dtype, "| MTP logits", tuple(mtp_logits.shape))
print(f"loss {loss.item():.3f}  (ln V = {torch.log(torch.tensor(float(cfg.d_vocab))).item():.3f})")
print("next token:", repr(model.to_string(logits[0, -1].argmax())))
"""),
    md("""
## The activation cache

`run_with_cache` returns a `V4ActivationCache` (a TransformerLens `ActivationCache` that knows the
residual is *n streams*: `[b, p, n, d]`). Index it by full hook name or by TransformerLens shorthand.
Every hook name, its shape and what editing it does is listed in `docs/hooks.md` (in the v4lens
repository); `model.hook_dict` holds this model's hook points.
"""),
    code("""
logits, cache = model.run_with_cache(tokens)
print(len(model.hook_dict), "hook points;", len(cache), "cached for this forward")
for name in ["hook_embed", "blocks.1.hook_streams_post", "blocks.1.attn_hc.hook_comb",
             "blocks.1.attn.indexer.hook_topk", "blocks.1.attn.hook_pattern", "blocks.1.mlp.hook_expert_ids"]:
    t = cache[name]
    print(f"{name:36s} {str(tuple(t.shape)):18s} {t.dtype}")
print("cache['attn_out', 1]:", tuple(cache["attn_out", 1].shape))
"""),
    md("""
Cache only what you need with `names_filter` (a list, a predicate or a single name), and keep only
some positions with `pos_slice` — the cache slices each hook on its real position axis.
"""),
    code("""
_, small = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("mlp.hook_expert_ids"), pos_slice=-1)
for name, ids in small.items():
    print(name, ids[0, 0].tolist())  # the experts the last token used in each layer
"""),
    md("""
## Hooks: read and edit

A hook function receives `(tensor, hook)`. Returning `None` only observes; returning a tensor
**replaces** the activation and everything downstream uses the edited value. Hooks added with
`run_with_hooks` or the `model.hooks(...)` context manager are removed afterwards.

First an observation: the n × n Sinkhorn mixing of layer 1's attention half at the last token.
"""),
    code("""
seen = {}

def grab_comb(comb, hook):
    seen[hook.name] = comb[0, -1]  # observe only: return None

model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn_hc.hook_comb", grab_comb)])
comb = seen["blocks.1.attn_hc.hook_comb"]
print(comb)
print("row sums", comb.sum(1), "column sums", comb.sum(0))  # doubly stochastic
"""),
    md("""
Now an edit: send every token of the last layer to experts 0 and 1. The logits change, and a
cache taken under the edit shows the new routing.
"""),
    code("""
last = cfg.n_layers - 1
k = cfg.n_activated_experts

def same_experts(ids, hook):
    return torch.arange(k, device=ids.device).expand_as(ids).clone()  # a new tensor (never edit in place), on the model's device

with model.hooks(fwd_hooks=[(f"blocks.{last}.mlp.hook_expert_ids", same_experts)]):
    edited, edited_cache = model.run_with_cache(tokens)
print("expert ids before:", cache[f"blocks.{last}.mlp.hook_expert_ids"][0, -3:].tolist())
print("expert ids after: ", edited_cache[f"blocks.{last}.mlp.hook_expert_ids"][0, -3:].tolist())
print(f"max |Δ logit| at the last position: {(edited - logits)[0, -1].abs().max():.4f}")
assert torch.equal(model(tokens), logits)  # the hook is gone again
"""),
    md("""
Edits upstream change *decisions* downstream: zero the CSA layer 1's attention output and count
how many tokens of layers 2 and 3 now pick different experts.
"""),
    code("""
def zero(x, hook):
    return torch.zeros_like(x)

with model.hooks(fwd_hooks=[("blocks.1.hook_attn_out", zero)]):
    ablated_logits, ablated = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_expert_ids"))
for l in range(cfg.n_layers):
    before, after = cache[f"blocks.{l}.mlp.hook_expert_ids"], ablated[f"blocks.{l}.mlp.hook_expert_ids"]
    changed = (before.sort(-1).values != after.sort(-1).values).any(-1).sum().item()
    print(f"layer {l}: {changed}/{tokens.shape[1]} tokens routed differently")
kl = torch.nn.functional.kl_div(ablated_logits[0, -1].log_softmax(-1), logits[0, -1].log_softmax(-1),
                                log_target=True, reduction="sum")
print(f"KL(clean || ablated) at the last position: {kl:.2e}")
"""),
    md("""
Layers 0 and 1 are unchanged (they run before or at the edit: causality within the forward), later
layers re-route. Next: `02_routing` (experts, hash routes, router patching), `03_mhc` (streams and
Sinkhorn mixing), `04_sparse_attention` (indexer, compressed entries, sinks), `06_exporting_figures`,
`07_mini3b_at_scale`.
"""),
]

# ============================================================================ 02 routing
NB02 = [
    md("""
# 02 · Routing: experts, hash routes, router patching

Every V4 MoE layer sends each token to k of E routed experts plus one shared expert. The first
`n_hash_layers` layers route by a fixed table (`tid2eid[token]`: the experts depend on the token
id only); the rest use a learned router: sqrt(softplus(logits)) scores, top-k after a selection bias,
weights normalised and scaled. The hooks expose each stage:

| hook | what |
|---|---|
| `mlp.hook_router_logits` / `hook_router_scores` | [b,p,E] fp32 |
| `mlp.hook_hash_ids` (hash layers) | [b,p,k] the tid2eid row; edits re-route |
| `mlp.hook_expert_ids` / `hook_expert_weights` | [b,p,k] experts used and their weights; edits re-route / re-weight |

`tiny` has 8 experts, top-2, layer 0 hash-routed.
"""),
    code(SETUP),
    code("""
model = v4lens.load("tiny")
cfg = model.cfg
prompt = "The quick brown fox jumps over the lazy dog and the"
tokens = model.to_tokens(prompt)
str_tokens = model.to_str_tokens(tokens[0])
logits, cache = model.run_with_cache(tokens)
print([f"L{l}:{'hash' if cfg.is_hash_layer(l) else 'learned'}" for l in range(cfg.n_layers)])
"""),
    md("""
## Expert choices

Which experts each token used in layer 1, with their weights (a learned layer).
"""),
    code("""
import pandas as pd

ids = cache["blocks.1.mlp.hook_expert_ids"][0]
weights = cache["blocks.1.mlp.hook_expert_weights"][0]
pd.DataFrame({"token": str_tokens, "experts": ids.tolist(),
              "weights": [[round(w, 3) for w in row] for row in weights.tolist()]})
"""),
    md("""
`plot.router_heatmap` draws token × expert routing weights with the chosen experts circled (hover
shows the router score). On a hash layer it shows each token's `tid2eid` route instead.
"""),
    code("""
plot.router_heatmap(model, cache, layer=1).show()
"""),
    md("""
## Load balance

`stats.load_balance` summarises every layer's load: coefficient of variation, max/mean load,
usage entropy (normalised: 1 = perfectly even), unused experts — on counts and on weight mass.
With 12 tokens × 2 slots over 8 experts the counts are noisy; see `07_mini3b_at_scale` for 2k tokens.
"""),
    code("""
stats.load_balance(model, cache)[["layer", "layer_type", "routing", "assignments", "cv",
                                  "max_over_mean", "entropy_norm", "frac_unused"]]
"""),
    code("""
plot.expert_load(model, cache, normalize=True).show()
"""),
    md("""
## Hash routes

On a hash layer the router still computes scores (they set the weights), but the *choice* is
`tid2eid[token]`. `stats.hash_vs_learned` asks: would the layer's own router have picked the
same experts? On random weights, agreement is at chance level.
"""),
    code("""
hash_layer = 0
tid2eid = model.blocks[hash_layer].mlp.gate.tid2eid
fox, cat = model.to_single_token(" fox"), model.to_single_token(" cat")
print("tid2eid[' fox'] =", tid2eid[fox].tolist(), "  tid2eid[' cat'] =", tid2eid[cat].tolist())
stats.hash_vs_learned(model, cache)
"""),
    md("""
`patching.override_hash_routes` re-routes chosen token ids on hash layers for every forward inside
the context — the `tid2eid` buffer is never written. Swap the routes of " fox" and " cat": the fox
token now uses the cat's experts, and the logits move.
"""),
    code("""
fox_pos = str_tokens.index(" fox")
with patching.override_hash_routes(model, swap=(fox, cat)):
    swapped_logits, swapped = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_expert_ids"))
print("layer 0 experts of ' fox' before:", cache["blocks.0.mlp.hook_expert_ids"][0, fox_pos].tolist(),
      " after:", swapped["blocks.0.mlp.hook_expert_ids"][0, fox_pos].tolist())
print(f"max |Δ logit| at the last position: {(swapped_logits - logits)[0, -1].abs().max():.4f}")
assert torch.equal(model(tokens), logits)  # outside the context nothing changed
"""),
    md("""
Explicit routes work too: `override_hash_routes(model, routes={token_id: [e0, e1]})`.

## Router patching

Activation patching asks which pieces of a clean run restore a metric on a corrupted run. Clean
"... brown fox ..." vs corrupted "... brown cat ...": the metric is the logit difference between
the clean run's top token and the corrupted run's top token at the last position.

`patching.get_act_patch_routing` gives one position of one layer the clean run's *routing*
(`hook_expert_ids` and `hook_expert_weights`) while the experts compute on the corrupted input →
a `[layer, pos]` map of how much the routing decision alone carries.
"""),
    code("""
clean_tokens = tokens
corrupted_tokens = model.to_tokens(prompt.replace("fox", "cat"))
assert corrupted_tokens.shape == clean_tokens.shape
corrupted_logits = model(corrupted_tokens)
answer, distractor = int(logits[0, -1].argmax()), int(corrupted_logits[0, -1].argmax())

def metric(lg):
    return lg[:, -1, answer].mean() - lg[:, -1, distractor].mean()

print(f"clean {metric(logits):.4f}   corrupted {metric(corrupted_logits):.4f}")
routing_effect = patching.get_act_patch_routing(model, corrupted_tokens, cache, metric)
print(tuple(routing_effect.shape))
"""),
    code("""
plot.patching_heatmap(routing_effect, model, corrupted_tokens, title="Patching clean routing (ids + weights)").show()
"""),
    md("""
Positions before the corrupted token route identically in both runs, so patching them is a no-op
(the corrupted metric exactly). The effect is confined to positions where the routing actually
differs — check:
"""),
    code("""
for l in range(cfg.n_layers):
    name = f"blocks.{l}.mlp.hook_expert_ids"
    _, corrupted_cache = model.run_with_cache(corrupted_tokens, names_filter=name)
    differs = (cache[name][0].sort(-1).values != corrupted_cache[name][0].sort(-1).values).any(-1)
    print(f"layer {l}: routing differs at positions {differs.nonzero().flatten().tolist()}")
"""),
    md("""
`what="ids"` patches only the expert choice (weights recomputed from the corrupted scores);
`what="weights"` only the weights. For the expert *outputs* with routing fixed, use
`get_act_patch_expert_out` (needs `use_expert_out=True`).
"""),
]

# ============================================================================ 03 mHC
NB03 = [
    md("""
# 03 · mHC: the residual is four streams

V4 replaces the residual stream with **manifold-constrained hyper-connections** (mHC): the hidden
state is n = `hc_mult` streams `[b, p, n, d]`. Around every sub-layer (attention, then MoE) an mHC

1. collapses the streams into the sub-layer input with weights `pre` ([n], sigmoid),
2. writes the sub-layer output back into each stream with weights `post` ([n], 2·sigmoid),
3. mixes the streams with `comb` ([n, n]), a Sinkhorn-Knopp projection of a softmax — (nearly)
   doubly stochastic, so mixing neither creates nor destroys mass.

All three depend on the token (they are computed from the streams), and all are hooks:
`blocks.{l}.attn_hc.hook_pre/post/comb` and `mlp_hc.*`. `comb[j, k]` is the weight of input stream
j in output stream k.
"""),
    code(SETUP),
    code("""
model = v4lens.load("tiny")
cfg = model.cfg
tokens = model.to_tokens("The quick brown fox jumps over the lazy dog and the")
logits, cache = model.run_with_cache(tokens)
streams = cache["blocks.1.hook_streams_post"]
print("streams after block 1:", tuple(streams.shape), "(b, p, n, d)")
print("per-stream norm at the last token:", streams[0, -1].norm(dim=-1))
"""),
    md("""
## Streams through depth

`cache.accumulated_streams()` stacks the streams at every block boundary (embed, 0_post, ...);
`plot.stream_norms` draws each stream's norm through depth. At the embedding all four streams are
copies of the token embedding; they diverge as sub-layers write with different `post` weights.
"""),
    code("""
acc, labels = cache.accumulated_streams(return_labels=True)
print(labels, tuple(acc.shape))
plot.stream_norms(model, cache).show()
"""),
    md("""
## Sinkhorn mixing matrices

`hook_comb` is fp32 `[b, p, n, n]`. Rows and columns each sum to 1 (up to the Sinkhorn iteration's
tolerance).
"""),
    code("""
comb = cache["blocks.2.mlp_hc.hook_comb"][0, -1]
print(comb)
print("row sums   ", comb.sum(-1))
print("column sums", comb.sum(-2))
"""),
    md("""
`stats.sinkhorn_summary` measures every mixing matrix of the run: row/column entropy (max ln n =
1.386: uniform mixing), distance to the identity and to the nearest permutation (0: the streams
are just relabelled), the share of tokens whose nearest permutation is the identity, and the
Sinkhorn errors after the first and last iteration (replayed from `hook_mixes`). Near-uniform
mixing is what random initialisation gives; a trained model's combs are the thing to compare.
"""),
    code("""
stats.sinkhorn_summary(model, cache)
"""),
    md("""
`plot.comb_grid` shows every layer's comb for one token (top: attention half, bottom: MoE half),
with a slider over positions; `plot.pre_post_weights` the collapse/expand weights;
`plot.sinkhorn_convergence` the row/column errors per Sinkhorn iteration.
"""),
    code("""
plot.comb_grid(model, cache, position=-1).show()
"""),
    code("""
plot.pre_post_weights(model, cache, position=-1).show()
plot.sinkhorn_convergence(model, cache, layer=1).show()
"""),
    md("""
## Editing the mixing

`patching.comb_hooks` forces comb to the identity (each stream keeps itself) or uniform (every
stream becomes the mean); `get_act_patch_hc_comb_fixed` sweeps that over layers → `[layer]`.
Here the metric is the logit difference between the model's top two tokens at the last position.
"""),
    code("""
top2 = logits[0, -1].topk(2).indices.tolist()

def metric(lg):
    return lg[:, -1, top2[0]].mean() - lg[:, -1, top2[1]].mean()

print(f"unedited: {metric(logits):.4f}")
identity = model.run_with_hooks(tokens, fwd_hooks=patching.comb_hooks(model, [0, 1, 2, 3], "identity"))
print(f"every comb = identity: {metric(identity):.4f}")
print("per layer, identity:", patching.get_act_patch_hc_comb_fixed(model, tokens, None, metric, value="identity"))
print("per layer, uniform: ", patching.get_act_patch_hc_comb_fixed(model, tokens, None, metric, value="uniform"))
"""),
    md("""
## Exact logit attribution through mHC: `decompose`

With the mixing weights (every later `post` and `comb`, hc_head's `pre`) and the final norm's
1/rms frozen at this run's values, the final state is a *linear* combination of the embedding and
every sub-layer write, one scalar coefficient per write: α = preᵀ · comb_S ⋯ comb_{s+1} · post_s.
`decompose` splits a logit (difference) into those parts — per head and per routed expert slot
if asked — and the parts sum to the model's value.
"""),
    code("""
dec = v4lens.decompose(model, tokens=tokens, target=(top2[0], top2[1]), heads=True, experts=True)
print("sum of parts", dec.values.sum(0).item(), " model", dec.total.item(), " metric", metric(logits).item())
dec.top(8)
"""),
    code("""
plot.attribution_bars(dec, top=15).show()
"""),
    md("""
`stream_lineage` gives the same propagation as vectors: how much of each write reaches each final
stream (before hc_head collapses them), and `alpha` the resulting weight in the collapsed state.
"""),
    code("""
import pandas as pd

lineage, labels, alpha = v4lens.stream_lineage(model, cache, positions=[-1])
print(tuple(lineage.shape), "(writes, b, positions, streams)")
pd.DataFrame(lineage[:, 0, 0].numpy(), index=labels, columns=[f"stream {k}" for k in range(cfg.hc_mult)]
             ).assign(alpha=alpha[:, 0, 0].numpy()).round(3)
"""),
    md("""
The embedding starts as 1 in every stream; a sub-layer's write enters with its `post` weights
(2·sigmoid, ≈ 1 at random init) and is then spread by every later comb. Random-init combs are
near-uniform, so early writes reach all four streams almost equally; only the last sub-layers, with
few combs after them, keep their own `post` profile. `alpha` (= hc_head's `pre` · lineage) is the
coefficient `decompose` multiplies each write's logit contribution by; in a trained model, writes
that land in streams hc_head ignores are invisible to the logits.
"""),
]

# ============================================================================ 04 sparse attention
NB04 = [
    md("""
# 04 · Sparse attention: indexer picks, compressed entries, sinks

V4's attention layers come in three kinds, each a hook-visible mechanism:

- **sliding**: a window of W recent tokens (itself included);
- **CSA** (compressed sparse attention, ratio 4): the window plus the top-k compressed entries
  chosen by the **Lightning Indexer** (each entry pools 2×4 overlapping tokens);
- **HCA** (heavily compressed attention, ratio m): the window plus *every* visible compressed entry
  (each pools m tokens).

Every head also has a learned **sink** logit in its softmax denominator: mass the head can park
nowhere. `tiny` has W = 8, CSA layers 1 and 3 (index top-3), an HCA layer 2 (ratio 6). A query at
position t sees compressed entry w once it is complete: w < (t+1) // ratio.
"""),
    code(SETUP),
    code("""
model = v4lens.load("tiny")
cfg = model.cfg
prompt = ("In the old library by the river, the archivist kept a ledger of every visitor, every "
          "borrowed book and every late return, and each evening she read the day's names aloud.")
tokens = model.to_tokens(prompt)
S = tokens.shape[1]
logits, cache = model.run_with_cache(tokens)
print(S, "tokens;", [cfg.layer_type(l) for l in range(cfg.n_layers)], "; index top-k", cfg.index_topk)
"""),
    md("""
## What each query attends: `hook_key_index`

`attn.hook_key_index` `[b, p, K]` names every candidate column: `0..S-1` a raw token (the
window), `S + w` compressed entry w, `-1` an empty slot. For the last query of CSA layer 1 the
first W columns are the window, then the indexer's picks.
"""),
    code("""
def describe(idx):
    return "empty" if idx < 0 else f"token {idx}" if idx < S else f"entry {idx - S}"

print([describe(i) for i in cache["blocks.1.attn.hook_key_index"][0, -1].tolist()])
print("indexer picks (last 4 queries):", cache["blocks.1.attn.indexer.hook_topk"][0, -4:].tolist())
print("visible entries at the last query:", S // 4)
"""),
    md("""
## Indexer picks vs full attention

The indexer chooses entries with its own cheap scorer (`indexer.hook_scores`); the attention head
then attends only to those. How much would *dense* attention over all visible compressed entries
have put on the chosen ones? `stats.indexer_recall` computes exactly that per query (softmax of
q·kv/√c over every visible entry, per head, mass on the picks; window and sink left out): 1 when
the picks cover every visible entry; a random choice gets about k / visible.
"""),
    code("""
recall = stats.indexer_recall(model, cache, layer=1)  # [b, p], mean over heads
visible = (torch.arange(S) + 1) // 4
chance = (cfg.index_topk / visible.clamp(min=1)).clamp(max=1)
for t in range(6, S, 6):
    print(f"query {t:2d}: {int(visible[t]):2d} visible entries, recall {recall[0, t]:.3f}  (random picks ≈ {chance[t]:.3f})")
stats.indexer_recall_summary(model, cache)
"""),
    md("""
On random weights the indexer does about as well as chance (`recall_selective` is the mean over the
queries where it actually drops entries); the gap above chance is what a trained indexer buys.
"""),
    md("""
The same comparison by hand, as sets: the top-k entries of dense attention (head-averaged) vs the
indexer's picks at the last query.
"""),
    code("""
q = cache["blocks.1.attn.hook_q"][0, -1].float()              # [h, c] (after RoPE)
kv = cache["blocks.1.attn.compressor.hook_kv"][0].float()     # [T, c]
T_visible = S // 4
dense = ((q @ kv[:T_visible].T) / q.shape[-1] ** 0.5).softmax(-1).mean(0)   # [T_visible]
dense_top = set(dense.topk(cfg.index_topk).indices.tolist())
picks = set(cache["blocks.1.attn.indexer.hook_topk"][0, -1].tolist()) - {-1}
print("dense attention's top-k:", sorted(dense_top), " indexer's picks:", sorted(picks),
      " overlap:", len(dense_top & picks))
"""),
    md("""
`plot.indexer_scores` shows the indexer's query × entry scores with its picks circled; entries are
labelled by the tokens they pool.
"""),
    code("""
plot.indexer_scores(model, cache, layer=1).show()
"""),
    md("""
## Forcing picks

`patching.force_indexer_picks(model, layers, include=[w], exclude=[v], queries=[t])` edits the
indexer's top-k in every forward inside the context: an excluded pick becomes an empty slot, an
included entry replaces the lowest-scoring pick (entries a query cannot see yet are never forced).
Here: drop the last query's top pick, then force in an entry it did not choose.
"""),
    code("""
last = S - 1
picks_last = cache["blocks.1.attn.indexer.hook_topk"][0, last].tolist()
not_picked = [w for w in range(S // 4) if w not in picks_last]
print("picks:", picks_last, " not picked:", not_picked)

for label, kwargs in [("exclude", {"exclude": [picks_last[0]]}), ("include", {"include": [not_picked[0]]})]:
    with patching.force_indexer_picks(model, 1, queries=[last], **kwargs):
        edited, c = model.run_with_cache(tokens, names_filter="blocks.1.attn.indexer.hook_topk")
    print(f"{label}: picks now {c['blocks.1.attn.indexer.hook_topk'][0, last].tolist()}, "
          f"max |Δ logit| {(edited - logits)[0, last].abs().max():.4f}")
"""),
    md("""
`patching.get_act_patch_indexer_topk` sweeps the same idea as activation patching: give one query
the clean run's picks (`[layer, pos]`, NaN on layers without an indexer).

## Compressed entries (HCA)

`compressor.hook_weights` `[b, T, slots, c]` holds each entry's softmax pooling weights over its
source tokens. `plot.compressed_entries` shows them (mean over channels) with the source tokens
printed in the cells. On HCA layer 2 every visible entry is attended, no indexer involved:
"""),
    code("""
print("HCA entries:", tuple(cache["blocks.2.attn.compressor.hook_kv"].shape), "(b, T, c)")
candidates = cache["blocks.2.attn.hook_key_index"][0, -1].tolist()
print("last query's candidates on layer 2:", [describe(i) for i in candidates])
plot.compressed_entries(model, cache, layer=2).show()
"""),
    md("""
## Sinks

`attn.hook_pattern` rows sum to 1 − sink; `attn.hook_sink` is the mass the sink absorbed
(observational — edit `hook_sink_logit` to change it). `plot.attention_pattern` shows one head's
window, compressed candidates and sink column (rows sum to 1); `plot.sink_mass` the mean sink
probability per layer × head.
"""),
    code("""
pattern, sink = cache["blocks.1.attn.hook_pattern"], cache["blocks.1.attn.hook_sink"]
print("max |pattern.sum + sink - 1|:", (pattern.sum(-1) + sink - 1).abs().max().item())
plot.attention_pattern(model, cache, layer=1, head=0, max_positions=16).show()
"""),
    code("""
print(stats.sink_mass(model, cache))  # [L, H]
plot.sink_mass(model, cache).show()
"""),
    md("""
Ablating a sink (logit → −∞) makes the head spend all its mass on real candidates.
`patching.sink_hooks` does it for chosen heads; `get_act_patch_sink` sweeps every (layer, head).
"""),
    code("""
ablated = model.run_with_hooks(tokens, fwd_hooks=patching.sink_hooks(model, 1, heads=[0]))
print(f"ablate layer 1 head 0's sink: max |Δ logit| {(ablated - logits)[0, -1].abs().max():.4f}")
top2 = logits[0, -1].topk(2).indices.tolist()

def metric(lg):
    return lg[:, -1, top2[0]].mean() - lg[:, -1, top2[1]].mean()

patching.get_act_patch_sink(model, tokens, None, metric)  # [layer, head]: the metric with that sink ablated
"""),
]

# ============================================================================ 06 exporting figures
NB06 = [
    md("""
# 06 · Exporting figures

`v4lens.plot.save(fig, path)` picks the format from the suffix:

- **.html**: a self-contained page with plotly.js embedded — works offline, always available;
- **.png / .svg / .pdf / .jpg / .webp**: through kaleido with the *system's* Chromium (on PATH or
  `$BROWSER_PATH`; Debian: `apt-get install chromium`). kaleido never downloads a browser here.

Without a browser `save` writes the HTML next to the requested file and raises `plot.ExportError`
saying what to install. `plot.export_session()` keeps one Chromium running for many images
(≈ 0.25 s each instead of seconds).
"""),
    code(SETUP),
    code("""
OUT = Path(os.environ.get("V4LENS_NOTEBOOK_OUT", "figures"))  # the tests point this at a temporary folder
OUT.mkdir(parents=True, exist_ok=True)
model = v4lens.load("tiny")
tokens = model.to_tokens("The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the")
logits, cache = model.run_with_cache(tokens)
figures = {
    "router_layer1": plot.router_heatmap(model, cache, layer=1),
    "comb_grid": plot.comb_grid(model, cache),
    "attention_l1_h0": plot.attention_pattern(model, cache, layer=1, head=0, max_positions=12),
    "logit_lens": plot.logit_lens_table(cache),
}
print("browser for image export:", plot.find_browser())
"""),
    md("""
## HTML: always works
"""),
    code("""
for name, fig in figures.items():
    path = plot.save(fig, OUT / f"{name}.html")
    print(f"{path}  {path.stat().st_size / 1e6:.1f} MB")
"""),
    md("""
## Images: one browser session, and a fallback

Write PNGs (and one SVG) in one `export_session`. Catch `ExportError` so a machine without
Chromium still gets its HTML files and a clear message instead of a traceback.
"""),
    code("""
written, failed = [], []
with plot.export_session():
    for name, fig in figures.items():
        try:
            written.append(plot.save(fig, OUT / f"{name}.png", width=900, height=500, scale=2))
        except plot.ExportError as e:
            failed.append(name)
            print(f"{name}: {e}")
    try:
        written.append(plot.save(figures["router_layer1"], OUT / "router_layer1.svg"))
    except plot.ExportError as e:
        print(e)
print("images written:", [p.name for p in written], "| HTML only:", failed)
"""),
    code("""
from IPython.display import Image, display

pngs = [p for p in written if p.suffix == ".png"]
if pngs:
    display(Image(filename=str(pngs[0]), width=600))
else:
    print("no PNG on this machine (no Chromium): open the HTML files instead")
"""),
    md("""
## What a machine without Chromium sees

Simulated here by hiding the browser from `save`: the HTML lands next to the requested PNG, and the
error says what to install.
"""),
    code("""
from unittest import mock

with mock.patch("v4lens.plot.export.find_browser", return_value=None):
    try:
        plot.save(figures["comb_grid"], OUT / "no_browser" / "comb_grid.png")
    except plot.ExportError as e:
        print("ExportError:", e)
print(sorted(p.name for p in (OUT / "no_browser").iterdir()))
"""),
    md("""
From the command line, `v4lens viz --model tiny --prompt "..." --out figs/` writes a standard set
of figures as HTML + PNG with an index page, and carries on with HTML only when there is no
browser; `examples/export_figures.py` is the scripted version of this notebook.
"""),
]

# ============================================================================ 07 mini-3b
NB07 = [
    md("""
# 07 · mini-3b at scale

`mini-3b` is the V4 architecture at a size a workstation CPU handles: 28 layers (2 sliding, then
alternating CSA / HCA with ratio 112), 24 routed experts (top-4, the first two layers hash-routed),
4 streams, d_model 1536 — 3.17B parameters, 1.08B active per token. Its weights are a seeded random
scaffold (or cut out of a V4-Flash checkpoint with `v4lens.slice_checkpoint`).

This notebook: what the weights cost in memory, a 2,048-token forward with a cache that keeps only
what we read, and what *random* weights look like to the usual tools — flat logits, near-uniform
routing, a logit lens with nothing to find. Those are the baselines a trained checkpoint must beat.
Runs in about a minute on a 2-core CPU (up to ~2.5 minutes when the cores are shared), ~9.5 GB of RAM at peak.
"""),
    code(SETUP),
    code("""
import time

import pandas as pd


def rss_gb():
    \"\"\"This process's resident memory (Linux; NaN elsewhere).\"\"\"
    try:
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1e6
    except (OSError, StopIteration):
        return float("nan")


before = rss_gb()
t0 = time.perf_counter()
model = v4lens.load("mini-3b", dtype="bf16")
cfg = model.cfg
print(f"built in {time.perf_counter() - t0:.1f} s; resident memory +{rss_gb() - before:.2f} GB")
print(cfg.param_counts())
"""),
    md("""
## Memory of the weights

Matrices are bf16; the reference's fp32 islands (norm weights, mHC parameters, sinks, compressor
projections and position biases, router biases) stay fp32 — under 2% of the bytes. Routed experts
dominate: 24 per layer, of which each token uses 4.
"""),
    code("""
def component(name):
    if name.startswith("mtp."):
        return "MTP block"
    if name in ("embed.weight", "head.weight"):
        return "embedding + unembedding"
    for key, label in [(".mlp.experts.", "routed experts"), (".mlp.shared_experts.", "shared experts"),
                       (".mlp.gate.", "routers"), (".attn.indexer.", "Lightning Indexers"),
                       (".attn.compressor.", "KV compressors"), (".attn.", "attention"), ("hc", "mHC")]:
        if key in name:
            return label
    return "norms"


rows = [(component(n), p.dtype, p.numel(), p.numel() * p.element_size()) for n, p in model.named_parameters()]
rows += [("buffers (tid2eid, ...)", b.dtype, b.numel(), b.numel() * b.element_size()) for _, b in model.named_buffers()]
weights = pd.DataFrame(rows, columns=["component", "dtype", "params", "bytes"])
table = weights.groupby("component")[["params", "bytes"]].sum().sort_values("bytes", ascending=False)
table["GB"] = (table.pop("bytes") / 1e9).round(3)
print(weights.groupby(weights.dtype.astype(str))["bytes"].sum().div(1e9).round(3).to_dict(), "GB by dtype")
table
"""),
    md("""
## A 2,048-token forward with a small cache

A full cache of every hook at 2k tokens is several GB. Cache only what the analysis reads
(`names_filter`) and only the positions it reads (`pos_slice`: the last 16 here; the stream tensors
are sliced on their position axis, compressed-entry tensors stay whole). Routing statistics want
*every* token, so a plain hook collects the expert choices in the same forward. And skip the logits:
`[1, 2048, 129280]` fp32 would be 1.06 GB and ~20% of the forward's time (`return_type=None` stops
after the last block); the logit lens below recomputes them exactly at the positions we read.
"""),
    code("""
import inspect

# 2,048 tokens of varied text that every machine has: v4lens's own source (docstrings and code)
text = "\\n".join(inspect.getsource(m) for m in (v4lens.model.hooked, v4lens.analysis.stats.routing,
                                               v4lens.analysis.patching.sweeps, v4lens.analysis.lens))
tokens = model.to_tokens(text)[:, :2048]
assert tokens.shape[1] == 2048
print("tokens:", tuple(tokens.shape), repr(model.to_string(tokens[0, 1:40])))

routing = {}

def keep_routing(x, hook):
    routing[hook.name] = x  # observe every position: [b, p, k]

routing_hooks = [(f"blocks.{l}.mlp.{h}", keep_routing) for l in range(cfg.n_layers)
                 for h in ("hook_expert_ids", "hook_expert_weights")]

def lens_hooks(name):
    return name.endswith("hook_streams_post") or name.startswith(("hc_head.", "ln_final.")) or name == "hook_embed"

t0 = time.perf_counter()
with model.hooks(fwd_hooks=routing_hooks):
    _, cache = model.run_with_cache(tokens, names_filter=lens_hooks, pos_slice=slice(-16, None), return_type=None)
elapsed = time.perf_counter() - t0
cache_gb = sum(t.numel() * t.element_size() for t in cache.values()) / 1e9
print(f"forward + cache: {elapsed:.1f} s ({tokens.shape[1] / elapsed:.0f} tok/s); resident memory {rss_gb():.1f} GB")
print(f"cache: {len(cache)} tensors, {cache_gb * 1e3:.0f} MB; "
      f"streams {tuple(cache['blocks.27.hook_streams_post'].shape)} (b, last 16 positions, n, d)")
"""),
    md("""
## Random weights: flat logits

`cache.logit_lens()` reads every block boundary (embed, 0_post, …, 27_post) through hc_head → final
norm → unembedding; its last boundary *is* the model's output, so with `keep_logits=True` it also gives
the logits at the 16 cached positions (29 × 16 × 129,280 fp32 ≈ 0.24 GB).

With normal(0, 0.02) matrices the logits barely move away from uniform: the entropy of the next-token
distribution sits just below ln V, the top probability is a few dozen times 1/V (still ≈ 0.02%), and
the loss is slightly *above* ln V (random logits with spread σ cost about σ²/2 nats over uniform).
"""),
    code("""
lens = cache.logit_lens(k=5, per_stream=False, keep_logits=True)
log_probs = lens.logits[-1, 0].log_softmax(-1)  # [16, V]: the model's output at the cached positions
entropy = -(log_probs.exp() * log_probs).sum(-1)
ln_v = torch.log(torch.tensor(float(cfg.d_vocab)))
loss = -lens.target_logprobs[-1, 0, :-1].mean()  # the last position has no next token
print(f"entropy {entropy.mean():.3f} nats (ln V = {ln_v:.3f}); max prob {log_probs.exp().max(-1).values.mean():.2e} "
      f"(1/V = {1 / cfg.d_vocab:.2e}); loss {loss:.3f}; logit std {lens.logits[-1].std():.3f}")
"""),
    md("""
## Random weights: near-uniform routing

Over 2,048 tokens each layer sends 8,192 assignments to 24 experts. `stats.load_balance` reads a
cache; build one from the collected routing tensors. Normalised usage entropy near 1 and no unused
experts: random routers spread tokens almost evenly (the hash layers' tid2eid table is random too).
A trained model's specialised, skewed routing shows up as a drop in `entropy_norm`.
"""),
    code("""
routing_cache = v4lens.V4ActivationCache(routing, model, tokens=tokens)
balance = stats.load_balance(model, routing_cache)
print(balance[["cv", "entropy_norm", "frac_unused"]].describe().loc[["mean", "min", "max"]].round(3))
balance[["layer", "layer_type", "routing", "cv", "max_over_mean", "entropy_norm", "frac_unused"]].head(6)
"""),
    code("""
plot.expert_load(model, routing_cache, normalize=True).show()
"""),
    md("""
## Random weights: the logit lens

Through depth, the probability of the actual next token stays at ≈ 1/V at every boundary and the
top tokens are arbitrary — there is nothing for the lens to find. On a trained model this is where
the answer appears layer by layer.
"""),
    code("""
p_next = lens.target_probs[:, 0, -2]  # position -2: its next token is in the prompt (-1 has none)
print(f"P(next token) across {len(lens.labels)} boundaries: min {p_next.min():.1e}, max {p_next.max():.1e} "
      f"(1/V = {1 / cfg.d_vocab:.1e})")
lens.table(batch=0, position=-2).tail(6)
"""),
    code("""
plot.logit_lens_table(lens, model, position=-2).show()  # model= decodes the target token
"""),
    md("""
The same code on a real checkpoint (`v4lens.load("path/to/mini-3b-from-flash", dtype="bf16")`)
gives peaked logits, skewed routing and a lens that converges — comparing against these numbers
tells you how much of a pattern is the architecture and how much is learning.
"""),
]

# ============================================================================ 05 recall circuit
NB05 = [
    md("""
# 05 · Finding the recall circuit in a trained tiny V4

`v4lens.load("tiny-recall")` is a 3-layer V4 (sliding window 8 · CSA with a top-2 Lightning
Indexer · HCA ratio 8, 4 mHC streams, hash-routed layer 0) trained by `v4lens.train` on
key→value recall: records `[key value filler filler]`, then `QUERY key`, and the model must
output that key's value. The queried record always lies **outside the query's sliding window**,
so the only way the value can reach the query is through the compressed entries of the CSA or
HCA layer — and, on the CSA layer, only through the entries the indexer picks.

We find the circuit with v4lens's analysis tools: ablation of the indexer's picks, activation
patching of streams, heads and picks, and exact logit attribution through mHC.
"""),
    code(SETUP),
    code("""
from v4lens.tasks import recall_batch, task_accuracy, KEY_IDS, VALUE_IDS, QUERY

model = v4lens.load("tiny-recall")
batch = recall_batch(256, generator=torch.Generator().manual_seed(0))
print("accuracy on 256 held-out sequences:", task_accuracy(model, batch))
# keep the sequences whose queried record sits at one position, so per-position results line up
same = batch["key_pos"] == 8
tokens, qpos, answer, key_pos = (batch[k][same][:48] for k in ("tokens", "query_pos", "answer", "key_pos"))
rows = torch.arange(len(tokens))

def role(t):
    t = int(t)
    return "BOS" if t == 0 else "Q" if t == QUERY else f"k{t}" if t in KEY_IDS else f"v{t}" if t in VALUE_IDS else "·"

print(" ".join(role(t) for t in tokens[0]), f"   query at {int(qpos[0])}, key at {int(key_pos[0])}")
"""),
    md("""
## 1 · The answer is read from context, through the indexer

Replace the queried record's value by another value: a model that retrieves must now output the
new value. Then remove every compressed entry the CSA layer's indexer picked (`hook_topk` → -1):
if the answer travels through those entries, accuracy falls to chance (1/16).
"""),
    code("""
corrupted = tokens.clone()
other = VALUE_IDS.start + (answer - VALUE_IDS.start + 1 + torch.randint(0, 15, answer.shape)) % 16
corrupted[rows, key_pos + 1] = other          # the queried record now holds a different value
logits = model(corrupted)
print("predicts the new value:", (logits[rows, qpos].argmax(-1) == other).float().mean().item())

no_picks = [("blocks.1.attn.indexer.hook_topk", lambda picks, hook: torch.full_like(picks, -1))]
logits = model.run_with_hooks(tokens, fwd_hooks=no_picks)
print("accuracy without the indexer's picks:", (logits[rows, qpos].argmax(-1) == answer).float().mean().item())
"""),
    md("""
## 2 · Which entries does the indexer pick?

CSA entry w pools window w's second halves and window w−1's first halves (4 tokens each), so the
record at positions 4w…4w+3 is in entry w (and partly in w+1). How often is the queried
record's entry among the query's two picks?
"""),
    code("""
_, cache = model.run_with_cache(tokens)
picks = cache["blocks.1.attn.indexer.hook_topk"][rows, qpos]          # [b, 2]
record_entry = key_pos // 4
hit = (picks == record_entry[:, None]).any(-1) | (picks == record_entry[:, None] + 1).any(-1)
print("picks include the queried record's entry:", hit.float().mean().item())
print("example picks:", picks[:4].tolist(), "record entries:", record_entry[:4].tolist())
plot.indexer_scores(model, cache, layer=1, batch=0).show()
"""),
    md("""
## 3 · Activation patching

Clean run: the real sequences. Corrupted run: the same sequences with the queried value swapped
(section 1). The metric is the clean-answer-minus-corrupted-answer logit difference at the
query, normalised so that 1 = clean and 0 = corrupted. Patching one clean activation into the
corrupted run shows where the information about the value lives.
"""),
    code("""
_, clean_cache = model.run_with_cache(tokens)
clean_logits, corrupt_logits = model(tokens), model(corrupted)

def logit_diff(lg):
    return (lg[rows, qpos, answer] - lg[rows, qpos, other]).mean()

clean_diff, corrupt_diff = logit_diff(clean_logits), logit_diff(corrupt_logits)
def metric(lg):
    return (logit_diff(lg) - corrupt_diff) / (clean_diff - corrupt_diff)

streams = patching.get_act_patch_streams(model, corrupted, clean_cache, metric, where="post")
plot.patching_heatmap(streams, model=model, tokens=tokens, title="clean streams after each block → corrupted run").show()
value_pos = int(key_pos[0]) + 1
print(f"restored by the value position {value_pos}:", streams[:, value_pos].tolist())
print(f"restored by the query position {int(qpos[0])}:", streams[:, int(qpos[0])].tolist())
"""),
    md("""
Two places carry the answer: the value's own position after layer 0 (the information is still
local there; patching it restores the clean answer) and the query position from layer 1 on,
after it has fetched the value through layer 1's compressed attention. Nothing in between:
there is no sliding-window path. Which heads do the fetching, and does the clean
choice of entries matter?
"""),
    code("""
heads = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric)
plot.patching_heatmap(heads, x="head", title="clean head outputs (all positions) → corrupted run").show()
picks_patch = patching.get_act_patch_indexer_topk(model, corrupted, clean_cache, metric)
print("patching the clean indexer picks, layer 1 (max over positions):", picks_patch[1].nan_to_num(0).abs().max().item())
"""),
    md("""
Patching the clean picks changes nothing: the corruption swapped the *value*, and the indexer
chooses entries by the *key*, which both runs share — the picks are the same. The indexer is the
"where to look" half of the circuit (section 1: without its picks, chance), the attention head
and the MoE that reads its output are the "what it says" half.
"""),
    md("""
## 4 · Exact logit attribution through mHC

`decompose` splits the clean logit difference at the query into the embedding, every head and
every expert slot, each carried to the head through the (frozen) mHC mixing. The parts sum
exactly to the model's value.
"""),
    code("""
dec = v4lens.decompose(model, clean_cache, target=(answer, other), positions=[int(qpos[0])], heads=True, experts=True)
print("sum of parts", dec.values.sum(0)[0, 0].item(), " model value", dec.total[0, 0].item())
for label, value in dec.top(6):
    print(f"{label:>16s} {value:+.2f}")
plot.attribution_bars(dec, batch=0, position=0, top=12).show()
"""),
    md("""
## 5 · Look at the winning head

The sparse attention view of layer 1's strongest head: each query's window tokens, the
compressed entries it picked and the sink. The query (last row but one) puts its mass on the
entry holding the queried record.
"""),
    code("""
best = max(range(model.cfg.n_heads), key=lambda h: abs(heads[1, h].item()))
plot.attention_pattern(model, clean_cache, layer=1, head=best, batch=0).show()
"""),
    md("""
## 6 · Generating with hooks

`generate` decodes incrementally: the prompt goes through once (the prefill), then each new
token runs alone against a `V4KVCache` that holds what V4 looks back at — the last W−1 keys, each
compressor's unfinished window and the CSA overlap carry, the compressed entries and the
indexer's keys. Hooks are active at every step, so the indexer ablation of section 1 also breaks
generation. A decoding step sees the window, the top-k picks and the visible HCA entries only,
and gives the same logits as a full forward.
"""),
    code("""
prompt = tokens[:16, :-1]                      # up to the queried key: the answer comes next
out = model.generate(prompt, max_new_tokens=1, return_type="generation")
print("generated the answer:", (out.new_tokens[:, 0] == answer[:16]).float().mean().item())
ablated = model.generate(prompt, max_new_tokens=1, fwd_hooks=no_picks, return_type="generation")
print("... without the indexer's picks:", (ablated.new_tokens[:, 0] == answer[:16]).float().mean().item())

kv = v4lens.V4KVCache()
model(prompt[:, :-1], past_kv_cache=kv)        # prefill all but the last token
logits, step = model.run_with_cache(prompt[:, -1:], past_kv_cache=kv)   # one decoding step
print(kv)
print("step == full forward:", torch.allclose(logits[:, -1], model(prompt)[:, -1], atol=1e-5))
print("candidates of the step, layer 1 (window, then picked entries as N + w):", step["blocks.1.attn.hook_key_index"][0, 0].tolist())
"""),
]


# ============================================================================ 08 DSpark drafter
NB08 = [
    md("""
# 08 · How V4's drafter guesses: DSpark

V4-Flash-0731 and V4-Pro-0813 replace the April MTP block (one guess, two tokens ahead) with
**DSpark**, a drafter that guesses a whole block of K tokens at once; speculative decoding then
checks the block with one forward of the main model. After the main model has run positions
0 … p:

1. **taps** — the output streams of a few target layers (`dspark_target_layer_ids`), averaged
   over the n mHC streams (`dspark.hook_taps`), are projected and normalised into one context
   vector per position, `main_x` (`dspark.hook_main_x`);
2. **the draft block** — the anchor a (the main head's pick at p, i.e. the token at p+1) and
   K−1 noise tokens (`dspark_noise_token_id`), at positions p+1 … p+K;
3. **three stages** — ordinary V4 blocks, chained. Their attention lets every block query see the
   context keys of the last W main positions (the *context ring*, built from `main_x`) and all K
   block keys: inside the block it is **not causal**;
4. **the shared head** — the last stage's hc_head and norm, then the main model's unembedding:
   the base logits U [b, K, V];
5. **the Markov head** — a rank-r bigram correction walked left to right:
   y₀ = a, y_{k+1} = argmax(U_k + markov_w2 · markov_w1[y_k]), so each draft can follow the one before;
6. **the confidence head** — c_k = w_c · [h_k ; markov_w1[y_k]]; σ(c_k) is the predicted probability
   that draft k survives verification given that the earlier drafts did.

`tiny-dspark` is the `tiny` backbone (4 layers, the real V4 vocabulary and tokenizer) with such a
drafter, all seeded random weights. Be clear about what that means: its drafts are gibberish and the
main model almost never accepts them. This notebook shows the mechanics — every step above is a
hook — and what you would read on real weights; where a *working* drafter is needed, hooks fake one.
"""),
    code(SETUP),
    code("""
from contextlib import contextmanager

import pandas as pd

from v4lens.analysis import draft_calibration, draft_sources

model = v4lens.load("tiny-dspark")
cfg = model.cfg
K = cfg.dspark_block_size
print(f"backbone: {[cfg.layer_type(l) for l in range(cfg.n_layers)]}, window W = {cfg.window_size}")
print(f"DSpark: block of K = {K}, {cfg.n_mtp_layers} stages, taps of layers {cfg.dspark_target_layer_ids}, "
      f"Markov rank r = {cfg.dspark_markov_rank}")
print(f"noise token {cfg.dspark_noise_token_id}: {model.to_string([cfg.dspark_noise_token_id])!r}")
"""),
    md("""
## One draft

`model(tokens, draft=True)` returns the main logits and a `Draft`: `tokens` [b, K] (draft k guesses
position p+2+k), `logits` [b, K, V] (the Markov-corrected ℓ = U + Markov bias), `confidences` [b, K]
(raw logits c_k), and the two parts of ℓ, `base_logits` (U) and `markov_bias`. `draft_anchor=` sets
the anchor yourself instead of taking the main head's pick.
"""),
    code("""
prompt = "The quick brown fox jumps over the lazy dog and the"
tokens = model.to_tokens(prompt)
p = tokens.shape[1] - 1                    # the last position the main model ran
logits, draft = model(tokens, draft=True)
anchor = logits[0, -1].argmax()            # the token at p+1: the block's first input
print("tokens", tuple(draft.tokens.shape), " logits", tuple(draft.logits.shape),
      " confidences", tuple(draft.confidences.shape))

def words(ids):
    return model.to_str_tokens(ids, prepend_bos=False)

sigma = draft.confidences[0].sigmoid()
pd.DataFrame({"position": [p + 1] + [p + 2 + k for k in range(K)],
              "token": words(torch.cat([anchor[None], draft.tokens[0]])),
              "σ(c)": [None] + sigma.tolist(),
              "predicted survival Π σ": [None] + sigma.cumprod(0).tolist()},
             index=["anchor (main head)"] + [f"draft {k + 1}" for k in range(K)]).round(4)
"""),
    md("""
The random confidence head outputs c ≈ 0, so σ ≈ 0.5 for every draft and the predicted survival of
the whole prefix halves with each step. A trained head is what makes the numbers useful: high on
easy continuations (code, a repeated span), dropping where the text can branch.

## Taps and the context ring

The stages never see the main model's tokens, only `main_x`. A tap is literally the mean over the
n streams of a target layer's `hook_streams_post`; each stage turns the last W context vectors into
its own keys (`attn.hook_context_kv`).
"""),
    code("""
_, cache = model.run_with_cache(tokens, draft=True)
taps, main_x = cache["dspark.hook_taps"], cache["dspark.hook_main_x"]
print("taps", tuple(taps.shape), "(b, p, T target layers, d) → main_x", tuple(main_x.shape), "(b, p, d)")
for t, layer in enumerate(cfg.dspark_target_layer_ids):
    same = torch.allclose(taps[:, :, t], cache[f"blocks.{layer}.hook_streams_post"].mean(2))
    print(f"  tap {t} == blocks.{layer}.hook_streams_post averaged over the {cfg.hc_mult} streams: {same}")
print("stage 0: context keys", tuple(cache["dspark.stages.0.attn.hook_context_kv"].shape),
      "+ block keys", tuple(cache["dspark.stages.0.attn.hook_kv"].shape), "(b, keys, c)")
"""),
    md("""
`attn.hook_key_index` [b, K, L+K] names every key column by absolute position: main positions
p−L+1 … p, then the block p+1 … p+K — the same row for every block query. `plot.draft_attention`
draws a stage's pattern (here the mean over heads); the dotted line separates the context ring from
the block. (`plot.attention_pattern` draws main-model blocks, whose queries are the prompt.)
"""),
    code("""
plot.draft_attention(model, cache, stage=0).show()
index = cache["dspark.stages.0.attn.hook_key_index"][0, 0].tolist()   # [L+K] absolute positions
pattern = cache["dspark.stages.0.attn.hook_pattern"][0].mean(0)        # [K queries, L+K keys]
L = len(index) - K
print(f"the first block query (the anchor, position {p + 1}) puts {pattern[0, L + 1:].sum():.3f} of its "
      f"attention on the later block keys {p + 2}..{p + K}: not causal")
"""),
    md("""
The stages are score-routed MoE blocks like the main model's learned layers; their routing is in
the cache as usual (`dspark.stages.{s}.mlp.hook_expert_ids`), one row per block position. The noise
positions enter with the same embedding and differ only through attention (their RoPE positions);
at random init that is not enough to route them apart:
"""),
    code("""
experts = {f"stage {s}": cache[f"dspark.stages.{s}.mlp.hook_expert_ids"][0].tolist() for s in range(cfg.n_mtp_layers)}
pd.DataFrame(experts, index=[f"{j}·{'anchor' if j == p + 1 else 'noise'}" for j in index[-K:]])
"""),
    md("""
## Stages vs the Markov head

Each drafted token's logit ℓ_k[y] = U_k[y] + Markov bias[y]. `draft_sources` splits it and flags the
drafts the Markov bias *decided* (the stages alone, argmax U_k, would have picked another token);
`plot.draft_sources_bars` draws the split, ★ on those drafts.
"""),
    code("""
src = draft_sources(draft)
pd.DataFrame({"draft": words(draft.tokens[0]), "stages alone": words(src.stage_choice[0]),
              "U[y]": src.stage_logit[0].tolist(), "Markov bias[y]": src.markov_logit[0].tolist(),
              "Markov decided": src.markov_decided[0].tolist()}, index=[f"draft {k + 1}" for k in range(K)]).round(4)
"""),
    code("""
plot.draft_sources_bars(model, draft).show()
"""),
    md("""
At random init the Markov bias is a few thousandths of a logit: it decides a draft only where the
stages' top two tokens are nearly tied. To see a strong Markov head, scale `markov_w2` (its output
side) for one forward and restore it. Stronger bigram steering changes most picks — ★ almost
everywhere.

(A hook on `dspark.hook_markov_bias` is *not* the way to do this: that hook fires after the walk
has picked the drafts, so it changes the returned `Draft.logits` only — the drafts stay, and are
then no longer the argmax of the logits returned with them.)
"""),
    code("""
@contextmanager
def stronger_markov(model, factor):
    \"\"\"Scale the Markov head's markov_w2 inside the context; the original weights come back afterwards.\"\"\"
    w2 = model.dspark.markov_w2
    saved = w2.clone()
    w2.mul_(factor)
    try:
        yield
    finally:
        w2.copy_(saved)

with stronger_markov(model, 100):
    _, strong = model(tokens, draft=True)
assert torch.equal(model(tokens, draft=True)[1].tokens, draft.tokens)  # restored
print("drafts, Markov ×100:", words(strong.tokens[0]))
print("Markov decided:     ", draft_sources(strong).markov_decided[0].tolist())
plot.draft_sources_bars(model, strong).show()
"""),
    md("""
## Editing a draft

`dspark.hook_drafts` [b, K] holds the walk's picks. A changed entry is *forced*: the walk restarts
from it, so the Markov bias of the next step (and the confidences, which read markov_w1[y_k]) follow
the forced token. Force draft 1 to " cat" — with the weak random Markov head only the next
confidence moves; with the ×100 head the rest of the block re-walks. The main model's logits never
change: DSpark runs after the main head.
"""),
    code("""
cat = model.to_single_token(" cat")

def force_first(drafts, hook):
    drafts = drafts.clone()  # [b, K]: a new tensor, never edit in place
    drafts[:, 0] = cat
    return drafts

force = [("dspark.hook_drafts", force_first)]
edited_logits, forced = model.run_with_hooks(tokens, draft=True, fwd_hooks=force)
with stronger_markov(model, 100):
    _, strong_forced = model.run_with_hooks(tokens, draft=True, fwd_hooks=force)
print("main logits unchanged:", torch.equal(edited_logits, logits))
pd.DataFrame({"drafted": words(draft.tokens[0]), "draft 1 forced": words(forced.tokens[0]),
              "σ(c)": draft.confidences[0].sigmoid().tolist(),
              "σ(c), forced": forced.confidences[0].sigmoid().tolist(),
              "Markov ×100": words(strong.tokens[0]), "Markov ×100, forced": words(strong_forced.tokens[0])},
             index=[f"draft {k + 1}" for k in range(K)]).round(4)
"""),
    md("""
## Speculative decoding

`model.generate(prompt, speculative=True)` decodes in rounds. The cache holds positions 0 … p and x,
the token at p+1, is chosen: DSpark drafts y₁ … y_K from the cache's context ring (no main-model
forward), one forward over [x, y₁ … y_K] gives the main model's picks after each, and greedy
decoding keeps drafts while they equal those picks. The round emits the kept drafts plus the main
model's next token; if drafts were rejected the cache is rolled back and the kept tokens re-run.
The output is exactly plain greedy decoding's; only the number of forwards changes.
"""),
    code("""
N = 40
plain = model.generate(prompt, max_new_tokens=N, return_type="generation")
spec = model.generate(prompt, max_new_tokens=N, speculative=True, return_type="generation")
print("same tokens as plain greedy:", torch.equal(spec.tokens, plain.tokens), "|", repr(plain.text[0][:60]))
print(f"forwards: plain {plain.forwards}, speculative {spec.forwards}; draft acceptance {spec.draft_acceptance:.2f}")

def rounds_table(out, n=5):
    return pd.DataFrame([{"verified": r.verified, "accepted": int(r.accepted[0]), "tokens emitted": r.kept + 1,
                          "drafts": repr(model.to_string(r.drafts[0])),
                          "σ(c)": [round(s, 2) for s in r.confidences[0].sigmoid().tolist()]}
                         for r in out.rounds[:n]])

rounds_table(spec)
"""),
    md("""
The random drafter is never right: every round verifies 5 drafts, keeps none, and re-runs x to drop
them from the cache — about two forwards per token, worse than plain decoding. Everything depends on
the guesses, so make the drafter right with hooks: plain greedy already gave the continuation, a hook
on stage 0's `attn.hook_key_index` reads which position the round drafts for (the block's first key
is p+1), and a hook on `dspark.hook_drafts` writes the true tokens in. Hooks passed to `generate`
are active in every drafting pass and forward.
"""),
    code("""
truth = plain.tokens[0]  # the prompt and its greedy continuation
where = {}

def block_start(index, hook):  # [b, K, L+K] absolute positions: observe only
    where["p"] = int(index[0, 0, -K]) - 1

def oracle(drafts, hook):  # [b, K]: draft k guesses position p+2+k
    right = truth[where["p"] + 2: where["p"] + 2 + K]
    drafts = drafts.clone()
    drafts[0, :len(right)] = right  # past the end of the budget nothing is verified
    return drafts

oracle_hooks = [("dspark.stages.0.attn.hook_key_index", block_start), ("dspark.hook_drafts", oracle)]
right = model.generate(prompt, max_new_tokens=N, speculative=True, fwd_hooks=oracle_hooks, return_type="generation")
print("same tokens as plain greedy:", torch.equal(right.tokens, plain.tokens))
print(f"forwards: {right.forwards} for {N} tokens ({N / right.forwards:.1f} tokens per forward); "
      f"draft acceptance {right.draft_acceptance:.2f}")
rounds_table(right)
"""),
    md("""
With every draft right a round emits K+1 = 6 tokens for one forward. (Speculative *sampling*,
`temperature=` with `seed=`, is lossless too: drafts are kept with probability min(1, p/q) and its
tokens are distributed as the main model's. Beware of reading its acceptance rate on random weights:
both distributions are nearly uniform, p/q ≈ 1, so gibberish drafts are often "accepted".)
"""),
    code("""
sampled = model.generate(prompt, max_new_tokens=N, speculative=True, temperature=1.0, seed=0, return_type="generation")
print(f"sampled: acceptance {sampled.draft_acceptance:.2f}, {sampled.forwards} forwards")
"""),
    md("""
## Is the confidence head calibrated?

`draft_calibration(out)` compares, per draft position (0 = draft 1), the observed survival (this
draft and all before it kept) with the predicted Π σ(c_j), and the rate at which a draft is kept
once the earlier ones were with the mean σ(c). For the random drafter the head is over-confident:
it predicts 0.5, 0.25, … and nothing survives.
"""),
    code("""
pd.DataFrame(draft_calibration(spec).rows()).round(3)
"""),
    md("""
A drafter that is right *some* of the time gives a more telling picture. The noisy oracle below
writes each true token with probability 0.8 and keeps the drafter's own guess otherwise; the head
still predicts ≈ 0.5 per draft, so now it is under-confident. `plot.draft_calibration_plot` shows
both sides: the bars per position (observed vs predicted survival) and the reliability curve over
bins of the prediction. On real weights this is the figure to check: calibrated means bars of equal
height and points on the diagonal.
"""),
    code("""
coin = torch.Generator().manual_seed(0)

def noisy_oracle(drafts, hook):
    right = truth[where["p"] + 2: where["p"] + 2 + K]
    lucky = torch.rand(len(right), generator=coin) < 0.8
    drafts = drafts.clone()
    drafts[0, :len(right)] = torch.where(lucky, right, drafts[0, :len(right)])
    return drafts

noisy_hooks = [("dspark.stages.0.attn.hook_key_index", block_start), ("dspark.hook_drafts", noisy_oracle)]
noisy = model.generate(prompt, max_new_tokens=N, speculative=True, fwd_hooks=noisy_hooks, return_type="generation")
print(f"{len(noisy.rounds)} rounds, {noisy.forwards} forwards, draft acceptance {noisy.draft_acceptance:.2f}")
plot.draft_calibration_plot(noisy).show()
"""),
    md("""
## Verifying only confident drafts: `draft_threshold`

With `draft_threshold=t` a round verifies drafts only while their predicted survival Π σ(c_j)
stays ≥ t. The confidence decides how many drafts are *checked*, never whether one is accepted, so
the tokens stay plain greedy's. On this drafter σ ≈ 0.5: t = 0.4 checks one draft per round (shorter
forwards, but every rejection still costs a re-run), t = 0.6 none — then each round is a plain
decoding step and the wasted verify-and-re-run forwards are gone. With a calibrated head the
threshold trades positions checked against drafts accepted.
"""),
    code("""
rows = []
for t in (None, 0.4, 0.6):
    out = model.generate(prompt, max_new_tokens=N, speculative=True, draft_threshold=t, return_type="generation")
    rows.append({"draft_threshold": "none: all K" if t is None else t, "rounds": len(out.rounds),
                 "drafts verified": sum(r.verified for r in out.rounds), "forwards": out.forwards,
                 "same tokens as plain greedy": torch.equal(out.tokens, plain.tokens)})
pd.DataFrame(rows)
"""),
]


# ============================================================================ 09 probing and SAEs
NB09 = [
    md("""
# 09 · Probing and SAEs on V4 streams

A V4 residual is **four streams** mixed by mHC, not one vector. This notebook runs the workflow of
probe and sparse-autoencoder research on it, end to end, with the trained `tiny-recall` (key→value
recall; notebook 05 finds its circuit):

1. **Bulk collection**: `v4lens.activations.collect` runs a dataset through the model in
   length-bucketed, right-padded batches and appends the chosen hooks at the chosen positions to a
   resumable store on disk, read back as a torch `Dataset` (docs/activations.md).
2. **A linear probe per stream and layer**: where does the answer become readable?
3. **A sparse autoencoder** on the four streams after block 1 (a minimal one, written here; SAELens
   works too: docs/saelens.md).
4. **Splice it back** with a hook: does the model still answer from the SAE's reconstruction?
"""),
    code(SETUP),
    code("""
import v4lens.activations as acts
from v4lens.tasks import recall_batch, task_accuracy, VALUE_IDS

model = v4lens.load("tiny-recall")
print(model.cfg.n_layers, "layers,", model.cfg.hc_mult, "streams of", model.cfg.d_model)
batch = recall_batch(512, generator=torch.Generator().manual_seed(0))
tokens, qpos, answer = batch["tokens"], batch["query_pos"], batch["answer"]
print(model.to_string(tokens[0]))
print("accuracy:", task_accuracy(model, batch))
"""),
    md("""
## 1 · Collect the streams at the query

Each prompt stops at the query key, so its last token is where the model must produce the value.
`positions="last"` keeps that position only; the store holds, per row, the four streams after
every block. Running the same call again after a crash would skip the rows already stored.
"""),
    code("""
OUT = Path(os.environ.get("V4LENS_NOTEBOOK_OUT", "figures"))  # the tests point this at a temporary folder
prompts = [row[: int(q) + 1] for row, q in zip(tokens, qpos)]
hooks = [f"blocks.{l}.hook_streams_post" for l in range(model.cfg.n_layers)]
store = acts.collect(model, prompts, hooks, OUT / "acts_recall", positions="last", batch_size=256,
                     overwrite=True, progress=False)
print(len(store), "rows;", {h: tuple(s) for h, s in store.hook_shapes.items()})
full = next(iter(torch.utils.data.DataLoader(store, batch_size=len(store))))  # small enough to hold
y = answer[full["row"]] - VALUE_IDS.start   # which of the 16 values each row must answer
"""),
    md("""
## 2 · A linear probe per stream

A logistic-regression probe on each stream alone (trained on 384 rows, tested on 128): after block
0 the answer is nowhere (chance is 1/16); after block 1 — the CSA layer whose indexer fetches the
queried record — every stream carries it.
"""),
    code("""
def probe_accuracy(x, y, n_train=384, steps=150):
    x = (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-6)
    W = torch.zeros(x.shape[1], 16, requires_grad=True)
    b = torch.zeros(16, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(x[:n_train] @ W + b, y[:n_train])
            opt.zero_grad(); loss.backward(); opt.step()
    return float(((x[n_train:] @ W + b).argmax(-1) == y[n_train:]).float().mean())

torch.manual_seed(0)
table = {h: [probe_accuracy(full[h][:, s].float(), y) for s in range(model.cfg.hc_mult)] for h in hooks}
for h, accs in table.items():
    print(f"{h:28s}", "  ".join(f"stream {s}: {a:.2f}" for s, a in enumerate(accs)))
"""),
    md("""
## 3 · A sparse autoencoder on the streams after block 1

The input is the four streams flattened (`[n·d]`); 512 features, ReLU, an L1 penalty. The fraction
of variance unexplained (FVU) and the mean number of active features (L0) say how well and how
sparsely it reconstructs.
"""),
    code("""
H = "blocks.1.hook_streams_post"
X = full[H].flatten(1).float()   # [rows, n*d]

class SAE(torch.nn.Module):
    def __init__(self, d, m, mean):
        super().__init__()
        self.enc, self.dec = torch.nn.Linear(d, m), torch.nn.Linear(m, d)
        with torch.no_grad():
            self.dec.weight.copy_(self.enc.weight.T)
            self.dec.bias.copy_(mean)
    def encode(self, x):
        return torch.relu(self.enc(x - self.dec.bias))
    def forward(self, x):
        return self.dec(self.encode(x))

torch.manual_seed(0)
sae, scale = SAE(X.shape[1], 512, X.mean(0)), X.std()
opt = torch.optim.Adam(sae.parameters(), lr=2e-3)
with torch.enable_grad():
    for step in range(250):
        xb = X[torch.randint(0, len(X), (256,))]
        f = sae.encode(xb)
        loss = (sae.dec(f) - xb).pow(2).mean() / scale**2 + 3e-3 * f.abs().sum(-1).mean() / scale
        opt.zero_grad(); loss.backward(); opt.step()
F = sae.encode(X)
fvu = float((sae(X) - X).pow(2).sum() / (X - X.mean(0)).pow(2).sum())
print(f"FVU {fvu:.4f}, L0 {float((F > 0).float().sum(-1).mean()):.2f} active features per row")
top = torch.stack([F[y == v].mean(0) for v in range(16)]).argmax(1)   # the feature most active per value
print("the most active feature for each answer value:", top.tolist())
"""),
    md("""
## 4 · Splice the reconstruction back

A hook on `blocks.1.hook_streams_post` replaces the four streams at each query by the SAE's
reconstruction; everything downstream (block 2, the mHC head, the logits) runs on it. If the
features carry what the model uses, accuracy stays; replacing the streams by their mean instead
removes the answer.
"""),
    code("""
rows = torch.arange(len(tokens))

def splice(streams, hook):   # [b, S, n, d]
    at = streams[rows, qpos]
    streams[rows, qpos] = sae(at.flatten(1).float()).view_as(at).to(streams.dtype)
    return streams

def mean_streams(streams, hook):
    streams[rows, qpos] = X.mean(0).view_as(streams[0, 0]).to(streams.dtype)
    return streams

def accuracy(logits):
    return float((logits[rows, qpos].argmax(-1) == answer).float().mean())

print("clean:", accuracy(model(tokens)))
print("SAE reconstruction spliced in:", accuracy(model.run_with_hooks(tokens, fwd_hooks=[(H, splice)])))
print("streams replaced by their mean:", accuracy(model.run_with_hooks(tokens, fwd_hooks=[(H, mean_streams)])))
"""),
]


# ============================================================================ 10 agentic transcripts
NB10 = [
    md("""
# 10 · Agentic transcripts: segments, indexer picks and experts

Agentic transcripts — a system prompt with tools, a question, interleaved reasoning, tool calls,
tool results, an answer — are what a lot of interpretability work on V4 now studies. `v4lens.chat`
renders DeepSeek-V4's prompt format byte for byte and labels **every token** with the part of the
conversation it belongs to: the system prompt, the tools block, each user turn, each assistant
turn's thinking, content and tool calls (tool name, each argument), each tool result
(docs/chat.md). Statistics, figures, caches and the activation store all take that labelling:

1. render a multi-turn transcript and look at its segments table;
2. one forward, then figures with their token axes coloured by part;
3. per part: the attention-sink mass, where the Lightning Indexer's picks land, which experts run;
4. select positions by part: the streams at every tool-result token, in a cache and on disk.

The model is `mini-3b` (3.2B parameters in bf16, ~8 GB of memory at peak; about 2 minutes on a
2-core CPU, most of it one 1,450-token forward). Set `V4LENS_NOTEBOOK_MODEL=tiny` to run the same
notebook in seconds (same tokenizer and vocabulary, 4 layers): the tests do. Both are seeded random scaffolds, so the numbers below are **baselines**,
what the architecture does before any learning: each table says what a trained checkpoint
(`v4lens.load("path/to/mini-3b-from-flash")`) would be compared against.
"""),
    code(SETUP),
    code("""
import time

from v4lens import chat

MODEL = os.environ.get("V4LENS_NOTEBOOK_MODEL", "mini-3b")  # the tests set "tiny"
model = v4lens.load(MODEL, dtype="bf16" if MODEL == "mini-3b" else None)
cfg = model.cfg
csa = [l for l in range(cfg.n_layers) if cfg.layer_type(l) == "csa"]
print(f"{MODEL}: {cfg.n_layers} layers; CSA layers {csa}; the indexer keeps {cfg.index_topk} compressed entries "
      f"(4 tokens each); {cfg.n_routed_experts} experts, top-{cfg.n_activated_experts}; "
      f"hash-routed layers {list(range(cfg.n_hash_layers))}")
"""),
    md("""
## 1 · A transcript

Three tools, one question, two parallel searches, a page read, a calculation, an answer, then a
follow-up question. Tool arguments are JSON strings, as OpenAI-style clients send them.
"""),
    code(r'''
import json

def tool(name, description, argument):
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {argument: {"type": "string"}}, "required": [argument]}}}

def call(id, name, **arguments):
    return {"id": id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}

tools = [tool("search", "Search the web; returns the top results as title, url and snippet", "query"),
         tool("open_page", "Fetch a web page and return its main text", "url"),
         tool("calculator", "Evaluate an arithmetic expression", "expression")]
eiffel = json.dumps([
    {"title": "Eiffel Tower - Official website", "url": "https://www.toureiffel.paris/en/the-monument/key-figures",
     "snippet": "The Eiffel Tower is 330 metres tall including its antennas. Built for the 1889 World's Fair, it "
                "was the tallest structure in the world until 1930."},
    {"title": "Eiffel Tower | History, Height, & Facts", "url": "https://www.britannica.com/topic/Eiffel-Tower",
     "snippet": "Parisian landmark that is also a technological masterpiece in building-construction history. "
                "Its height is 300 metres without the antenna."},
    {"title": "How tall is the Eiffel Tower? It grows in summer", "url": "https://example.org/eiffel-heat",
     "snippet": "Thermal expansion of the iron makes the tower up to 15 centimetres taller on hot days."}], indent=1)
skytree = json.dumps([
    {"title": "Tokyo Skytree - Wikipedia", "url": "https://en.wikipedia.org/wiki/Tokyo_Skytree",
     "snippet": "A broadcasting and observation tower in Sumida, Tokyo. It became the tallest structure in Japan "
                "in 2010 and reached its full height of 634.0 metres in March 2011."},
    {"title": "TOKYO SKYTREE | Facts", "url": "https://www.tokyo-skytree.jp/en/about/",
     "snippet": "Height 634 m. The number was chosen because 6 (mu), 3 (sa) and 4 (shi) read as Musashi, the old "
                "name of the region."}], indent=1)
page = "\n\n".join([
    "Tokyo Skytree",
    "Tokyo Skytree is a broadcasting and observation tower in Sumida, Tokyo. It became the tallest structure in "
    "Japan in 2010 and reached its full height of 634.0 metres (2,080 ft) in March 2011, making it the tallest "
    "tower in the world, displacing the Canton Tower, and the second tallest structure in the world after the "
    "Burj Khalifa (829.8 m).",
    "Design. The design was published on 24 November 2006. The base of the tower has a structure similar to a "
    "tripod; from a height of about 350 m and above, the tower's structure is cylindrical to offer panoramic "
    "views of the river and the city. There are observatories at 350 m, with a capacity of up to 2,000 people, "
    "and 450 m, with a capacity of 900 people.",
    "Construction. Construction began on 14 July 2008. The tower reached 634 m on 18 March 2011, and the "
    "broadcasting antenna was completed the same month. The tower opened to the public on 22 May 2012.",
    "Broadcasting. The tower is the primary television and radio broadcast site for the Kanto region; the older "
    "Tokyo Tower no longer gives complete digital terrestrial coverage because high-rise buildings surround it."])

messages = [
    {"role": "system", "content": "You are a research agent. Check every fact with the tools before you answer, "
                                  "and give the numbers you used."},
    {"role": "user", "content": "Which is taller, the Eiffel Tower or the Tokyo Skytree, and by how many feet?"},
    {"role": "assistant", "content": "",
     "reasoning_content": "I need both heights from reliable sources. Search for each tower separately.",
     "tool_calls": [call("c1", "search", query="Eiffel Tower height"),
                    call("c2", "search", query="Tokyo Skytree height")]},
    {"role": "tool", "tool_call_id": "c1", "content": eiffel},
    {"role": "tool", "tool_call_id": "c2", "content": skytree},
    {"role": "assistant", "content": "",
     "reasoning_content": "The Eiffel Tower is 330 m with antennas (300 m without). The Skytree snippets say "
                          "634 m; confirm on the full page before computing.",
     "tool_calls": [call("c3", "open_page", url="https://en.wikipedia.org/wiki/Tokyo_Skytree")]},
    {"role": "tool", "tool_call_id": "c3", "content": page},
    {"role": "assistant", "content": "",
     "reasoning_content": "Skytree 634.0 m, Eiffel 330 m. Difference 304 m; one metre is 3.28084 ft.",
     "tool_calls": [call("c4", "calculator", expression="(634 - 330) * 3.28084")]},
    {"role": "tool", "tool_call_id": "c4", "content": "997.37536"},
    {"role": "assistant", "reasoning_content": "304 m is about 997 ft. Give both heights and the difference.",
     "content": "The Tokyo Skytree is taller: 634 m against the Eiffel Tower's 330 m (with antennas), a "
                "difference of 304 m, about 997 feet."},
    {"role": "user", "content": "And how much taller than the Skytree is the Burj Khalifa?"},
]
'''),
    md("""
## 2 · Render and label

`chat.segments` renders the conversation as `chat.render` does (thinking mode here: with tools in
play every turn keeps its reasoning) and tokenizes it: one row per span of tokens, tiling the
prompt. `part` says what a span is; `turn` counts the assistant replies before it; `tool` and
`argument` name the call a span belongs to. The format's own markup (role tokens, DSML tags,
`<tool_result>`) is `marker`.
"""),
    code("""
seg = chat.segments(messages, model, thinking=True, tools=tools)
print(seg)
table = seg.to_pandas()
table["tokens"] = table.stop - table.start
table.groupby("part", sort=False).tokens.sum().to_frame().T
"""),
    code("""
for r in seg:  # the conversation without markup and tool schemas, span by span
    if r.part not in ("marker", "tools", "tool_schema"):
        print(f"{r.start:5d}–{r.stop:<5d} turn {r.turn}  {r.part:13s} {r.tool or '':10s} {r.text[:58]!r}")
"""),
    md("""
Filters select tokens: `seg.mask(kind, **fields)` is a bool `[S]`, `seg.positions(...)` the
indices, `seg.labels(field)` one label per token.
"""),
    code("""
at = seg.positions("argument", tool="calculator")
print("the calculator's argument:", repr("".join(seg.str_tokens[p] for p in at)), "at", at.tolist())
print("tool-result tokens:", int(seg.mask("tool_result").sum()), "of", seg.n_tokens)
"""),
    md("""
## 3 · One forward, caching what we read

The per-segment statistics declare the hooks they read (`stats.names_filter`), the figures below
need the routers' weights and scores and the indexer's scores; nothing else is kept, and
`return_type=None` skips the logits.
"""),
    code("""
learned = next(l for l in range(cfg.n_layers) if not cfg.is_hash_layer(l))  # the first learned router
reads = stats.names_filter("sink_mass_by_segment", "indexer_picks_by_segment", "expert_load_by_segment")
router = plot.style.hook_filter("mlp.hook_expert_weights", "mlp.hook_router_scores", blocks=[f"blocks.{learned}"])
scores = plot.style.hook_filter("attn.indexer.hook_scores", blocks=[f"blocks.{csa[-1]}"])
t0 = time.perf_counter()
_, cache = model.run_with_cache(seg.tokens(), names_filter=lambda n: reads(n) or router(n) or scores(n),
                                return_type=None)
print(f"{seg.n_tokens} tokens: {len(cache)} tensors cached in {time.perf_counter() - t0:.1f} s")
"""),
    md("""
## 4 · Figures coloured by segment

`segments=seg` colours a figure's token labels by part, with a legend (`segment_field="role"`,
`"turn"`, ... for other columns). First the router of a learned layer, from the end of the
`open_page` call into the page it returned: each row is a token, each column an expert.
"""),
    code("""
page_start = seg.select("tool_result", tool="open_page")[0].start
plot.router_heatmap(model, cache, learned, segments=seg, focus=page_start + 24, max_positions=48).show()
"""),
    md("""
The indexer's scores for the tokens of the final answer (rows) over the compressed entries
(columns), the picks circled. Each entry is coloured by the part most of its four tokens are in,
so a column of circles in the tool-result colour is the answer reading a tool result.
"""),
    code("""
answer_end = int(seg.positions("content")[-1])
plot.indexer_scores(model, cache, csa[-1], segments=seg, focus=answer_end, max_positions=16, max_entries=64).show()
"""),
    md("""
## 5 · Sink mass per part

`stats.sink_mass_by_segment`: the attention-sink probability (the mass no candidate takes), mean
over heads and over the query tokens of each part, per layer. Any per-token value averages the
same way with `stats.per_segment(values, seg)`. On random weights the sink's share is about one
candidate's: largest in the system prompt, whose queries have the fewest candidates.
"""),
    code("""
def heatmap(table, title, **colours):
    fig = plot.style.figure(title, height=max(360, 22 * len(table) + 200), xaxis_title=table.columns.name,
                            yaxis_title=table.index.name)
    fig.add_heatmap(z=table.to_numpy(), x=[str(c) for c in table.columns], y=[str(i) for i in table.index],
                    text=table.round(2).astype(str).to_numpy(), texttemplate="%{text}", **colours)
    fig.update_yaxes(autorange="reversed", type="category")
    return fig

order = stats.token_groups(seg)[0]  # the parts in conversation order
sink = stats.sink_mass_by_segment(model, cache, seg)
heatmap(sink.pivot(index="layer", columns="segment", values="sink_mass")[order],
        "Sink mass per layer and part", colorscale="Viridis").show()
"""),
    md("""
## 6 · Where the indexer's picks land

`stats.indexer_picks_by_segment`: for each CSA layer and each part the queries are in, the share of
their picks (compressed entries) that falls in each part. `baseline` is what picking uniformly
among the entries a query can see would give — the share a part's size and position explain. Only
queries that see more entries than the indexer keeps are a real choice (`selective`); before that
the picks are every visible entry and `share = baseline`.

`field` can be a function of a span: here the tool results are told apart by tool, so we can ask
which result the final answer reads.
"""),
    code("""
def part_or_tool(span):
    return f"result: {span.tool}" if span.part == "tool_result" else span.part

picks = stats.indexer_picks_by_segment(model, cache, seg, field=part_or_tool)
answer = picks[picks["query"] == "content"]  # the final answer's tokens as queries
print(f"{answer.queries.iloc[0]} answer tokens, {answer.selective.iloc[0]} of them choosing")
pooled = answer.groupby("segment", sort=False)[["share", "baseline"]].mean()  # mean over the CSA layers
fig = plot.style.figure("What the final answer's indexer picks (mean over CSA layers)", xaxis_title="picked part",
                        yaxis_title="share of picks", barmode="group")
fig.add_bar(x=pooled.index, y=pooled.share, name="picks")
fig.add_bar(x=pooled.index, y=pooled.baseline, name="uniform among visible entries")
fig.show()
"""),
    md("""
On random weights the picks follow the baseline: the tool results take most of them because they
are most of the context, not because the answer reads them (on mini-3b within about 0.02 per part
and layer; tiny's top-3 indexer is noisier). Per layer, the picks' share minus the baseline —
positive where the indexer reads a part more than its size and position explain. In a trained
model this table is where retrieval from one tool result, from the question or from the model's
own reasoning would show.
"""),
    code("""
excess = answer.assign(excess=answer.share - answer.baseline)
groups = stats.token_groups(seg, part_or_tool)[0]
heatmap(excess.pivot(index="layer", columns="segment", values="excess")[groups],
        "Final answer's picks: share minus baseline", colorscale="RdBu_r", zmid=0).show()
"""),
    md("""
## 7 · Expert load per part

`stats.expert_load_by_segment`: per layer and part, how many of the part's tokens each expert
takes (`frac`: a share of the part's assignments; `lift`: that share over the expert's share of
the whole conversation). One learned layer as a part × expert table:
"""),
    code("""
load = stats.expert_load_by_segment(model, cache, seg)
heatmap(load[load.layer == learned].pivot(index="segment", columns="expert", values="frac").loc[order],
        f"Expert share per part · layer {learned}", colorscale="Viridis").show()
"""),
    md("""
How far each part's expert mix is from the conversation's, per layer (total-variation distance,
0 = the same mix, 1 = disjoint experts). On random weights it mostly tracks a part's size: n tokens
make only n·k assignments, so the small parts (the system prompt, tool names, the reply openings)
differ by chance and the 647 tool-result tokens sit closest to the mix. On the hash layers, which
route by token id (`tid2eid`), a part made of the same few tokens again and again (the five
`<｜Assistant｜><think>` openings) lands on the same experts. A trained model's specialisation shows
as distances well above those of a part of the same size here.
"""),
    code("""
load["overall"] = (load.frac / load.lift).fillna(0)  # the expert's share over the whole conversation
tv = load.assign(gap=(load.frac - load.overall).abs()).groupby(["layer", "segment"], sort=False).gap.sum() / 2
heatmap(tv.unstack()[order], "Expert mix of each part vs the conversation (total variation)",
        colorscale="Viridis", zmin=0, zmax=1).show()
"""),
    md("""
## 8 · Selecting positions by segment

`seg.positions(...)` is a `pos_slice`: cache the streams at every tool-result token, and nothing
else, in one line (`stop_at_layer=2` runs blocks 0 and 1 only). For many transcripts,
`v4lens.activations.collect` stores the same positions on disk, one mask per row (the segments' ids
already start with BOS: rows are used as given).
"""),
    code("""
_, at_results = model.run_with_cache(seg.tokens(), pos_slice=seg.positions("tool_result"),
                                     names_filter=lambda n: n.endswith("hook_streams_post"), stop_at_layer=2)
print(at_results["blocks.1.hook_streams_post"].shape, "= [batch, tool-result tokens, streams, d_model]")
"""),
    code("""
import v4lens.activations as acts

OUT = Path(os.environ.get("V4LENS_NOTEBOOK_OUT", "figures"))  # the tests point this at a temporary folder
store = acts.collect(model, [seg.ids], ["blocks.1.hook_streams_post"], OUT / "acts_tool_results",
                     positions=[seg.mask("tool_result")], overwrite=True, progress=False)
rows = next(iter(torch.utils.data.DataLoader(store, batch_size=len(store))))
norms = rows["blocks.1.hook_streams_post"].float().norm(dim=-1).mean(-1)  # [tool-result tokens]
print(len(store), "positions stored; mean stream norm after block 1, per tool:")
stats.per_segment(norms, seg, "tool", positions=rows["position"]).dropna()
"""),
    md("""
The same code runs on a trained checkpoint. What to look for there: answer tokens whose picks
exceed the baseline on one tool result (the one the answer quotes), thinking tokens reading the
question, experts whose lift on tool results or on the DSML markup stands out on learned layers
— and, with `v4lens.patching`, whether removing those picks (`force_indexer_picks`) or those
experts (`v4lens.experts.forbid_expert_hooks`) changes the answer.
"""),
]


NOTEBOOKS = {
    "01_quickstart": NB01,
    "02_routing": NB02,
    "03_mhc": NB03,
    "04_sparse_attention": NB04,
    "05_recall_circuit": NB05,
    "06_exporting_figures": NB06,
    "07_mini3b_at_scale": NB07,
    "08_dspark_drafter": NB08,
    "09_probing_and_saes": NB09,
    "10_agentic_transcripts": NB10,
}


def build(name: str):
    nb = new_notebook(cells=NOTEBOOKS[name])
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name[:2]}-{i:02d}"  # stable ids: regenerating gives identical files
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    nbformat.validate(nb)
    return nb


def render(name: str) -> str:
    return nbformat.writes(build(name)) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 if a notebook is out of date")
    args = ap.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = HERE / f"{name}.ipynb"
        text = render(name)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
            print("wrote", path)
    if stale:
        print("out of date (run python notebooks/make_notebooks.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

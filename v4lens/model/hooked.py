"""`HookedV4`: the whole DeepSeek-V4 model on TransformerLens's hook machinery.

tokens -> embed -> copy into n streams -> blocks -> hc_head -> final RMSNorm -> fp32 head,
with logits for every position (each computed like the reference's fp32 last-position head)
and the MTP blocks on request.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedRootModule import HookedRootModule

from .allocator import tune_cpu_allocator
from .block import Block
from .config import V4Config
from .dspark import DSpark, context_vectors, dspark_args, run_dspark
from .guards import CheckedHookPoint, claim
from .head import fp32_logits
from .hyper_connections import HyperHead
from .inputs import check_token_range, forward_args, token_tensor
from .kv_cache import V4KVCache
from .loss import lm_cross_entropy
from .mtp import MTPBlock, run_mtp
from .norm import RMSNorm
from .padding import model_inputs
from .params import is_fp32_island, param
from .tl_compat import TransformerLensMethods

ReturnType = Literal["logits", "loss", "both"] | None


class HookedV4(TransformerLensMethods, HookedRootModule):
    """DeepSeek-V4 with a named `HookPoint` on every stream and routing decision (the catalogue: docs/hooks.md).

    Build it with `v4lens.load(...)`; `HookedV4(cfg)` alone leaves the weights uninitialised.
    `forward(input, return_type="logits")` takes a string, a list of strings or int64 tokens
    [b, p] / [p] and returns fp32 logits [b, p, d_vocab]; `mtp=True` also returns the MTP
    logits. `run_with_cache` returns a `V4ActivationCache`.
    """

    def __init__(self, cfg: V4Config, device=None, tokenizer=None):
        super().__init__()
        tune_cpu_allocator()  # large CPU temporaries reuse freed memory (v4lens.model.allocator)
        self.cfg = cfg
        D, V = cfg.d_model, cfg.d_vocab
        self.embed = nn.Module()
        self.embed.weight = param((V, D), cfg.dtype, device)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(Block(cfg, layer, device=device) for layer in range(cfg.n_layers))
        self.hc_head = HyperHead(cfg, device=device)
        self.ln_final = RMSNorm(D, cfg.norm_eps, device=device)
        self.head = nn.Module()
        # Stored in the model dtype (checkpoints hold it in bf16); the logits GEMM runs in fp32 as in the reference.
        self.head.weight = param((V, D), cfg.dtype, device)
        self.hook_logits = HookPoint()
        self.compiled_head = False  # set_compiled_head
        # on a DSpark config n_mtp_layers counts its stages: never build them as April MTP blocks
        n_mtp = cfg.n_mtp_layers if cfg.draft == "mtp" else 0
        self.mtp = nn.ModuleList(MTPBlock(cfg, i, device=device) for i in range(n_mtp))
        if cfg.draft == "dspark":
            self.dspark = DSpark(cfg, device=device)
        self._tokenizer = tokenizer
        # By name: `to_empty` (build_empty) and checkpoint loading replace the Parameter objects,
        # which drops the per-tensor `_v4_fp32` marker that fp32_param sets.
        self._fp32_islands = frozenset(n for n, p in self.named_parameters() if is_fp32_island(p))
        # every hook point checks what its hooks return: shape, dtype kind, device (v4lens.model.guards)
        for module in self.modules():
            if type(module) is HookPoint:
                module.__class__ = CheckedHookPoint
        self.setup()

    # ------------------------------------------------------------------ TL protocol
    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding [d_model, d_vocab] (fp32)."""
        return self.head.weight.T

    @property
    def W_E(self) -> torch.Tensor:
        return self.embed.weight

    def _token_ids(self, text: str, what: str = "text") -> list[int]:
        """One text -> its token ids, without BOS (`to_tokens` adds it: v4lens.model.padding.text_tokens)."""
        from ..tokenizer import check_text  # a lone surrogate: named with its position, not a tokenizer error

        check_text(text, what)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def to_str_tokens(self, input: str | torch.Tensor | Sequence[int], prepend_bos: bool = True) -> list:
        if isinstance(input, str):
            input = self.to_tokens(input, prepend_bos=prepend_bos)[0]
        if isinstance(input, torch.Tensor):
            if input.ndim == 2:
                return [self.to_str_tokens(row) for row in input]
            input = input.tolist()
        return [self.tokenizer.decode([i]) for i in input]

    def to_string(self, tokens: torch.Tensor | Sequence[int]) -> str | list[str]:
        if isinstance(tokens, torch.Tensor) and tokens.ndim == 2:
            return [self.tokenizer.decode(row.tolist()) for row in tokens]
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.tolist()
        if isinstance(tokens, int):  # a single token id (e.g. an argmax)
            tokens = [tokens]
        return self.tokenizer.decode(list(tokens))

    def to_single_token(self, string: str) -> int:
        ids = self.tokenizer(string, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{string!r} is {len(ids)} tokens, not one: {ids}")
        return ids[0]

    # ------------------------------------------------------------------ device / dtype
    def to(self, *args, **kwargs):
        """Like `nn.Module.to`, but fp32 islands stay fp32 and `cfg.device` / `cfg.dtype` follow."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"v4lens runs in float32 or bfloat16, not {dtype}")
        if dtype is not None:
            for name, p in self.named_parameters():
                if name not in self._fp32_islands and p.is_floating_point():
                    p.data = p.data.to(dtype)
            self.cfg.dtype = dtype
        if device is not None:
            for t in list(self.parameters()) + list(self.buffers()):
                t.data = t.data.to(device)
            self.cfg.device = torch.device(device)
        return self

    def cuda(self, device=None):
        return self.to(torch.device("cuda", device) if isinstance(device, int) else (device or "cuda"))

    def cpu(self):
        return self.to("cpu")

    def half(self):
        raise ValueError(
            "v4lens runs in float32 or bfloat16 (bf16 with the reference's fp32 islands); use .to(torch.bfloat16)"
        )

    def double(self):  # nn.Module.double would convert every tensor behind `to`'s back
        raise ValueError("v4lens runs in float32 or bfloat16, not float64; use .float() or .to(torch.bfloat16)")

    def type(self, dst_type):
        if not isinstance(dst_type, torch.dtype):
            raise TypeError(f"model.type takes a torch dtype (float32 or bfloat16), got {dst_type!r}; use .to(dtype)")
        return self.to(dst_type)

    def float(self):
        return self.to(torch.float32)

    def bfloat16(self):
        return self.to(torch.bfloat16)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input: str | Sequence[str] | torch.Tensor,
        return_type: ReturnType = "logits",
        mtp: bool = False,
        mtp_next_tokens: torch.Tensor | None = None,
        loss_per_token: bool = False,
        past_kv_cache: V4KVCache | None = None,
        stop_at_layer: int | None = None,
        logits_to_keep: int = 0,
        draft: bool = False,
        draft_anchor: torch.Tensor | int | None = None,
        prepend_bos: bool = True, padding_side: Literal["left", "right"] | None = None,
        attention_mask: torch.Tensor | None = None, start_at_layer: int | None = None, tokens: torch.Tensor | None = None,
    ):  # fmt: skip
        """Run the model.

        input: text, list of texts, or int64 tokens [b, p] / [p].
        return_type: "logits" (fp32 [b,p,V]), "loss" (mean next-token cross-entropy),
        "both" ((logits, loss)) or None (stop after the last block).
        mtp: also run the MTP blocks; the result becomes `(result, mtp_logits)` with
        mtp_logits a list of fp32 [b,p,V] (depth j at position t predicts token t+2+j).
        mtp_next_tokens: tokens [b, n] (1 <= n <= n_mtp_layers; only with mtp=True) to use after the
        last position instead of the greedy draft (the argmax of the previous head there).
        past_kv_cache: a `V4KVCache`; the input continues the sequence it holds and the cache
        advances (incremental decoding / chunked prefill: same logits and hooked values as one
        forward over the whole sequence; see `v4lens.model.kv_cache`).
        stop_at_layer: run blocks 0..stop_at_layer-1 only and return their output streams
        [b,p,n,d] (TransformerLens's option: cheap caching of early layers). An int in
        [-n_layers, n_layers]; negative counts from the end, as in TransformerLens (-1: all but the last).
        logits_to_keep: an int >= 0; if > 0, run the head (and its hooks) on the last that many
        positions only (transformers' option: a long prompt's [b, p, V] fp32 logits are 0.5 GB per 1k tokens).
        draft: run the DSpark drafter (DSpark models only) after the last position; the result becomes
        `(result, Draft)` (v4lens.model.dspark). draft_anchor: the token at the position after the last
        (int or int64 [b]) instead of the main head's argmax there. With past_kv_cache the context is the
        cache's ring (the last W positions of the whole sequence), filled by every chunk of a DSpark model.
        TransformerLens's options (v4lens.model.padding): prepend_bos and padding_side tokenize text;
        attention_mask [b, p] (1 = real token) or padding_side="left" on tokens (read off leading pads): each
        row's logits at its real positions equal that row alone. start_at_layer=l: `input` is the streams
        entering block l [b, p, n, d]; tokens [b, p]: their token ids (hash-routed blocks and the loss need them).
        """
        x = model_inputs(self, input, prepend_bos=prepend_bos, padding_side=padding_side, attention_mask=attention_mask,
                         start_at_layer=start_at_layer, tokens=tokens, stop_at_layer=stop_at_layer,
                         return_type=return_type, mtp=mtp, draft=draft, past_kv_cache=past_kv_cache)  # fmt: skip
        tokens = x.tokens
        draft_anchor = dspark_args(self.cfg, draft, mtp, draft_anchor, x.batch, x.device)
        if draft and stop_at_layer is not None:
            raise ValueError("stop_at_layer cannot be combined with draft=True (the drafter needs every layer)")
        stop_at_layer, logits_to_keep, mtp_next_tokens = forward_args(
            self.cfg, tokens, return_type, mtp, mtp_next_tokens, past_kv_cache, stop_at_layer, logits_to_keep
        )
        with contextlib.ExitStack() as stack:
            # one thread at a time where state is shared (hooks, a cache): v4lens.model.guards
            stack.enter_context(claim(self, "forward", exclusive=False))
            if past_kv_cache is not None:
                stack.enter_context(claim(past_kv_cache, "forward with past_kv_cache", exclusive=True))
                # a chunk that fails half-way (a hook raising in layer 5, say) must not leave layers 0-4 advanced
                stack.enter_context(past_kv_cache.transaction())
            out = self._forward(
                tokens, x.run_type(return_type), mtp=mtp, mtp_next_tokens=mtp_next_tokens, loss_per_token=loss_per_token,
                past_kv_cache=past_kv_cache, stop_at_layer=stop_at_layer, logits_to_keep=x.keep(logits_to_keep),
                draft=draft, draft_anchor=draft_anchor, streams=x.streams, start=x.start,
            )  # fmt: skip
            return x.finish(out, return_type, loss_per_token, logits_to_keep, stop_at_layer is not None)

    def _forward(self, tokens, return_type, *, mtp, mtp_next_tokens, loss_per_token, past_kv_cache, stop_at_layer,
                 logits_to_keep, draft=False, draft_anchor=None, streams=None, start=0):  # fmt: skip
        first = tokens if streams is None else streams  # [b, S] or [b, S, n, d]
        S = first.shape[1]
        if past_kv_cache is not None:
            positions = past_kv_cache.start(tokens, self)
            if mtp and past_kv_cache.length and past_kv_cache.mtp_length != past_kv_cache.length:
                raise ValueError("mtp=True with past_kv_cache needs every earlier chunk run with mtp=True too")
        else:
            positions = torch.arange(S, device=first.device)
        if streams is None:  # (start_at_layer passes the streams entering block `start`)
            embed = self.hook_embed(F.embedding(tokens, self.embed.weight))
            # a real copy (repeat, not expand), so hooks can edit hook_streams_pre in place
            streams = embed[:, :, None, :].repeat(1, 1, self.cfg.hc_mult, 1)
        # DSpark's taps: for a draft, and with a cache on every chunk (its context ring follows the sequence)
        ring = past_kv_cache is not None and self.cfg.draft == "dspark"
        targets, taps = (self.cfg.dspark_target_layer_ids if draft or ring else ()), {}
        for layer in range(start, self.cfg.n_layers if stop_at_layer is None else stop_at_layer):
            streams = self.blocks[layer](streams, positions, tokens, past_kv_cache)
            if layer in targets:  # DSpark reads these layers' output streams
                taps[layer] = streams
        if stop_at_layer is not None:
            return streams
        if return_type is None and not mtp and not draft:
            if ring:
                context_vectors(self, taps, past_kv_cache)
            if past_kv_cache is not None:
                past_kv_cache.length += S
            return None

        logits = self._unembed(streams[:, -logits_to_keep:] if logits_to_keep else streams)
        result = None
        if return_type == "logits":
            result = logits
        elif return_type is not None:
            loss = lm_cross_entropy(logits, tokens, per_token=loss_per_token, pad_token_id=self.cfg.pad_token_id)
            result = loss if return_type == "loss" else (logits, loss)
        mtp_logits = main_x = None
        if draft or ring:
            main_x = context_vectors(self, taps, past_kv_cache if ring else None)
        if mtp:
            mtp_logits = run_mtp(
                self, streams, tokens, logits, positions, mtp_next_tokens, past_kv_cache, logits_to_keep
            )
        if past_kv_cache is not None:
            past_kv_cache.length += S
            if mtp:
                past_kv_cache.mtp_length = past_kv_cache.length
        if draft:
            return result, run_dspark(self, main_x, logits, positions, draft_anchor, past_kv_cache)
        return (result, mtp_logits) if mtp else result

    def _unembed(self, streams: torch.Tensor) -> torch.Tensor:
        h = self.ln_final(self.hc_head(streams))
        return self.hook_logits(fp32_logits(h, self.head.weight, compiled=self.compiled_head))

    def set_compiled_head(self, enabled: bool = True) -> None:
        """Compute one position's fp32 logits (a decoding step's, the main and the MTP head) with a
        torch.compile'd kernel on CPU bf16 models: the same logits up to fp32 summation order, a mini-3b
        step 1.16x faster (1.23x on a CPU without native bf16, where the eager head's upcast costs more);
        the first step in a process compiles for 3-9 s (v4lens.model.head)."""
        if not isinstance(enabled, bool):
            raise TypeError(f"set_compiled_head takes True or False, got {enabled!r}")
        self.compiled_head = enabled

    # ------------------------------------------------------------------ input checks
    def _validate_tokens(self, input, prepend_bos: bool = True, padding_side=None) -> torch.Tensor:
        if isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str)):
            input = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        input = token_tensor(input, "input")  # lists of ints only: 1.9 or True is not a token id
        if input.ndim == 1:
            input = input[None]
        if input.ndim != 2:
            raise ValueError(f"tokens must be [batch, pos] or [pos], got shape {tuple(input.shape)}")
        if input.numel() == 0:
            raise ValueError(f"empty input: tokens of shape {tuple(input.shape)}")
        if input.device != self.device:
            raise ValueError(
                f"tokens are on {input.device} but the model is on {self.device}; move them with .to(model.device)"
            )
        input = input.long()
        check_token_range(input, self.cfg.d_vocab)
        return input

    # ------------------------------------------------------------------ caching
    def check_hook_names(self, names) -> None:
        """Raise a KeyError naming every unknown hook (with near matches) in `names`."""
        unknown = [n for n in names if isinstance(n, str) and n not in self.hook_dict]
        if unknown:
            import difflib

            hints = {n: difflib.get_close_matches(n, self.hook_dict, n=3) for n in unknown}
            raise KeyError(
                f"unknown hook name(s): {hints} (every name, shape and meaning: docs/hooks.md in the v4lens "
                "repository; model.hook_dict lists this model's hook points)"
            )

    def hooks(self, fwd_hooks=(), bwd_hooks=(), reset_hooks_end=True, clear_contexts=False):
        fwd_hooks, bwd_hooks = list(fwd_hooks), list(bwd_hooks)
        self.check_hook_names([n for n, _ in fwd_hooks + bwd_hooks])
        return self._claimed_hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts)

    @contextlib.contextmanager
    def _claimed_hooks(self, *args):
        # hooks are module state: this thread owns the model until the context ends (v4lens.model.guards)
        with claim(self, "hooks()", exclusive=True), super().hooks(*args) as model:
            yield model

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False):
        if isinstance(name, str):
            self.check_hook_names([name])
        with claim(self, "add_hook", exclusive=True):
            return super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def reset_hooks(self, *args, **kwargs):
        with claim(self, "reset_hooks", exclusive=True):
            return super().reset_hooks(*args, **kwargs)

    # ------------------------------------------------------------------ doors to the other rooms
    # The model room imports nothing from the rest of v4lens when it is imported (no cycles, and
    # `v4lens.model` stays the network alone). These conveniences are thin doors, each importing
    # its room on first use — the only such imports in the model room:
    #   tokenizer                           -> v4lens.tokenizer.tokenizer_for (real V4, or tiny-recall names)
    #   generate                            -> v4lens.generate.generate
    #   save_pretrained                     -> v4lens.weights.saving.save_pretrained
    #   run_with_cache, get_caching_hooks   -> v4lens.analysis.caching
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from ..tokenizer import tokenizer_for  # the real V4 tokenizer, or tiny-recall's synthetic names

            self._tokenizer = tokenizer_for(self.cfg)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tok) -> None:
        self._tokenizer = tok

    def generate(self, input, max_new_tokens: int = 20, **kwargs):
        """TransformerLens's `generate` (text for text, tokens for tokens; `return_type="generation"`: the whole
        record), greedy or sampled, with hooks active at every step; see `v4lens.generate.generate`."""
        from ..generate import generate

        return generate(self, input, max_new_tokens, **kwargs)

    def save_pretrained(self, path, format: str = "hf", max_shard_size: int | str = "5GB", dtype=None, overwrite=False):
        """Write safetensors + config.json in transformers' layout (`format="hf"`) or DeepSeek's
        (`"official"`); `v4lens.load(path)` reads either back bit-exactly. See `v4lens.weights.saving`."""
        from ..weights.saving import save_pretrained

        return save_pretrained(self, path, format, max_shard_size, dtype, overwrite=overwrite)

    def run_with_cache(self, *args, **kwargs):
        """TransformerLens's `run_with_cache`, returning a stream-aware `V4ActivationCache`
        (position slicing uses each hook's real position axis; see `v4lens.analysis.caching`)."""
        from ..analysis.caching import run_with_cache

        with claim(self, "run_with_cache", exclusive=True):  # before it touches offload_dir or hooks
            return run_with_cache(self, *args, **kwargs)

    def get_caching_hooks(self, *args, **kwargs):
        """TransformerLens's `get_caching_hooks` with V4's position axes (streams are 4-D)."""
        from ..analysis.caching import caching_hooks

        return caching_hooks(self, *args, **kwargs)

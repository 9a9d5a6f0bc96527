"""Which model is this? A model's identity = its config (the fields that change what it computes)
plus a fingerprint of its weights, so that state made by one model (a `V4KVCache`, an offloaded
activation cache) is never silently used with another.

The fingerprint is a SHA-256 over every parameter and persistent buffer's name, dtype, shape and a
strided sample of its values (`SAMPLES` evenly spaced elements, first and last included), read on
the CPU: the same weights give the same hex string in every process and on every device, and any
other seed or checkpoint gives another one. It reads ~`SAMPLES` values per tensor, never the whole
model, and `model_identity` memoises it per model until a tensor's (data_ptr, _version) changes,
so checking a model on every decoding step costs one walk over its tensors, not a hash.

Limits (documented, not detected): an edit that bypasses autograd's version counter (through
`.data`, or numpy views of the storage) is not seen until something else changes a version, and
a changed element that falls between two samples leaves the fingerprint as it was.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import weakref

import torch

SAMPLES = 64
# config fields that do not change what the model computes (runtime and hook options)
RUNTIME_FIELDS = ("name", "device", "attn_chunk_size", "use_attn_result", "use_expert_out")

_memo: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (versions, identity)


def config_identity(model) -> dict:
    """The model's config as a JSON-ready dict, without the runtime options (device, name, ...)."""
    d = {k: v for k, v in model.cfg.to_dict().items() if k not in RUNTIME_FIELDS}
    return json.loads(json.dumps(d))  # tuples -> lists, as they come back from a JSON file


def _named_tensors(model):
    return model.state_dict(keep_vars=True).items()  # parameters and persistent buffers, by name


def _stored(t: torch.Tensor) -> tuple:
    """The tensors that hold a weight's values: itself, or for a weight kept quantised (a tensor subclass that
    dequantises on use, `v4lens.weights.at_rest`) what it stores, so nothing dense is built to fingerprint it."""
    stored = getattr(t, "stored_tensors", None)
    return tuple(stored()) if stored is not None else (t,)


def weights_versions(model) -> tuple:
    """Where each weight lives and how often it was written in place: changes whenever a weight is
    replaced, moved or edited through autograd-visible in-place ops (`p.mul_`, `load_state_dict`)."""
    # one walk over the modules' own tensor dicts (cheaper than parameters() + buffers(), which is run on
    # every decoding step); a shared tensor appears once per module holding it, and a non-persistent
    # buffer that changes only costs a recomputed fingerprint (which leaves it out)
    versions = []
    for module in model.modules():
        if not (module._parameters or module._buffers):  # most modules are hook points: skip them cheaply
            continue
        for t in itertools.chain(module._parameters.values(), module._buffers.values()):
            if t is None:
                continue
            for s in (t,) if type(t) in _PLAIN else _stored(t):
                # a weight made under torch.inference_mode (one accelerate reads back from disk inside a
                # forward there) has no version counter, and cannot be edited in place outside it anyway
                versions.append((s.data_ptr(), -1 if s.is_inference() else s._version))
    return tuple(versions)


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # no stored_tensors to look up


def weights_fingerprint(model) -> str:
    """SHA-256 hex of the weights' names, dtypes, shapes and `SAMPLES` sampled values each."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in _named_tensors(model):
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            for s in _stored(t):
                n = s.numel()
                if n == 0 or s.is_meta:
                    continue
                k = min(n, SAMPLES)
                idx = torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)  # exact integer spacing
                sample = s.detach().reshape(-1)[idx.to(s.device)].cpu().contiguous()
                h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_identity(model) -> dict:
    """{"config": config_identity, "fingerprint": weights_fingerprint}; the fingerprint is recomputed
    only when `weights_versions` changed since the last call for this model, the config only when a
    field of `model.cfg` changed (it may be edited). Unchanged, the same dict object comes back."""
    versions, config_key = weights_versions(model), _config_key(model.cfg)
    memo = _memo.get(model)
    if memo is not None and memo[0] == versions and memo[1] == config_key:
        return memo[2]
    fingerprint = memo[2]["fingerprint"] if memo is not None and memo[0] == versions else weights_fingerprint(model)
    identity = {"config": config_identity(model), "fingerprint": fingerprint}
    if memo is not None and memo[2] == identity:
        identity = memo[2]
    _memo[model] = (versions, config_key, identity)
    return identity


def _config_key(cfg) -> tuple:
    return tuple(
        (k, v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in vars(cfg).items()
    )


def identity_mismatch(recorded: dict, model, current: dict | None = None) -> str | None:
    """What differs between a recorded `model_identity` and `model` (None if nothing): the config
    fields with both values, or that the weights differ. `current`: `model_identity(model)` when the
    caller has it already (it walks every tensor of the model)."""
    current = model_identity(model) if current is None else current
    old, new = recorded.get("config", {}), current["config"]
    fields = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if fields:
        shown = ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} here" for k in fields[:5])
        return f"config differs in {shown}" + (f" and {len(fields) - 5} more fields" if len(fields) > 5 else "")
    if recorded.get("fingerprint") != current["fingerprint"]:
        return (
            f"same config but different weights (fingerprint {str(recorded.get('fingerprint'))[:12]}… there, "
            f"{current['fingerprint'][:12]}… here: another seed or checkpoint, or weights edited since)"
        )
    return None

"""What a hook returns is checked against the tensor it replaces, on every path that attaches hooks.

None keeps the tensor (TransformerLens's semantics; in-place edits still count). A replacement of
another shape, another dtype kind (integer hooks such as expert ids / top-k / key index vs float
ones) or on another device is an error naming the hook and both; a float of another precision is
cast to the dtype that flows there.
"""

from __future__ import annotations

import pytest
import torch
from transformer_lens.hook_points import HookPoint

pytestmark = pytest.mark.usefixtures("single_thread")

TOKENS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28, 84, 19]])
STREAMS = "blocks.0.hook_streams_pre"  # [b, p, n, d]


def run(model, name, hook, **kwargs):
    with torch.no_grad():
        return model.run_with_hooks(TOKENS, fwd_hooks=[(name, hook)], **kwargs)


# ---------------------------------------------------------------------- shapes
def test_broadcastable_wrong_shape_is_an_error(tiny256):
    """[b, p, 1, d] would broadcast over the n streams and silently change the output."""
    with pytest.raises(ValueError, match=STREAMS) as err:
        run(tiny256, STREAMS, lambda t, hook: t[:, :, :1])
    assert "(1, 20, 1, 64)" in str(err.value) and "(1, 20, 4, 64)" in str(err.value)


@pytest.mark.parametrize(
    "name", ["blocks.1.attn.hook_q", "blocks.2.attn.hook_key_index", "blocks.0.mlp.hook_expert_ids"]
)
def test_wrong_shape_names_the_hook_not_a_deep_frame(tiny256, name):
    with pytest.raises(ValueError, match=name) as err:
        run(tiny256, name, lambda t, hook: t[:, :-1])
    assert "shape" in str(err.value)


# ---------------------------------------------------------------------- dtype kinds
@pytest.mark.parametrize(
    "name", ["blocks.1.attn.indexer.hook_topk", "blocks.2.attn.hook_key_index", "blocks.1.mlp.hook_expert_ids"]
)
def test_integer_hook_returning_float_is_an_error(tiny256, name):
    with pytest.raises(TypeError, match=name) as err:
        run(tiny256, name, lambda t, hook: t.float())
    assert "floating" in str(err.value) and "integer" in str(err.value) and "torch.int64" in str(err.value)


@pytest.mark.parametrize("name", ["hook_embed", "blocks.1.attn.hook_pattern", "blocks.0.mlp.hook_expert_weights"])
def test_float_hook_returning_integers_or_bools_is_an_error(tiny256, name):
    with pytest.raises(TypeError, match=name):
        run(tiny256, name, lambda t, hook: t.long())
    with pytest.raises(TypeError, match=name):
        run(tiny256, name, lambda t, hook: t > 0)


def test_other_float_precision_is_cast_to_the_flowing_dtype(tiny256):
    seen = []
    hooks = [("hook_embed", lambda t, hook: t.to(torch.bfloat16)), ("hook_embed", lambda t, hook: seen.append(t.dtype))]
    with torch.no_grad():
        out = tiny256.run_with_hooks(TOKENS, fwd_hooks=hooks)
        want = tiny256.run_with_hooks(TOKENS, fwd_hooks=[("hook_embed", lambda t, hook: t.to(torch.bfloat16).float())])
    assert seen == [torch.float32]
    torch.testing.assert_close(out, want, atol=0, rtol=0)


def test_non_tensor_return_is_an_error(tiny256):
    with pytest.raises(TypeError, match="hook_embed.*list"):
        run(tiny256, "hook_embed", lambda t, hook: [t])


def test_other_device_is_an_error(tiny256):
    with pytest.raises(ValueError, match="hook_embed") as err:
        run(tiny256, "hook_embed", lambda t, hook: t.to("meta"))
    assert "meta" in str(err.value) and "cpu" in str(err.value)


# ---------------------------------------------------------------------- None and valid replacements
def test_none_keeps_the_tensor_and_in_place_edits_count(tiny256):
    def halve_in_place(t, hook):
        t.mul_(0.5)

    with torch.no_grad():
        ref = tiny256(TOKENS)
        same = run(tiny256, STREAMS, lambda t, hook: None)
        edited = run(tiny256, STREAMS, halve_in_place)
        replaced = run(tiny256, STREAMS, lambda t, hook: t * 0.5)
    torch.testing.assert_close(same, ref, atol=0, rtol=0)
    torch.testing.assert_close(edited, replaced, atol=0, rtol=0)
    assert not torch.allclose(edited, ref)


# ---------------------------------------------------------------------- every path that attaches a hook
def test_every_way_of_attaching_a_hook_is_checked(tiny256):
    def bad(t, hook):
        return t[:, :, :1]

    with pytest.raises(ValueError, match=STREAMS), tiny256.hooks(fwd_hooks=[(STREAMS, bad)]):
        tiny256(TOKENS)
    for kwargs in ({}, {"prepend": True}, {"is_permanent": True}):
        tiny256.add_hook(STREAMS, bad, **kwargs)
        try:
            with pytest.raises(ValueError, match=STREAMS):
                tiny256(TOKENS)
        finally:
            tiny256.reset_hooks(including_permanent=True)
    point = tiny256.hook_dict[STREAMS]
    assert isinstance(point, HookPoint)
    point.add_hook(bad)
    try:
        with pytest.raises(ValueError, match=STREAMS):
            tiny256(TOKENS)
    finally:
        tiny256.reset_hooks()
    with pytest.raises(ValueError, match=STREAMS):
        run(tiny256, STREAMS, bad)
    assert not any(p.fwd_hooks for p in tiny256.hook_dict.values())


def test_list_hooks_shows_the_users_function(tiny256):
    def mine(t, hook):
        return None

    with tiny256.hooks(fwd_hooks=[(STREAMS, mine)]):
        assert tiny256.hook_dict[STREAMS].fwd_hooks[0].user_hook is mine


def test_backward_hook_returning_a_wrong_shape_names_the_hook(tiny256):
    name = "blocks.1.hook_streams_mid"
    with tiny256.hooks(bwd_hooks=[(name, lambda g, hook: g[:, :, :1])]):
        loss = tiny256(TOKENS, return_type="loss")
        with pytest.raises(ValueError, match=name):
            loss.backward()


def test_backward_hook_replacement_of_the_right_shape_works(tiny256):
    name = "blocks.1.hook_streams_mid"
    grads = {}
    with tiny256.hooks(bwd_hooks=[(name, lambda g, hook: g * 0), ("hook_embed", lambda g, hook: grads.update(e=g))]):
        tiny256(TOKENS, return_type="loss").backward()
    assert grads["e"].shape == (1, 20, 64)
    tiny256.zero_grad(set_to_none=True)

"""Drop tlv_fast into existing PyTorch code: module swapping and an F.scaled_dot_product_attention override."""
import contextlib

import torch.nn.functional as F
from torch import nn

from .. import backends
from ..nn import MultiheadAttention
from ..ops import sdpa


def _keep_swapped_attention(module, args):
    """A no-op forward pre-hook. nn.TransformerEncoderLayer skips self_attn.forward in its eval-mode fast path
    (torch._transformer_encoder_layer_fwd) unless some submodule has a hook; this one keeps tlv_fast's forward."""
    return None


def patch(model, backend="auto"):
    """Turn every torch.nn.MultiheadAttention inside `model` (or `model` itself) into a
    tlv_fast.nn.MultiheadAttention, in place; returns the model.

    The modules keep their identity: the very same Parameter objects (so their sharing between parents,
    `requires_grad`, device, dtype, hooks and any optimizer built before `patch` are unchanged), only the class
    changes (tlv_fast's is a subclass adding `backend`). nn.TransformerEncoder's nested-tensor fast path is turned off
    (use_nested_tensor = False): tlv_fast reads the key-padding mask in the kernel instead, and the swapped attention
    must not be bypassed. Padded positions of a key-padding mask then hold values computed like any other position
    (torch's nested-tensor path writes 0 there); they are outputs of padding, which callers ignore.
    """
    backend = backends.validate(backend, ops=("attention",), where="tlv_fast.patch: backend")
    for module in ([model] if type(model) is nn.MultiheadAttention else list(model.modules())):
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
        if type(module) is nn.MultiheadAttention:
            module.__class__ = MultiheadAttention
            module.backend = backend
            module.register_forward_pre_hook(_keep_swapped_attention)
        elif type(module) is MultiheadAttention:
            module.backend = backend  # patched before: only the backend changes
    return model


@contextlib.contextmanager
def sdpa_override(backend="auto"):
    """Within the block, calls of torch.nn.functional.scaled_dot_product_attention (as timm and nanoGPT-style code
    make them, looked up at call time) run tlv_fast.scaled_dot_product_attention. A call whose arguments tlv_fast
    does not accept (e.g. query/key/value batch dims that differ but broadcast) or that no backend declares it can
    run falls back to torch's, with one warning per kind of call; an error raised while tlv_fast runs a call it
    accepted propagates. Code that bound the function at import (`from torch.nn.functional import
    scaled_dot_product_attention`) is not affected."""
    backend = backends.validate(backend, ops=("attention",), where="tlv_fast.sdpa_override: backend")
    original = F.scaled_dot_product_attention

    def routed(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        try:
            call = sdpa.plan(query, key, value, attn_mask, dropout_p, "top_left" if is_causal else "none", scale,
                             enable_gqa, False, backend, "ieee", "scaled_dot_product_attention")
        except (ValueError, TypeError, RuntimeError) as e:  # not accepted, or no declared backend runs it
            reason = str(e).split(",")[0][:120]
            backends.warn_once(("sdpa_override", reason), "tlv_fast.sdpa_override: falling back to torch's "
                               f"scaled_dot_product_attention ({reason})")
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        return sdpa.run(call)

    F.scaled_dot_product_attention = routed
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original

"""Drop tlv_fast into existing PyTorch code: module swapping and an F.scaled_dot_product_attention override."""
import contextlib

import torch
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
    must not be bypassed. Where torch would have taken that path (an encoder built with it enabled, called in eval
    mode without autograd, with a src_key_padding_mask and no attention mask), the padded positions of the output
    are set to 0 as torch's nested tensors give them; elsewhere (training, autograd) they hold values computed like
    any other position, as on torch's own regular path.
    """
    backend = backends.validate(backend, ops=("attention",), where="tlv_fast.patch: backend")
    for module in ([model] if type(model) is nn.MultiheadAttention else list(model.modules())):
        if isinstance(module, nn.TransformerEncoder):
            if getattr(module, "use_nested_tensor", False) and not getattr(module, "_tlv_fast_zeroes_padding", False):
                module.register_forward_hook(_zero_padding_as_nested, with_kwargs=True)
                module._tlv_fast_zeroes_padding = True
            module.use_nested_tensor = False
        if type(module) is nn.MultiheadAttention:
            module.__class__ = MultiheadAttention
            module.backend = backend
            module.register_forward_pre_hook(_keep_swapped_attention)
        elif type(module) is MultiheadAttention:
            module.backend = backend  # patched before: only the backend changes
    return model


def _zero_padding_as_nested(module, args, kwargs, output):
    """Forward hook of a patched nn.TransformerEncoder that torch would have run on nested tensors: 0 at the padded
    positions, as torch's nested path returns them (the conditions are torch's own runtime checks)."""
    src = args[0] if args else kwargs.get("src")
    attn_mask = args[1] if len(args) > 1 else kwargs.get("mask")
    padding = args[2] if len(args) > 2 else kwargs.get("src_key_padding_mask")
    if padding is None or attn_mask is not None or module.training or src.dim() != 3 \
            or torch.is_autocast_enabled(src.device.type):
        return output
    if torch.is_grad_enabled() and (src.requires_grad or any(p.requires_grad for p in module.parameters())):
        return output
    padded = padding if padding.dtype == torch.bool else padding != 0  # torch takes logical_not of the mask
    return output.masked_fill(padded[..., None], 0.0)


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

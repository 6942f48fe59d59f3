"""Register "tlv_fast" in Hugging Face transformers' AttentionInterface and AttentionMaskInterface.

    import tlv_fast.integrations.transformers          # or tlv_fast.register_hf()
    model = AutoModel.from_config(cfg, attn_implementation="tlv_fast")
    model.set_attn_implementation("tlv_fast")

Any model that dispatches through the interface (BERT, GPT-2, ViT, Llama-style models...) then runs its attention on
tlv_fast.scaled_dot_product_attention with the same masks as "sdpa" (boolean, built by transformers' sdpa_mask:
padding and causal patterns; None when is_causal suffices), grouped-query attention without repeating K/V, and
additive position biases.
"""
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .. import backends
from ..ops import scaled_dot_product_attention

NAME = "tlv_fast"
_backend = ["auto"]  # the backend register() was given


def tlv_fast_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                               position_bias=None, **kwargs):
    """transformers' attention-function signature: query (B, H, Nq, d), key/value (B, Hkv, Nk, d); returns
    (output (B, Nq, H, d), None)."""
    if kwargs.get("softcap") is not None:
        raise ValueError("tlv_fast attention does not support `softcap`")
    if kwargs.get("output_attentions", False):
        raise ValueError("tlv_fast attention does not return attention weights; use attn_implementation='eager'")
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # as transformers' sdpa path: causal only for a prefill without an explicit mask (top-left alignment)
    is_causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    if position_bias is not None:  # an additive bias, masked where the boolean mask says so
        if attention_mask is None:
            attention_mask = position_bias
        elif attention_mask.dtype == torch.bool:
            attention_mask = position_bias.masked_fill(~attention_mask, float("-inf"))
        else:
            attention_mask = position_bias + attention_mask
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                                       is_causal=is_causal, enable_gqa=gqa, backend=_backend[0])
    return out.transpose(1, 2).contiguous(), None


def register(backend="auto"):
    """Register (idempotently) the "tlv_fast" attention and mask functions with transformers; `backend` (see
    tlv_fast.backends) applies to every model using attn_implementation="tlv_fast" from then on."""
    _backend[0] = backends.validate(backend, ops=("attention",), where="tlv_fast.register_hf: backend")
    AttentionInterface.register(NAME, tlv_fast_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


register()

"""tlv_fast: Transformers for Language and Vision, fast.

Fused attention kernels (Triton) and the modules and models built on them. Importing tlv_fast does not import
triton or touch CUDA; Triton kernels load, and the C++/CUDA ops compile (once, cached), on first use.
"""
from . import backends, nn
from .backends import BACKENDS
from .ops import (
    attention,
    optimal_transport,
    relpos_attention,
    scaled_dot_product_attention,
    sinkhorn,
    varlen_attention,
)

__version__ = "0.1.0"


def register_hf(backend="auto"):
    """Register "tlv_fast" as a Hugging Face transformers attention implementation (see
    tlv_fast.integrations.transformers); returns the name to pass as attn_implementation."""
    from .integrations import transformers as _hf
    return _hf.register(backend)


def patch(model, backend="auto"):
    """Swap every torch.nn.MultiheadAttention in `model` for tlv_fast.nn.MultiheadAttention (same weights)."""
    from .integrations.torch import patch as _patch
    return _patch(model, backend)


def sdpa_override(backend="auto"):
    """Context manager routing torch.nn.functional.scaled_dot_product_attention calls to tlv_fast."""
    from .integrations.torch import sdpa_override as _override
    return _override(backend)
__all__ = ["BACKENDS", "attention", "backends", "nn", "optimal_transport", "patch", "register_hf", "relpos_attention",
           "scaled_dot_product_attention", "sdpa_override", "sinkhorn", "varlen_attention", "__version__"]

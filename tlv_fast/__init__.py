"""tlv_fast: Transformers for Language and Vision, fast.

Fused attention kernels (Triton) and the modules and models built on them. Importing tlv_fast does not import
triton or touch CUDA; Triton kernels load, and the C++/CUDA ops compile (once, cached), on first use.
"""
from . import nn
from ._dispatch import BACKENDS
from .ops import attention, optimal_transport, relpos_attention, scaled_dot_product_attention, sinkhorn

__version__ = "0.1.0"
__all__ = ["BACKENDS", "attention", "nn", "optimal_transport", "relpos_attention", "scaled_dot_product_attention",
           "sinkhorn", "__version__"]

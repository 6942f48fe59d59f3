"""tlv_fast: Transformers for Language and Vision, fast.

Fused attention kernels (Triton) and the modules and models built on them. Importing tlv_fast does not import
triton or touch CUDA; kernels load on first use.
"""
from ._dispatch import BACKENDS
from .ops import attention, scaled_dot_product_attention

__version__ = "0.1.0"
__all__ = ["BACKENDS", "attention", "scaled_dot_product_attention", "__version__"]

"""Public ops: autograd and torch.library registration over the kernels, with backend dispatch (tlv_fast.backends).

Modules: sdpa (attention, scaled_dot_product_attention), varlen (varlen_attention), relpos (relpos_attention),
transport (sinkhorn, optimal_transport); each declares its backends next to its code.
"""
from .relpos import relpos_attention
from .sdpa import attention, scaled_dot_product_attention
from .transport import optimal_transport, sinkhorn
from .varlen import varlen_attention

__all__ = ["attention", "scaled_dot_product_attention", "relpos_attention", "sinkhorn", "optimal_transport",
           "varlen_attention"]

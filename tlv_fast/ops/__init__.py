"""Public ops: autograd and torch.library registration over the kernels, with backend dispatch."""
from .attention import attention, scaled_dot_product_attention
from .relpos_attention import relpos_attention
from .sinkhorn import optimal_transport, sinkhorn

__all__ = ["attention", "scaled_dot_product_attention", "relpos_attention", "sinkhorn", "optimal_transport"]

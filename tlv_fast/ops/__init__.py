"""Public ops: autograd and torch.library registration over the kernels, with backend dispatch."""
from .attention import attention, scaled_dot_product_attention

__all__ = ["attention", "scaled_dot_product_attention"]

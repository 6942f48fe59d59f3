import torch
from torch import nn

from .. import backends
from ..ops import optimal_transport


class OptimalTransport(nn.Module):
    """STTR's optimal-transport head: the learnable dustbin score `phi` (initialised to 0, as STTR; its parameter
    name matches the published checkpoint's ``regression_head.phi``) and `iters` log-domain Sinkhorn iterations.

    forward(attn (..., M, N)) -> T (..., M+1, N+1): see :func:`tlv_fast.optimal_transport`.
    """

    def __init__(self, iters=10, backend="auto", device=None, dtype=None):
        super().__init__()
        self.iters = iters
        self.backend = backends.validate(backend, ops=("optimal_transport",), where="OptimalTransport: backend")
        self.phi = nn.Parameter(torch.zeros((), device=device, dtype=dtype))

    def forward(self, attn):
        return optimal_transport(attn, self.phi, self.iters, self.backend)

    def extra_repr(self):
        return f"iters={self.iters}, backend={self.backend!r}"

"""Thin modules over tlv_fast.ops."""
from .mha import MultiheadAttention
from .optimal_transport import OptimalTransport
from .relpos_attention import RelativeMultiheadAttention, sinusoidal_table

__all__ = ["MultiheadAttention", "OptimalTransport", "RelativeMultiheadAttention", "sinusoidal_table"]

"""Thin modules over tlv_fast.ops."""
from .optimal_transport import OptimalTransport
from .relpos_attention import RelativeMultiheadAttention, sinusoidal_table

__all__ = ["OptimalTransport", "RelativeMultiheadAttention", "sinusoidal_table"]

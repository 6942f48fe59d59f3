"""Thin modules over tlv_fast.ops."""
from .block import MLP, Block, SelfAttention
from .mha import MultiheadAttention
from .optimal_transport import OptimalTransport
from .relpos_attention import RelativeMultiheadAttention, sinusoidal_table

__all__ = ["Block", "MLP", "MultiheadAttention", "OptimalTransport", "RelativeMultiheadAttention", "SelfAttention",
           "sinusoidal_table"]

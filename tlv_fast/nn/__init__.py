"""Thin modules over tlv_fast.ops."""
from .optimal_transport import OptimalTransport

__all__ = ["OptimalTransport"]

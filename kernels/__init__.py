"""Triton kernels and their launchers (imported as ``tlv_fast.kernels``; no autograd, no nn here)."""

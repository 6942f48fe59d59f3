"""STTR's relative-position attention: the Triton kernel as torch.library custom ops with autograd, the C++ CPU kernel
(csrc/relpos.cpp, ``tlv_fast::native_relpos_fwd`` / ``_bwd``) with its fake implementations and autograd, and
dispatch."""
from typing import Optional

import torch
from torch import Tensor

from .. import backends, reference, testing
from ._common import (
    FLOAT_DTYPES,
    TRITON_DTYPES,
    call,
    check_precision,
    cpu_native_ops,
    eager_twin,
    empty_layout,
    native_runtime,
    no_double_backward,
    triton_runtime,
)
from .sdpa import MAX_HEAD_DIM

_modules = {}


def _kernels():
    kernels = _modules.get("relpos")
    if kernels is None:  # lazy, as in ops.sdpa
        from ..kernels import relpos_attention as kernels
        _modules["relpos"] = kernels
    return kernels


FAMILY = backends.family("relpos_attention", public=("relpos_attention",),
                         auto={"cuda": ("triton", "reference"), "cpu": ("native", "reference")}, features=("logits",))
TRITON = FAMILY.declare(backends.Implementation(
    "relpos_attention", "triton", dtypes={"cuda": TRITON_DTYPES, "cpu": TRITON_DTYPES}, max_head_dim=MAX_HEAD_DIM,
    runtime=triton_runtime(_kernels), notes={"cpu": "only under `TRITON_INTERPRET=1`"}))
NATIVE = FAMILY.declare(backends.Implementation(
    "relpos_attention", "native", dtypes={"cpu": TRITON_DTYPES}, runtime=native_runtime,
    summary="csrc: C++ on CPU, banded tables", notes={"cpu": "needs a C++ compiler on first use"}))
REFERENCE = FAMILY.declare(backends.Implementation(
    "relpos_attention", "reference", dtypes={"cuda": FLOAT_DTYPES, "cpu": FLOAT_DTYPES},
    summary="materialises N × N logits"))


def _fwd_impl(q: Tensor, k: Tensor, v: Tensor, qr: Tensor, kr: Tensor, offset_sign: int, mask_upper: bool,
              return_logits: bool, precision: str) -> tuple[Tensor, Tensor, Tensor]:
    B, H, n_q, _ = q.shape
    n_k = k.shape[2]
    out = empty_layout(q, (B, H, n_q, v.shape[3]))
    lse = testing.poison(torch.empty((B, H, n_q), device=q.device, dtype=torch.float32))
    logits = torch.zeros((B, n_q, n_k) if return_logits else (0,), device=q.device, dtype=torch.float32)
    _kernels().relpos_attention_fwd(q, k, v, qr, kr, out, lse, logits if return_logits else None, offset_sign,
                                    mask_upper, precision)
    return out, lse, logits


_relpos_fwd = torch.library.custom_op("tlv_fast::relpos_attention_fwd", mutates_args=())(_fwd_impl)


@_relpos_fwd.register_fake
def _(q, k, v, qr, kr, offset_sign, mask_upper, return_logits, precision):
    B, H, n_q, _ = q.shape
    logits_shape = (B, n_q, k.shape[2]) if return_logits else (0,)
    return (empty_layout(q, (B, H, n_q, v.shape[3])), q.new_empty((B, H, n_q), dtype=torch.float32),
            q.new_empty(logits_shape, dtype=torch.float32))


@torch.library.custom_op("tlv_fast::relpos_attention_bwd", mutates_args=())
def _relpos_bwd(dout: Tensor, dlogits: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, qr: Tensor, kr: Tensor,
                out: Tensor, lse: Tensor, offset_sign: int, mask_upper: bool,
                precision: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dk, dv = empty_layout(k, k.shape), empty_layout(v, v.shape)
    dq, dqr, dkr = _kernels().relpos_attention_bwd(dout, dlogits, q, k, v, qr, kr, out, lse, None, dk, dv,
                                                   offset_sign, mask_upper, precision)
    dq_out = empty_layout(q, q.shape)
    dq_out.copy_(dq)
    return dq_out, dk, dv, dqr.to(qr.dtype), dkr.to(kr.dtype)


@_relpos_bwd.register_fake
def _(dout, dlogits, q, k, v, qr, kr, out, lse, offset_sign, mask_upper, precision):
    rows, H, d = qr.shape
    return (empty_layout(q, q.shape), empty_layout(k, k.shape), empty_layout(v, v.shape),
            qr.new_empty((rows, H, d)), kr.new_empty((rows, H, d)))


def _setup_context(ctx, inputs, output):
    q, k, v, qr, kr, offset_sign, mask_upper, return_logits, precision = inputs
    ctx.save_for_backward(q, k, v, qr, kr, output[0], output[1])
    ctx.args = (offset_sign, mask_upper, precision)
    ctx.return_logits = return_logits


def _backward(ctx, dout, _dlse, dlogits):
    q, k, v, qr, kr, out, lse = ctx.saved_tensors
    g = dlogits if ctx.return_logits else None
    dq, dk, dv, dqr, dkr = torch.ops.tlv_fast.relpos_attention_bwd(dout, g, q, k, v, qr, kr, out, lse, *ctx.args)
    return dq, dk, dv, dqr, dkr, None, None, None, None


_relpos_fwd.register_autograd(_backward, setup_context=_setup_context)
no_double_backward("tlv_fast::relpos_attention_bwd", "relpos_attention")
_eager = eager_twin(_fwd_impl, _setup_context, _backward)


@cpu_native_ops
def _native_ops():
    """The C++ ops (csrc/relpos.cpp), loaded and given their fake implementations and autograd once."""

    @torch.library.register_fake("tlv_fast::native_relpos_fwd")
    def _(q, k, v, qr, kr, offset_sign, mask_upper, return_logits):
        B, H, n_q, _ = q.shape
        logits_shape = (B, n_q, k.shape[2]) if return_logits else (0,)
        return (q.new_empty((B, H, n_q, v.shape[3])), q.new_empty((B, H, n_q), dtype=torch.float32),
                q.new_empty(logits_shape, dtype=torch.float32))

    @torch.library.register_fake("tlv_fast::native_relpos_bwd")
    def _(dout, dlogits, q, k, v, qr, kr, out, lse, offset_sign, mask_upper):
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), qr.new_empty(qr.shape),
                kr.new_empty(kr.shape))

    def setup_context(ctx, inputs, output):
        q, k, v, qr, kr, offset_sign, mask_upper, return_logits = inputs
        ctx.save_for_backward(q, k, v, qr, kr, output[0], output[1])
        ctx.args = (offset_sign, mask_upper)
        ctx.return_logits = return_logits

    def backward(ctx, dout, _dlse, dlogits):
        q, k, v, qr, kr, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        g = dlogits if ctx.return_logits else None
        dq, dk, dv, dqr, dkr = torch.ops.tlv_fast.native_relpos_bwd(dout, g, q, k, v, qr, kr, out, lse, *ctx.args)
        return dq, dk, dv, dqr, dkr, None, None, None

    torch.library.register_autograd("tlv_fast::native_relpos_fwd", backward, setup_context=setup_context)
    no_double_backward("tlv_fast::native_relpos_bwd", "relpos_attention (native)")


def relpos_attention(q, k, v, qr, kr, offset_sign=1, mask_upper=False, return_logits=False, backend="auto", *,
                     fp32_precision="ieee"):
    """Attention with STTR's content-dependent relative-position terms (docs/sttr.md §2.2), fused.

    Args:
        q: (B, H, Nq, d) queries, already scaled by 1/sqrt(d); k: (B, H, Nk, d); v: (B, H, Nk, dv). Any strides.
        qr, kr: (Nq + Nk - 1, H, d) projected positional tables, QR already scaled by 1/sqrt(d) (STTR:
            QR = (PE W_q^T + b_q) / sqrt(d), KR = PE W_k^T + b_k).
        offset_sign: +1 or -1. Query i and key j use table row r = delta - min(delta) with
            delta = offset_sign * (i - j): r = (i - j) + Nk - 1 for +1 (self attention, i_query - j_key; STTR's
            left-query cross attention, x_L - x_R) and r = (j - i) + Nq - 1 for -1 (right-query cross attention,
            x_L - x_R). Rows are in ascending order of delta (tlv_fast.reference.relpos_rows gives the map).
        mask_upper: mask key j > i (STTR's last cross-attention layer).
        return_logits: also return the head-summed pre-softmax logits (B, Nq, Nk) in fp32, -inf where masked —
            the one Nq x Nk output (STTR's optimal-transport input); gradients flowing into it are honoured.
        backend: "auto" (Triton on CUDA tensors, the C++ kernel on CPU tensors, the reference for the rest;
            TLV_FAST_BACKEND overrides), "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "native" (C++, CPU:
            csrc/relpos.cpp) or "reference".
        fp32_precision: "ieee" or "tf32" dots for float32 inputs, as in tlv_fast.attention.

    logits[b, h, i, j] = q_i . k_j + q_i . kr[r_ij] + qr[r_ij] . k_j (+ mask); out = softmax_j(logits) v. The
    backward returns dq, dk, dv, d(qr), d(kr) deterministically (the tables' gradients are summed over the batch
    in a fixed order). Nothing Nq x Nk x d, nor the Nq x (Nq + Nk - 1) positional logits, is formed.

    Returns:
        out (B, H, Nq, dv) in q's dtype; with return_logits, (out, logits).
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("qr", qr), ("kr", kr)):
        if not isinstance(t, Tensor):
            raise TypeError(f"relpos_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point() or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"relpos_attention: {name} must be a floating tensor of q's dtype {q.dtype} and device "
                             f"{q.device}, got {t.dtype} on {t.device}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"relpos_attention: q, k, v must be (B, H, N, d), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, n_q, d = q.shape
    n_k = k.shape[2]
    if k.shape != (B, H, n_k, d) or v.shape[:3] != (B, H, n_k):
        raise ValueError(f"relpos_attention: k must be (B, H, Nk, {d}) and v (B, H, Nk, dv) for q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    for name, t in (("qr", qr), ("kr", kr)):
        if t.shape != (n_q + n_k - 1, H, d):
            raise ValueError(f"relpos_attention: {name} must be (Nq + Nk - 1, H, d) = {(n_q + n_k - 1, H, d)}, got "
                             f"{tuple(t.shape)}")
    if offset_sign not in (1, -1):
        raise ValueError(f"relpos_attention: offset_sign must be +1 or -1, got {offset_sign!r}")
    if n_q == 0 or n_k == 0:
        raise ValueError(f"relpos_attention: Nq and Nk must be >= 1, got {n_q} and {n_k}")
    check_precision("relpos_attention", fp32_precision)
    inputs = backends.Inputs(q.device, q.dtype, max(d, v.shape[3]),
                             frozenset({"logits"}) if return_logits else frozenset())
    chosen = backends.choose("relpos_attention", backend, inputs)
    if chosen == "reference":
        return reference.relpos_attention(q, k, v, qr, kr, offset_sign, mask_upper, return_logits)
    if chosen == "native":
        out, _, logits = _native_ops().native_relpos_fwd(q, k, v, qr, kr, int(offset_sign), bool(mask_upper),
                                                         bool(return_logits))
        return (out, logits) if return_logits else out
    out, _, logits = call(torch.ops.tlv_fast.relpos_attention_fwd, _fwd_impl, _eager,
                          (q, k, v, qr, kr, int(offset_sign), bool(mask_upper), bool(return_logits), fp32_precision),
                          (q, k, v, qr, kr))
    return (out, logits) if return_logits else out

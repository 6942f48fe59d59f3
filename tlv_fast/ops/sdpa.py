"""Fused attention: ``scaled_dot_product_attention`` (torch's drop-in) and ``attention`` (FlashAttention-style).

The Triton path is two ``torch.library`` custom ops (``tlv_fast::attention_fwd`` / ``tlv_fast::attention_bwd``) with
fake implementations and registered autograd, so ``torch.compile`` sees one opaque node and no graph break. The
native path (CPU tensors) is the C++ pair ``tlv_fast::native_attention_fwd`` / ``_bwd`` of csrc/attention.cpp, with
its fake implementations and autograd registered here.
"""
import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor

from .. import backends, reference, testing
from ._common import (
    FLOAT_DTYPES,
    TRITON_DTYPES,
    call,
    check_precision,
    check_tensor,
    cpu_native_ops,
    eager_twin,
    empty_layout,
    native_runtime,
    no_double_backward,
    triton_runtime,
)

MAX_HEAD_DIM = 256


_modules = {}


def _kernels():
    kernels = _modules.get("attention")
    if kernels is None:  # lazy: importing triton costs ~1 s
        from ..kernels import attention as kernels
        _modules["attention"] = kernels
    return kernels


# what each backend runs (the README table is generated from these)
FAMILY = backends.family("attention", public=("attention", "scaled_dot_product_attention"),
                         auto={"cuda": ("triton", "reference"), "cpu": ("native", "reference")},
                         features=("mask", "mask_grad", "causal", "dropout", "gqa", "lse"))
TRITON = FAMILY.declare(backends.Implementation(
    "attention", "triton", dtypes={"cuda": TRITON_DTYPES, "cpu": TRITON_DTYPES}, max_head_dim=MAX_HEAD_DIM,
    runtime=triton_runtime(_kernels), notes={"cpu": "only under `TRITON_INTERPRET=1` (tests; slow)"}))
NATIVE = FAMILY.declare(backends.Implementation(
    "attention", "native", dtypes={"cpu": TRITON_DTYPES}, runtime=native_runtime,
    summary="csrc: C++ on CPU, flash-style, BLAS tiles", notes={"cpu": "needs a C++ compiler on first use"}))
REFERENCE = FAMILY.declare(backends.Implementation(
    "attention", "reference", dtypes={"cuda": FLOAT_DTYPES, "cpu": FLOAT_DTYPES}, summary="materialises N × N"))


def _causal_offset(causal, n_q, n_k):
    return {"none": None, "top_left": 0, "bottom_right": n_k - n_q}[causal]


def _fwd_impl(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], seed: Optional[Tensor],
              scale: float, causal: str, dropout_p: float, precision: str) -> tuple[Tensor, Tensor]:
    B, H, n_q, _ = q.shape
    n_k, dv = k.shape[2], v.shape[3]
    poison = testing.poison_enabled()
    out = empty_layout(q, (B, H, n_q, dv), poison=poison)
    lse = testing.poison(torch.empty((B, H, n_q), device=q.device, dtype=torch.float32), poison)  # contiguous
    if out.numel() == 0 or n_k == 0:  # no keys: every row is empty -> 0, lse -inf
        return out.zero_(), lse.fill_(float("-inf"))
    if dropout_p > 0.0 and seed is None:
        raise ValueError("attention_fwd: dropout_p > 0 needs a seed tensor")
    mask = attn_mask.expand(B, H, n_q, n_k) if attn_mask is not None else None
    _kernels().attention_fwd(q, k, v, out, lse, mask, seed, scale, _causal_offset(causal, n_q, n_k), dropout_p,
                             precision)
    return out, lse


_attention_fwd = torch.library.custom_op("tlv_fast::attention_fwd", mutates_args=())(_fwd_impl)


@_attention_fwd.register_fake
def _(q, k, v, attn_mask, seed, scale, causal, dropout_p, precision):
    B, H, n_q, _ = q.shape
    return empty_layout(q, (B, H, n_q, v.shape[3])), q.new_empty((B, H, n_q), dtype=torch.float32)


@torch.library.custom_op("tlv_fast::attention_bwd", mutates_args=())
def _attention_bwd(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   attn_mask: Optional[Tensor], seed: Optional[Tensor], scale: float, causal: str,
                   dropout_p: float, precision: str, mask_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, H, n_q, _ = q.shape
    n_k = k.shape[2]
    dq, dk, dv = empty_layout(q, q.shape), empty_layout(k, k.shape), empty_layout(v, v.shape)
    dmask = torch.zeros((B, H, n_q, n_k), device=q.device, dtype=torch.float32) if mask_grad else None
    if q.numel() and k.numel():
        mask = attn_mask.expand(B, H, n_q, n_k) if attn_mask is not None else None
        _kernels().attention_bwd(dout, dlse, q, k, v, out, lse, dq, dk, dv, dmask, mask, seed, scale,
                                 _causal_offset(causal, n_q, n_k), dropout_p, precision)
    else:
        dq.zero_(), dk.zero_(), dv.zero_()
    if not mask_grad:
        return dq, dk, dv, q.new_empty((0,))
    # reduce over the dims the mask was broadcast along, in fp32, in a fixed order (deterministic)
    return dq, dk, dv, dmask.sum_to_size(attn_mask.shape).to(attn_mask.dtype)


@_attention_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, attn_mask, seed, scale, causal, dropout_p, precision, mask_grad):
    dmask = torch.empty_like(attn_mask, memory_format=torch.contiguous_format) if mask_grad else q.new_empty((0,))
    return empty_layout(q, q.shape), empty_layout(k, k.shape), empty_layout(v, v.shape), dmask


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, seed, scale, causal, dropout_p, precision = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], attn_mask, seed)
    ctx.args = (scale, causal, dropout_p, precision)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, attn_mask, seed = ctx.saved_tensors
    mask_grad = attn_mask is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dmask = torch.ops.tlv_fast.attention_bwd(dout, dlse, q, k, v, out, lse, attn_mask, seed,
                                                         *ctx.args, mask_grad)
    return dq, dk, dv, dmask if mask_grad else None, None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
no_double_backward("tlv_fast::attention_bwd", "attention")

_eager = eager_twin(_fwd_impl, _setup_context, _backward)


@cpu_native_ops
def _native_ops():
    """The C++ ops (csrc/attention.cpp), loaded and given their fake implementations and autograd once."""

    @torch.library.register_fake("tlv_fast::native_attention_fwd")
    def _(q, k, v, mask, seed, scale, causal_offset, dropout_p):
        B, H, n_q, _ = q.shape
        return empty_layout(q, (B, H, n_q, v.shape[3])), q.new_empty((B, H, n_q), dtype=torch.float32)

    @torch.library.register_fake("tlv_fast::native_attention_bwd")
    def _(dout, dlse, q, k, v, out, lse, mask, seed, scale, causal_offset, dropout_p, mask_grad):
        B, H, n_q, _ = q.shape
        dmask = q.new_empty((B, H, n_q, k.shape[2]), dtype=torch.float32) if mask_grad else q.new_empty((0,))
        return (empty_layout(q, q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask)

    def setup_context(ctx, inputs, output):
        q, k, v, mask, seed, scale, causal_offset, dropout_p = inputs
        ctx.save_for_backward(q, k, v, output[0], output[1], mask, seed)
        ctx.args = (scale, causal_offset, dropout_p)

    def backward(ctx, dout, dlse):
        q, k, v, out, lse, mask, seed = ctx.saved_tensors
        mask_grad = mask is not None and ctx.needs_input_grad[3]
        if dout is None:  # only the lse was used
            dout = torch.zeros_like(out)
        dq, dk, dv, dmask = torch.ops.tlv_fast.native_attention_bwd(dout, dlse, q, k, v, out, lse, mask, seed,
                                                                    *ctx.args, mask_grad)
        return dq, dk, dv, dmask.to(mask.dtype) if mask_grad else None, None, None, None, None

    torch.library.register_autograd("tlv_fast::native_attention_fwd", backward, setup_context=setup_context)
    no_double_backward("tlv_fast::native_attention_bwd", "attention (native)")


def _run_native(c):
    B, H, n_q, _ = c.q.shape
    n_k = c.k.shape[2]
    seed = None
    if c.dropout_p > 0.0:  # torch's CPU generator: torch.manual_seed reproduces a run
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
        testing.record_seed(seed)
    mask = c.mask.expand(B, H, n_q, n_k) if c.mask is not None else None  # broadcast dims: stride 0, no copy
    return _native_ops().native_attention_fwd(c.q, c.k, c.v, mask, seed, c.scale,
                                              _causal_offset(c.causal, n_q, n_k), c.dropout_p)


def _check(q, k, v, attn_mask, dropout_p, scale, gqa, fp32_precision, op):
    """Validate the public arguments; return (q, k, v, mask) as 4-D (B, H, N, D) views and the output shape."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        check_tensor(op, name, t, 2, "(..., N, D) with at least 2 dims")
        if t.dtype != q.dtype:
            raise ValueError(f"query, key and value must share a dtype, got query {q.dtype} and {name} {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"query, key and value must share a device, got query on {q.device}, {name} on {t.device}")
        if t.ndim != q.ndim:
            raise ValueError(f"query, key and value must have the same number of dims, got query {q.ndim}-D and "
                             f"{name} {t.ndim}-D")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"query and key must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError(f"head dims must be >= 1, got query/key {q.shape[-1]} and value {v.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"key and value must have the same length, got {k.shape[-2]} and {v.shape[-2]}")
    if q.ndim >= 3:
        if q.shape[:-3] != k.shape[:-3] or k.shape[:-3] != v.shape[:-3]:
            raise ValueError(f"query, key and value must share batch dims, got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
        hq, hk, hv = q.shape[-3], k.shape[-3], v.shape[-3]
        if hk != hv:
            raise ValueError(f"key and value must have the same number of heads, got {hk} and {hv}")
        if hq != hk and not (gqa and hk > 0 and hq % hk == 0):
            need = "a multiple of" if gqa else "equal to (or pass enable_gqa=True for a multiple of)"
            raise ValueError(f"query heads ({hq}) must be {need} key/value heads ({hk})")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale}")
    check_precision(op, fp32_precision)
    out_shape = (*q.shape[:-1], v.shape[-1])
    score_shape = (*q.shape[:-1], k.shape[-2])
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise ValueError(f"attn_mask must be bool (True = take part) or floating (additive), got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask must be on the query's device {q.device}, got {attn_mask.device}")
        shape = attn_mask.shape  # broadcastable to score_shape (torch.broadcast_shapes costs ~10 us)
        ok = len(shape) <= len(score_shape) and all(a == 1 or a == b for a, b in zip(shape[::-1], score_shape[::-1]))
        if not ok:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the scores' shape "
                             f"{score_shape} (..., heads, Nq, Nk)")
    # to (B, H, N, D): (N, D) -> (1, 1, N, D); (H, N, D) -> (1, H, N, D); (b1, b2, ..., H, N, D) -> (b1*b2*..., ...)
    if q.ndim < 4:
        lead = (1,) * (4 - q.ndim)
        q, k, v = q.view(*lead, *q.shape), k.view(*lead, *k.shape), v.view(*lead, *v.shape)
    elif q.ndim > 4:
        if attn_mask is not None:
            attn_mask = attn_mask.expand(score_shape).reshape(-1, *score_shape[-3:])
        q, k, v = (t.reshape(-1, *t.shape[-3:]) for t in (q, k, v))
    return q, k, v, attn_mask, out_shape


@dataclasses.dataclass
class Call:
    """A checked attention call and the backend chosen for it (see :func:`plan`); :func:`run` executes it."""
    q: Tensor
    k: Tensor
    v: Tensor
    mask: Optional[Tensor]
    out_shape: tuple
    ndim: int
    dropout_p: float
    causal: str
    scale: float
    return_lse: bool
    precision: str
    backend: str


def plan(q, k, v, attn_mask, dropout_p, causal, scale, gqa, return_lse, backend, fp32_precision, op):
    """Validate a call (ValueError / TypeError naming the argument) and choose its backend (RuntimeError when the
    named backend cannot run it); nothing runs yet."""
    q4, k4, v4, mask, out_shape = _check(q, k, v, attn_mask, dropout_p, scale, gqa, fp32_precision, op)
    features = {"causal"} if causal != "none" else set()
    if mask is not None:
        features.add("mask_grad" if mask.requires_grad else "mask")
    if dropout_p > 0.0:
        features.add("dropout")
    if q4.shape[1] != k4.shape[1]:
        features.add("gqa")
    if return_lse:
        features.add("lse")
    inputs = backends.Inputs(q.device, q.dtype, max(q.shape[-1], v.shape[-1]), frozenset(features))
    chosen = backends.choose(op, backend, inputs)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return Call(q4, k4, v4, mask, out_shape, q.ndim, float(dropout_p), causal, scale, return_lse, fp32_precision,
                chosen)


def run(c: Call):
    """Execute a planned call on its backend."""
    if c.backend == "reference":
        out, lse = reference.attention(c.q, c.k, c.v, c.mask, c.dropout_p,
                                       None if c.causal == "none" else c.causal, c.scale, return_lse=True)
    elif c.backend == "native":
        out, lse = _run_native(c)
    else:
        seed = None
        if c.dropout_p > 0.0:
            seed = torch.randint(0, 2**31 - 1, (1,), device=c.q.device, dtype=torch.int64)
            testing.record_seed(seed)
        out, lse = call(torch.ops.tlv_fast.attention_fwd, _fwd_impl, _eager,
                        (c.q, c.k, c.v, c.mask, seed, c.scale, c.causal, c.dropout_p, c.precision),
                        (c.q, c.k, c.v, c.mask))
    out = out.reshape(c.out_shape) if c.ndim != 4 else out
    if c.return_lse:
        return out, lse.reshape(c.out_shape[:-1]) if c.ndim != 4 else lse
    return out


def _attention(q, k, v, attn_mask, dropout_p, causal, scale, gqa, return_lse, backend, fp32_precision, op):
    return run(plan(q, k, v, attn_mask, dropout_p, causal, scale, gqa, return_lse, backend, fp32_precision, op))


def attention(q, k, v, causal=False, scale=None, attn_mask=None, dropout_p=0.0, return_lse=False, backend="auto",
              *, fp32_precision="ieee"):
    """Multi-head attention softmax(q k^T * scale + attn_mask) v with FlashAttention's conventions.

    Args:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv). Any strides (a (B, N, H, D) tensor
            transposed to (B, H, N, D) is read in place). Hq must be a multiple of Hkv (GQA/MQA: query head h uses
            kv head h // (Hq / Hkv), K and V are never repeated in memory). 3-D (H, N, D), 2-D (N, D) and >4-D
            inputs work too (leading dims are batch). float16, bfloat16 or float32 for the Triton kernel; the
            reference backend also takes float64. Head dims up to 256 (any value: padded inside the kernel).
        causal: mask key j for query i when j > i + Nk - Nq: aligned to the bottom-right corner as in
            FlashAttention >= 2.1, which is what a KV-cache decode step (Nq < Nk) needs. Rows with
            i + Nk - Nq < 0 see no key and give 0.
        scale: multiplier of q k^T; default 1 / sqrt(D).
        attn_mask: None, bool (True = take part) or float (added to the scaled scores), broadcastable to
            (B, Hq, Nq, Nk). Read in the kernel through its strides: a (B, 1, 1, Nk) key-padding mask costs no
            Nq x Nk memory. A float mask that requires grad receives its gradient (summed over broadcast dims,
            deterministically); that gradient is Nq x Nk per batch and head while it is formed.
        dropout_p: dropout on the attention weights inside the kernel (Philox); the backward regenerates the same
            mask. Seeds come from torch's generator on q's device, so torch.manual_seed reproduces a run. Apply
            it in training only (this function does not know the module's mode).
        return_lse: also return the natural-log logsumexp of each row's scaled, masked logits, (B, Hq, Nq) fp32
            (-inf for a row with no visible key). Gradients flowing into it are honoured.
        backend: "auto" (Triton on CUDA tensors, the C++ kernel on CPU tensors, the reference for the rest; env
            TLV_FAST_BACKEND overrides), "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "native" (the C++
            kernel of csrc/attention.cpp: CPU, fp32/bf16/fp16) or "reference" (eager, any device and dtype); see
            tlv_fast.backends.
        fp32_precision: float32 inputs: "ieee" (default; full-precision dots, like torch's default matmul) or
            "tf32" (tensor-core TF32 dots, ~10-bit mantissa inputs, faster). Ignored for 16-bit inputs, whose dots
            run on tensor cores with fp32 accumulation.

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, in the memory order of q's first three dims; with return_lse,
        (out, lse). A row whose keys are all masked gives 0 and passes gradient 0, never NaN.
    """
    return _attention(q, k, v, attn_mask, dropout_p, "bottom_right" if causal else "none", scale, True,
                      return_lse, backend, fp32_precision, "attention")


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, backend="auto", fp32_precision="ieee"):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (same arguments and results).

    ``is_causal`` is aligned top-left as in torch (key j visible to query i iff j <= i). Inputs are
    (..., H, N, D) as in torch; with ``enable_gqa`` the query heads may be a multiple of the key/value heads.
    Differences from torch: an ``attn_mask`` together with ``is_causal=True`` is allowed (both apply; torch
    raises), and a row whose keys are all masked gives 0 (torch's math backend does the same, others may give NaN).
    ``backend`` and ``fp32_precision`` are as in :func:`tlv_fast.attention`.
    """
    return _attention(query, key, value, attn_mask, dropout_p, "top_left" if is_causal else "none", scale,
                      enable_gqa, False, backend, fp32_precision, "scaled_dot_product_attention")

"""Attention over packed variable-length batches (FlashAttention's ``varlen`` convention).

The sequences of a batch are concatenated along the token axis: q is (total_q, Hq, D), k and v (total_k, Hkv, D|Dv),
and sequence b holds rows ``cu_seqlens[b]:cu_seqlens[b + 1]``. Nothing is computed for padding, because there is
none. The Triton path reuses the attention kernels (their ``VARLEN`` variant) through two ``torch.library`` custom
ops with registered autograd, like :mod:`tlv_fast.ops.sdpa`.
"""
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
    eager_twin,
    no_double_backward,
    triton_runtime,
)
from .sdpa import MAX_HEAD_DIM, _kernels

OP = "varlen_attention"
FAMILY = backends.family(OP, public=(OP,), auto={"cuda": ("triton", "reference"), "cpu": ("reference",)},
                         features=("causal", "dropout", "gqa", "lse"))
TRITON = FAMILY.declare(backends.Implementation(
    OP, "triton", dtypes={"cuda": TRITON_DTYPES, "cpu": TRITON_DTYPES}, max_head_dim=MAX_HEAD_DIM,
    runtime=triton_runtime(_kernels), notes={"cpu": "only under `TRITON_INTERPRET=1` (tests; slow)"}))
REFERENCE = FAMILY.declare(backends.Implementation(
    OP, "reference", dtypes={"cuda": FLOAT_DTYPES, "cpu": FLOAT_DTYPES},
    summary="one eager attention per sequence"))


def _packed(t):
    """(total, H, D) -> the (1, H, total, D) view the kernels read."""
    return t.unsqueeze(0).transpose(1, 2)


def _fwd_impl(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
              max_seqlen_k: int, seed: Optional[Tensor], scale: float, causal: bool, dropout_p: float,
              precision: str) -> tuple[Tensor, Tensor]:
    total_q, H, _ = q.shape
    poison = testing.poison_enabled()
    out = testing.poison(q.new_empty((total_q, H, v.shape[2])), poison)
    lse = testing.poison(torch.empty((H, total_q), device=q.device, dtype=torch.float32), poison)
    if total_q == 0:
        return out, lse
    if max_seqlen_k == 0 or k.shape[0] == 0:  # no keys anywhere: every row is empty -> 0, lse -inf
        return out.zero_(), lse.fill_(float("-inf"))
    if dropout_p > 0.0 and seed is None:
        raise ValueError("varlen_attention_fwd: dropout_p > 0 needs a seed tensor")
    _kernels().attention_fwd(_packed(q), _packed(k), _packed(v), _packed(out), lse.unsqueeze(0), None, seed, scale,
                             0 if causal else None, dropout_p, precision,
                             varlen=(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    return out, lse


_varlen_fwd = torch.library.custom_op("tlv_fast::varlen_attention_fwd", mutates_args=())(_fwd_impl)


@_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, scale, causal, dropout_p, precision):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[2])), q.new_empty((q.shape[1], q.shape[0]),
                                                                          dtype=torch.float32)


@torch.library.custom_op("tlv_fast::varlen_attention_bwd", mutates_args=())
def _varlen_bwd(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                seed: Optional[Tensor], scale: float, causal: bool, dropout_p: float,
                precision: str) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.shape[0] == 0 or k.shape[0] == 0 or max_seqlen_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    _kernels().attention_bwd(_packed(dout), None if dlse is None else dlse.unsqueeze(0), _packed(q), _packed(k),
                             _packed(v), _packed(out), lse.unsqueeze(0), _packed(dq), _packed(dk), _packed(dv),
                             None, None, seed, scale, 0 if causal else None, dropout_p, precision,
                             varlen=(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    return dq, dk, dv


@_varlen_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, scale, causal,
      dropout_p, precision):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, seed, scale, causal, dropout_p, precision = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k, seed)
    ctx.args = (max_q, max_k)
    ctx.rest = (scale, causal, dropout_p, precision)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, seed = ctx.saved_tensors
    dq, dk, dv = torch.ops.tlv_fast.varlen_attention_bwd(dout, dlse, q, k, v, out, lse, cu_q, cu_k,
                                                         *ctx.args, seed, *ctx.rest)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_varlen_fwd.register_autograd(_backward, setup_context=_setup_context)
no_double_backward("tlv_fast::varlen_attention_bwd", OP)
_eager = eager_twin(_fwd_impl, _setup_context, _backward)


def _check_lengths(name, cu, total, max_seqlen, max_name, validate):
    """cu_seqlens: 1-D int32/int64 (B + 1,) on the data's device, from 0 to `total`, nondecreasing, no step above
    max_seqlen (validate reads the values: one device synchronisation)."""
    if not isinstance(cu, Tensor):
        raise TypeError(f"{OP}: {name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.ndim != 1 or cu.shape[0] < 2:
        raise ValueError(f"{OP}: {name} must be 1-D with batch + 1 >= 2 entries, got shape {tuple(cu.shape)}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{OP}: {name} must be int32 (or int64), got {cu.dtype}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"{OP}: {max_name} must be an int >= 0, got {max_seqlen!r}")
    if total >= 2**31:
        raise ValueError(f"{OP}: at most 2**31 - 1 packed rows are supported, got {total}")
    if validate:
        lengths = cu[1:] - cu[:-1]
        first, last, shortest, longest = torch.stack(
            [cu[0], cu[-1], lengths.min(), lengths.max()]).tolist()
        if first != 0 or last != total:
            raise ValueError(f"{OP}: {name} must start at 0 and end at the number of packed rows ({total}), got "
                             f"{first} ... {last}")
        if shortest < 0:
            raise ValueError(f"{OP}: {name} must be nondecreasing (sequence lengths >= 0)")
        if longest > max_seqlen:
            raise ValueError(f"{OP}: {max_name} ({max_seqlen}) is below the longest sequence in {name} ({longest})")
    return cu.to(torch.int32)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False, scale=None,
                     dropout_p=0.0, return_lse=False, backend="auto", *, fp32_precision="ieee",
                     validate_lengths=True):
    """Attention over a packed batch of sequences of different lengths (FlashAttention's varlen interface).

    Args:
        q: (total_q, Hq, D); k: (total_k, Hkv, D); v: (total_k, Hkv, Dv): the sequences concatenated along the
            first axis (any strides; read in place). Hq must be a multiple of Hkv (GQA).
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) cumulative lengths, starting at 0 and ending at total_q /
            total_k: query rows cu_seqlens_q[b]:cu_seqlens_q[b+1] attend to key rows cu_seqlens_k[b]:cu_seqlens_k[b+1].
        max_seqlen_q, max_seqlen_k: ints >= the longest query / key sequence (they size the launch grid).
        causal: mask key j for query i when j > i + n_k - n_q, per sequence (bottom-right, as FlashAttention
            >= 2.1 and :func:`tlv_fast.attention`).
        scale: multiplier of q k^T; default 1 / sqrt(D).
        dropout_p: dropout on the attention weights, inside the kernel (as :func:`tlv_fast.attention`).
        return_lse: also return the logsumexp of each row, (Hq, total_q) fp32 (FlashAttention's varlen layout;
            -inf for a row with no key). Gradients flowing into it are honoured.
        backend: "auto", "triton" or "reference" (see tlv_fast.backends); fp32_precision as in
            :func:`tlv_fast.attention`.
        validate_lengths: check cu_seqlens against the totals and max_seqlen (reads them: one host-device
            synchronisation). A bad cu_seqlens would otherwise make the kernel read or write outside the tensors;
            pass False only for lengths known to be right (e.g. inside a CUDA graph capture).

    Returns:
        out (total_q, Hq, Dv) in q's dtype; with return_lse, (out, lse).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(OP, name, t, 3, "(total, heads, head_dim)")
        if t.ndim != 3:
            raise ValueError(f"{OP}: {name} must be (total, heads, head_dim), got shape {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{OP}: q, k and v must share dtype and device, got q {q.dtype} on {q.device} and "
                             f"{name} {t.dtype} on {t.device}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{OP}: q and k must have the same head dim, got {q.shape[2]} and {k.shape[2]}")
    if q.shape[2] == 0 or v.shape[2] == 0:
        raise ValueError(f"{OP}: head dims must be >= 1, got q/k {q.shape[2]} and v {v.shape[2]}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"{OP}: k and v must have the same rows and heads, got {tuple(k.shape)} and {tuple(v.shape)}")
    hq, hk = q.shape[1], k.shape[1]
    if hk == 0 or hq % hk:
        raise ValueError(f"{OP}: query heads ({hq}) must be a multiple of key/value heads ({hk})")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{OP}: dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"{OP}: scale must be a finite number or None, got {scale}")
    check_precision(OP, fp32_precision)
    validate = validate_lengths and not torch.compiler.is_compiling()
    both = isinstance(cu_seqlens_q, Tensor) and isinstance(cu_seqlens_k, Tensor)
    if both and cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"{OP}: cu_seqlens_q and cu_seqlens_k must describe the same batch (the same shape), got "
                         f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")
    cu_q = _check_lengths("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q", validate)
    cu_k = _check_lengths("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k", validate)
    if cu_q.device != q.device or cu_k.device != q.device:
        raise ValueError(f"{OP}: cu_seqlens must be on the data's device {q.device}")

    features = {"causal"} if causal else set()
    if dropout_p > 0.0:
        features.add("dropout")
    if hq != hk:
        features.add("gqa")
    if return_lse:
        features.add("lse")
    chosen = backends.choose(OP, backend, backends.Inputs(q.device, q.dtype, max(q.shape[2], v.shape[2]),
                                                          frozenset(features)))
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
    if chosen == "reference":
        out, lse = reference.varlen_attention(q, k, v, cu_q, cu_k, causal, scale, dropout_p)
    else:
        seed = None
        if dropout_p > 0.0:
            seed = torch.randint(0, 2**31 - 1, (1,), device=q.device, dtype=torch.int64)
            testing.record_seed(seed)
        out, lse = call(torch.ops.tlv_fast.varlen_attention_fwd, _fwd_impl, _eager,
                        (q, k, v, cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k), seed, scale, bool(causal),
                         float(dropout_p), fp32_precision), (q, k, v))
    return (out, lse) if return_lse else out

"""Split-KV attention for few query rows (decoding with a KV cache), in Triton.

The flash-decoding scheme (Dao, Haziza, Massa, Sizov, 2023, "Flash-Decoding for long-context inference"): with one
query row per (batch, head) the forward kernel has too few programs to fill the GPU and each one streams a whole KV
cache. Here the keys of one (batch, kv head) are cut into SPLITS chunks handled by separate programs, each writing a
partial output normalised by its own softmax sum together with that chunk's log-sum-exp; a second kernel combines
the chunks by their log-sum-exps. The query rows of the GQA_GROUP query heads that share a kv head are packed into
one tile (row r is query head hk * GQA_GROUP + r // N_Q, query r % N_Q), so each K/V tile is loaded once for all of
them. With a single chunk the first kernel writes the final output directly (one launch).

Same conventions as kernels/attention.py: scores in base 2 inside, lse in natural log, a row with no visible key
gives output 0 and lse -inf, causal keeps key j for query i iff j <= i + causal_offset. No dropout (the attention
forward kernel serves that case).
"""
import torch
import triton
import triton.language as tl

from .common import (
    C_MASK_BOOL,
    C_MASK_NONE,
    MASK_BOOL,
    MASK_NONE,
    block_dim,
    cdiv,
    dot,
    dot_args,
    launch_untiled,
    next_pow2,
    signature_launch,
    tuning,
)
from .common import interpreted as common_interpreted

MAX_ROWS = 64  # GQA_GROUP * N_Q up to this: the split-KV path (see use_split_kv)
MAX_QUERIES = 16


@triton.jit
def _decode_kernel(
    Q, K, V, Mask, Out, Lse, PartO, PartL,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh,
    H, N_Q, N_K, GQA_GROUP, sm_scale, causal_offset, CHUNK, SPLITS, K_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DIRECT: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # program: (row block, chunk, batch * kv head), chunk fastest so the chunks of one cache run side by side
    pid = tl.program_id(0)
    split = pid % SPLITS
    rest = pid // SPLITS
    H_KV = H // GQA_GROUP
    n_rows = GQA_GROUP * N_Q
    num_r = tl.cdiv(n_rows, BLOCK_M)
    rblock = rest % num_r
    bhk = rest // num_r
    b = bhk // H_KV
    hk = bhk % H_KV

    rows = rblock * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    g = rows // N_Q
    i = rows % N_Q
    h = (hk * GQA_GROUP + g).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h[:, None] * stride_qh + i[:, None] * stride_qm \
        + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    m_rows = Mask + b.to(tl.int64) * stride_mb + h * stride_mh + i * stride_mm  # (BLOCK_M,) row starts

    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, N_K)
    if IS_CAUSAL:  # no row of this tile sees keys past its last query's diagonal
        hi = tl.minimum(hi, tl.maximum(N_Q + causal_offset, 0))
    qk_scale = sm_scale * 1.4426950408889634  # 1/ln 2
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < hi
        if MASK_KIND != C_MASK_NONE:
            mvals = tl.load(m_rows[:, None] + offs_n[None, :] * stride_mn, mask=row_ok[:, None] & key_ok[None, :],
                            other=0)
        kT = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=key_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
        s = dot(q, kT, PRECISION, UPCAST) * qk_scale
        if MASK_KIND != C_MASK_NONE:
            if MASK_KIND == C_MASK_BOOL:  # additive, as in torch: False adds -inf (a NaN score stays NaN)
                s += tl.where(mvals != 0, 0.0, float("-inf"))
            else:
                s += mvals.to(tl.float32) * 1.4426950408889634
        valid = key_ok[None, :]
        if IS_CAUSAL:
            valid = valid & (offs_n[None, :] <= i[:, None] + causal_offset)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=key_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse2 = m_i + tl.math.log2(l_i)  # -inf for a row without keys
    dv_ok = offs_dv[None, :] < HEAD_DIM_V
    if DIRECT:
        o_ptrs = Out + b.to(tl.int64) * stride_ob + h[:, None] * stride_oh + i[:, None] * stride_om \
            + offs_dv[None, :] * stride_od
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & dv_ok)
        tl.store(Lse + b.to(tl.int64) * stride_lb + h * stride_lh + i, lse2 * 0.6931471805599453, mask=row_ok)
    else:  # partials: (B, H, N_Q, SPLITS, BLOCK_DV) and (B, H, N_Q, SPLITS), fp32, contiguous
        part = ((b.to(tl.int64) * H + h) * N_Q + i) * SPLITS + split
        tl.store(PartO + part[:, None] * BLOCK_DV + offs_dv[None, :], acc, mask=row_ok[:, None] & dv_ok)
        tl.store(PartL + part, lse2, mask=row_ok)


@triton.jit
def _combine_kernel(Out, Lse, PartO, PartL, stride_ob, stride_oh, stride_om, stride_od, stride_lb, stride_lh,
                    H, N_Q, SPLITS, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr):
    # one program per (batch, head, query row): out = sum_s 2^(l_s - L) o_s, L = log2 sum_s 2^l_s
    row = tl.program_id(0).to(tl.int64)  # (b * H + h) * N_Q + i
    i = row % N_Q
    bh = row // N_Q
    b = bh // H
    h = bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    l_s = tl.load(PartL + row * SPLITS + offs_s, mask=offs_s < SPLITS, other=float("-inf"))
    m = tl.max(l_s, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(l_s - m_use)  # 0 for chunks without keys
    total = tl.sum(w, 0)
    o_s = tl.load(PartO + (row * SPLITS + offs_s)[:, None] * BLOCK_DV + offs_dv[None, :],
                  mask=(offs_s[:, None] < SPLITS) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    out = tl.sum(o_s * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + b * stride_ob + h * stride_oh + i * stride_om + offs_dv * stride_od,
             out.to(Out.dtype.element_ty), mask=offs_dv < HEAD_DIM_V)
    tl.store(Lse + b * stride_lb + h * stride_lh + i, (m + tl.math.log2(total)) * 0.6931471805599453)


# (BLOCK_M, BLOCK_N, num_warps, num_stages): BLOCK_M holds GQA_GROUP * N_Q rows; memory-bound, so small tiles and
# deep pipelines (autotuned only with TLV_FAST_AUTOTUNE=1)
DECODE_TILES = [(16, 64, 4, 4), (32, 64, 4, 4), (64, 64, 4, 3), (16, 32, 4, 4), (32, 32, 4, 3),
                (64, 32, 4, 3), (16, 64, 8, 3)]


def _rows(args):
    return args["GQA_GROUP"] * args["N_Q"]


def _pinned(args):
    rows = max(16, min(MAX_ROWS, next_pow2(_rows(args))))
    wide = max(args.get("BLOCK_D", 64), args.get("BLOCK_DV", 64)) > 128
    return (rows, 32 if wide or rows == 64 else 64, 4, 3 if rows > 16 else 4)


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    need = max(16, min(MAX_ROWS, next_pow2(_rows(args))))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] == need]
    return kept or configs[:1]


tuning(_decode_kernel, DECODE_TILES, ["N_Q", "GQA_GROUP", "K_BUCKET", "HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL",
                                      "MASK_KIND", "DIRECT"], _prune, pinned=_pinned)

_sm_count = {}


def _programs_wanted(device):
    """About four programs per streaming multiprocessor (132 on H100/H200 when the device cannot be asked)."""
    n = _sm_count.get(device)
    if n is None:
        n = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        _sm_count[device] = n
    return 4 * n


def use_split_kv(n_q, n_k, gqa_group, dropout_p):
    """The shapes this kernel is for: at most MAX_QUERIES query rows, GQA group * rows within one tile, no dropout."""
    return dropout_p == 0.0 and n_q <= MAX_QUERIES and gqa_group * n_q <= MAX_ROWS and n_k > 0


def num_splits(B, h_kv, n_k, device, block_n=64):
    """Chunks per KV cache: enough programs to fill the GPU, each chunk at least 4 tiles of keys."""
    want = cdiv(_programs_wanted(device), max(B * h_kv, 1))
    return max(1, min(want, cdiv(n_k, 4 * block_n)))


def _mask_args(mask, q):
    """Kernel arguments of an optional mask (bool viewed as uint8, or float) expanded to (B, Hq, Nq, Nk)."""
    if mask is None:
        return dict(stride_mb=0, stride_mh=0, stride_mm=0, stride_mn=0), MASK_NONE
    sb, sh, sm, sn = mask.stride()
    return dict(stride_mb=sb, stride_mh=sh, stride_mm=sm, stride_mn=sn), MASK_BOOL if mask.dtype == torch.uint8 else 2


def attention_decode(q, k, v, out, lse, mask=None, sm_scale=1.0, causal_offset=None, precision="ieee", splits=None):
    """Forward into `out` (B, Hq, Nq, Dv) and `lse` (B, Hq, Nq) fp32 (last dim contiguous) for few query rows.

    Arguments as kernels.attention.attention_fwd (no dropout). splits: chunks per KV cache (default: num_splits).
    """
    B, H, n_q, d = q.shape
    h_kv, n_k, dv = k.shape[1], k.shape[2], v.shape[3]
    bd, bdv = block_dim(d), block_dim(dv)
    n_keys = n_k if causal_offset is None else max(0, min(n_k, n_q + causal_offset))
    splits = splits or num_splits(B, h_kv, n_keys, q.device)
    chunk = cdiv(cdiv(max(n_keys, 1), splits), 64) * 64  # a multiple of every tile's BLOCK_N
    splits = cdiv(max(n_keys, 1), chunk)
    direct = splits == 1
    if direct:
        part_o = part_l = lse
    else:
        part_o = torch.empty((B, H, n_q, splits, bdv), device=q.device, dtype=torch.float32)
        part_l = torch.empty((B, H, n_q, splits), device=q.device, dtype=torch.float32)
    ob, oh, om, od = out.stride()
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    tensors = {"Q": q, "K": k, "V": v, "Mask": q if mask is None else mask, "Out": out, "Lse": lse, "PartO": part_o,
               "PartL": part_l}
    # the cache's length and its chunking change every step: scalars of the launch, not part of its signature
    key = ("decode", q.dtype, q.shape, q.stride(), k.shape[:2], k.shape[3], k.stride(), v.shape[:2], v.shape[3],
           v.stride(), out.stride(), lse.stride(), None if mask is None else (mask.dtype, mask.stride()), sm_scale,
           causal_offset, precision, direct, tuple(t.data_ptr() & 15 for t in tensors.values()))
    scalars = {"N_K": n_k, "CHUNK": chunk, "SPLITS": splits, "K_BUCKET": next_pow2(n_k)}
    rows = (H // h_kv) * n_q

    def build():
        margs, kind = _mask_args(mask, q)
        (qb, qh, qm, qd), (kb, kh, kn, kd), (vb, vh, vn, vd) = q.stride(), k.stride(), v.stride()
        args = {
            **margs,
            "stride_qb": qb, "stride_qh": qh, "stride_qm": qm, "stride_qd": qd,
            "stride_kb": kb, "stride_kh": kh, "stride_kn": kn, "stride_kd": kd,
            "stride_vb": vb, "stride_vh": vh, "stride_vn": vn, "stride_vd": vd,
            "stride_ob": ob, "stride_oh": oh, "stride_om": om, "stride_od": od,
            "stride_lb": lse.stride(0), "stride_lh": lse.stride(1),
            "H": H, "N_Q": n_q, "GQA_GROUP": H // h_kv, "sm_scale": float(sm_scale),
            "causal_offset": int(causal_offset or 0),
            "HEAD_DIM": d, "HEAD_DIM_V": dv, "BLOCK_D": bd, "BLOCK_DV": bdv, "IS_CAUSAL": causal_offset is not None,
            "MASK_KIND": kind, "DIRECT": direct, **dot_args(_decode_kernel, q.dtype, precision),
        }
        return None, args
    signature_launch(_decode_kernel, key, tensors, build, scalars,
                     lambda meta: (cdiv(rows, meta["BLOCK_M"]) * splits * B * h_kv,))
    if not direct:
        launch_untiled(_combine_kernel, (B * H * n_q,), dict(
            Out=out, Lse=lse, PartO=part_o, PartL=part_l, stride_ob=ob, stride_oh=oh, stride_om=om, stride_od=od,
            stride_lb=lse.stride(0), stride_lh=lse.stride(1), H=H, N_Q=n_q, SPLITS=splits, HEAD_DIM_V=dv,
            BLOCK_DV=bdv, BLOCK_S=max(2, next_pow2(splits))))
    return out, lse


def interpreted():
    return common_interpreted(_decode_kernel)


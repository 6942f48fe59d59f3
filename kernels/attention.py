"""FlashAttention-2 forward and backward in Triton (Dao, 2023, arXiv:2307.08691).

Launchers ``attention_fwd`` / ``attention_bwd`` take (B, H, N, D) tensors of any strides and never materialise
the N x N score matrix (except ``dmask``, the gradient of a float mask that asks for one, which *is* N x N).

Conventions inside the kernels
- scores are kept in base 2: s2 = (q.k * scale + bias) * log2(e), so softmax uses exp2 (one MUFU op);
- ``lse`` is stored in natural log, (B, H, Nq) fp32; a row with no visible key has lse = -inf and output 0;
- causal masking keeps key j for query i iff j <= i + causal_offset (0: top-left, Nk - Nq: bottom-right);
- dropout keeps entry (b, h, i, j) iff philox(seed | (b*H + h) << 32, i*Nk + j) >= p; forward, backward and
  ``dropout_keep_mask`` (the testing hook) call the same ``_dropout_keep``. The counter is 32-bit: streams repeat
  within one (batch, head) only beyond 2^32 query-key pairs (Nq = Nk > 65536).
"""
import torch
import triton
import triton.language as tl

from .common import (
    BCAST_ALONG_A,
    BCAST_ALONG_B,
    BCAST_NONE,
    C_ALONG_A,
    C_MASK_BOOL,
    C_MASK_NONE,
    MASK_BOOL,
    MASK_FLOAT,
    MASK_NONE,
    backward_delta,
    bias_tile,
    block_dim,
    cdiv,
    dot,
    dot_args,
    launch,
    load_tile,
    next_pow2,
    signature_launch,
    store_tile,
    tuning,
)
from .common import configs as configs_of
from .common import interpreted as common_interpreted
from .decode import attention_decode, use_split_kv

# ----------------------------------------------------------------------------------------------------------------
# attention-only device helpers (the shared tile helpers are in common.py)
# ----------------------------------------------------------------------------------------------------------------
_SCAN = tl.constexpr(1024)  # keys a key-padding scan reads per step


@triton.jit
def _dropout_keep(seed, bh, offs_a, offs_b, N_K, A_IS_KEY: tl.constexpr, dropout_p):
    # keep[a, b] for a tile indexed (query i, key j) or, when A_IS_KEY, (key j, query i)
    seed64 = seed.to(tl.uint64) | (bh.to(tl.uint64) << 32)
    if A_IS_KEY:
        counter = offs_b[None, :] * N_K + offs_a[:, None]
    else:
        counter = offs_a[:, None] * N_K + offs_b[None, :]
    return tl.rand(seed64, counter.to(tl.int32)) >= dropout_p


@triton.jit
def _sequence(Cu, b, N, VARLEN: tl.constexpr):
    # (first row, length) of batch entry b: from the cumulative lengths of a packed (varlen) batch, else (0, N)
    if VARLEN:
        first = tl.load(Cu + b)
        return first.to(tl.int64), tl.load(Cu + b + 1) - first
    else:
        return 0, N


@triton.jit
def _keys_kept(mask_base, stride_mn, N_K, MASK_KIND: tl.constexpr, MASK_BCAST: tl.constexpr):
    # 1 + the last key a key-padding mask (bool, one row for all queries) keeps, 0 if none; N_K for other masks.
    # Keys past it are never loaded: a padded batch costs what its longest sequence costs.
    if MASK_KIND == C_MASK_BOOL and MASK_BCAST == C_ALONG_A:
        last = tl.zeros([], dtype=tl.int32) - 1
        for start in range(0, N_K, _SCAN):
            offs = start + tl.arange(0, _SCAN)
            keep = tl.load(mask_base + offs * stride_mn, mask=offs < N_K, other=0)
            last = tl.maximum(last, tl.max(tl.where(keep != 0, offs, -1), 0))
        return last + 1
    else:
        return N_K


@triton.jit
def _key_range(start_m, N_Q, N_K, kept, causal_offset, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    # keys [0, n_full) are in range and visible to every row of the query block at start_m (n_full a multiple of
    # BLOCK_N); keys [n_full, hi) need masking; both 0 for a block past the last query row. kept: keys past it
    # are all masked (see _keys_kept)
    hi = tl.minimum(N_K, kept)
    if IS_CAUSAL:
        n_full = tl.minimum(hi, tl.maximum(start_m + causal_offset + 1, 0))
        hi = tl.minimum(hi, tl.maximum(start_m + BLOCK_M + causal_offset, 0))
    else:
        n_full = hi
    hi = tl.where(start_m < N_Q, hi, 0)
    return (tl.where(start_m < N_Q, n_full, 0) // BLOCK_N) * BLOCK_N, hi


# ----------------------------------------------------------------------------------------------------------------
# forward: O = softmax(Q K^T * scale + bias) V, one program per (query block, batch*head)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, mask_base, seed, bh,
                    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                    offs_m, offs_d, offs_dv, lo, hi, N_Q, N_K, drop_nk, qk_scale, causal_offset, dropout_p,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
                    CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr, CHECK_M: tl.constexpr,
                    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_BCAST: tl.constexpr,
                    HAS_DROPOUT: tl.constexpr, FOLD_SCALE: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr):
    # MASKED: this key range may hold keys past N_K or above the causal diagonal.
    # FOLD_SCALE (no mask, scale > 0): the running max is taken over the raw q.k and the scale enters once, in the
    # exponent's multiply-add, as in Triton's fused-attention tutorial; otherwise scores are scaled, then biased.
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASK_KIND != C_MASK_NONE:  # issued before the product is waited on
            bias = bias_tile(mask_base, offs_m, offs_n, stride_mm, stride_mn, N_Q, N_K,
                             MASK_KIND, MASK_BCAST, CHECK_M, MASKED)
        kT = load_tile(k_base, offs_d, offs_n, stride_kd, stride_kn, HEAD_DIM, N_K, CHECK_D, MASKED)  # (D, N)
        if FOLD_SCALE:
            s = dot(q, kT, PRECISION, UPCAST)  # raw q.k
        else:
            s = dot(q, kT, PRECISION, UPCAST) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
            if MASK_KIND != C_MASK_NONE:
                s += bias
        if MASKED:
            valid = offs_n[None, :] < N_K
            if IS_CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
            s = tl.where(valid, s, float("-inf"))
        if FOLD_SCALE:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED or MASK_KIND != C_MASK_NONE:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: keep exp2 finite
        else:
            m_use = m_new
        if FOLD_SCALE:
            p = tl.math.exp2(s * qk_scale - m_use[:, None])
        else:
            p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            p = tl.where(_dropout_keep(seed, bh, offs_m, offs_n, drop_nk, False, dropout_p), p, 0.0)
        v = load_tile(v_base, offs_n, offs_dv, stride_vn, stride_vd, N_K, HEAD_DIM_V, MASKED, CHECK_DV)
        acc = acc + dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.heuristics({
    "EVEN_M": lambda a: not a["VARLEN"] and a["N_Q"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: not a["VARLEN"] and a["N_K"] % a["BLOCK_N"] == 0,
})
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, Mask, Seed, CuQ, CuK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_lb, stride_lh,
    H, N_Q, N_K, GQA_GROUP, sm_scale, causal_offset, dropout_p, Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr,  # head dims padded up to their tiles
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, FOLD_SCALE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    # program order: query block major, so the heaviest causal blocks of every (batch, head) go first
    num_m = tl.cdiv(N_Q, BLOCK_M)
    pid = tl.program_id(0)
    n_bh = tl.num_programs(0) // num_m
    bh = pid % n_bh
    pid_m = num_m - 1 - pid // n_bh
    b = bh // H
    h = bh % H
    hk = h // GQA_GROUP
    drop_nk = N_K  # the dropout counter's row length: the padded one for a packed batch
    q0, N_Q = _sequence(CuQ, b, N_Q, VARLEN)
    k0, N_K = _sequence(CuK, b, N_K, VARLEN)
    if VARLEN and IS_CAUSAL:
        causal_offset = N_K - N_Q  # bottom-right, per sequence
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q0 * stride_qm
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + k0 * stride_kn
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh + k0 * stride_vn
    mask_base = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)

    kept = _keys_kept(mask_base, stride_mn, N_K, MASK_KIND, MASK_BCAST)
    n_full, hi = _key_range(start_m, N_Q, N_K, kept, causal_offset, IS_CAUSAL, BLOCK_M, BLOCK_N)
    q = load_tile(q_base, offs_m, offs_d, stride_qm, stride_qd, N_Q, HEAD_DIM, not EVEN_M, CHECK_D)  # (M, D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # 1/ln 2: exp(x) = exp2(x * log2 e)

    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, mask_base, seed, bh,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        offs_m, offs_d, offs_dv, 0, n_full, N_Q, N_K, drop_nk, qk_scale, causal_offset, dropout_p,
        HEAD_DIM, HEAD_DIM_V, BLOCK_N, CHECK_D, CHECK_DV, not EVEN_M,
        False, IS_CAUSAL, MASK_KIND, MASK_BCAST, HAS_DROPOUT, FOLD_SCALE, PRECISION, UPCAST)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, mask_base, seed, bh,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        offs_m, offs_d, offs_dv, n_full, hi, N_Q, N_K, drop_nk, qk_scale, causal_offset, dropout_p,
        HEAD_DIM, HEAD_DIM_V, BLOCK_N, CHECK_D, CHECK_DV, not EVEN_M,
        True, IS_CAUSAL, MASK_KIND, MASK_BCAST, HAS_DROPOUT, FOLD_SCALE, PRECISION, UPCAST)

    # rows that saw no key (fully masked): l = 0 -> output 0, lse = -inf
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    if HAS_DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p) / l_safe)[:, None]
    else:
        acc = acc * (1.0 / l_safe)[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # ln 2: back to natural log
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + q0 * stride_om
    store_tile(o_base, acc.to(Out.dtype.element_ty), offs_m, offs_dv, stride_om, stride_od, N_Q, HEAD_DIM_V,
                not EVEN_M, CHECK_DV)
    lse_ptrs = Lse + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q0 + offs_m
    if EVEN_M:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=offs_m < N_Q)


# ----------------------------------------------------------------------------------------------------------------
# backward (FA2 section 3.2, by recomputation from lse):
#   P = exp(S - lse), dV = P^T dO, dP = dO V^T, dS = P * (dP - Delta), dQ = dS K * scale, dK = dS^T Q * scale,
#   Delta = rowsum(dO * O) - dlse (the gradient reaching the returned lse enters dS as + P * dlse)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_lse2(Lse, offs_m, N_Q, CHECK_M: tl.constexpr):
    # lse in log2 units; rows without keys (lse = -inf) and rows past N_Q get +inf so that exp2(s - lse) = 0
    if CHECK_M:
        lse = tl.load(Lse + offs_m, mask=offs_m < N_Q, other=float("-inf"))
    else:
        lse = tl.load(Lse + offs_m)
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # 1/ln 2


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, dmask_base, seed, bh,
                         stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn, stride_dmm, stride_dmn,
                         offs_n, offs_d, offs_dv, lo, hi, N_Q, N_K, drop_nk, qk_scale, causal_offset, dropout_p,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
                         CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr,
                         CAUSAL_MASK: tl.constexpr, MASK_KIND: tl.constexpr, MASK_BCAST: tl.constexpr,
                         HAS_DROPOUT: tl.constexpr, STORE_DMASK: tl.constexpr,
                         PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # tiles are transposed, (keys, queries), so no large operand needs a transpose
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        if MASK_KIND != C_MASK_NONE:
            biasT = bias_tile(mask_base, offs_n, offs_m, stride_mn, stride_mm, N_K, N_Q,
                              MASK_KIND, (3 - MASK_BCAST) % 3, CHECK_N, CHECK_M)  # transposed: ALONG_A <-> ALONG_B
        qT = load_tile(q_base, offs_d, offs_m, stride_qd, stride_qm, HEAD_DIM, N_Q, CHECK_D, CHECK_M)  # (D, M)
        lse2 = _load_lse2(lse_base, offs_m, N_Q, CHECK_M)
        sT = dot(k, qT, PRECISION, UPCAST) * qk_scale  # (N, M)
        if MASK_KIND != C_MASK_NONE:
            sT += biasT
        pT = tl.math.exp2(sT - lse2[None, :])
        if CAUSAL_MASK or CHECK_N:
            valid = offs_n[:, None] < N_K
            if CAUSAL_MASK:
                valid = valid & (offs_n[:, None] <= offs_m[None, :] + causal_offset)
            pT = tl.where(valid, pT, 0.0)
        do = load_tile(do_base, offs_m, offs_dv, stride_dom, stride_dod, N_Q, HEAD_DIM_V, CHECK_M, CHECK_DV)
        dpT = dot(v, tl.trans(do), PRECISION, UPCAST)  # (N, M)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_n, offs_m, drop_nk, True, dropout_p)
            inv_keep = 1.0 / (1.0 - dropout_p)
            dv += dot(tl.where(keep, pT * inv_keep, 0.0).to(do.dtype), do, PRECISION, UPCAST)
            dpT = tl.where(keep, dpT * inv_keep, 0.0)
        else:
            dv += dot(pT.to(do.dtype), do, PRECISION, UPCAST)
        if CHECK_M:
            delta = tl.load(delta_base + offs_m, mask=offs_m < N_Q, other=0.0)
        else:
            delta = tl.load(delta_base + offs_m)
        dsT = pT * (dpT - delta[None, :])
        if STORE_DMASK:
            store_tile(dmask_base, dsT, offs_n, offs_m, stride_dmn, stride_dmm, N_K, N_Q, CHECK_N, CHECK_M)
        dk += dot(dsT.to(qT.dtype), tl.trans(qT), PRECISION, UPCAST)
    return dk, dv


@triton.jit
def _block_kept(mask_base, offs_n, stride_mn, N_K, MASK_KIND: tl.constexpr, MASK_BCAST: tl.constexpr):
    # False when a key-padding mask (bool, one row for all queries) masks every key of this block
    if MASK_KIND == C_MASK_BOOL and MASK_BCAST == C_ALONG_A:
        keep = tl.load(mask_base + offs_n * stride_mn, mask=offs_n < N_K, other=0)
        return tl.max(keep.to(tl.int32), 0) > 0
    else:
        return True


@triton.heuristics({
    "EVEN_M": lambda a: not a["VARLEN"] and a["N_Q"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: not a["VARLEN"] and a["N_K"] % a["BLOCK_N"] == 0,
})
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, Mask, Seed, DK, DV, DMask, CuQ, CuK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dmb, stride_dmh, stride_dmm, stride_dmn,
    stride_lb, stride_lh,
    H, N_Q, N_K, GQA_GROUP, sm_scale, causal_offset, dropout_p, Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr,  # head dims padded up to their tiles
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    STORE_DMASK: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    # one program per (key block, batch*kv-head); it walks the GQA_GROUP query heads that share the kv head, so
    # dK and dV are summed in a fixed order (deterministic, no atomics). Key block major: under a causal mask the
    # first key blocks are seen by the most queries, and they start first across the whole grid.
    num_n = tl.cdiv(N_K, BLOCK_N)
    pid = tl.program_id(0)
    n_bhk = tl.num_programs(0) // num_n
    bhk = pid % n_bhk
    pid_n = pid // n_bhk
    H_KV = H // GQA_GROUP
    b = bhk // H_KV
    hk = bhk % H_KV
    drop_nk = N_K
    q0, N_Q = _sequence(CuQ, b, N_Q, VARLEN)
    k0, N_K = _sequence(CuK, b, N_K, VARLEN)
    if VARLEN and IS_CAUSAL:
        causal_offset = N_K - N_Q
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    k = load_tile(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + k0 * stride_kn, offs_n, offs_d,
                   stride_kn, stride_kd, N_K, HEAD_DIM, not EVEN_N, CHECK_D)  # (N, D)
    v = load_tile(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh + k0 * stride_vn, offs_n, offs_dv,
                   stride_vn, stride_vd, N_K, HEAD_DIM_V, not EVEN_N, CHECK_DV)  # (N, Dv)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # 1/ln 2
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)

    # queries [m_lo, m_full) straddle the causal diagonal of this key block; [m_full, N_Q) see all of it
    m_end = tl.cdiv(N_Q, BLOCK_M) * BLOCK_M
    if IS_CAUSAL:
        m_lo = (tl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M
        m_full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M
        m_lo = tl.minimum(m_lo, m_end)
        m_full = tl.minimum(tl.maximum(m_full, m_lo), m_end)
    else:
        m_lo = 0
        m_full = 0
    in_range = start_n < N_K  # a block past the end of a short sequence stores nothing
    for g in range(0, GQA_GROUP):
        h = hk * GQA_GROUP + g
        bh = b * H + h
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q0 * stride_qm
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + q0 * stride_dom
        mask_base = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
        dmask_base = DMask + b.to(tl.int64) * stride_dmb + h.to(tl.int64) * stride_dmh
        lse_base = Lse + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q0
        delta_base = Delta + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q0
        live = in_range & _block_kept(mask_base, offs_n, stride_mn, N_K, MASK_KIND, MASK_BCAST)
        m_stop = tl.where(live, N_Q, 0)
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, dmask_base, seed, bh,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn, stride_dmm, stride_dmn,
            offs_n, offs_d, offs_dv, m_lo, tl.minimum(m_full, m_stop), N_Q, N_K, drop_nk, qk_scale, causal_offset,
            dropout_p, HEAD_DIM, HEAD_DIM_V, BLOCK_M, CHECK_D, CHECK_DV, not EVEN_M, not EVEN_N,
            True, MASK_KIND, MASK_BCAST, HAS_DROPOUT, STORE_DMASK, PRECISION, UPCAST)
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, dmask_base, seed, bh,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn, stride_dmm, stride_dmn,
            offs_n, offs_d, offs_dv, m_full, m_stop, N_Q, N_K, drop_nk, qk_scale, causal_offset, dropout_p,
            HEAD_DIM, HEAD_DIM_V, BLOCK_M, CHECK_D, CHECK_DV, not EVEN_M, not EVEN_N,
            False, MASK_KIND, MASK_BCAST, HAS_DROPOUT, STORE_DMASK, PRECISION, UPCAST)
    dk = dk * sm_scale
    store_tile(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh + k0 * stride_dkn,
                dk.to(DK.dtype.element_ty), offs_n, offs_d, stride_dkn, stride_dkd, N_K, HEAD_DIM, not EVEN_N, CHECK_D)
    store_tile(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh + k0 * stride_dvn,
                dv.to(DV.dtype.element_ty), offs_n, offs_dv, stride_dvn, stride_dvd, N_K, HEAD_DIM_V, not EVEN_N,
                CHECK_DV)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, mask_base, seed, bh,
                       stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                       offs_m, offs_d, offs_dv, lo, hi, N_Q, N_K, drop_nk, qk_scale, causal_offset, dropout_p,
                       HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
                       CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr, CHECK_M: tl.constexpr,
                       MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                       MASK_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASK_KIND != C_MASK_NONE:
            bias = bias_tile(mask_base, offs_m, offs_n, stride_mm, stride_mn, N_Q, N_K,
                             MASK_KIND, MASK_BCAST, CHECK_M, MASKED)
        kT = load_tile(k_base, offs_d, offs_n, stride_kd, stride_kn, HEAD_DIM, N_K, CHECK_D, MASKED)  # (D, N)
        vT = load_tile(v_base, offs_dv, offs_n, stride_vd, stride_vn, HEAD_DIM_V, N_K, CHECK_DV, MASKED)
        s = dot(q, kT, PRECISION, UPCAST) * qk_scale  # (M, N)
        if MASK_KIND != C_MASK_NONE:
            s += bias
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            valid = offs_n[None, :] < N_K
            if IS_CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
            p = tl.where(valid, p, 0.0)
        dp = dot(do, vT, PRECISION, UPCAST)  # (M, N)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, offs_n, drop_nk, False, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq += dot(ds.to(kT.dtype), tl.trans(kT), PRECISION, UPCAST)
    return dq


@triton.heuristics({
    "EVEN_M": lambda a: not a["VARLEN"] and a["N_Q"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: not a["VARLEN"] and a["N_K"] % a["BLOCK_N"] == 0,
})
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, Mask, Seed, DQ, CuQ, CuK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_lb, stride_lh,
    H, N_Q, N_K, GQA_GROUP, sm_scale, causal_offset, dropout_p, Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr,  # head dims padded up to their tiles
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    num_m = tl.cdiv(N_Q, BLOCK_M)
    pid = tl.program_id(0)
    n_bh = tl.num_programs(0) // num_m
    bh = pid % n_bh
    pid_m = num_m - 1 - pid // n_bh  # heaviest causal blocks first, across the grid
    b = bh // H
    h = bh % H
    hk = h // GQA_GROUP
    drop_nk = N_K
    q0, N_Q = _sequence(CuQ, b, N_Q, VARLEN)
    k0, N_K = _sequence(CuK, b, N_K, VARLEN)
    if VARLEN and IS_CAUSAL:
        causal_offset = N_K - N_Q
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + k0 * stride_kn
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh + k0 * stride_vn
    mask_base = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    kept = _keys_kept(mask_base, stride_mn, N_K, MASK_KIND, MASK_BCAST)
    n_full, hi = _key_range(start_m, N_Q, N_K, kept, causal_offset, IS_CAUSAL, BLOCK_M, BLOCK_N)
    q = load_tile(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q0 * stride_qm, offs_m, offs_d,
                   stride_qm, stride_qd, N_Q, HEAD_DIM, not EVEN_M, CHECK_D)
    do = load_tile(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + q0 * stride_dom, offs_m, offs_dv,
                    stride_dom, stride_dod, N_Q, HEAD_DIM_V, not EVEN_M, CHECK_DV)
    row = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q0
    lse2 = _load_lse2(Lse + row, offs_m, N_Q, not EVEN_M)
    if EVEN_M:
        delta = tl.load(Delta + row + offs_m)
    else:
        delta = tl.load(Delta + row + offs_m, mask=offs_m < N_Q, other=0.0)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # 1/ln 2

    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, mask_base, seed, bh,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        offs_m, offs_d, offs_dv, 0, n_full, N_Q, N_K, drop_nk, qk_scale, causal_offset, dropout_p,
        HEAD_DIM, HEAD_DIM_V, BLOCK_N, CHECK_D, CHECK_DV, not EVEN_M,
        False, IS_CAUSAL, MASK_KIND, MASK_BCAST, HAS_DROPOUT, PRECISION, UPCAST)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, mask_base, seed, bh,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        offs_m, offs_d, offs_dv, n_full, hi, N_Q, N_K, drop_nk, qk_scale, causal_offset, dropout_p,
        HEAD_DIM, HEAD_DIM_V, BLOCK_N, CHECK_D, CHECK_DV, not EVEN_M,
        True, IS_CAUSAL, MASK_KIND, MASK_BCAST, HAS_DROPOUT, PRECISION, UPCAST)
    dq = dq * sm_scale
    store_tile(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + q0 * stride_dqm,
                dq.to(DQ.dtype.element_ty), offs_m, offs_d, stride_dqm, stride_dqd, N_Q, HEAD_DIM, not EVEN_M, CHECK_D)


@triton.jit
def _dropout_mask_kernel(Out, Seed, N_Q, N_K, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # testing hook: the keep mask the attention kernels use, as uint8 (B*H, N_Q, N_K)
    bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(tl.load(Seed), bh, offs_m, offs_n, N_K, False, dropout_p)
    ptrs = Out + bh.to(tl.int64) * N_Q * N_K + offs_m[:, None] * N_K + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=(offs_m[:, None] < N_Q) & (offs_n[None, :] < N_K))


# ----------------------------------------------------------------------------------------------------------------
# launch configuration: autotuned on a GPU (keys bucketed so a growing KV cache does not retune every step); the
# interpreter and force_blocks() use one tile (common.launch)
# ----------------------------------------------------------------------------------------------------------------
_TUNE_KEY = ["Q_BUCKET", "K_BUCKET", "HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "MASK_KIND", "HAS_DROPOUT"]
SMEM_LIMIT = 227 * 1024  # bytes per block on H100/H200 (the opt-in maximum)
SCRATCH = 512  # bytes of shared memory beyond the operands that smem_bytes allows for

# (BLOCK_M, BLOCK_N, num_warps, num_stages, largest padded head dim without spills for sm_90 in the plain variant,
# the same in the heavy one -- a mask read as a full tile, dropout or a mask gradient -- 0: never). Measured with
# `python -m benchmarks compile-stats --which all` (benchmarks/RESULTS.md); tests/kernels/test_compile.py (--slow)
# keeps the spill column at zero for every tile the launcher may pick, at head dims 64, 128 and 256, plain, causal
# and heavy. 16-row tiles serve few query rows with dropout (no wgmma); the single-warpgroup ones are those of
# Triton's fused-attention tutorial (fwd 128x64 w4, dK/dV 32x128 w4, dQ 128x32 w4). float32 inputs have their own,
# smaller tiles: their dots hold twice the bytes per operand in registers (and "ieee" precision runs on FMA units).
FWD_TILES = [(128, 64, 4, 3, 64, 0), (128, 128, 8, 3, 128, 0), (128, 128, 8, 2, 128, 0), (128, 64, 8, 3, 256, 128),
             (128, 64, 8, 4, 128, 128), (128, 32, 8, 4, 256, 128), (128, 32, 8, 3, 256, 128), (128, 32, 4, 4, 128, 0),
             (64, 64, 4, 3, 256, 64), (64, 32, 4, 4, 256, 128), (64, 32, 8, 3, 256, 128), (64, 32, 8, 2, 256, 256),
             (16, 64, 4, 4, 256, 256), (16, 128, 4, 3, 128, 0)]
DKDV_TILES = [(32, 128, 4, 3, 64, 0), (32, 128, 8, 3, 128, 64), (64, 128, 8, 3, 64, 0), (32, 64, 4, 3, 128, 64),
              (32, 64, 4, 4, 128, 64), (64, 64, 4, 3, 64, 0), (16, 128, 8, 3, 128, 128), (16, 64, 4, 2, 128, 128),
              (16, 64, 8, 2, 128, 128), (32, 32, 8, 2, 256, 256), (64, 32, 8, 2, 256, 128)]
DQ_TILES = [(128, 32, 4, 3, 64, 0), (128, 32, 8, 3, 256, 128), (128, 64, 8, 3, 128, 64), (128, 64, 8, 2, 128, 0),
            (64, 64, 4, 3, 128, 64), (64, 32, 4, 3, 256, 128), (32, 64, 8, 3, 256, 256), (16, 64, 4, 3, 256, 128)]
FWD_TILES_FP32 = [(64, 32, 8, 3, 64, 64), (64, 32, 8, 2, 64, 64), (32, 32, 4, 2, 64, 64), (64, 16, 4, 2, 64, 64),
                  (32, 16, 4, 2, 256, 256), (32, 16, 8, 2, 256, 256), (16, 16, 4, 2, 256, 256)]
DKDV_TILES_FP32 = [(32, 32, 8, 3, 64, 64), (16, 64, 4, 2, 64, 64), (32, 32, 4, 2, 64, 64), (16, 32, 8, 2, 256, 256),
                   (32, 16, 8, 2, 256, 256), (16, 32, 4, 2, 128, 64), (16, 16, 4, 2, 64, 64)]
DQ_TILES_FP32 = [(32, 64, 8, 2, 128, 128), (32, 32, 8, 2, 256, 256), (16, 64, 4, 2, 128, 128), (16, 32, 4, 2, 256, 128),
                 (32, 16, 4, 2, 128, 128), (32, 32, 4, 2, 64, 64), (64, 16, 4, 2, 64, 64)]
TILES = {"fwd": (FWD_TILES, FWD_TILES_FP32), "dkdv": (DKDV_TILES, DKDV_TILES_FP32), "dq": (DQ_TILES, DQ_TILES_FP32)}


def heavy(args):
    """The register-hungry variant: a mask read as a full tile, dropout, or a mask gradient."""
    full_mask = args.get("MASK_KIND", MASK_NONE) != MASK_NONE and args.get("MASK_BCAST") == BCAST_NONE
    return full_mask or args.get("HAS_DROPOUT", False) or args.get("STORE_DMASK", False)


def _bucket(n):
    return next_pow2(max(int(n), 1))


def smem_bytes(kind, tile, elt, d, dv, mask_elt=0, mask_tile=False):
    """Shared memory a tile of kernel `kind` ("fwd", "dkdv", "dq") takes on sm_90, as the compiler lays it out: the
    operand held for the whole program once, the streamed ones once per pipeline stage, and a mask (a tile when
    mask_tile, else a row) streamed the same way (checked against the compiled kernels, tests/kernels/test_compile.py).
    mask_elt: bytes per mask element (0: no mask). SCRATCH covers the compiler's small buffers (barriers, reductions;
    up to 0.2 KiB measured beyond the operands)."""
    bm, bn, _, stages = tile[:4]
    masked = stages * mask_elt * (bm * bn if mask_tile else bn) + SCRATCH
    if kind == "fwd":  # Q held; K and V streamed
        return elt * (bm * d + stages * bn * (d + dv)) + masked
    if kind == "dkdv":  # K and V held; Q and dO streamed; lse and Delta rows
        return elt * (bn * (d + dv) + stages * bm * (d + dv)) + 8 * stages * bm + masked
    return elt * (bm * (d + dv) + stages * bn * (d + dv)) + masked  # dq: Q and dO held; K and V streamed


def _mask_smem(args):
    """(bytes per mask element, read as a tile) of a launch's mask arguments."""
    if args.get("MASK_KIND", MASK_NONE) == MASK_NONE:
        return 0, False
    return args["Mask"].element_size(), args["MASK_BCAST"] == BCAST_NONE


def _fp32(args):
    q = args.get("Q")
    return q is not None and q.element_size() == 4


def _prune(kind):
    """Autotune candidates for these arguments: tiles of the dtype's table within their spill-free head dim (for this
    variant) and the shared memory, no 16-row query tiles for more than 16 query rows (fwd, dQ), none much larger
    than the problem."""
    max_d = [{t[:4]: t[4:] for t in table} for table in TILES[kind]]

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        elt, d, dv = args["Q"].element_size(), args["BLOCK_D"], args["BLOCK_DV"]
        n_q, n_k = args["N_Q"], args["N_K"]
        mask_elt, mask_tile = _mask_smem(args)
        limits, limit = max_d[elt == 4], 1 if heavy(args) else 0
        kept = []
        for c in configs:
            tile = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            bm, bn = tile[:2]
            if tile not in limits or max(d, dv) > limits[tile][limit] \
                    or smem_bytes(kind, tile, elt, d, dv, mask_elt, mask_tile) > SMEM_LIMIT:
                continue
            if kind != "dkdv" and bm == 16 and n_q > 16:
                continue
            if (bm > 16 and bm >= 2 * _bucket(n_q)) or (bn > 16 and bn >= 2 * _bucket(n_k)):
                continue
            kept.append(c)
        return kept or configs_of([_PINNED[kind](args)])  # the pinned tile is spill-free for every shape
    return prune


def _width(args):
    return max(args.get("BLOCK_D", 64), args.get("BLOCK_DV", 64))


def _pinned_fwd(args):
    """The forward's tile without autotuning (spill-free for the variant): few query rows (with dropout; otherwise
    kernels/decode.py serves them) take 16-row tiles; otherwise the single-warpgroup 128 x 64 up to head dim 64, two
    warpgroups at 128, narrower beyond; float32 its own small tiles."""
    d, h = _width(args), heavy(args)
    if _fp32(args):
        return (64, 32, 8, 3) if d <= 64 else (32, 16, 4, 2) if d <= 128 else (32, 16, 8, 2)
    if args.get("N_Q", 128) <= 16:
        return (16, 128, 4, 3) if d <= 128 and not h else (16, 64, 4, 4)
    if d <= 64 and not h:
        return (128, 64, 4, 3)
    if d <= 128:
        return (128, 64, 8, 3)
    return (64, 32, 8, 2) if h else (128, 32, 8, 3)


def _pinned_dkdv(args):
    d, h = _width(args), heavy(args)
    if _fp32(args):
        return (32, 32, 8, 3) if d <= 64 else (16, 32, 8, 2)
    if h:
        return (32, 128, 8, 3) if d <= 64 else (16, 128, 8, 3) if d <= 128 else (32, 32, 8, 2)
    return (32, 128, 4, 3) if d <= 64 else (32, 128, 8, 3) if d <= 128 else (64, 32, 8, 2)


def _pinned_dq(args):
    d, h = _width(args), heavy(args)
    if _fp32(args):
        return (32, 64, 8, 2) if d <= 128 else (32, 32, 8, 2)
    if args.get("N_Q", 128) <= 16:
        return (16, 64, 4, 3) if d <= 128 or not h else (32, 64, 8, 3)
    if d <= 64 and not h:
        return (128, 32, 4, 3)
    return (128, 32, 8, 3) if d <= 128 else (32, 64, 8, 3) if h else (64, 32, 4, 3)


_PINNED = {"fwd": _pinned_fwd, "dkdv": _pinned_dkdv, "dq": _pinned_dq}


def _table(kind):
    """Every tile of `kind` for the autotuner (both dtype tables; pruning keeps the dtype's own)."""
    return list(dict.fromkeys(t[:4] for table in TILES[kind] for t in table))


tuning(_attn_fwd_kernel, _table("fwd"), _TUNE_KEY, _prune("fwd"), pinned=_pinned_fwd)
tuning(_attn_bwd_dkdv_kernel, _table("dkdv"), _TUNE_KEY + ["STORE_DMASK"], _prune("dkdv"), pinned=_pinned_dkdv)
tuning(_attn_bwd_dq_kernel, _table("dq"), _TUNE_KEY, _prune("dq"), pinned=_pinned_dq)


def _grid(rows, axis, others):
    """1-D grid of cdiv(rows, meta[axis]) * others programs (no 65535 limit)."""
    return lambda meta: (cdiv(rows, meta[axis]) * others,)


def _mask_args(mask, q):
    """Kernel arguments for an optional mask already broadcast (expanded) to (B, Hq, Nq, Nk)."""
    if mask is None:
        return dict(Mask=q, stride_mb=0, stride_mh=0, stride_mm=0, stride_mn=0), MASK_NONE, BCAST_NONE
    kind = MASK_BOOL if mask.dtype in (torch.bool, torch.uint8) else MASK_FLOAT  # uint8: a bool mask's view
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    sb, sh, sm, sn = mask.stride()
    n_q, n_k = mask.shape[-2:]
    bcast = BCAST_ALONG_A if (sm == 0 or n_q == 1) else (BCAST_ALONG_B if (sn == 0 or n_k == 1) else BCAST_NONE)
    return dict(Mask=mask, stride_mb=sb, stride_mh=sh, stride_mm=sm, stride_mn=sn), kind, bcast


def _common_args(q, k, v, mask, seed, sm_scale, causal_offset, dropout_p, precision, varlen, lse):
    B, H, n_q, d = q.shape
    n_k, dv = k.shape[2], v.shape[3]
    bd, bdv = block_dim(d), block_dim(dv)
    (qb, qh, qm, qd), (kb, kh, kn, kd), (vb, vh, vn, vd) = q.stride(), k.stride(), v.stride()
    margs, kind, bcast = _mask_args(mask, q)
    if varlen is None:
        cu_q = cu_k = q
        lb, lh = lse.stride(0), lse.stride(1)
    else:  # packed rows: q (1, H, total, D) views; batch entries from the cumulative lengths, no batch stride
        cu_q, cu_k, n_q, n_k = varlen
        B = cu_q.shape[0] - 1
        qb = kb = vb = lb = 0
        lh = lse.stride(1)
    return B, {
        "Q": q, "K": k, "V": v, "Seed": seed if seed is not None else q, **margs, "CuQ": cu_q, "CuK": cu_k,
        "stride_qb": qb, "stride_qh": qh, "stride_qm": qm, "stride_qd": qd,
        "stride_kb": kb, "stride_kh": kh, "stride_kn": kn, "stride_kd": kd,
        "stride_vb": vb, "stride_vh": vh, "stride_vn": vn, "stride_vd": vd,
        "stride_lb": lb, "stride_lh": lh,
        "H": H, "N_Q": n_q, "N_K": n_k, "GQA_GROUP": H // k.shape[1], "sm_scale": float(sm_scale),
        "causal_offset": int(causal_offset or 0), "dropout_p": float(dropout_p),
        "Q_BUCKET": _bucket(n_q), "K_BUCKET": _bucket(n_k),
        "HEAD_DIM": d, "HEAD_DIM_V": dv, "BLOCK_D": bd, "BLOCK_DV": bdv, "CHECK_D": d != bd, "CHECK_DV": dv != bdv,
        "IS_CAUSAL": causal_offset is not None, "MASK_KIND": kind, "MASK_BCAST": bcast, "HAS_DROPOUT": dropout_p > 0.0,
        "VARLEN": varlen is not None, **dot_args(_attn_fwd_kernel, q.dtype, precision),
    }


def attention_fwd(q, k, v, out, lse, mask=None, seed=None, sm_scale=1.0, causal_offset=None, dropout_p=0.0,
                  precision="ieee", varlen=None, split_kv=None):
    """Forward into `out` (B, Hq, Nq, Dv) and `lse` (B, Hq, Nq) fp32, last dim contiguous.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), any strides; Hq % Hkv == 0.
    mask: None, or bool/float broadcast (expanded) to (B, Hq, Nq, Nk). seed: int64 tensor (1,) when dropout_p > 0.
    causal_offset: None (no causal mask) or c, keeping key j for query i iff j <= i + c.
    varlen: None, or (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) for a packed batch: q, k, v, out are
    then (1, H, total, D) views of (total, H, D) tensors, lse a (1, H, total) view, sequence b holds rows
    [cu[b], cu[b+1]), no mask, and a causal mask is aligned bottom-right per sequence (causal_offset ignored).
    split_kv: None (auto: kernels/decode.py for few query rows, see use_split_kv), True or False.
    """
    if split_kv is None:
        split_kv = varlen is None and use_split_kv(q.shape[2], k.shape[2], q.shape[1] // k.shape[1], dropout_p)
    if split_kv:
        if dropout_p > 0.0:
            raise ValueError("attention_fwd: split_kv=True does not implement dropout (dropout_p must be 0)")
        return attention_decode(q, k, v, out, lse, mask, sm_scale, causal_offset, precision)
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    tensors = {"Q": q, "K": k, "V": v, "Out": out, "Lse": lse, "Mask": q if mask is None else mask,
               "Seed": q if seed is None else seed, "CuQ": q if varlen is None else varlen[0],
               "CuK": q if varlen is None else varlen[1]}
    key = ("fwd", q.dtype, q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), out.stride(), lse.stride(),
           None if mask is None else (mask.dtype, mask.stride()), sm_scale, causal_offset, dropout_p, precision,
           None if varlen is None else varlen[2:], tuple(t.data_ptr() & 15 for t in tensors.values()))

    def build():
        B, args = _common_args(q, k, v, mask, seed, sm_scale, causal_offset, dropout_p, precision, varlen, lse)
        ob, oh, om, od = out.stride()
        args.update(stride_ob=0 if varlen else ob, stride_oh=oh, stride_om=om, stride_od=od,
                    FOLD_SCALE=args["MASK_KIND"] == MASK_NONE and sm_scale > 0)
        return _grid(args["N_Q"], "BLOCK_M", B * args["H"]), args
    signature_launch(_attn_fwd_kernel, key, tensors, build)
    return out, lse


def attention_bwd(do, dlse, q, k, v, out, lse, dq, dk, dv, dmask=None, mask=None, seed=None, sm_scale=1.0,
                  causal_offset=None, dropout_p=0.0, precision="ieee", varlen=None):
    """Gradients into dq, dk, dv (shapes of q, k, v; any strides) and, if given, dmask (B, Hq, Nq, Nk) fp32.

    do: gradient of out; dlse: None or gradient of lse (B, Hq, Nq). Other arguments as in attention_fwd.
    dmask, when given, must be zero-filled: blocks that the causal mask skips are not written.
    """
    delta = backward_delta(out, do, dlse)  # the layout of lse: (B, H, Nq) contiguous
    B, common = _common_args(q, k, v, mask, seed, sm_scale, causal_offset, dropout_p, precision, varlen, delta)
    nb = 0 if varlen else 1  # packed batches have no batch stride
    common.update(DO=do, Lse=lse, Delta=delta, stride_dob=do.stride(0) * nb, stride_doh=do.stride(1),
                  stride_dom=do.stride(2), stride_dod=do.stride(3))
    store_dmask = dmask is not None
    dm = dmask if store_dmask else delta.new_empty((1, 1, 1, 1))
    launch(_attn_bwd_dkdv_kernel, _grid(common["N_K"], "BLOCK_N", B * k.shape[1]), dict(
        common, DK=dk, DV=dv, DMask=dm,
        stride_dkb=dk.stride(0) * nb, stride_dkh=dk.stride(1), stride_dkn=dk.stride(2), stride_dkd=dk.stride(3),
        stride_dvb=dv.stride(0) * nb, stride_dvh=dv.stride(1), stride_dvn=dv.stride(2), stride_dvd=dv.stride(3),
        stride_dmb=dm.stride(0), stride_dmh=dm.stride(1), stride_dmm=dm.stride(2), stride_dmn=dm.stride(3),
        STORE_DMASK=store_dmask))
    launch(_attn_bwd_dq_kernel, _grid(common["N_Q"], "BLOCK_M", B * common["H"]), dict(
        common, DQ=dq,
        stride_dqb=dq.stride(0) * nb, stride_dqh=dq.stride(1), stride_dqm=dq.stride(2), stride_dqd=dq.stride(3)))
    return dq, dk, dv, dmask


def dropout_keep_mask(seed, B, H, n_q, n_k, dropout_p):
    """The keep mask (bool, (B, H, Nq, Nk)) the attention kernels apply for this seed tensor and p."""
    out = torch.empty((B, H, n_q, n_k), device=seed.device, dtype=torch.uint8)
    grid = (triton.cdiv(n_q, 16), triton.cdiv(n_k, 16), B * H)
    _dropout_mask_kernel[grid](out, seed, n_q, n_k, float(dropout_p), BLOCK_M=16, BLOCK_N=16)
    return out.bool()


def interpreted():
    """True when these kernels run in Triton's CPU interpreter (decided when they were created)."""
    return common_interpreted(_attn_fwd_kernel)

"""STTR's relative-position attention (Li et al., 2021; docs/sttr.md §2) in Triton, forward and backward.

    logits[i, j] = q_i . k_j + q_i . KR[r_ij] + QR[r_ij] . k_j,     r_ij = sign * (i - j) + ROW0

(ROW0 = Nk - 1 for sign +1, Nq - 1 for sign -1, so rows run 0 .. Nq + Nk - 2). Nothing Nq x Nk x C, nor the
Nq x (Nq + Nk - 1) positional logits, is formed: a (BLOCK_M, BLOCK_N) tile only touches the band of
BLOCK_M + BLOCK_N - 1 table rows between its corners (padded to BLOCK_L), so per tile the positional terms are two
small matmuls with that band, X = Q KR_band^T (BLOCK_M, BLOCK_L) and Y = QR_band K^T (BLOCK_L, BLOCK_N), of which
the tile needs one diagonal each: logits[a, b] += X[a, c] + Y[c, b] with band column c = sign * (a - b) + const.

The relative shift (Dai et al., 2019, Transformer-XL, appendix B). Row a of the tile needs row a of X shifted by a:
that is the flattened X read with a row stride of BLOCK_L + 1 (sign +1; BLOCK_L - 1 for sign -1), and the tile of
Y is the flattened Y read with row stride BLOCK_N and column stride 1 - BLOCK_N (sign +1). Each is written as a
gather on the *flattened* (1-D) product with an affine index: Triton leaves the layout of a 1-D gather alone
(lib/Dialect/TritonGPU/Transforms/OptimizeThreadLocality.cpp returns early for rank 1, since Triton 3.4) and, the
gather not being warp-local, lowers it as one store of the product to shared memory and one load per logit from its
skewed address (lib/Conversion/TritonGPUToLLVM/GatherOpToLLVM.cpp); the reshapes to and from 1-D change no layout.
A 2-D tl.gather along the band axis is instead made warp-local and costs BLOCK_L / 32 warp shuffles and selects per
logit plus two layout conversions (the method before this one: 255 registers with spills at 64 x 64,
benchmarks/RESULTS.md). The backward reads dS the other way round: dKR and dQ's positional part need dS laid out
by band column, DS1[a, c] = dS[a, j(a, c)] (BLOCK_M, BLOCK_L), dQR and dK's part DS2[c, b] = dS[i(c, b), b]
(BLOCK_L, BLOCK_N) -- the adjoint of reading one diagonal is reading the other -- again skewed reads of the
flattened dS (interleaved with zeros, which the band columns a tile does not reach read).

Softmax runs in base 2 as in kernels/attention.py: log2(e) is folded into the exponent's multiply-add,
p = exp2(s * log2 e - m), with m the running row maximum in log2 units. The returned logits (head-summed) stay in
natural units and lse is stored in natural log, as the op (tlv_fast/ops/relpos.py) expects.

Backward, as FlashAttention-2's (Dao, 2023, arXiv:2307.08691): two kernels recompute P from lse, one by key tile
(dK, dV in registers; dQR) and one by query tile (dQ in registers; dKR), which keeps each spill-free. The table
gradients are summed over tiles and the batch: each program accumulates them tile by tile (read-modify-write, a
barrier between tiles) in a buffer private to it, which it zero-fills first so that a launch is idempotent (the
autotuner reruns it); the launcher sums the buffers in a fixed order -- deterministic, no atomics. One program per
(part, batch, head): when batch x heads are too few to fill the GPU, each (batch, head)'s tiles are split into parts
(key_split) that run in parallel, O(B H parts (Nq + Nk) d) memory.

Tiles follow kernels/common.py's pinned-first policy (launch, tuning; as kernels/attention.py): the pinned tile is
the first of the dtype's table below that is spill-free for the launch; TLV_FAST_AUTOTUNE=1 benchmarks the table
pruned the same way; force_blocks() and the interpreter as everywhere.
"""
import torch
import triton
import triton.language as tl

from .common import backward_delta, block_dim, cdiv, dot, dot_args, fixed_tile, launch, load_tile, next_pow2, tuning
from .common import configs as configs_of
from .common import interpreted as common_interpreted

LOG2E = tl.constexpr(1.4426950408889634)  # 1/ln 2
LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------------------------
# the relative shift: one diagonal of a band product, read from the flattened product
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _band_col(a, b, SIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # band column (table row r_lo + c) of the tile entry (a, b), offsets local to the tile
    if SIGN == 1:
        return a - b + (BLOCK_N - 1)
    else:
        return b - a + (BLOCK_M - 1)


@triton.jit
def _band_start(start_m, start_n, ROW0, SIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # r_lo: the table row of band column 0
    if SIGN == 1:
        return start_m - start_n - (BLOCK_N - 1) + ROW0
    else:
        return start_n - start_m - (BLOCK_M - 1) + ROW0


@triton.jit
def _rows_diagonal(x, SIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    # x (M, L) -> (M, N): out[a, b] = x[a, c(a, b)], x read with row stride L + 1 (sign +1) / L - 1 (sign -1)
    f = tl.arange(0, BLOCK_M * BLOCK_N)
    a = f // BLOCK_N
    c = _band_col(a, f % BLOCK_N, SIGN, BLOCK_M, BLOCK_N)
    out = tl.gather(tl.reshape(x, [BLOCK_M * BLOCK_L]), a * BLOCK_L + c, axis=0)
    return tl.reshape(out, [BLOCK_M, BLOCK_N])


@triton.jit
def _cols_diagonal(y, SIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    # y (L, N) -> (M, N): out[a, b] = y[c(a, b), b]
    f = tl.arange(0, BLOCK_M * BLOCK_N)
    b = f % BLOCK_N
    c = _band_col(f // BLOCK_N, b, SIGN, BLOCK_M, BLOCK_N)
    out = tl.gather(tl.reshape(y, [BLOCK_L * BLOCK_N]), c * BLOCK_N + b, axis=0)
    return tl.reshape(out, [BLOCK_M, BLOCK_N])


@triton.jit
def _by_band_col(ds, SIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    # ds (M, N) -> (M, L): out[a, c] = ds[a, j] with c(a, j) = c, 0 where no key of the tile has that column
    # (read from ds interleaved with zeros: odd entries)
    f = tl.arange(0, BLOCK_M * BLOCK_L)
    a = f // BLOCK_L
    c = f % BLOCK_L
    if SIGN == 1:
        j = a - c + (BLOCK_N - 1)
    else:
        j = c + a - (BLOCK_M - 1)
    idx = tl.where((j >= 0) & (j < BLOCK_N), 2 * (a * BLOCK_N + j), 1)
    src = tl.reshape(tl.join(ds, tl.zeros_like(ds)), [2 * BLOCK_M * BLOCK_N])
    return tl.reshape(tl.gather(src, idx, axis=0), [BLOCK_M, BLOCK_L])


@triton.jit
def _by_band_row(ds, SIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    # ds (M, N) -> (L, N): out[c, b] = ds[i, b] with c(i, b) = c, 0 where no query of the tile has that column
    f = tl.arange(0, BLOCK_L * BLOCK_N)
    c = f // BLOCK_N
    b = f % BLOCK_N
    if SIGN == 1:
        i = c - (BLOCK_N - 1) + b
    else:
        i = (BLOCK_M - 1) - c + b
    idx = tl.where((i >= 0) & (i < BLOCK_M), 2 * (i * BLOCK_N + b), 1)
    src = tl.reshape(tl.join(ds, tl.zeros_like(ds)), [2 * BLOCK_M * BLOCK_N])
    return tl.reshape(tl.gather(src, idx, axis=0), [BLOCK_L, BLOCK_N])


@triton.jit
def _relpos_scores(q, kT, qr_base, kr_base, stride_rr, stride_rd, stride_kr_r, stride_kr_d, start_m, start_n,
                   offs_d, ROW0, N_ROWS, HEAD_DIM, SIGN: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # logits of one tile (natural units) and the table bands it used: qrb (L, D), krb (L, D)
    r_lo = _band_start(start_m, start_n, ROW0, SIGN, BLOCK_M, BLOCK_N)
    offs_l = r_lo + tl.arange(0, BLOCK_L)
    band_ok = (offs_l >= 0) & (offs_l < N_ROWS)  # rows past the table: entries outside the logits, masked later
    d_ok = offs_d < HEAD_DIM
    krb = tl.load(kr_base + offs_l[:, None] * stride_kr_r + offs_d[None, :] * stride_kr_d,
                  mask=band_ok[:, None] & d_ok[None, :], other=0.0)
    qrb = tl.load(qr_base + offs_l[:, None] * stride_rr + offs_d[None, :] * stride_rd,
                  mask=band_ok[:, None] & d_ok[None, :], other=0.0)
    s = dot(q, kT, PRECISION, UPCAST)
    s += _rows_diagonal(dot(q, tl.trans(krb), PRECISION, UPCAST), SIGN, BLOCK_M, BLOCK_N, BLOCK_L)  # q_i.KR[r_ij]
    s += _cols_diagonal(dot(qrb, kT, PRECISION, UPCAST), SIGN, BLOCK_M, BLOCK_N, BLOCK_L)           # QR[r_ij].k_j
    return s, qrb, krb, offs_l, band_ok


@triton.jit
def _valid(offs_m, offs_n, N_Q, N_K, MASK_UPPER: tl.constexpr):
    ok = (offs_m[:, None] < N_Q) & (offs_n[None, :] < N_K)
    if MASK_UPPER:
        ok = ok & (offs_n[None, :] <= offs_m[:, None])
    return ok


def _band_width(a):
    return next_pow2(a["BLOCK_M"] + a["BLOCK_N"] - 1)  # BLOCK_L: table rows a tile touches, padded


# ----------------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------------
@triton.heuristics({"EVEN_M": lambda a: a["N_Q"] % a["BLOCK_M"] == 0, "BLOCK_L": _band_width})
@triton.jit
def _relpos_fwd_kernel(
    Q, K, V, QR, KR, Out, Lse, Logits,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_rr, stride_rh, stride_rd, stride_kr_r, stride_kr_h, stride_kr_d,
    H, N_Q, N_K, ROW0, Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr, SIGN: tl.constexpr, MASK_UPPER: tl.constexpr,
    RETURN_LOGITS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, EVEN_M: tl.constexpr,
):
    # one program per (query block, batch, head); with RETURN_LOGITS per (query block, batch), walking the heads in
    # order so that the head-summed logits accumulate deterministically (the first head stores, the others add)
    num_m = tl.cdiv(N_Q, BLOCK_M)
    pid = tl.program_id(0)
    start_m = (pid % num_m) * BLOCK_M
    if RETURN_LOGITS:
        b = pid // num_m
        h0 = 0
        n_heads = H
    else:
        b = pid // num_m // H
        h0 = pid // num_m % H
        n_heads = 1
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_rows = N_Q + N_K - 1
    hi = N_K
    if MASK_UPPER:  # key blocks entirely right of the diagonal are masked
        hi = tl.minimum(N_K, start_m + BLOCK_M)
        if RETURN_LOGITS:  # ... and their logits are -inf
            for start_n in range(hi, N_K, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                lptrs = Logits + (b.to(tl.int64) * N_Q + offs_m[:, None]) * N_K + offs_n[None, :]
                tl.store(lptrs, tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32),
                         mask=(offs_m[:, None] < N_Q) & (offs_n[None, :] < N_K))
    for hh in range(0, n_heads):
        h = h0 + hh
        q = load_tile(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, offs_m, offs_d,
                       stride_qm, stride_qd, N_Q, HEAD_DIM, not EVEN_M, CHECK_D)
        k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
        qr_base = QR + h.to(tl.int64) * stride_rh
        kr_base = KR + h.to(tl.int64) * stride_kr_h
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row maximum, log2 units
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kT = load_tile(k_base, offs_d, offs_n, stride_kd, stride_kn, HEAD_DIM, N_K, CHECK_D, True)
            s, qrb, krb, offs_l, band_ok = _relpos_scores(
                q, kT, qr_base, kr_base, stride_rr, stride_rd, stride_kr_r, stride_kr_d, start_m, start_n,
                offs_d, ROW0, n_rows, HEAD_DIM, SIGN, BLOCK_M, BLOCK_N, BLOCK_L, PRECISION, UPCAST)
            s = tl.where(_valid(offs_m, offs_n, N_Q, N_K, MASK_UPPER), s, float("-inf"))
            if RETURN_LOGITS:
                lptrs = Logits + (b.to(tl.int64) * N_Q + offs_m[:, None]) * N_K + offs_n[None, :]
                in_range = (offs_m[:, None] < N_Q) & (offs_n[None, :] < N_K)
                if hh == 0:
                    tl.store(lptrs, s, mask=in_range)
                else:
                    tl.store(lptrs, tl.load(lptrs, mask=in_range, other=0.0) + s, mask=in_range)
            m_new = tl.maximum(m_i, tl.max(s, 1) * LOG2E)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: keep exp2 finite
            p = tl.math.exp2(s * LOG2E - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = load_tile(v_base, offs_n, offs_dv, stride_vn, stride_vd, N_K, HEAD_DIM_V, True, CHECK_DV)
            acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, UPCAST)
            m_i = m_new
        if RETURN_LOGITS:
            tl.debug_barrier()  # the next head re-reads these logits (other threads may have written them)
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        o = acc / l_safe[:, None]
        o_ptrs = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om \
            + offs_dv[None, :] * stride_od
        tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=(offs_m[:, None] < N_Q) & (offs_dv[None, :] < HEAD_DIM_V))
        lse = (m_i + tl.math.log2(l_i)) * LN2  # natural log
        tl.store(Lse + (b.to(tl.int64) * H + h) * N_Q + offs_m, lse, mask=offs_m < N_Q)


# ----------------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _rmw(ptrs, val, mask):
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + val, mask=mask)


@triton.jit
def _zero_rows(base, n, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr):
    # rows [0, n) of a (rows, BLOCK_D) fp32 buffer
    offs_d = tl.arange(0, BLOCK_D)
    for start in range(0, n, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        tl.store(base + offs[:, None] * BLOCK_D + offs_d[None, :], tl.zeros([CHUNK, BLOCK_D], tl.float32),
                 mask=offs[:, None] < n)


@triton.jit
def _bwd_tile(q, do, k, v, lse2, delta, qr_base, kr_base, DLogits, b, start_m, start_n, offs_d,
              stride_rr, stride_rd, stride_kr_r, stride_kr_d, stride_glb, stride_glm, stride_gln,
              N_Q, N_K, ROW0, N_ROWS, HEAD_DIM, SIGN: tl.constexpr, MASK_UPPER: tl.constexpr,
              HAS_DLOGITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # one tile recomputed from lse: P, dS = P (dP - Delta) (+ dLogits), and the table bands the tile used
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    s, qrb, krb, offs_l, band_ok = _relpos_scores(
        q, tl.trans(k), qr_base, kr_base, stride_rr, stride_rd, stride_kr_r, stride_kr_d, start_m, start_n, offs_d,
        ROW0, N_ROWS, HEAD_DIM, SIGN, BLOCK_M, BLOCK_N, BLOCK_L, PRECISION, UPCAST)
    ok = _valid(offs_m, offs_n, N_Q, N_K, MASK_UPPER)
    p = tl.where(ok, tl.math.exp2(s * LOG2E - lse2[:, None]), 0.0)
    ds = p * (dot(do, tl.trans(v), PRECISION, UPCAST) - delta[:, None])
    if HAS_DLOGITS:
        g = tl.load(DLogits + b.to(tl.int64) * stride_glb + offs_m[:, None] * stride_glm
                    + offs_n[None, :] * stride_gln, mask=ok, other=0.0)
        ds += g.to(tl.float32)
    return p, ds, qrb, krb, offs_l, band_ok


@triton.jit
def _load_rows(lse_base, delta_base, offs_m, N_Q):
    # lse in log2 units (+inf past N_Q, so that P = 0 there) and Delta of a query tile
    lse2 = tl.load(lse_base + offs_m, mask=offs_m < N_Q, other=float("inf")) * LOG2E
    return lse2, tl.load(delta_base + offs_m, mask=offs_m < N_Q, other=0.0)


@triton.jit
def _part_of_program(N, BLOCK, N_BH, H):
    # a backward program's (batch, head) and its part of the N rows (whole tiles of BLOCK): the grid is part-major,
    # N_BH programs per part
    pid = tl.program_id(0)
    n_parts = tl.num_programs(0) // N_BH
    bh = pid % N_BH
    per_part = tl.cdiv(tl.cdiv(N, BLOCK), n_parts) * BLOCK
    lo = (pid // N_BH) * per_part
    return pid, bh, bh // H, bh % H, lo, tl.minimum(lo + per_part, N)


@triton.heuristics({"BLOCK_L": _band_width})
@triton.jit
def _relpos_bwd_kernel(
    Q, K, V, QR, KR, DO, Lse, Delta, DLogits, DK, DV, DQR,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_rr, stride_rh, stride_rd, stride_kr_r, stride_kr_h, stride_kr_d,
    stride_glb, stride_glm, stride_gln,
    H, N_Q, N_K, ROW0, N_BH, Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr, SIGN: tl.constexpr, MASK_UPPER: tl.constexpr,
    HAS_DLOGITS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # by key: dK, dV and dQR. One program per (key part, batch, head), part-major (N_BH programs per part); it walks
    # the key tiles of its part and, for each, the query tiles that see it:
    #   dK_j += sum_i dS_ij (q_i + QR[r_ij]),   dQR[r] += sum_{r_ij = r} dS_ij k_j,
    # the band sums through DS2[c, j] = dS[i(c, j), j] (L, N). DQR (fp32, (parts, B, H, rows, D)) is private to the
    # program: zero-filled here, then accumulated tile by tile (read-modify-write, a barrier between tiles).
    pid, bh, b, h, n_lo, n_hi = _part_of_program(N_K, BLOCK_N, N_BH, H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_rows = N_Q + N_K - 1
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    qr_base = QR + h.to(tl.int64) * stride_rh
    kr_base = KR + h.to(tl.int64) * stride_kr_h
    dqr_base = DQR + pid.to(tl.int64) * n_rows * BLOCK_D  # pid = part * N_BH + bh: this program's slot
    lse_base = Lse + bh.to(tl.int64) * N_Q
    delta_base = Delta + bh.to(tl.int64) * N_Q
    _zero_rows(dqr_base, n_rows, BLOCK_D, BLOCK_L)
    tl.debug_barrier()  # the tiles below read what other threads zeroed
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh, offs_n, offs_d,
                      stride_kn, stride_kd, N_K, HEAD_DIM, True, CHECK_D)  # (N, D)
        v = load_tile(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh, offs_n, offs_dv,
                      stride_vn, stride_vd, N_K, HEAD_DIM_V, True, CHECK_DV)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        m_lo = 0
        if MASK_UPPER:  # query blocks entirely above the diagonal see none of these keys
            m_lo = (start_n // BLOCK_M) * BLOCK_M
        for start_m in range(m_lo, N_Q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = load_tile(q_base, offs_m, offs_d, stride_qm, stride_qd, N_Q, HEAD_DIM, True, CHECK_D)
            do = load_tile(do_base, offs_m, offs_dv, stride_dom, stride_dod, N_Q, HEAD_DIM_V, True, CHECK_DV)
            lse2, delta = _load_rows(lse_base, delta_base, offs_m, N_Q)
            p, ds, qrb, krb, offs_l, band_ok = _bwd_tile(
                q, do, k, v, lse2, delta, qr_base, kr_base, DLogits, b, start_m, start_n, offs_d,
                stride_rr, stride_rd, stride_kr_r, stride_kr_d, stride_glb, stride_glm, stride_gln,
                N_Q, N_K, ROW0, n_rows, HEAD_DIM, SIGN, MASK_UPPER, HAS_DLOGITS, BLOCK_M, BLOCK_N, BLOCK_L,
                PRECISION, UPCAST)
            dv += dot(tl.trans(p).to(do.dtype), do, PRECISION, UPCAST)
            dsc = ds.to(q.dtype)
            ds2 = _by_band_row(dsc, SIGN, BLOCK_M, BLOCK_N, BLOCK_L)
            dk += dot(tl.trans(dsc), q, PRECISION, UPCAST) + dot(tl.trans(ds2), qrb, PRECISION, UPCAST)
            _rmw(dqr_base + offs_l[:, None] * BLOCK_D + offs_d[None, :], dot(ds2, k, PRECISION, UPCAST),
                 band_ok[:, None] & (offs_d[None, :] < BLOCK_D))
            tl.debug_barrier()  # the next tile reads what this one wrote (other threads may own it)
        dk_ptrs = DK + b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh + offs_n[:, None] * stride_dkn \
            + offs_d[None, :] * stride_dkd
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=(offs_n[:, None] < N_K) & (offs_d[None, :] < HEAD_DIM))
        dv_ptrs = DV + b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh + offs_n[:, None] * stride_dvn \
            + offs_dv[None, :] * stride_dvd
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=(offs_n[:, None] < N_K) & (offs_dv[None, :] < HEAD_DIM_V))


@triton.heuristics({"BLOCK_L": _band_width})
@triton.jit
def _relpos_bwd_dq_kernel(
    Q, K, V, QR, KR, DO, Lse, Delta, DLogits, DQ, DKR,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_rr, stride_rh, stride_rd, stride_kr_r, stride_kr_h, stride_kr_d,
    stride_glb, stride_glm, stride_gln,
    H, N_Q, N_K, ROW0, N_BH, Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr, SIGN: tl.constexpr, MASK_UPPER: tl.constexpr,
    HAS_DLOGITS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # by query: dQ and dKR, the mirror of _relpos_bwd_kernel. One program per (query part, batch, head); for each
    # query tile of its part it walks the key tiles the tile sees:
    #   dQ_i += sum_j dS_ij (k_j + KR[r_ij])   (in registers; DQ fp32 (B, H, Nq, BLOCK_D), one writer per row),
    #   dKR[r] += sum_{r_ij = r} dS_ij q_i      (private DKR (parts, B, H, rows, D), as DQR above),
    # the band sums through DS1[i, c] = dS[i, j(i, c)] (M, L).
    pid, bh, b, h, m_lo, m_hi = _part_of_program(N_Q, BLOCK_M, N_BH, H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_rows = N_Q + N_K - 1
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    qr_base = QR + h.to(tl.int64) * stride_rh
    kr_base = KR + h.to(tl.int64) * stride_kr_h
    dkr_base = DKR + pid.to(tl.int64) * n_rows * BLOCK_D
    _zero_rows(dkr_base, n_rows, BLOCK_D, BLOCK_L)
    tl.debug_barrier()
    for start_m in range(m_lo, m_hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = load_tile(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, offs_m, offs_d,
                      stride_qm, stride_qd, N_Q, HEAD_DIM, True, CHECK_D)
        do = load_tile(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh, offs_m, offs_dv,
                       stride_dom, stride_dod, N_Q, HEAD_DIM_V, True, CHECK_DV)
        lse2, delta = _load_rows(Lse + bh.to(tl.int64) * N_Q, Delta + bh.to(tl.int64) * N_Q, offs_m, N_Q)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        hi = N_K
        if MASK_UPPER:  # key blocks entirely right of the diagonal are masked
            hi = tl.minimum(N_K, start_m + BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = load_tile(k_base, offs_n, offs_d, stride_kn, stride_kd, N_K, HEAD_DIM, True, CHECK_D)
            v = load_tile(v_base, offs_n, offs_dv, stride_vn, stride_vd, N_K, HEAD_DIM_V, True, CHECK_DV)
            p, ds, qrb, krb, offs_l, band_ok = _bwd_tile(
                q, do, k, v, lse2, delta, qr_base, kr_base, DLogits, b, start_m, start_n, offs_d,
                stride_rr, stride_rd, stride_kr_r, stride_kr_d, stride_glb, stride_glm, stride_gln,
                N_Q, N_K, ROW0, n_rows, HEAD_DIM, SIGN, MASK_UPPER, HAS_DLOGITS, BLOCK_M, BLOCK_N, BLOCK_L,
                PRECISION, UPCAST)
            dsc = ds.to(q.dtype)
            ds1 = _by_band_col(dsc, SIGN, BLOCK_M, BLOCK_N, BLOCK_L)
            dq += dot(dsc, k, PRECISION, UPCAST) + dot(ds1, krb, PRECISION, UPCAST)
            _rmw(dkr_base + offs_l[:, None] * BLOCK_D + offs_d[None, :], dot(tl.trans(ds1), q, PRECISION, UPCAST),
                 band_ok[:, None] & (offs_d[None, :] < BLOCK_D))
            tl.debug_barrier()
        tl.store(DQ + bh.to(tl.int64) * N_Q * BLOCK_D + offs_m[:, None] * BLOCK_D + offs_d[None, :], dq,
                 mask=offs_m[:, None] < N_Q)


# ----------------------------------------------------------------------------------------------------------------
# launch configuration (kernels/common.py: force_blocks(), then one small tile under the interpreter, then the
# pinned tile, or the pruned table with TLV_FAST_AUTOTUNE=1)
# ----------------------------------------------------------------------------------------------------------------
_KEY = ["Q_BUCKET", "K_BUCKET", "HEAD_DIM", "HEAD_DIM_V", "SIGN", "MASK_UPPER"]
BWD_PROGRAMS = 264  # the backward splits its tiles until about this many programs run (2 per H100/H200 SM)

# (BLOCK_M, BLOCK_N, num_warps, num_stages, largest padded head dim without spills for sm_90 in the plain variant,
# the same in the heavy one -- mask_upper and/or logits -- 0: never), in order of preference: the pinned tile is the
# first that is spill-free for the launch (and not much larger than the problem). Measured by compiling each tile
# for sm_90 (benchmarks/sm90.py) at 960 x 8 heads, W = 320, head dims 16 to 128 (sign +1, plain and masked with
# logits; at STTR's head dim 16 every variant: tests/kernels/test_compile.py keeps them spill-free); the preference
# follows the inner loop's warp-instructions per logit. Square-ish tiles: the band
# is padded to a power of two, BLOCK_L = next_pow2(BLOCK_M + BLOCK_N - 1). float32 inputs ("ieee" dots on FMA
# units) have their own, smaller tiles.
FWD_TILES = [(64, 64, 4, 2, 64, 0), (64, 32, 4, 2, 128, 32), (64, 64, 8, 2, 128, 32), (32, 32, 4, 2, 128, 64),
             (32, 16, 4, 2, 128, 64), (16, 16, 4, 2, 128, 128)]
FWD_TILES_FP32 = [(32, 32, 4, 2, 32, 16), (32, 16, 4, 2, 16, 32), (64, 32, 8, 2, 16, 0), (16, 16, 4, 2, 64, 64)]
BWD_TILES = [(32, 64, 4, 2, 16, 0), (64, 64, 8, 2, 32, 0), (32, 64, 8, 2, 64, 64), (32, 32, 4, 2, 16, 0),
             (16, 64, 4, 2, 32, 16), (16, 32, 4, 2, 16, 16), (16, 16, 4, 2, 128, 128)]
BWD_TILES_FP32 = [(32, 32, 4, 2, 16, 16), (32, 64, 8, 2, 16, 16), (16, 32, 4, 2, 16, 16),
                  (16, 16, 4, 2, 0, 0)]  # the fallback beyond d 16: 0 to 8 bytes of spills up to d 64
DQ_TILES = [(64, 64, 8, 2, 16, 0), (32, 32, 4, 2, 32, 16), (64, 32, 8, 2, 32, 16), (32, 16, 4, 2, 32, 32),
            (64, 16, 4, 2, 16, 16), (16, 16, 4, 2, 128, 128)]
DQ_TILES_FP32 = [(32, 32, 4, 2, 16, 16), (64, 32, 8, 2, 16, 16), (32, 16, 4, 2, 16, 16), (16, 16, 4, 2, 64, 32)]
TILES = {"fwd": (FWD_TILES, FWD_TILES_FP32), "bwd": (BWD_TILES, BWD_TILES_FP32), "dq": (DQ_TILES, DQ_TILES_FP32)}


def _bucket(n):
    return next_pow2(max(int(n), 1))


def heavy(args):
    """The register-hungrier variants: the causal-like mask or the head-summed logits (or their gradient)."""
    return bool(args.get("MASK_UPPER") or args.get("RETURN_LOGITS") or args.get("HAS_DLOGITS"))


def _fits(limits, args):
    """Spill-free for this launch's head dim and variant."""
    width = max(args.get("BLOCK_D", 16), args.get("BLOCK_DV", 16))
    return width <= limits[1 if heavy(args) else 0]


def _small_enough(tile, args):
    """Not much larger than the problem (an axis of more than 16 at least twice the padded length)."""
    bm, bn = tile[:2]
    too_tall = bm > 16 and bm >= 2 * _bucket(args.get("N_Q", bm))
    return not (too_tall or (bn > 16 and bn >= 2 * _bucket(args.get("N_K", bn))))


def _table(kind, args):
    q = args.get("Q")
    return TILES[kind][q is not None and q.element_size() == 4]


def _pinner(kind):
    def pinned(args):
        """The first tile of the dtype's table that is spill-free for this launch and not much larger than the
        problem; else the first spill-free one; else the table's last (its smallest)."""
        table = _table(kind, args)
        fitting = [t for t in table if _fits(t[4:], args)]
        for t in fitting:
            if _small_enough(t, args):
                return t[:4]
        return (fitting or table[-1:])[0][:4]
    return pinned


def _prune(kind):
    """Autotune candidates: the tiles of the dtype's table that are spill-free for this launch and not much larger
    than the problem; the pinned tile when none is left."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        limits = {t[:4]: t[4:] for t in _table(kind, args)}
        kept = []
        for c in configs:
            tile = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            if tile in limits and _fits(limits[tile], args) and _small_enough(tile, args):
                kept.append(c)
        return kept or configs_of([_pinner(kind)(args)])
    return prune


def _configs(kind):
    """Every tile of `kind` for the autotuner (both dtype tables; pruning keeps the dtype's own)."""
    return list(dict.fromkeys(t[:4] for table in TILES[kind] for t in table))


tuning(_relpos_fwd_kernel, _configs("fwd"), _KEY + ["RETURN_LOGITS"], _prune("fwd"), pinned=_pinner("fwd"))
tuning(_relpos_bwd_kernel, _configs("bwd"), _KEY + ["HAS_DLOGITS", "N_BH"], _prune("bwd"), pinned=_pinner("bwd"))
tuning(_relpos_bwd_dq_kernel, _configs("dq"), _KEY + ["HAS_DLOGITS", "N_BH"], _prune("dq"), pinned=_pinner("dq"))


def _common(q, k, v, qr, kr, offset_sign, mask_upper, precision):
    B, H, n_q, d = q.shape
    n_k, dv = k.shape[2], v.shape[3]
    return dict(
        Q=q, K=k, V=v, QR=qr, KR=kr,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qm=q.stride(2), stride_qd=q.stride(3),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2), stride_kd=k.stride(3),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2), stride_vd=v.stride(3),
        stride_rr=qr.stride(0), stride_rh=qr.stride(1), stride_rd=qr.stride(2),
        stride_kr_r=kr.stride(0), stride_kr_h=kr.stride(1), stride_kr_d=kr.stride(2),
        H=H, N_Q=n_q, N_K=n_k, ROW0=(n_k - 1) if offset_sign == 1 else (n_q - 1),
        Q_BUCKET=_bucket(n_q), K_BUCKET=_bucket(n_k),
        HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_D=block_dim(d), BLOCK_DV=block_dim(dv),
        CHECK_D=d != block_dim(d), CHECK_DV=dv != block_dim(dv), SIGN=offset_sign, MASK_UPPER=mask_upper,
        **dot_args(_relpos_fwd_kernel, q.dtype, precision),
    )


def relpos_attention_fwd(q, k, v, qr, kr, out, lse, logits=None, offset_sign=1, mask_upper=False,
                         precision="ieee"):
    """Forward into out (B, H, Nq, dv), lse (B, H, Nq) fp32 contiguous (natural log) and, if given, logits
    (B, Nq, Nk) fp32 contiguous (head-summed logits in natural units; every entry is written)."""
    B, H, n_q, _ = q.shape
    args = _common(q, k, v, qr, kr, offset_sign, mask_upper, precision)
    ret = logits is not None
    launch(_relpos_fwd_kernel, lambda meta: (cdiv(n_q, meta["BLOCK_M"]) * B * (1 if ret else H),), dict(
        args, Out=out, Lse=lse, Logits=logits if ret else lse, RETURN_LOGITS=ret,
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_om=out.stride(2), stride_od=out.stride(3)))
    return out, lse, logits


def key_split(n_bh, n_k, block_n, programs=None):
    """Parts per (batch, head) of a backward kernel whose n_k rows (keys, or queries for the by-query kernel) come
    in tiles of block_n, for n_bh = batch x heads: 1 when they already give `programs` (default BWD_PROGRAMS)
    programs, else as many as bring the grid there, at most one per tile."""
    programs = BWD_PROGRAMS if programs is None else programs
    if n_bh >= programs:
        return 1
    return max(1, min(cdiv(n_k, block_n), cdiv(programs, n_bh)))


def relpos_attention_bwd(do, dlogits, q, k, v, qr, kr, out, lse, dq, dk, dv, offset_sign=1, mask_upper=False,
                         precision="ieee", parts=None):
    """Gradients: dk, dv written into the given tensors; returns (dq fp32 (B, H, Nq, D), dqr, dkr fp32
    (rows, H, D)) with D the true head dim (dq, the argument, is unused). parts: key parts of the by-key kernel and
    query parts of the by-query kernel per (batch, head) (None: key_split's choice for the tile; an int: that many,
    at most one per tile)."""
    B, H, n_q, d = q.shape
    n_k = k.shape[2]
    rows = n_q + n_k - 1
    if parts is not None and (isinstance(parts, bool) or not isinstance(parts, int) or parts < 1):
        raise ValueError(f"relpos_attention_bwd: parts must be a positive int or None, got {parts!r}")
    delta = backward_delta(out, do)
    args = _common(q, k, v, qr, kr, offset_sign, mask_upper, precision)
    bd = args["BLOCK_D"]
    has_g = dlogits is not None
    gs = dlogits.stride() if has_g else (0, 0, 0)
    args.update(DO=do, Lse=lse, Delta=delta, DLogits=dlogits if has_g else lse, N_BH=B * H, HAS_DLOGITS=has_g,
                stride_dob=do.stride(0), stride_doh=do.stride(1), stride_dom=do.stride(2), stride_dod=do.stride(3),
                stride_glb=gs[0], stride_glm=gs[1], stride_gln=gs[2])

    def n_parts(n, block):
        return key_split(B * H, n, block) if parts is None else min(parts, cdiv(n, block))

    def partials(kernel, n, axis, table):
        # (buffer, grid) for the private table partials of `kernel`, whose parts split `n` rows in tiles of
        # meta[axis]. Autotuning chooses the tile (so the parts) at launch: room for the most parts any candidate
        # takes, zero-filled (the slots a tile with fewer parts leaves alone must read as zeros)
        tile = fixed_tile(kernel, args)
        if tile is not None:
            slots, alloc = n_parts(n, tile[0 if axis == "BLOCK_M" else 1]), torch.empty
        else:
            slots, alloc = max(n_parts(n, t[0 if axis == "BLOCK_M" else 1]) for t in table), torch.zeros
        buf = alloc((slots, B, H, rows, bd), device=q.device, dtype=torch.float32)
        return buf, lambda meta: (B * H * n_parts(n, meta[axis]),)

    dqr_acc, grid = partials(_relpos_bwd_kernel, n_k, "BLOCK_N", _configs("bwd"))
    launch(_relpos_bwd_kernel, grid, dict(
        args, DK=dk, DV=dv, DQR=dqr_acc,
        stride_dkb=dk.stride(0), stride_dkh=dk.stride(1), stride_dkn=dk.stride(2), stride_dkd=dk.stride(3),
        stride_dvb=dv.stride(0), stride_dvh=dv.stride(1), stride_dvn=dv.stride(2), stride_dvd=dv.stride(3)))
    dkr_acc, grid = partials(_relpos_bwd_dq_kernel, n_q, "BLOCK_M", _configs("dq"))
    dq_acc = torch.empty((B, H, n_q, bd), device=q.device, dtype=torch.float32)
    launch(_relpos_bwd_dq_kernel, grid, dict(args, DQ=dq_acc, DKR=dkr_acc))
    # the tables are shared by the batch: sum the private partials over the parts and the batch in a fixed order
    # (deterministic)
    dqr = dqr_acc[..., :d].sum((0, 1)).transpose(0, 1)
    dkr = dkr_acc[..., :d].sum((0, 1)).transpose(0, 1)
    return dq_acc[..., :d], dqr, dkr


def interpreted():
    """True when these kernels run in Triton's CPU interpreter (decided when they were created)."""
    return common_interpreted(_relpos_fwd_kernel)

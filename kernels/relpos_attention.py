"""STTR's relative-position attention (Li et al., 2021; docs/sttr.md §2) in Triton, forward and backward.

    logits[i, j] = q_i . k_j + q_i . KR[r_ij] + QR[r_ij] . k_j,     r_ij = sign * (i - j) + ROW0

(ROW0 = Nk - 1 for sign +1, Nq - 1 for sign -1, so rows run 0 .. Nq + Nk - 2). Nothing Nq x Nk x C, nor the
Nq x (Nq + Nk - 1) positional logits, is formed: a (BLOCK_M, BLOCK_N) tile only touches the band of
BLOCK_M + BLOCK_N - 1 table rows between its corners, so per tile the positional terms are two small matmuls with
that band, Q KR_band^T (BLOCK_M, BLOCK_L) and QR_band K^T (BLOCK_L, BLOCK_N), whose diagonals are gathered
(tl.gather) into the tile. The backward scatters dS the same way: the adjoint of a gather along a diagonal is the
gather along the other one.

The backward runs one program per (batch, head) over every tile, so the gradients of the shared tables (summed over
the tiles and the batch) accumulate in a private per-(batch, head) buffer in a fixed order and are then summed over
the batch: deterministic, no atomics, O(B H (Nq + Nk) d) memory.
"""
import torch
import triton
import triton.language as tl

from .common import backward_delta, block_dim, cdiv, dot, dot_args, launch, load_tile, next_pow2, tuning
from .common import interpreted as common_interpreted


@triton.jit
def _band_index(offs_ml, offs_nl, SIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # column of the band (row r_lo + c of the tables) used by the tile entry (i, j); offsets local to the tile
    if SIGN == 1:
        return offs_ml[:, None] - offs_nl[None, :] + (BLOCK_N - 1)
    else:
        return offs_nl[None, :] - offs_ml[:, None] + (BLOCK_M - 1)


@triton.jit
def _band_start(start_m, start_n, ROW0, SIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    if SIGN == 1:
        return start_m - start_n - (BLOCK_N - 1) + ROW0
    else:
        return start_n - start_m - (BLOCK_M - 1) + ROW0


@triton.jit
def _relpos_scores(q, kT, qr_base, kr_base, stride_rr, stride_rd, stride_kr_r, stride_kr_d, start_m, start_n,
                   offs_d, ROW0, N_ROWS, HEAD_DIM, SIGN: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # logits of one tile (natural units) and the table bands it used: qrb (L, D), krb (L, D)
    r_lo = _band_start(start_m, start_n, ROW0, SIGN, BLOCK_M, BLOCK_N)
    offs_l = r_lo + tl.arange(0, BLOCK_L)
    band_ok = (offs_l >= 0) & (offs_l < N_ROWS)
    d_ok = offs_d < HEAD_DIM
    krb = tl.load(kr_base + offs_l[:, None] * stride_kr_r + offs_d[None, :] * stride_kr_d,
                  mask=band_ok[:, None] & d_ok[None, :], other=0.0)
    qrb = tl.load(qr_base + offs_l[:, None] * stride_rr + offs_d[None, :] * stride_rd,
                  mask=band_ok[:, None] & d_ok[None, :], other=0.0)
    cidx = _band_index(tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), SIGN, BLOCK_M, BLOCK_N)  # (M, N)
    s = dot(q, kT, PRECISION, UPCAST)
    s += tl.gather(dot(q, tl.trans(krb), PRECISION, UPCAST), cidx, axis=1)   # q_i . KR[r_ij]
    s += tl.gather(dot(qrb, kT, PRECISION, UPCAST), cidx, axis=0)            # QR[r_ij] . k_j
    return s, qrb, krb, offs_l, band_ok


@triton.jit
def _valid(offs_m, offs_n, N_Q, N_K, MASK_UPPER: tl.constexpr):
    ok = (offs_m[:, None] < N_Q) & (offs_n[None, :] < N_K)
    if MASK_UPPER:
        ok = ok & (offs_n[None, :] <= offs_m[:, None])
    return ok


def _band_width(a):
    return next_pow2(a["BLOCK_M"] + a["BLOCK_N"] - 1)  # BLOCK_L: table rows a tile touches, padded


@triton.heuristics({"EVEN_M": lambda a: a["N_Q"] % a["BLOCK_M"] == 0, "BLOCK_L": _band_width})
@triton.jit
def _relpos_fwd_kernel(
    Q, K, V, QR, KR, Out, Lse, Logits,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_rr, stride_rh, stride_rd, stride_kr_r, stride_kr_h, stride_kr_d,
    H, N_Q, N_K, ROW0,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr, SIGN: tl.constexpr, MASK_UPPER: tl.constexpr,
    RETURN_LOGITS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, EVEN_M: tl.constexpr,
):
    # one program per (query block, batch, head); with RETURN_LOGITS per (query block, batch), walking the heads in
    # order so that the head-summed logits accumulate deterministically (logits zero-filled by the launcher)
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
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kT = load_tile(k_base, offs_d, offs_n, stride_kd, stride_kn, HEAD_DIM, N_K, CHECK_D, True)
            s, qrb, krb, offs_l, band_ok = _relpos_scores(
                q, kT, qr_base, kr_base, stride_rr, stride_rd, stride_kr_r, stride_kr_d, start_m, start_n,
                offs_d, ROW0, n_rows, HEAD_DIM, SIGN, BLOCK_M, BLOCK_N, BLOCK_L, PRECISION, UPCAST)
            ok = _valid(offs_m, offs_n, N_Q, N_K, MASK_UPPER)
            s = tl.where(ok, s, float("-inf"))
            if RETURN_LOGITS:
                lptrs = Logits + (b.to(tl.int64) * N_Q + offs_m[:, None]) * N_K + offs_n[None, :]
                in_range = (offs_m[:, None] < N_Q) & (offs_n[None, :] < N_K)
                tl.store(lptrs, tl.load(lptrs, mask=in_range, other=0.0) + s, mask=in_range)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2((s - m_use[:, None]) * 1.4426950408889634)  # 1/ln 2
            alpha = tl.math.exp2((m_i - m_use) * 1.4426950408889634)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = load_tile(v_base, offs_n, offs_dv, stride_vn, stride_vd, N_K, HEAD_DIM_V, True, CHECK_DV)
            acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, UPCAST)
            m_i = m_new
            if RETURN_LOGITS:
                tl.debug_barrier()  # the next head re-reads these logits (other threads may hold them)
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        o = acc / l_safe[:, None]
        o_ptrs = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om \
            + offs_dv[None, :] * stride_od
        tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=(offs_m[:, None] < N_Q) & (offs_dv[None, :] < HEAD_DIM_V))
        lse = m_i + tl.log(l_i)
        tl.store(Lse + (b.to(tl.int64) * H + h) * N_Q + offs_m, lse, mask=offs_m < N_Q)


@triton.jit
def _rmw(ptrs, val, mask):
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + val, mask=mask)


@triton.heuristics({"BLOCK_L": _band_width})
@triton.jit
def _relpos_bwd_kernel(
    Q, K, V, QR, KR, DO, Lse, Delta, DLogits, DQ, DK, DV, DQR, DKR,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_rr, stride_rh, stride_rd, stride_kr_r, stride_kr_h, stride_kr_d,
    stride_glb, stride_glm, stride_gln,
    H, N_Q, N_K, ROW0,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr, SIGN: tl.constexpr, MASK_UPPER: tl.constexpr,
    HAS_DLOGITS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # one program per (batch, head), every tile in a fixed order. dS = P (dP - Delta) (+ dLogits); then
    #   dK_j  += sum_i dS_ij (q_i + QR[r_ij]),  dQ_i += sum_j dS_ij (k_j + KR[r_ij]),
    #   dKR[r] += sum_{r_ij = r} dS_ij q_i,     dQR[r] += sum_{r_ij = r} dS_ij k_j.
    # The band sums are diagonal gathers of dS: DS1[i, c] = dS[i, j(i, c)], DS2[c, j] = dS[i(c, j), j].
    # DQ (fp32, zero-filled, (B, H, Nq, D)) and DQR / DKR (fp32, zero-filled, (B, H, rows, D)) are private to the
    # program and accumulated tile by tile (read-modify-write, a barrier between tiles).
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_rows = N_Q + N_K - 1
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    qr_base = QR + h.to(tl.int64) * stride_rh
    kr_base = KR + h.to(tl.int64) * stride_kr_h
    dq_base = DQ + bh.to(tl.int64) * N_Q * BLOCK_D
    dqr_base = DQR + bh.to(tl.int64) * n_rows * BLOCK_D
    dkr_base = DKR + bh.to(tl.int64) * n_rows * BLOCK_D
    lse_base = Lse + bh.to(tl.int64) * N_Q
    delta_base = Delta + bh.to(tl.int64) * N_Q
    ml = tl.arange(0, BLOCK_M)
    nl = tl.arange(0, BLOCK_N)
    cl = tl.arange(0, BLOCK_L)
    # band column c -> key (row of the tile) for DS1 and query for DS2, local to the tile
    if SIGN == 1:
        j_of = ml[:, None] - cl[None, :] + (BLOCK_N - 1)   # (M, L)
        i_of = cl[:, None] - (BLOCK_N - 1) + nl[None, :]   # (L, N)
    else:
        j_of = cl[None, :] + ml[:, None] - (BLOCK_M - 1)
        i_of = (BLOCK_M - 1) - cl[:, None] + nl[None, :]
    j_ok = (j_of >= 0) & (j_of < BLOCK_N)
    i_ok = (i_of >= 0) & (i_of < BLOCK_M)
    j_of = tl.where(j_ok, j_of, 0)
    i_of = tl.where(i_ok, i_of, 0)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + nl
        k = load_tile(k_base, offs_n, offs_d, stride_kn, stride_kd, N_K, HEAD_DIM, True, CHECK_D)  # (N, D)
        v = load_tile(v_base, offs_n, offs_dv, stride_vn, stride_vd, N_K, HEAD_DIM_V, True, CHECK_DV)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        m_lo = 0
        if MASK_UPPER:  # query blocks entirely above the diagonal see none of these keys
            m_lo = (start_n // BLOCK_M) * BLOCK_M
        for start_m in range(m_lo, N_Q, BLOCK_M):
            offs_m = start_m + ml
            q = load_tile(q_base, offs_m, offs_d, stride_qm, stride_qd, N_Q, HEAD_DIM, True, CHECK_D)
            do = load_tile(do_base, offs_m, offs_dv, stride_dom, stride_dod, N_Q, HEAD_DIM_V, True, CHECK_DV)
            lse = tl.load(lse_base + offs_m, mask=offs_m < N_Q, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=offs_m < N_Q, other=0.0)
            s, qrb, krb, offs_l, band_ok = _relpos_scores(
                q, tl.trans(k), qr_base, kr_base, stride_rr, stride_rd, stride_kr_r, stride_kr_d, start_m,
                start_n, offs_d, ROW0, n_rows, HEAD_DIM, SIGN, BLOCK_M, BLOCK_N, BLOCK_L, PRECISION, UPCAST)
            ok = _valid(offs_m, offs_n, N_Q, N_K, MASK_UPPER)
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
            dv += dot(tl.trans(p).to(do.dtype), do, PRECISION, UPCAST)
            dp = dot(do, tl.trans(v), PRECISION, UPCAST)
            ds = p * (dp - delta[:, None])
            if HAS_DLOGITS:
                g = tl.load(DLogits + b.to(tl.int64) * stride_glb + offs_m[:, None] * stride_glm
                            + offs_n[None, :] * stride_gln, mask=ok, other=0.0)
                ds += g.to(tl.float32)
            ds1 = tl.where(j_ok, tl.gather(ds, j_of, axis=1), 0.0)   # (M, L): dS[i, j(i, c)]
            ds2 = tl.where(i_ok, tl.gather(ds, i_of, axis=0), 0.0)   # (L, N): dS[i(c, j), j]
            dsc = ds.to(q.dtype)
            dk += dot(tl.trans(dsc), q, PRECISION, UPCAST) + dot(tl.trans(ds2.to(q.dtype)), qrb, PRECISION, UPCAST)
            dq = dot(dsc, k, PRECISION, UPCAST) + dot(ds1.to(q.dtype), krb, PRECISION, UPCAST)
            d_qr = dot(ds2.to(q.dtype), k, PRECISION, UPCAST)                 # (L, D)
            d_kr = dot(tl.trans(ds1.to(q.dtype)), q, PRECISION, UPCAST)       # (L, D)
            _rmw(dq_base + offs_m[:, None] * BLOCK_D + offs_d[None, :], dq, (offs_m[:, None] < N_Q))
            band = band_ok[:, None] & (offs_d[None, :] < BLOCK_D)
            _rmw(dqr_base + offs_l[:, None] * BLOCK_D + offs_d[None, :], d_qr, band)
            _rmw(dkr_base + offs_l[:, None] * BLOCK_D + offs_d[None, :], d_kr, band)
            tl.debug_barrier()  # the next tile reads what this one wrote (other threads may own it)
        dk_ptrs = DK + b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh + offs_n[:, None] * stride_dkn \
            + offs_d[None, :] * stride_dkd
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=(offs_n[:, None] < N_K) & (offs_d[None, :] < HEAD_DIM))
        dv_ptrs = DV + b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh + offs_n[:, None] * stride_dvn \
            + offs_dv[None, :] * stride_dvd
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=(offs_n[:, None] < N_K) & (offs_dv[None, :] < HEAD_DIM_V))


# one pinned tile on a GPU (BLOCK_M, BLOCK_N, num_warps, num_stages); the interpreter and force_blocks() as attention
_KEY = ["HEAD_DIM", "HEAD_DIM_V", "SIGN", "MASK_UPPER"]
tuning(_relpos_fwd_kernel, [(64, 64, 4, 2)], _KEY + ["RETURN_LOGITS"])
tuning(_relpos_bwd_kernel, [(64, 64, 4, 2)], _KEY + ["HAS_DLOGITS"])


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
        HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_D=block_dim(d), BLOCK_DV=block_dim(dv),
        CHECK_D=d != block_dim(d), CHECK_DV=dv != block_dim(dv), SIGN=offset_sign, MASK_UPPER=mask_upper,
        **dot_args(_relpos_fwd_kernel, q.dtype, precision),
    )


def relpos_attention_fwd(q, k, v, qr, kr, out, lse, logits=None, offset_sign=1, mask_upper=False,
                         precision="ieee"):
    """Forward into out (B, H, Nq, dv), lse (B, H, Nq) fp32 contiguous and, if given, logits (B, Nq, Nk) fp32
    contiguous and zero-filled (head-summed logits)."""
    B, H, n_q, _ = q.shape
    args = _common(q, k, v, qr, kr, offset_sign, mask_upper, precision)
    ret = logits is not None
    launch(_relpos_fwd_kernel, lambda meta: (cdiv(n_q, meta["BLOCK_M"]) * B * (1 if ret else H),), dict(
        args, Out=out, Lse=lse, Logits=logits if ret else lse, RETURN_LOGITS=ret,
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_om=out.stride(2), stride_od=out.stride(3)))
    return out, lse, logits


def relpos_attention_bwd(do, dlogits, q, k, v, qr, kr, out, lse, dq, dk, dv, offset_sign=1, mask_upper=False,
                         precision="ieee"):
    """Gradients: dk, dv written into the given tensors; returns (dq fp32 (B, H, Nq, D), dqr, dkr fp32
    (rows, H, D)) with D the true head dim."""
    B, H, n_q, d = q.shape
    n_k = k.shape[2]
    rows = n_q + n_k - 1
    delta = backward_delta(out, do)
    args = _common(q, k, v, qr, kr, offset_sign, mask_upper, precision)
    bd = args["BLOCK_D"]
    dq_acc = torch.zeros((B, H, n_q, bd), device=q.device, dtype=torch.float32)
    dqr_acc = torch.zeros((B, H, rows, bd), device=q.device, dtype=torch.float32)
    dkr_acc = torch.zeros((B, H, rows, bd), device=q.device, dtype=torch.float32)
    has_g = dlogits is not None
    g = dlogits if has_g else lse
    gs = dlogits.stride() if has_g else (0, 0, 0)
    launch(_relpos_bwd_kernel, lambda meta: (B * H,), dict(
        args, DO=do, Lse=lse, Delta=delta, DLogits=g, DQ=dq_acc, DK=dk, DV=dv, DQR=dqr_acc, DKR=dkr_acc,
        stride_dob=do.stride(0), stride_doh=do.stride(1), stride_dom=do.stride(2), stride_dod=do.stride(3),
        stride_dkb=dk.stride(0), stride_dkh=dk.stride(1), stride_dkn=dk.stride(2), stride_dkd=dk.stride(3),
        stride_dvb=dv.stride(0), stride_dvh=dv.stride(1), stride_dvn=dv.stride(2), stride_dvd=dv.stride(3),
        stride_glb=gs[0], stride_glm=gs[1], stride_gln=gs[2], HAS_DLOGITS=has_g))
    # the tables are shared by the batch: sum the per-(batch, head) partials in batch order (deterministic)
    dqr = dqr_acc[..., :d].sum(0).transpose(0, 1)
    dkr = dkr_acc[..., :d].sum(0).transpose(0, 1)
    return dq_acc[..., :d], dqr, dkr


def interpreted():
    """True when these kernels run in Triton's CPU interpreter (decided when they were created)."""
    return common_interpreted(_relpos_fwd_kernel)

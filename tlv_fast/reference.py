"""The one eager implementation of every tlv_fast op: test oracle, ``backend="reference"`` and the ``eager``
benchmark provider. Plain PyTorch, readable over fast; it materialises whatever the math needs (N x N scores).

Only torch, and tlv_fast.formulas (which imports only torch), are imported here (tests/test_layout.py checks it).
"""
import math

import torch

from tlv_fast.formulas import add_dustbins, dustbin_marginals, empty_transport, relpos_rows

__all__ = ["attention", "sinkhorn", "optimal_transport", "relpos_attention", "add_dustbins", "dustbin_marginals",
           "empty_transport", "relpos_rows"]


def attention(q, k, v, attn_mask=None, dropout_p=0.0, causal=None, scale=None, return_lse=False,
              dropout_mask=None, return_weights=False):
    """softmax(q k^T * scale + mask) v, eagerly, for tensors (..., H, N, D) with any matching leading dims.

    Args:
        q: (..., Hq, Nq, D); k: (..., Hkv, Nk, D); v: (..., Hkv, Nk, Dv). Hq % Hkv == 0 (grouped-query
            attention when they differ: query head h reads kv head h // (Hq / Hkv)).
        attn_mask: None, bool (True = take part) or additive float, broadcastable to (..., Hq, Nq, Nk).
        dropout_p: probability of zeroing an attention weight (kept ones are scaled by 1 / (1 - p)).
        causal: None, "top_left" (key j visible to query i iff j <= i, torch's is_causal) or "bottom_right"
            (j <= i + Nk - Nq, FlashAttention's; the two agree when Nq == Nk).
        scale: multiplier of q k^T; default 1 / sqrt(D).
        return_lse: also return the natural-log logsumexp of each row's logits, (..., Hq, Nq) fp32.
        dropout_mask: bool keep mask broadcastable to (..., Hq, Nq, Nk); replaces random dropout (tests).
        return_weights: also return the attention weights (..., Hq, Nq, Nk) as applied to v (after dropout).

    Scores are formed in the input dtype (q and k each scaled by sqrt(scale) first, as torch's math path does), the
    softmax in fp32 for 16-bit inputs (as eager attention usually is) and in the input dtype otherwise, the product
    with v in the input dtype. Masks are additive, as in torch: a bool mask adds -inf where False, so a NaN score
    (NaN or inf in q or k) of a masked-out key still makes its row NaN; the causal mask replaces scores instead
    (those keys are never read by the kernels). A row in which every key is masked gives output 0, gradient 0 and
    lse -inf.
    """
    d = q.shape[-1]
    n_q, n_k = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    group = q.shape[-3] // k.shape[-3]
    if group != 1:
        k = k.repeat_interleave(group, dim=-3)
        v = v.repeat_interleave(group, dim=-3)
    # scale before the product (sqrt(scale) on each side, as torch's math path): q.k of large 16-bit inputs would
    # overflow before a scale applied afterwards could bring it back into range
    root = math.sqrt(scale) if scale > 0 else None
    scores = (q * root) @ (k.transpose(-2, -1) * root) if root else (q @ k.transpose(-2, -1)) * scale
    if attn_mask is not None:
        # masks are additive (bool False = -inf), so a NaN score of a masked-out key stays NaN, as in torch
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros((), dtype=scores.dtype, device=scores.device).masked_fill(~attn_mask,
                                                                                              float("-inf"))
        scores = scores + attn_mask.to(scores.dtype)
    if causal is not None:
        offset = {"top_left": 0, "bottom_right": n_k - n_q}[causal]
        i = torch.arange(n_q, device=q.device)[:, None]
        j = torch.arange(n_k, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + offset, float("-inf"))
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    # rows with no visible key: softmax of a finite stand-in, then zeroed (no NaN in values or gradients)
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    scores = scores.masked_fill(empty, 0.0)
    p = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
    lse = torch.logsumexp(scores, dim=-1).masked_fill(empty.squeeze(-1), float("-inf"))
    p = p.to(q.dtype)
    if dropout_mask is not None:
        p = p * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        p = torch.nn.functional.dropout(p, dropout_p)
    out = p @ v
    extra = ((lse,) if return_lse else ()) + ((p,) if return_weights else ())
    return (out, *extra) if extra else out


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, scale=None, dropout_p=0.0,
                     dropout_mask=None):
    """Attention over a packed batch (see :func:`tlv_fast.varlen_attention`), one :func:`attention` per sequence.

    q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv); cu_seqlens_* (B + 1,) cumulative lengths.
    causal is aligned bottom-right per sequence. dropout_mask: None or a function b -> bool keep mask
    broadcastable to (1, Hq, n_q_b, n_k_b) (tests). Returns (out (total_q, Hq, Dv), lse (Hq, total_q) fp32).
    """
    outs, lses = [], []
    bounds = zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist(), cu_seqlens_k[:-1].tolist(),
                 cu_seqlens_k[1:].tolist())
    for b, (q0, q1, k0, k1) in enumerate(bounds):
        qb, kb, vb = (t.transpose(0, 1).unsqueeze(0) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        keep = None if dropout_mask is None else dropout_mask(b)
        o, lse = attention(qb, kb, vb, None, dropout_p, "bottom_right" if causal else None, scale,
                           return_lse=True, dropout_mask=keep)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    if not outs:
        return q.new_empty((0, q.shape[1], v.shape[2])), q.new_empty((q.shape[1], 0), dtype=torch.float32)
    return torch.cat(outs, 0), torch.cat(lses, 1)


def sinkhorn(scores, log_mu, log_nu, iters=10, order="col_first"):
    """Entropic optimal transport in the log domain, unrolled: `iters` pairs of potential updates.

    scores (..., M, N); log_mu (..., M), log_nu (..., N) log marginals. u = v = 0, then per iteration, in `order`
    ("col_first": v first, as STTR; "row_first": u first, as SuperGlue):
        v_j = log_nu_j - logsumexp_i(S_ij + u_i),   u_i = log_mu_i - logsumexp_j(S_ij + v_j).
    Returns the log plan S + u_i + v_j. A row or column with no finite score keeps potential 0 (zero mass, no
    NaN). Gradients are autograd through the unrolled loop.
    """
    # an empty row (column) stays empty whatever the finite potentials: find them once and give their log-sum-exp
    # finite inputs (then discard it), so that neither values nor gradients see -inf - (-inf)
    neg_inf = torch.isneginf(scores)
    empty_row = neg_inf.all(dim=-1)  # (..., M)
    empty_col = neg_inf.all(dim=-2)  # (..., N)
    s_row = scores.masked_fill(empty_row[..., :, None], 0.0)
    s_col = scores.masked_fill(empty_col[..., None, :], 0.0)
    u = scores.new_zeros(scores.shape[:-1])                    # (..., M)
    v = scores.new_zeros(scores.shape[:-2] + scores.shape[-1:])  # (..., N)

    def row(v):
        return torch.where(empty_row, 0.0, log_mu - torch.logsumexp(s_row + v[..., None, :], dim=-1))

    def col(u):
        return torch.where(empty_col, 0.0, log_nu - torch.logsumexp(s_col + u[..., :, None], dim=-2))

    for _ in range(iters):
        if order == "col_first":
            v = col(u)
            u = row(v)
        else:
            u = row(v)
            v = col(u)
    return scores + u[..., :, None] + v[..., None, :]


def optimal_transport(attn, phi, iters=10, order="col_first"):
    """STTR's optimal-transport head: append a dustbin row and column filled with the scalar `phi`, run `iters`
    log-domain Sinkhorn iterations with dustbin marginals, return the transport plan scaled so that every real row
    sums to 1: T = exp(log plan + log(M + N)), shape (..., M+1, N+1). Masked scores are -inf (T = 0 there).
    With M = 0 or N = 0 every real row and column goes to its dustbin: T = 1 there, the corner 0."""
    *batch, m, n = attn.shape
    if m == 0 or n == 0:
        return empty_transport(attn, phi)
    scores = add_dustbins(attn, phi)
    log_mu, log_nu = dustbin_marginals(m, n, attn.dtype, attn.device)
    log_plan = sinkhorn(scores, log_mu.expand(*batch, m + 1), log_nu.expand(*batch, n + 1), iters, order)
    return torch.exp(log_plan + math.log(m + n))


def relpos_attention(q, k, v, qr, kr, offset_sign=1, mask_upper=False, return_logits=False):
    """STTR's relative-position attention (Li et al. 2021; docs/sttr.md §2), eagerly.

    q (B, H, Nq, d), k (B, H, Nk, d), v (B, H, Nk, dv); qr, kr (Nq + Nk - 1, H, d) projected positional tables
    indexed by relpos_rows. logits[b, h, i, j] = q_i.k_j + q_i.kr[row_ij] + qr[row_ij].k_j (the 1/sqrt(d) is already
    folded into q and qr); mask_upper masks key j > i with -inf. Returns softmax(logits) v and, with
    return_logits, the head-summed logits (B, Nq, Nk) in fp32 (-inf where masked). Softmax in fp32 for 16-bit inputs.
    """
    n_q, n_k = q.shape[-2], k.shape[-2]
    rows = relpos_rows(n_q, n_k, offset_sign, q.device)  # (Nq, Nk)
    b, h = q.shape[0], q.shape[1]
    q_kr = q @ kr.permute(1, 2, 0)  # (B, H, Nq, R): q_i . kr[r]
    k_qr = k @ qr.permute(1, 2, 0)  # (B, H, Nk, R): k_j . qr[r]
    pos_q = torch.gather(q_kr, -1, rows.expand(b, h, n_q, n_k))
    pos_k = torch.gather(k_qr, -1, rows.t().expand(b, h, n_k, n_q)).transpose(-2, -1)
    logits = q @ k.transpose(-2, -1) + pos_q + pos_k
    if mask_upper:
        upper = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(1)
        logits = logits.masked_fill(upper, float("-inf"))
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    out = torch.softmax(logits, dim=-1).to(v.dtype) @ v
    return (out, logits.float().sum(1)) if return_logits else out

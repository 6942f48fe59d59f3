"""Small formulas that the eager reference and the production path both use, written once.

Only torch and the standard library are imported here (tests/test_layout.py checks it), so that
``tlv_fast.reference`` -- the test oracle -- may import this module and stay independent of the kernels.
"""
import math

import torch


def dustbin_marginals(m, n, dtype=torch.float32, device=None):
    """log marginals of the dustbin problem (SuperGlue, Sarlin et al. 2020; STTR): each of m rows / n columns carries
    1/(m+n), the row dustbin n/(m+n), the column dustbin m/(m+n). Returns (log_mu (m+1), log_nu (n+1))."""
    norm = -math.log(m + n)
    log_mu = torch.full((m + 1,), norm, dtype=dtype, device=device)
    log_nu = torch.full((n + 1,), norm, dtype=dtype, device=device)
    log_mu[-1] += math.log(n)
    log_nu[-1] += math.log(m)
    return log_mu, log_nu


def add_dustbins(scores, phi):
    """(..., M, N) scores -> (..., M+1, N+1) with a last row and column holding the scalar tensor `phi`."""
    *batch, m, n = scores.shape
    phi = phi.to(scores.dtype)
    return torch.cat([torch.cat([scores, phi.expand(*batch, m, 1)], -1), phi.expand(*batch, 1, n + 1)], -2)


def empty_transport(attn, phi):
    """The dustbin plan of an empty problem (M = 0 or N = 0), scaled like optimal_transport's: every real row and
    column is matched to its dustbin (T = 1), the dustbin corner carries nothing (T = 0). (..., M+1, N+1), with a
    gradient of 0 for attn and phi."""
    *batch, m, n = attn.shape
    t = torch.zeros(*batch, m + 1, n + 1, dtype=attn.dtype, device=attn.device)
    t[..., :m, n] = 1.0
    t[..., m, :n] = 1.0
    return t + 0.0 * (attn.sum() + phi.to(attn.dtype))  # joins the graph so that gradients are defined (zero)


def relpos_rows(n_q, n_k, offset_sign, device=None):
    """(Nq, Nk) table row used by query i and key j in relative-position attention: the offset
    delta = offset_sign * (i - j) shifted to start at 0, i.e. row = delta + (Nk - 1) for offset_sign = +1 and
    row = delta + (Nq - 1) for offset_sign = -1; rows run over Nq + Nk - 1 offsets in ascending order."""
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    return (i - j) + (n_k - 1) if offset_sign == 1 else (j - i) + (n_q - 1)


def occlusion_iou_counts(occlusion, occ_mask, valid):
    """STTR's occlusion IoU (Li et al., 2021) as (intersection, union) counts over the last two dims: with
    p = occlusion > 0.5, intersection = |p & occ_mask| + |~p & valid| and union = |(p & valid) | occ_mask| +
    |(~p & occ_mask) | valid| (valid: non-occluded pixels with ground truth; pixels that are neither are ignored).
    Shared by tlv_fast.models.stereo_metrics and tlv_fast.stereo.metrics."""
    p = occlusion > 0.5
    inter = (p & occ_mask).sum((-2, -1)) + (~p & valid).sum((-2, -1))
    union = ((p & valid) | occ_mask).sum((-2, -1)) + ((~p & occ_mask) | valid).sum((-2, -1))
    return inter, union

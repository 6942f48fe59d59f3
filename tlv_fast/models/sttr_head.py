"""STTR's regression head (docs/sttr.md §1.6-1.7, §3), its losses (§4.2) and metrics (§4.3), as functions users call."""
import torch
import torch.nn.functional as F
from torch import nn

from .. import backends
from ..formulas import add_dustbins, occlusion_iou_counts
from ..ops import optimal_transport
from .sttr_features import ContextAdjustment


def window_regression(plan, occ_tokens=None, parity=False, min_mass=0.1):
    """Modified winner-take-all (docs/sttr.md §3.4-3.5) on a transport plan without its dustbins.

    Args:
        plan: (..., W', W') matching probabilities, left tokens i by right tokens j.
        occ_tokens: (..., W') bool, ground-truth occlusion on the token grid; used with parity only.
        parity: the published code's rule: where the window mass is < min_mass (or occ_tokens is true when given)
            the mass is taken as 1, so the raw occlusion is 0 there and the window is not renormalised.

    Returns:
        d_raw (..., W') disparity in tokens (the window-weighted mean of max(i - j, 0) over j in {k-1, k, k+1},
        k = argmax_j plan[i, j]), mass (..., W') the window's (possibly replaced) mass, occ_raw = 1 - mass.
    """
    w = plan.shape[-1]
    k = plan.argmax(-1, keepdim=True)  # (..., W', 1)
    taps = torch.cat([k - 1, k, k + 1], -1)  # (..., W', 3): right tokens of the window
    window = F.pad(plan, (1, 1)).gather(-1, taps + 1)  # out-of-range taps read 0
    mass = window.sum(-1)
    if parity:
        replace = mass < min_mass if occ_tokens is None else occ_tokens
        mass = torch.where(replace, torch.ones_like(mass), mass)
    i = torch.arange(w, device=plan.device).view(*([1] * (plan.ndim - 2)), w, 1)
    shift = (i - taps).clamp_min(0).to(plan.dtype)  # max(i - j, 0)
    norm = mass if parity else mass.clamp_min(torch.finfo(mass.dtype).tiny)
    d_raw = (window / norm.unsqueeze(-1) * shift).sum(-1)
    return d_raw, mass, 1.0 - mass


class RegressionHead(nn.Module):
    """Optimal transport with dustbins (phi) -> window regression -> nearest upsampling -> context adjustment."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.phi = nn.Parameter(torch.tensor(0.0))  # dustbin score (published name regression_head.phi)
        self.cal = ContextAdjustment(cfg.cal_blocks, cfg.cal_feat_dim, cfg.cal_expansion) if cfg.cal else None

    def transport(self, logits):
        """(B, H', W', W') head-summed logits (-inf where masked) -> plan (B, H', W'+1, W'+1)."""
        if self.cfg.regression == "ot":
            return optimal_transport(logits, self.phi, self.cfg.sinkhorn_iters,
                                     backend=backends.pick(self.cfg.backend, "optimal_transport"))
        return torch.softmax(add_dustbins(logits, self.phi), -1)

    def forward(self, logits, left, scale, occ_tokens=None):
        """logits (B, H', W', W'); left (B, 3, H, W) the normalised left image; scale = pixels per token."""
        plan = self.transport(logits)
        d_raw, mass, occ_raw = window_regression(plan[..., :-1, :-1], occ_tokens, self.cfg.parity,
                                                 self.cfg.min_window_mass)
        disp_low = d_raw * scale
        size = left.shape[-2:]
        disp = F.interpolate(disp_low[:, None], size=size, mode="nearest")  # (B, 1, H, W)
        occ = F.interpolate(occ_raw[:, None], size=size, mode="nearest")
        if self.cal is not None:
            mean = disp.mean((1, 2, 3), keepdim=True)  # per image (the published code pools the whole batch)
            std = disp.std((1, 2, 3), keepdim=True) + 1e-6
            chunk = self.cfg.cal_chunk_rows if not torch.is_grad_enabled() else 0
            disp_n, occ = self.cal((disp - mean) / std, (occ - 0.5) / 0.5, left, chunk)
            disp = disp_n * std + mean
        return {"disparity": disp[:, 0], "occlusion": occ[:, 0], "disparity_low_res": disp_low, "transport": plan,
                "disparity_raw": d_raw, "window_mass": mass, "occlusion_low_res": occ_raw}


def _masked_sum(x, mask):
    """Sum of x where mask (entries outside it may be non-finite: where, not a product)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum()


def _mean(total, count):
    """total / count, and 0 (with zero gradient) when nothing was counted."""
    return total / count.clamp_min(1)


def _tokens(x, rows, cols):
    return x.index_select(-2, rows).index_select(-1, cols)


def gt_response(plan, disp_tokens, cols, scale, stride, parity=False):
    """The plan's response at the ground-truth match (docs/sttr.md §3.6): left token i sits at full-resolution column
    cols[i]; its match is at token (cols[i] - s//2 - d) / s (parity: (cols[i] - d) / scale, the published target),
    read by linear interpolation between the floor and ceil tokens (clamped to the row, as published)."""
    x = cols.to(plan.dtype)
    target = (x - disp_tokens) / scale if parity else (x - stride // 2 - disp_tokens) / stride
    w = plan.shape[-1]
    lo = target.floor().long().clamp(0, w - 1)
    hi = target.ceil().long().clamp(0, w - 1)
    w_hi = target - lo
    return (plan.gather(-1, lo[..., None])[..., 0] * (1 - w_hi) + plan.gather(-1, hi[..., None])[..., 0] * w_hi)


def sttr_loss(outputs, disp, occ_mask=None, occ_mask_right=None, weights=None, parity=None):
    """STTR's training loss (docs/sttr.md §4.2): relative response + smooth L1 on the raw and final disparity + binary
    entropy on the occlusion, each weighted 1 by default.

    Args:
        outputs: the dict STTR returns.
        disp: (B, H, W) ground-truth left disparity in pixels; <= 0 marks pixels without ground truth.
        occ_mask, occ_mask_right: (B, H, W) bool left / right occlusion (optional). Occluded pixels are not valid.
        weights: dict over "rr", "l1_raw", "l1", "occ_be".
        parity: the published relative-response target (defaults to the model's setting, outputs["parity"]).

    Returns:
        dict with "rr", "l1_raw", "l1", "occ_be" and their weighted sum "loss". A term whose pixels are all absent
        (an image without ground truth, or without occlusion) is 0 with zero gradient, never NaN.
    """
    weights = {"rr": 1.0, "l1_raw": 1.0, "l1": 1.0, "occ_be": 1.0, **(weights or {})}
    parity = outputs["parity"] if parity is None else parity
    rows, cols, eps = outputs["sampled_rows"], outputs["sampled_cols"], 1e-6
    invalid = disp <= 0
    if occ_mask is not None:
        invalid = invalid | occ_mask
    inv_t, disp_t = _tokens(invalid, rows, cols), _tokens(disp, rows, cols)
    plan = outputs["transport"]
    resp = gt_response(plan[..., :-1, :-1], disp_t, cols, outputs["scale"], outputs["stride"], parity)
    valid_t = ~inv_t
    # masked means as sums over the masks: no data-dependent shapes, so no host synchronisation in a training step
    rr_sum, rr_n = _masked_sum(-torch.log(resp + eps), valid_t), valid_t.sum()
    if occ_mask is not None:
        occ_t = _tokens(occ_mask, rows, cols)
        rr_sum, rr_n = rr_sum + _masked_sum(-torch.log(plan[..., :-1, -1] + eps), occ_t), rr_n + occ_t.sum()
    if occ_mask_right is not None:
        occ_rt = _tokens(occ_mask_right, rows, cols)
        rr_sum, rr_n = rr_sum + _masked_sum(-torch.log(plan[..., -1, :-1] + eps), occ_rt), rr_n + occ_rt.sum()
    valid = ~invalid
    smooth_l1 = lambda x, y, m: _mean(_masked_sum(F.smooth_l1_loss(x, y, reduction="none"), m), m.sum())  # noqa
    losses = {"rr": _mean(rr_sum, rr_n), "l1_raw": smooth_l1(outputs["disparity_low_res"], disp_t, valid_t),
              "l1": smooth_l1(outputs["disparity"], disp, valid)}
    occ = outputs["occlusion"]
    be_sum, be_n = _masked_sum(-torch.log(1.0 - occ + eps), valid), valid.sum()
    if occ_mask is not None:
        be_sum, be_n = be_sum + _masked_sum(-torch.log(occ + eps), occ_mask), be_n + occ_mask.sum()
    losses["occ_be"] = _mean(be_sum, be_n)
    losses["loss"] = sum(weights[k] * losses[k] for k in ("rr", "l1_raw", "l1", "occ_be"))
    return losses


@torch.no_grad()
def stereo_metrics(disparity, occlusion, disp, occ_mask=None, threshold=3.0):
    """Per-image metrics of docs/sttr.md §4.3, averaged over the batch (pixel counts summed).

    disparity, occlusion (B, H, W) predictions; disp (B, H, W) ground truth (<= 0: none); occ_mask (B, H, W) bool.
    Returns dict: epe (mean |error| over valid pixels, averaged over the images that have any; NaN only when none
    has), error_px / total_px (valid pixels with |error| > threshold,
    and valid pixels: accumulate these over a dataset), px_error_rate, and iou (occlusion IoU with p = occlusion
    > 0.5 over the two classes, pixels neither valid nor occluded ignored; only with occ_mask)."""
    valid = disp > 0
    if occ_mask is not None:
        valid = valid & ~occ_mask
    err = (disparity - disp).abs()
    counts = valid.flatten(1).sum(1)
    per_image = torch.where(valid, err, 0.0).flatten(1).sum(1) / counts.clamp_min(1)
    has_gt = counts > 0  # images without ground truth do not take part in the mean (NaN when no image has any)
    epe = per_image[has_gt].mean() if bool(has_gt.any()) else torch.tensor(float("nan"))
    error_px, total_px = int((err[valid] > threshold).sum()), int(valid.sum())
    out = {"epe": float(epe), "error_px": error_px, "total_px": total_px,
           "px_error_rate": error_px / max(total_px, 1)}
    if occ_mask is not None:
        inter, union = occlusion_iou_counts(occlusion, occ_mask, valid)
        out["iou"] = float((inter.float() / union.clamp_min(1)).mean())
    return out

"""Stereo evaluation metrics over the pixels that have ground truth, accumulated over a dataset.

    EPE       mean |d_pred - d_gt| in pixels
    D1-all    fraction of pixels with |error| > 3 px AND |error| > 5 % of d_gt (the KITTI 2015 stereo benchmark's rule)
    3-px      fraction of pixels with |error| > 3 px
    occ. IoU  STTR's occlusion IoU (tlv_fast.formulas.occlusion_iou_counts, as tlv_fast.models.stereo_metrics)

Dataset figures are pixel-weighted (sums of errors and counts over every image, then one division), so an image with
more ground truth weighs more; the per-image values are also returned for tables and plots.
"""
import math

import torch

from ..formulas import occlusion_iou_counts


def _check(name, t, shape=None, dtype=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtype == "bool" and t.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got {t.dtype}")
    if dtype == "float" and not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def image_counts(pred, gt, valid=None, occlusion=None, occ_mask=None):
    """The sums one (H, W) image adds to a dataset's metrics.

    pred, gt: (H, W) predicted and ground-truth disparity (pixels). valid: bool (H, W), the pixels with ground truth
    (default: finite gt > 0). occlusion: (H, W) predicted occlusion probability; occ_mask: bool (H, W) ground-truth
    occlusion (the occluded pixels are excluded from the disparity metrics; both or neither for the IoU).
    Returns a dict of Python numbers: pixels, abs_error (sum), d1 and px3 (counts), and with occlusion, occ_inter and
    occ_union."""
    _check("gt", gt, dtype="float")
    if gt.ndim != 2:
        raise ValueError(f"gt must be (H, W), got shape {tuple(gt.shape)}")
    _check("pred", pred, gt.shape, "float")
    gt, pred = gt.double(), pred.double()
    if valid is None:
        valid = torch.isfinite(gt) & (gt > 0)
    else:
        _check("valid", valid, gt.shape, "bool")
        valid = valid & torch.isfinite(gt)
    if occ_mask is not None:
        _check("occ_mask", occ_mask, gt.shape, "bool")
        valid = valid & ~occ_mask
    err = (pred - torch.where(valid, gt, 0.0)).abs()[valid]
    g = gt[valid]
    out = {"pixels": int(valid.sum()), "abs_error": float(err.sum()), "px3": int((err > 3).sum()),
           "d1": int(((err > 3) & (err > 0.05 * g)).sum())}
    if (occlusion is None) != (occ_mask is None):
        raise ValueError("occlusion and occ_mask: pass both (for the occlusion IoU) or neither")
    if occlusion is not None:
        _check("occlusion", occlusion, gt.shape, "float")
        inter, union = occlusion_iou_counts(occlusion, occ_mask, valid)
        out["occ_inter"], out["occ_union"] = int(inter), int(union)
    return out


def summarize(counts):
    """image_counts dicts (one per image) -> the dataset's metrics: epe (px), d1_all, px3 (fractions), occ_iou (when
    any image had occlusion ground truth), pixels and images. Metrics without pixels are NaN."""
    total = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    n = total.get("pixels", 0)

    def div(a, b):
        return a / b if b else math.nan
    out = {"epe": div(total.get("abs_error", 0.0), n), "d1_all": div(total.get("d1", 0), n),
           "px3": div(total.get("px3", 0), n), "pixels": n, "images": len(counts)}
    if "occ_union" in total:
        out["occ_iou"] = div(total["occ_inter"], total["occ_union"])
    return out


def per_image(c):
    """One image's image_counts -> its own metrics (the same keys as summarize)."""
    return summarize([c])

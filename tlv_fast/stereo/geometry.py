"""Stereo geometry: disparity to depth and to 3-D points, and the calibration files of KITTI and Middlebury.

For a rectified pair, a point at depth Z seen at column u in the left image and u - d in the right one satisfies
``Z = f B / (d + doffs)``, f the focal length in pixels, B the baseline and ``doffs = cx_right - cx_left`` the
difference of the principal points (0 when both cameras share them, as in KITTI; see the Middlebury 2014 stereo
dataset page, "calib.txt", for doffs). The pinhole model then gives ``X = (u - cx) Z / f`` and ``Y = (v - cy) Z / f``.

Conventions: u is the column index and v the row index, 0-based, with pixel centres at integer coordinates (the
convention of the KITTI projection matrices and of OpenCV); the camera frame has x right, y down, z forward (so a
viewer with y up shows the cloud upside down). Depth is in the unit of the baseline: metres for KITTI, millimetres for
Middlebury.
"""
import dataclasses
import math
import os
import re

import numpy as np
import torch

__all__ = [
    "Calibration", "disparity_to_depth", "point_mask", "disparity_to_points", "points_from_calibration",
    "read_kitti_calibration", "read_middlebury_calibration", "read_calibration",
]


def _check_number(value, name, fn, positive=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
            value = value.item()
        else:
            raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{fn}: {name} must be > 0, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The rectified-stereo calibration that turns disparities into 3-D points.

    Attributes:
        focal: focal length of the (left) rectified camera, in pixels.
        baseline: distance between the camera centres, > 0, in the unit of the calibration file: metres for KITTI
            (:func:`read_kitti_calibration`), millimetres for Middlebury (:func:`read_middlebury_calibration`).
            Depths and points come out in this unit.
        cx, cy: principal point of the left camera, in pixels (0-based, pixel centres at integer coordinates).
        doffs: ``cx_right - cx_left``, in pixels, added to the disparity (0 for KITTI; Middlebury's ``doffs``).
    """
    focal: float
    baseline: float
    cx: float
    cy: float
    doffs: float = 0.0

    def __post_init__(self):
        for name in ("focal", "baseline", "cx", "cy", "doffs"):
            value = _check_number(getattr(self, name), name, "Calibration", positive=name in ("focal", "baseline"))
            object.__setattr__(self, name, value)


def _as_disp(disp, fn, two_d=False):
    if isinstance(disp, np.ndarray):
        disp = torch.from_numpy(disp)
    if not isinstance(disp, torch.Tensor):
        raise TypeError(f"{fn}: disp must be a torch.Tensor (or numpy.ndarray), got {type(disp).__name__}")
    if disp.dtype == torch.bool or disp.dtype.is_complex:
        raise TypeError(f"{fn}: disp must have a real (floating or integer) dtype, got {disp.dtype}")
    if two_d and disp.dim() != 2:
        raise ValueError(f"{fn}: disp must have shape (H, W), got {tuple(disp.shape)}")
    return disp


def _as_valid(valid, disp, fn):
    if valid is None:
        return None
    if isinstance(valid, np.ndarray):
        valid = torch.from_numpy(valid)
    if not isinstance(valid, torch.Tensor):
        raise TypeError(f"{fn}: valid must be a bool torch.Tensor or None, got {type(valid).__name__}")
    if valid.dtype != torch.bool:
        raise TypeError(f"{fn}: valid must be a bool mask, got dtype {valid.dtype}")
    if valid.shape != disp.shape:
        raise ValueError(f"{fn}: valid must have the shape of disp {tuple(disp.shape)}, got {tuple(valid.shape)}")
    return valid.to(disp.device)


def _denominator(disp, doffs):
    """d + doffs in float64, and where it gives a depth (finite and > 0)."""
    den = disp.to(torch.float64) + doffs
    return den, torch.isfinite(den) & (den > 0)


def disparity_to_depth(disp, focal, baseline, doffs=0.0):
    """Depth ``Z = focal * baseline / (disp + doffs)`` as float32, same shape and device as ``disp``.

    Computed in float64, then rounded once to float32. Where there is no depth (``disp + doffs <= 0``, or ``disp``
    NaN or infinite) the result is NaN. The unit is the baseline's.
    """
    fn = "disparity_to_depth"
    disp = _as_disp(disp, fn)
    focal = _check_number(focal, "focal", fn, positive=True)
    baseline = _check_number(baseline, "baseline", fn, positive=True)
    doffs = _check_number(doffs, "doffs", fn)
    den, ok = _denominator(disp, doffs)
    depth = torch.where(ok, (focal * baseline) / torch.where(ok, den, 1.0), math.nan)
    return depth.to(torch.float32)


def point_mask(disp, valid=None, doffs=0.0):
    """The pixels that become points, a bool (H, W) mask: ``disp`` finite, ``disp + doffs > 0``, and ``valid``.

    ``valid`` (bool (H, W), optional) may be any mask of trusted pixels, e.g. ground-truth validity or the
    non-occluded pixels (``~occlusion``).
    """
    fn = "point_mask"
    disp = _as_disp(disp, fn, two_d=True)
    valid = _as_valid(valid, disp, fn)
    doffs = _check_number(doffs, "doffs", fn)
    _, ok = _denominator(disp, doffs)
    return ok if valid is None else ok & valid


def disparity_to_points(disp, focal, baseline, cx=None, cy=None, valid=None, doffs=0.0):
    """Back-project a left disparity map to 3-D points, float32 (N, 3) on the device of ``disp``.

    With ``Z = focal * baseline / (d + doffs)``: ``X = (u - cx) * Z / focal``, ``Y = (v - cy) * Z / focal``, u the
    column and v the row index (pixel centres at integer coordinates). ``cx`` and ``cy`` default to the image centre,
    ``(W - 1) / 2`` and ``(H - 1) / 2``. Computed in float64, rounded once to float32.

    The points are exactly the pixels of :func:`point_mask` (``disp``, ``valid``, ``doffs``), in row-major order, so
    ``image[:, point_mask(disp, valid, doffs)].T`` are their colours (with ``image`` the (3, H, W) left image).
    """
    fn = "disparity_to_points"
    disp = _as_disp(disp, fn, two_d=True)
    valid = _as_valid(valid, disp, fn)
    focal = _check_number(focal, "focal", fn, positive=True)
    baseline = _check_number(baseline, "baseline", fn, positive=True)
    doffs = _check_number(doffs, "doffs", fn)
    h, w = disp.shape
    cx = (w - 1) / 2 if cx is None else _check_number(cx, "cx", fn)
    cy = (h - 1) / 2 if cy is None else _check_number(cy, "cy", fn)
    den, mask = _denominator(disp, doffs)
    if valid is not None:
        mask = mask & valid
    v, u = torch.nonzero(mask, as_tuple=True)  # row-major order
    z = (focal * baseline) / den[v, u]
    x = (u.to(torch.float64) - cx) * z / focal
    y = (v.to(torch.float64) - cy) * z / focal
    return torch.stack([x, y, z], dim=1).to(torch.float32)


def points_from_calibration(disp, calib, valid=None):
    """:func:`disparity_to_points` with the focal length, baseline, principal point and doffs of ``calib``."""
    if not isinstance(calib, Calibration):
        raise TypeError(f"points_from_calibration: calib must be a Calibration, got {type(calib).__name__}")
    return disparity_to_points(disp, calib.focal, calib.baseline, cx=calib.cx, cy=calib.cy, valid=valid,
                               doffs=calib.doffs)


# ------------------------------------------------------------------------------------------------ calibration files

def _read_text(path):
    with open(os.fspath(path), encoding="utf-8", errors="replace") as f:
        return f.read()


def _kitti_entries(text):
    entries = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            entries[key.strip()] = value
    return entries


def _kitti_projection(entries, camera, which, spath):
    fn = "read_kitti_calibration"
    cam = str(camera).strip()
    if not cam.isdigit():
        raise ValueError(f"{fn}: {which} must be a camera number like '02', got {camera!r}")
    keys = (f"P_rect_{int(cam):02d}", f"P{int(cam)}")
    for key in keys:
        if key in entries:
            break
    else:
        raise ValueError(f"{fn}: {spath!r} has no projection matrix for the {which} camera (looked for "
                         f"{' or '.join(repr(k) for k in keys)})")
    words = entries[key].split()
    try:
        values = [float(x) for x in words]
    except ValueError:
        raise ValueError(f"{fn}: {spath!r}: {key} is not a list of numbers: {entries[key].strip()!r}") from None
    if len(values) != 12 or not all(math.isfinite(x) for x in values):
        raise ValueError(f"{fn}: {spath!r}: {key} must hold 12 finite numbers (a 3 x 4 matrix), got {len(values)}")
    return key, np.array(values, dtype=np.float64).reshape(3, 4)


def read_kitti_calibration(path, left="02", right="03"):
    """The :class:`Calibration` of a KITTI stereo pair (baseline in metres).

    Reads ``calib_cam_to_cam.txt`` (KITTI raw data and the KITTI 2015 stereo benchmark: ``P_rect_02: <12 numbers>``
    lines) or the per-frame files of the object and odometry benchmarks (``P2: <12 numbers>``); other lines are
    ignored. ``left`` and ``right`` are camera numbers ("02" and "03": the colour pair; "00" and "01": grey).
    With P the 3 x 4 rectified projection matrices: ``focal = P_left[0, 0]``, ``cx = P_left[0, 2]``,
    ``cy = P_left[1, 2]``, ``baseline = (P_left[0, 3] - P_right[0, 3]) / focal`` and
    ``doffs = P_right[0, 2] - P_left[0, 2]`` (0 in KITTI's files).
    """
    fn, spath = "read_kitti_calibration", os.fspath(path)
    entries = _kitti_entries(_read_text(spath))
    kl, pl = _kitti_projection(entries, left, "left", spath)
    kr, pr = _kitti_projection(entries, right, "right", spath)
    focal = pl[0, 0]
    if not focal > 0:
        raise ValueError(f"{fn}: {spath!r}: {kl}[0, 0] (the focal length) must be > 0, got {focal}")
    if abs(pr[0, 0] - focal) > 1e-6 * focal or abs(pr[1, 2] - pl[1, 2]) > 1e-3:
        raise ValueError(f"{fn}: {spath!r}: {kl} and {kr} are not a rectified pair (focal {focal} vs {pr[0, 0]}, "
                         f"cy {pl[1, 2]} vs {pr[1, 2]})")
    baseline = (pl[0, 3] - pr[0, 3]) / focal
    if not baseline > 0:
        raise ValueError(f"{fn}: {spath!r}: baseline ({kl}[0, 3] - {kr}[0, 3]) / focal = {baseline} must be > 0 "
                         f"(is the left camera {left!r} really left of {right!r}?)")
    return Calibration(focal=float(focal), baseline=float(baseline), cx=float(pl[0, 2]), cy=float(pl[1, 2]),
                       doffs=float(pr[0, 2] - pl[0, 2]))


def _middlebury_matrix(value, key, spath):
    fn = "read_middlebury_calibration"
    text = value.strip()
    if not (text.startswith("[") and text.endswith("]")):
        raise ValueError(f"{fn}: {spath!r}: {key} must be a matrix like [f 0 cx; 0 f cy; 0 0 1], got {text!r}")
    try:
        rows = [[float(x) for x in row.replace(",", " ").split()] for row in text[1:-1].split(";")]
    except ValueError:
        raise ValueError(f"{fn}: {spath!r}: {key} has a value that is not a number: {text!r}") from None
    if len(rows) != 3 or any(len(r) != 3 for r in rows):
        raise ValueError(f"{fn}: {spath!r}: {key} must be a 3 x 3 matrix, got {text!r}")
    return np.array(rows, dtype=np.float64)


def read_middlebury_calibration(path):
    """The :class:`Calibration` of a Middlebury 2014 scene (baseline in millimetres) from its ``calib.txt``.

    The file has ``key=value`` lines: ``cam0=[f 0 cx; 0 f cy; 0 0 1]``, ``cam1=[...]``, ``doffs=...``,
    ``baseline=...`` (mm), ``width``, ``height``, ``ndisp``, ... (the Middlebury 2014 stereo dataset page describes
    them; ETH3D's two-view files use the same layout). ``focal = cam0[0][0]``, ``cx = cam0[0][2]``,
    ``cy = cam0[1][2]``; ``cam0``, ``baseline`` and ``doffs`` are required.
    """
    fn, spath = "read_middlebury_calibration", os.fspath(path)
    entries = {}
    for line in _read_text(spath).splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            entries[key.strip()] = value.strip()
    missing = [k for k in ("cam0", "baseline", "doffs") if k not in entries]
    if missing:
        raise ValueError(f"{fn}: {spath!r} lacks {', '.join(missing)}; expected Middlebury calib.txt lines "
                         "cam0=[...], baseline=..., doffs=...")
    k = _middlebury_matrix(entries["cam0"], "cam0", spath)
    scalars = {}
    for key in ("baseline", "doffs"):
        try:
            scalars[key] = float(entries[key])
        except ValueError:
            raise ValueError(f"{fn}: {spath!r}: {key} must be a number, got {entries[key]!r}") from None
    try:
        return Calibration(focal=float(k[0, 0]), baseline=scalars["baseline"], cx=float(k[0, 2]), cy=float(k[1, 2]),
                           doffs=scalars["doffs"])
    except ValueError as e:
        raise ValueError(f"{fn}: {spath!r}: {e}") from None


def read_calibration(path):
    """Read a KITTI or a Middlebury calibration file (told apart by their keys: ``cam0=`` for Middlebury,
    ``P_rect_NN:`` or ``PN:`` for KITTI) with :func:`read_middlebury_calibration` or :func:`read_kitti_calibration`
    (default cameras 02 and 03)."""
    spath = os.fspath(path)
    text = _read_text(spath)
    if re.search(r"^\s*cam0\s*=", text, flags=re.MULTILINE):
        return read_middlebury_calibration(spath)
    if re.search(r"^\s*(P_rect_\d\d|P\d)\s*:", text, flags=re.MULTILINE):
        return read_kitti_calibration(spath)
    raise ValueError(f"read_calibration: {spath!r} is neither a Middlebury calib.txt (no 'cam0=' line) nor a KITTI "
                     "calibration (no 'P_rect_02:' or 'P2:' line)")

"""Reading and writing the files of stereo work: photos, disparity maps (PFM, KITTI 16-bit PNG), visualisations and
point clouds (PLY).

Formats, as implemented here:

- PFM (the "portable float map" described on Paul Debevec's HDRShop pages; the format of the Scene Flow and
  Middlebury 2014 disparities): an ASCII header ``PF`` (3 channels) or ``Pf`` (1 channel), then width and height,
  then a scale whose sign gives the byte order (negative: little-endian, positive: big-endian), each separated by
  whitespace and the scale followed by one whitespace byte; then float32 samples, rows stored bottom-to-top,
  channels interleaved.
- KITTI disparity PNG (the KITTI 2012 and 2015 stereo benchmarks' development kits): 16-bit grayscale,
  disparity = value / 256, value 0 where there is no ground truth.
- PLY (Greg Turk, "The PLY Polygon File Format"): the header ``write_ply`` documents, then one record per vertex.

All functions take paths (``str`` or ``os.PathLike``) and torch tensors (numpy arrays are accepted as well); they
return torch tensors on the CPU.
"""
import os
import re

import numpy as np
import torch
from PIL import Image

__all__ = [
    "read_image", "write_image", "read_pfm", "write_pfm", "read_kitti_disparity", "write_kitti_disparity",
    "colorize_disparity", "write_disparity_png", "write_probability_png", "write_ply", "read_ply",
]


# ---------------------------------------------------------------------------------------------------------- helpers

def _to_numpy(x, name, fn):
    """A torch tensor or numpy array as a numpy array (CPU, no copy when possible); anything else is a TypeError."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{fn}: {name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _shape_str(a):
    return "(" + ", ".join(str(s) for s in a.shape) + ")"


def _check_real(a, name, fn, allow_bool=False):
    """Reject dtypes that are not real numbers (complex, object, strings; bool unless allowed)."""
    if a.dtype == np.bool_ and allow_bool:
        return
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise TypeError(f"{fn}: {name} must have a real (integer or floating) dtype, got {a.dtype}")


def _float_to_uint8(a, name, fn):
    """Floats in [0, 1] to uint8 (clamped, rounded to nearest); NaN is an error."""
    a = a.astype(np.float64)
    if np.isnan(a).any():
        raise ValueError(f"{fn}: {name} contains NaN; expected values in [0, 1]")
    return np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)


def _as_uint8(a, name, fn):
    """uint8 as it is, floating point in [0, 1] scaled and rounded; anything else is an error naming `name`."""
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating):
        return _float_to_uint8(a, name, fn)
    raise TypeError(f"{fn}: {name} must be uint8, or floating point in [0, 1], got dtype {a.dtype}")


def _image_rawmode(im):
    """The raw mode of the first tile as Pillow decodes it (e.g. 'RGB;16B' for a 16-bit RGB PNG), or ''."""
    for tile in getattr(im, "tile", None) or ():
        args = tile[3] if len(tile) > 3 else None
        if isinstance(args, str):
            return args
        if isinstance(args, tuple) and args and isinstance(args[0], str):
            return args[0]
    return ""


_HIGH_DEPTH_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")


def _is_high_depth(im):
    return im.mode in _HIGH_DEPTH_MODES or ";16" in _image_rawmode(im) or ";32" in _image_rawmode(im)


def _save_pil(im, path, fn, format=None):
    try:
        im.save(os.fspath(path), format=format)
    except (KeyError, ValueError) as e:
        if format is None and "unknown file extension" in str(e):
            raise ValueError(f"{fn}: cannot tell the image format from the suffix of path {os.fspath(path)!r}; "
                             "use a suffix Pillow knows (.png, .jpg, .bmp, .tif, ...)") from None
        raise


# ------------------------------------------------------------------------------------------------------------ photos

def read_image(path):
    """Read a photo as a ``torch.uint8`` tensor of shape (3, H, W) (RGB).

    Any 8-bit format Pillow opens works (PNG, JPEG, BMP, TIFF, ...). Grayscale (and 1-bit) images have their channel
    repeated three times; images with alpha (RGBA, LA, PA) lose it; palette images are expanded to RGB; CMYK and YCbCr
    are converted by Pillow. The EXIF orientation tag is not applied: stereo pairs are rectified as stored. Only the
    first frame of a multi-frame file is read.

    16-bit and 32-bit images are refused: in stereo data they are disparity maps (see :func:`read_kitti_disparity`),
    and reading them as photos would silently drop their low bits.
    """
    fn = "read_image"
    with Image.open(os.fspath(path)) as im:
        if _is_high_depth(im):
            raise ValueError(f"{fn}: {os.fspath(path)!r} is a high bit-depth image (mode {im.mode!r}, raw mode "
                             f"{_image_rawmode(im)!r}); expected an 8-bit photo. A 16-bit PNG is usually a "
                             "disparity map: read it with read_kitti_disparity")
        if im.mode in ("1", "L"):
            gray = np.asarray(im.convert("L"))
            arr = np.repeat(gray[:, :, None], 3, axis=2)
        else:
            arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(np.array(arr.transpose(2, 0, 1), order="C"))  # a writable copy


def write_image(path, image):
    """Write a photo; the format follows the suffix of ``path`` (Pillow's rules: .png, .jpg, .bmp, ...).

    ``image``: (3, H, W) RGB or (H, W) grayscale, either ``uint8`` or floating point in [0, 1] (clamped, then rounded
    to the nearest of the 256 levels; NaN is an error). Other integer dtypes are refused (their range is ambiguous).
    JPEG is lossy: use PNG for an exact round trip with :func:`read_image`.
    """
    fn = "write_image"
    a = _to_numpy(image, "image", fn)
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[0] == 3)):
        raise ValueError(f"{fn}: image must have shape (3, H, W) or (H, W), got {_shape_str(a)}")
    if a.shape[-1] == 0 or a.shape[-2] == 0:
        raise ValueError(f"{fn}: image must not be empty, got shape {_shape_str(a)}")
    a = _as_uint8(a, "image", fn)
    if a.ndim == 3:
        im = Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0)))
    else:
        im = Image.fromarray(np.ascontiguousarray(a))
    _save_pil(im, path, fn)


# --------------------------------------------------------------------------------------------------------------- PFM

_PFM_WHITESPACE = b" \t\r\n\v\f"


def _pfm_tokens(buf, count, path):
    """The first ``count`` whitespace-separated header tokens of a PFM and the offset just past the last one."""
    tokens, pos, n = [], 0, len(buf)
    while len(tokens) < count:
        while pos < n and buf[pos] in _PFM_WHITESPACE:
            pos += 1
        start = pos
        while pos < n and buf[pos] not in _PFM_WHITESPACE and pos - start < 64:
            pos += 1
        if pos == start or pos - start >= 64:
            raise ValueError(f"read_pfm: {path!r} has a truncated or malformed header (expected 'PF'/'Pf', width, "
                             f"height and scale, found {len(tokens)} of them)")
        tokens.append(buf[start:pos])
    return tokens, pos


def read_pfm(path):
    """Read a PFM file: ``float32`` (H, W) for ``Pf`` (one channel), (3, H, W) for ``PF`` (three channels).

    The header is read token by token, so any whitespace between the tokens works (``"Pf\\n960 540\\n-1.0\\n"``,
    ``"Pf\\n960\\n540\\n-1\\n"``, ``"Pf 960 540 -1.0\\n"``, CR LF line ends). The sign of the scale gives the byte
    order (negative: little-endian, positive: big-endian); its magnitude is ignored. Rows are stored bottom-to-top
    and are returned top-to-bottom. Values are returned bit for bit (NaN and inf included): Middlebury 2014 marks
    unknown disparities with inf.
    """
    fn, spath = "read_pfm", os.fspath(path)
    with open(spath, "rb") as f:
        buf = f.read()
    if buf[:2] not in (b"PF", b"Pf") or (len(buf) > 2 and buf[2] not in _PFM_WHITESPACE):
        raise ValueError(f"{fn}: {spath!r} is not a PFM file (starts with {buf[:8]!r}; expected 'PF' or 'Pf' "
                         "followed by whitespace)")
    channels = 3 if buf[:2] == b"PF" else 1
    tokens, pos = _pfm_tokens(buf, 4, spath)
    try:
        width, height = int(tokens[1]), int(tokens[2])
    except ValueError:
        raise ValueError(f"{fn}: {spath!r} has a malformed size {tokens[1]!r} {tokens[2]!r}; expected two positive "
                         "integers") from None
    try:
        scale = float(tokens[3])
    except ValueError:
        raise ValueError(f"{fn}: {spath!r} has a malformed scale {tokens[3]!r}; expected a nonzero number") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"{fn}: {spath!r} has size {width} x {height}; expected positive width and height")
    if scale == 0 or not np.isfinite(scale):
        raise ValueError(f"{fn}: {spath!r} has scale {tokens[3]!r}; expected a nonzero finite number (its sign "
                         "gives the byte order)")
    nbytes = width * height * channels * 4
    # The data starts after the single whitespace byte that ends the scale. A writer that ends the header with
    # CR LF (or more whitespace) leaves extra bytes there: then the data are the last nbytes of the file.
    start = pos + 1
    if len(buf) - start < nbytes:
        raise ValueError(f"{fn}: {spath!r} is truncated: a {'PF' if channels == 3 else 'Pf'} of {width} x {height} "
                         f"needs {nbytes} data bytes, the file has {max(len(buf) - start, 0)}")
    if len(buf) - start > nbytes and all(b in _PFM_WHITESPACE for b in buf[pos:len(buf) - nbytes]):
        start = len(buf) - nbytes
    dtype = np.dtype("<f4" if scale < 0 else ">f4")
    data = np.frombuffer(buf, dtype=dtype, count=width * height * channels, offset=start)
    data = data.reshape(height, width, channels)[::-1].astype(np.float32)  # native byte order; bits unchanged
    if channels == 1:
        return torch.from_numpy(np.ascontiguousarray(data[:, :, 0]))
    return torch.from_numpy(np.ascontiguousarray(data.transpose(2, 0, 1)))


def write_pfm(path, array):
    """Write a PFM: (H, W) as ``Pf``, (3, H, W) as ``PF``; float32 little-endian (scale -1.0), rows bottom-to-top.

    The header is ``"Pf\\n{W} {H}\\n-1.0\\n"`` (``PF`` for three channels). Values are converted to float32 (NaN and
    inf are kept, bit for bit for float32 input), so :func:`read_pfm` returns exactly what was written.
    """
    fn = "write_pfm"
    a = _to_numpy(array, "array", fn)
    _check_real(a, "array", fn)
    if a.ndim == 2:
        magic, data = b"Pf", a[:, :, None]
    elif a.ndim == 3 and a.shape[0] == 3:
        magic, data = b"PF", a.transpose(1, 2, 0)
    else:
        raise ValueError(f"{fn}: array must have shape (H, W) or (3, H, W), got {_shape_str(a)}")
    height, width = data.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"{fn}: array must not be empty, got shape {_shape_str(a)}")
    payload = np.ascontiguousarray(data[::-1], dtype="<f4").tobytes()
    with open(os.fspath(path), "wb") as f:
        f.write(magic + b"\n%d %d\n-1.0\n" % (width, height))
        f.write(payload)


# ------------------------------------------------------------------------------------------------ KITTI disparities

def read_kitti_disparity(path):
    """Read a KITTI disparity PNG (16-bit grayscale): returns ``(disp, valid)``, float32 and bool (H, W).

    ``disp = value / 256`` where ``value > 0``; ``value == 0`` marks pixels without ground truth (``valid`` False,
    ``disp`` 0 there). An 8-bit (or colour) PNG is refused: it cannot hold KITTI's encoding.
    """
    fn, spath = "read_kitti_disparity", os.fspath(path)
    with Image.open(spath) as im:
        if im.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
            value = np.asarray(im).astype(np.int64)
        elif im.mode == "I" and _image_rawmode(im).startswith("I;16"):
            value = np.asarray(im).astype(np.int64)
        else:
            depth = "16-bit" if ";16" in _image_rawmode(im) else "8-bit"
            raise ValueError(f"{fn}: {spath!r} is a {depth} {im.mode!r} image; expected a 16-bit grayscale PNG "
                             "(KITTI disparity: value / 256, 0 = invalid)")
    if value.min(initial=0) < 0 or value.max(initial=0) > 65535:
        raise ValueError(f"{fn}: {spath!r} holds values outside [0, 65535]; expected a 16-bit grayscale PNG")
    valid = value > 0
    disp = (value.astype(np.float32) / np.float32(256.0)).astype(np.float32)
    return torch.from_numpy(disp), torch.from_numpy(valid)


def _check_valid(valid, shape, fn, name="valid"):
    v = _to_numpy(valid, name, fn)
    if v.dtype != np.bool_:
        raise TypeError(f"{fn}: {name} must be a bool mask, got dtype {v.dtype}")
    if v.shape != shape:
        raise ValueError(f"{fn}: {name} must have the shape of disp {tuple(shape)}, got {tuple(v.shape)}")
    return v


def _disparity_2d(disp, fn):
    d = _to_numpy(disp, "disp", fn)
    _check_real(d, "disp", fn)
    if d.ndim != 2:
        raise ValueError(f"{fn}: disp must have shape (H, W), got {_shape_str(d)}")
    if d.shape[0] == 0 or d.shape[1] == 0:
        raise ValueError(f"{fn}: disp must not be empty, got shape {_shape_str(d)}")
    return d.astype(np.float64)


def write_kitti_disparity(path, disp, valid=None):
    """Write a KITTI disparity PNG (always PNG, whatever the suffix): 16-bit grayscale.

    Valid pixels store ``round(disp * 256)`` (to nearest, ties to even) clamped to [1, 65535], so a valid pixel
    stays valid; the others store 0. ``valid`` defaults to ``disp > 0`` and finite. A pixel marked valid must have a
    finite disparity. Disparities that are multiples of 1/256 in (0, 65535 / 256] round-trip exactly through
    :func:`read_kitti_disparity`.
    """
    fn = "write_kitti_disparity"
    d = _disparity_2d(disp, fn)
    finite = np.isfinite(d)
    if valid is None:
        v = finite & (d > 0)
    else:
        v = _check_valid(valid, d.shape, fn)
        if not finite[v].all():
            raise ValueError(f"{fn}: disp is not finite at {int((~finite & v).sum())} pixel(s) marked valid")
    value = np.zeros(d.shape, np.uint16)
    value[v] = np.clip(np.rint(d[v] * 256.0), 1, 65535).astype(np.uint16)
    Image.fromarray(value).save(os.fspath(path), format="PNG")


# ---------------------------------------------------------------------------------------------- visualisations

# Colour map: positions in [0, 1] and sRGB anchors, interpolated linearly in between. A hand-made table in the
# spirit of Turbo (Google AI blog, "Turbo, An Improved Rainbow Colormap for Visualization", 2019): dark blue, blue,
# cyan, green, yellow, orange, red, dark red. Far (small disparity) is cold, near is warm. The low end is not black,
# so that invalid (black) pixels stay distinguishable.
_ANCHOR_T = np.linspace(0.0, 1.0, 9)
_ANCHOR_RGB = np.array([
    [48, 18, 60],
    [68, 90, 205],
    [62, 155, 254],
    [26, 228, 182],
    [114, 254, 94],
    [200, 239, 52],
    [254, 185, 46],
    [234, 86, 14],
    [122, 4, 3],
], dtype=np.float64)


def colorize_disparity(disp, max_disp=None, valid=None):
    """A disparity map as a colour image, ``uint8`` (3, H, W).

    Disparities are scaled to [0, 1] by ``max_disp`` (values above it saturate) and coloured through a fixed
    anchor table interpolated linearly (dark blue at 0, through cyan, green, yellow, to dark red at ``max_disp``).
    ``max_disp`` defaults to the largest valid disparity. Pixels that are invalid (``valid`` False, non-finite, or
    ``disp <= 0``) are black.
    """
    fn = "colorize_disparity"
    d = _disparity_2d(disp, fn)
    ok = np.isfinite(d) & (d > 0)
    if valid is not None:
        ok &= _check_valid(valid, d.shape, fn)
    if max_disp is None:
        max_disp = float(d[ok].max()) if ok.any() else 1.0
    else:
        if isinstance(max_disp, bool) or not isinstance(max_disp, (int, float, np.integer, np.floating)):
            raise TypeError(f"{fn}: max_disp must be a number or None, got {type(max_disp).__name__}")
        max_disp = float(max_disp)
        if not (np.isfinite(max_disp) and max_disp > 0):
            raise ValueError(f"{fn}: max_disp must be finite and > 0, got {max_disp}")
    t = np.clip(np.where(ok, d, 0.0) / max_disp, 0.0, 1.0)
    rgb = np.stack([np.interp(t, _ANCHOR_T, _ANCHOR_RGB[:, c]) for c in range(3)])
    rgb = np.rint(rgb).astype(np.uint8)
    rgb[:, ~ok] = 0
    return torch.from_numpy(rgb)


def write_disparity_png(path, disp, max_disp=None, valid=None):
    """Write :func:`colorize_disparity` (same arguments) as an 8-bit RGB PNG (always PNG, whatever the suffix)."""
    rgb = colorize_disparity(disp, max_disp=max_disp, valid=valid).numpy()
    Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 2, 0))).save(os.fspath(path), format="PNG")


def write_probability_png(path, prob):
    """Write a probability map (e.g. occlusion) as an 8-bit grayscale PNG (always PNG): white = 1, black = 0.

    ``prob``: (H, W) floating point in [0, 1] (rounded to the nearest of 256 levels; overshoot up to 1e-5 from
    rounding errors is clamped), or a bool mask. NaN or values further outside [0, 1] are errors.
    """
    fn = "write_probability_png"
    p = _to_numpy(prob, "prob", fn)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"{fn}: prob must have shape (H, W) with H, W > 0, got {_shape_str(p)}")
    if p.dtype == np.bool_:
        g = p.astype(np.uint8) * 255
    elif np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float64)
        if np.isnan(p).any():
            raise ValueError(f"{fn}: prob contains NaN; expected values in [0, 1]")
        lo, hi = float(p.min()), float(p.max())
        if lo < -1e-5 or hi > 1 + 1e-5:
            raise ValueError(f"{fn}: prob must be in [0, 1], got values in [{lo}, {hi}]")
        g = _float_to_uint8(p, "prob", fn)
    else:
        raise TypeError(f"{fn}: prob must be floating point in [0, 1] or bool, got dtype {p.dtype}")
    Image.fromarray(np.ascontiguousarray(g)).save(os.fspath(path), format="PNG")


# --------------------------------------------------------------------------------------------------------------- PLY

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


def write_ply(path, points, colors=None):
    """Write a point cloud as binary little-endian PLY (read by MeshLab, Open3D, CloudCompare).

    ``points``: (N, 3) real numbers, stored as float32 (non-finite coordinates are refused). ``colors``: None, or
    (N, 3) ``uint8``, or floating point in [0, 1] (clamped, rounded). The header is exactly::

        ply
        format binary_little_endian 1.0
        element vertex N
        property float x
        property float y
        property float z
        property uchar red        (these three only with colors)
        property uchar green
        property uchar blue
        end_header

    followed by N records of 12 bytes (15 with colours), no padding.
    """
    fn = "write_ply"
    p = _to_numpy(points, "points", fn)
    _check_real(p, "points", fn)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"{fn}: points must have shape (N, 3), got {_shape_str(p)}")
    p = p.astype(np.float32)
    if not np.isfinite(p).all():
        raise ValueError(f"{fn}: points has {int((~np.isfinite(p)).any(axis=1).sum())} non-finite point(s) (as "
                         "float32); drop them first (e.g. with geometry.point_mask)")
    n = p.shape[0]
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    header = f"ply\nformat binary_little_endian 1.0\nelement vertex {n}\nproperty float x\nproperty float y\n" \
             "property float z\n"
    c = None
    if colors is not None:
        c = _to_numpy(colors, "colors", fn)
        if c.shape != (n, 3):
            raise ValueError(f"{fn}: colors must have shape (N, 3) = ({n}, 3) like points, got {_shape_str(c)}")
        c = _as_uint8(c, "colors", fn)
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
        header += "property uchar red\nproperty uchar green\nproperty uchar blue\n"
    header += "end_header\n"
    rec = np.empty(n, dtype=np.dtype(fields))
    rec["x"], rec["y"], rec["z"] = p[:, 0], p[:, 1], p[:, 2]
    if c is not None:
        rec["red"], rec["green"], rec["blue"] = c[:, 0], c[:, 1], c[:, 2]
    with open(os.fspath(path), "wb") as f:
        f.write(header.encode("ascii"))
        f.write(rec.tobytes())


def _parse_ply_header(buf, spath):
    fn = "read_ply"
    if not (buf.startswith(b"ply\n") or buf.startswith(b"ply\r\n")):
        raise ValueError(f"{fn}: {spath!r} is not a PLY file (starts with {buf[:8]!r}; expected 'ply')")
    m = re.search(rb"(^|\n)end_header[ \t]*\r?\n", buf[:1 << 20])
    if m is None:
        raise ValueError(f"{fn}: {spath!r} has no 'end_header' line (truncated or not a PLY file)")
    fmt, elements = None, []
    for raw in buf[:m.start()].decode("ascii", errors="replace").splitlines()[1:]:
        words = raw.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format" and len(words) == 3:
            fmt = words[1]
        elif words[0] == "element" and len(words) == 3 and words[2].isdigit():
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements:
            if words[1] == "list":
                elements[-1][2].append((words[-1], None))
            elif len(words) == 3 and words[1] in _PLY_TYPES:
                elements[-1][2].append((words[2], _PLY_TYPES[words[1]]))
            else:
                raise ValueError(f"{fn}: {spath!r} has an unsupported property line {raw.strip()!r}")
        else:
            raise ValueError(f"{fn}: {spath!r} has an unexpected header line {raw.strip()!r}")
    if fmt not in ("binary_little_endian", "binary_big_endian", "ascii"):
        raise ValueError(f"{fn}: {spath!r} has format {fmt!r}; expected binary_little_endian, binary_big_endian or "
                         "ascii")
    return fmt, elements, m.end()


def read_ply(path):
    """Read a PLY point cloud: returns ``(points, colors)``, float32 (N, 3) and uint8 (N, 3) or None.

    Reads what :func:`write_ply` writes, and more generally binary (either byte order) or ASCII PLY whose vertex
    element has scalar properties ``x``, ``y``, ``z`` and optionally ``red``, ``green``, ``blue`` (uchar); other
    scalar vertex properties (normals, alpha, ...) are skipped, and so are elements after the vertices. Anything
    else (no vertex element, list properties on vertices, non-empty elements before the vertices, partial or
    non-uchar colours, truncated data) is a ValueError.
    """
    fn, spath = "read_ply", os.fspath(path)
    with open(spath, "rb") as f:
        buf = f.read()
    fmt, elements, start = _parse_ply_header(buf, spath)
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise ValueError(f"{fn}: {spath!r} has no 'vertex' element (elements: {names})")
    iv = names.index("vertex")
    for name, count, _ in elements[:iv]:
        if count:
            raise ValueError(f"{fn}: {spath!r} has {count} {name!r} record(s) before the vertices; not supported")
    _, n, props = elements[iv]
    pnames = [p[0] for p in props]
    for name, typ in props:
        if typ is None:
            raise ValueError(f"{fn}: {spath!r} has a list property {name!r} on vertices; not supported")
    if len(set(pnames)) != len(pnames):
        raise ValueError(f"{fn}: {spath!r} repeats a vertex property ({pnames})")
    missing = [k for k in ("x", "y", "z") if k not in pnames]
    if missing:
        raise ValueError(f"{fn}: {spath!r} has no vertex property {missing} (properties: {pnames})")
    rgb = [k for k in ("red", "green", "blue") if k in pnames]
    if rgb and len(rgb) != 3:
        raise ValueError(f"{fn}: {spath!r} has colour properties {rgb}; expected all of red, green, blue or none")
    types = dict(props)
    if rgb and any(types[k] != "u1" for k in rgb):
        raise ValueError(f"{fn}: {spath!r} has colours of types {[types[k] for k in rgb]}; expected uchar")
    if fmt == "ascii":
        lines = buf[start:].decode("ascii", errors="replace").split("\n")
        rows = [ln.split() for ln in lines if ln.strip()][:n]
        if len(rows) < n:
            raise ValueError(f"{fn}: {spath!r} is truncated: {n} vertices declared, {len(rows)} found")
        for i, r in enumerate(rows):
            if len(r) != len(props):
                raise ValueError(f"{fn}: {spath!r} vertex {i} has {len(r)} values; expected {len(props)}")
        try:
            table = np.array(rows, dtype=np.float64).reshape(n, len(props))
        except ValueError:
            raise ValueError(f"{fn}: {spath!r} has a vertex value that is not a number") from None
        col = {k: table[:, j] for j, k in enumerate(pnames)}
        if rgb:
            c = np.stack([col[k] for k in rgb], axis=1)
            if (c != np.rint(c)).any() or c.min(initial=0) < 0 or c.max(initial=0) > 255:
                raise ValueError(f"{fn}: {spath!r} has colours that are not integers in [0, 255]")
    else:
        order = "<" if fmt == "binary_little_endian" else ">"
        dt = np.dtype([(k, order + t) for k, t in props])
        if len(buf) - start < n * dt.itemsize:
            raise ValueError(f"{fn}: {spath!r} is truncated: {n} vertices of {dt.itemsize} bytes need "
                             f"{n * dt.itemsize} bytes, the file has {len(buf) - start}")
        col = np.frombuffer(buf, dtype=dt, count=n, offset=start)
    points = np.stack([np.asarray(col[k]).astype(np.float32) for k in ("x", "y", "z")], axis=1)
    colors = None
    if rgb:
        colors = torch.from_numpy(np.stack([np.asarray(col[k]).astype(np.uint8) for k in rgb], axis=1))
    return torch.from_numpy(np.ascontiguousarray(points)), colors

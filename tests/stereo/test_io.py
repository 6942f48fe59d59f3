"""tlv_fast.stereo.io: PFM, KITTI disparity PNG, photos, colour maps and PLY, against hand-built files."""
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from tlv_fast.stereo.io import (
    colorize_disparity,
    read_image,
    read_kitti_disparity,
    read_pfm,
    read_ply,
    write_disparity_png,
    write_image,
    write_kitti_disparity,
    write_pfm,
    write_ply,
    write_probability_png,
)


def _bits(t):
    return t.contiguous().view(torch.int32)


def _special_floats(shape, seed):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(shape, generator=g) * 100).float().flatten()
    a[:5] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-42])  # 1e-42: a subnormal
    # a quiet NaN with a payload and a signalling NaN (a float64 detour would change their bits)
    a[5:7] = torch.tensor([0x7FC01234, 0x7F800001], dtype=torch.int32).view(torch.float32)
    return a[torch.randperm(a.numel(), generator=g)].view(shape)


# ---------------------------------------------------------------------------------------------------------------- PFM

@pytest.mark.parametrize("shape, magic", [((7, 5), b"Pf"), ((3, 4, 6), b"PF")])
def test_pfm_round_trip_bit_exact(tmp_path, shape, magic):
    a = _special_floats(shape, seed=1)
    path = tmp_path / "a.pfm"
    write_pfm(path, a)
    h, w = shape[-2:]
    raw = path.read_bytes()
    assert raw.startswith(magic + b"\n%d %d\n-1.0\n" % (w, h))
    assert len(raw) == len(magic + b"\n%d %d\n-1.0\n" % (w, h)) + a.numel() * 4
    b = read_pfm(path)
    assert b.dtype == torch.float32 and b.shape == a.shape
    assert torch.equal(_bits(b), _bits(a))


def test_write_pfm_rows_bottom_to_top_little_endian(tmp_path):
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, -6.5]])
    write_pfm(tmp_path / "a.pfm", a)
    expected = b"Pf\n3 2\n-1.0\n" + struct.pack("<6f", 4.0, 5.0, -6.5, 1.0, 2.0, 3.0)
    assert (tmp_path / "a.pfm").read_bytes() == expected


def test_write_pfm_three_channels_interleaved(tmp_path):
    a = torch.arange(12, dtype=torch.float32).view(3, 2, 2)  # (C, H, W)
    write_pfm(tmp_path / "a.pfm", a.numpy().astype(np.float64))  # numpy float64 is accepted and stored as float32
    # bottom row (y = 1) first, each pixel r g b
    values = [a[c, y, x].item() for y in (1, 0) for x in (0, 1) for c in range(3)]
    assert (tmp_path / "a.pfm").read_bytes() == b"PF\n2 2\n-1.0\n" + struct.pack("<12f", *values)


def test_read_pfm_big_endian_positive_scale_split_header(tmp_path):
    # width and height on separate lines, integer scale; positive scale = big-endian
    rows_bottom_to_top = [[7.0, 8.0, 9.0], [1.5, -2.0, 3.25]]
    raw = b"Pf\n3\n2\n1\n" + struct.pack(">6f", *rows_bottom_to_top[0], *rows_bottom_to_top[1])
    (tmp_path / "be.pfm").write_bytes(raw)
    assert torch.equal(read_pfm(tmp_path / "be.pfm"), torch.tensor([[1.5, -2.0, 3.25], [7.0, 8.0, 9.0]]))


@pytest.mark.parametrize("header", [b"Pf\n2 2\n-1.0\n", b"Pf\n2 2\n-1\n", b"Pf 2 2 -1.0\n", b"Pf\n2\n2\n-2.5\n",
                                    b"Pf\r\n2 2\r\n-1.0\r\n", b"Pf\n2   2\n  -1.000000\n"])
def test_read_pfm_header_variants(tmp_path, header):
    (tmp_path / "a.pfm").write_bytes(header + struct.pack("<4f", 3.0, 4.0, 1.0, 2.0))
    assert torch.equal(read_pfm(tmp_path / "a.pfm"), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_read_pfm_three_channels(tmp_path):
    # one row, two pixels: (r, g, b) = (1, 2, 3), (4, 5, 6)
    (tmp_path / "a.pfm").write_bytes(b"PF\n2 1\n-1.0\n" + struct.pack("<6f", 1, 2, 3, 4, 5, 6))
    assert torch.equal(read_pfm(tmp_path / "a.pfm"), torch.tensor([[[1.0, 4.0]], [[2.0, 5.0]], [[3.0, 6.0]]]))


@pytest.mark.parametrize("raw, match", [
    (b"P6\n2 2\n255\n" + bytes(12), "not a PFM"),
    (b"PFM\n2 2\n-1.0\n" + bytes(48), "not a PFM"),
    (b"Pf\n2 2\n-1.0\n" + bytes(15), "truncated"),
    (b"Pf\n2 2\n", "truncated or malformed header"),
    (b"Pf\n2 x\n-1.0\n" + bytes(16), "malformed size"),
    (b"Pf\n2 2\n0\n" + bytes(16), "scale"),
    (b"Pf\n0 2\n-1\n", "positive width and height"),
])
def test_read_pfm_errors(tmp_path, raw, match):
    (tmp_path / "bad.pfm").write_bytes(raw)
    with pytest.raises(ValueError, match=match):
        read_pfm(tmp_path / "bad.pfm")


def test_write_pfm_errors(tmp_path):
    with pytest.raises(ValueError, match=r"array must have shape \(H, W\) or \(3, H, W\), got \(4, 2, 2\)"):
        write_pfm(tmp_path / "a.pfm", torch.zeros(4, 2, 2))
    with pytest.raises(TypeError, match="array must have a real"):
        write_pfm(tmp_path / "a.pfm", torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="array must be a torch.Tensor or numpy.ndarray, got list"):
        write_pfm(tmp_path / "a.pfm", [[1.0]])
    assert not (tmp_path / "a.pfm").exists()


# ------------------------------------------------------------------------------------------------ KITTI disparities

def test_kitti_disparity_round_trip_bit_exact(tmp_path):
    g = torch.Generator().manual_seed(2)
    value = torch.randint(0, 65536, (9, 13), generator=g)
    value[0, :3] = torch.tensor([0, 1, 65535])
    disp = value.float() / 256
    write_kitti_disparity(tmp_path / "d.png", disp)
    with Image.open(tmp_path / "d.png") as im:  # the file itself: 16-bit, value = disp * 256
        assert im.format == "PNG" and im.mode.startswith("I;16")
        assert np.array_equal(np.asarray(im).astype(np.int64), value.numpy())
    d, valid = read_kitti_disparity(tmp_path / "d.png")
    assert d.dtype == torch.float32 and valid.dtype == torch.bool
    assert torch.equal(valid, value > 0)
    assert torch.equal(d, disp)


def test_kitti_disparity_invalid_pixels(tmp_path):
    nan, inf = float("nan"), float("inf")
    disp = torch.tensor([[nan, inf, -3.0, 0.0, 2.5], [1e-4, 300.0, 10.0, 7.0, 1.0]])
    write_kitti_disparity(tmp_path / "d.png", disp)  # default valid: finite and > 0
    d, valid = read_kitti_disparity(tmp_path / "d.png")
    assert valid.tolist() == [[False, False, False, False, True], [True, True, True, True, True]]
    # 1e-4 * 256 rounds to 0 but stays valid (clamped to 1); 300 * 256 saturates at 65535
    assert d.tolist() == [[0, 0, 0, 0, 2.5], [1 / 256, 65535 / 256, 10.0, 7.0, 1.0]]
    # an explicit mask: pixel (1, 2) is dropped, pixel (0, 2) (negative) is kept at the smallest disparity
    mask = valid.clone()
    mask[1, 2], mask[0, 2] = False, True
    write_kitti_disparity(tmp_path / "m.png", disp, valid=mask)
    d, valid = read_kitti_disparity(tmp_path / "m.png")
    assert torch.equal(valid, mask) and d[1, 2] == 0 and d[0, 2] == 1 / 256


def test_kitti_disparity_errors(tmp_path):
    Image.fromarray(np.full((4, 5), 7, np.uint8)).save(tmp_path / "g8.png")
    with pytest.raises(ValueError, match="8-bit 'L' image; expected a 16-bit grayscale PNG"):
        read_kitti_disparity(tmp_path / "g8.png")
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="expected a 16-bit grayscale PNG"):
        read_kitti_disparity(tmp_path / "rgb.png")
    disp = torch.tensor([[1.0, float("nan")]])
    with pytest.raises(ValueError, match=r"disp is not finite at 1 pixel\(s\) marked valid"):
        write_kitti_disparity(tmp_path / "d.png", disp, valid=torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="valid must be a bool mask"):
        write_kitti_disparity(tmp_path / "d.png", disp, valid=torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"valid must have the shape of disp \(1, 2\)"):
        write_kitti_disparity(tmp_path / "d.png", disp, valid=torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"disp must have shape \(H, W\)"):
        write_kitti_disparity(tmp_path / "d.png", torch.ones(1, 2, 3))


# ------------------------------------------------------------------------------------------------------------ photos

def test_read_image_gray_rgba_palette(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray).save(tmp_path / "gray.png")
    img = read_image(tmp_path / "gray.png")
    assert img.dtype == torch.uint8 and img.shape == (3, 3, 4)
    assert all(torch.equal(img[c], torch.from_numpy(gray)) for c in range(3))

    rgba = np.random.default_rng(0).integers(0, 256, (3, 4, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert torch.equal(read_image(tmp_path / "rgba.png"), torch.from_numpy(rgba[:, :, :3]).permute(2, 0, 1))

    pal = Image.new("P", (3, 2))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putdata([0, 1, 1, 0, 0, 1])
    pal.save(tmp_path / "pal.png")
    with Image.open(tmp_path / "pal.png") as im:
        assert im.mode == "P"
    img = read_image(tmp_path / "pal.png")
    assert img[:, 0, 0].tolist() == [10, 20, 30] and img[:, 0, 1].tolist() == [200, 100, 50]
    assert img[:, 1, 2].tolist() == [200, 100, 50] and img[:, 1, 0].tolist() == [10, 20, 30]

    Image.fromarray(np.stack([gray, 255 - gray], axis=2)).save(tmp_path / "la.png")  # gray + alpha
    with Image.open(tmp_path / "la.png") as im:
        assert im.mode == "LA"
    assert torch.equal(read_image(tmp_path / "la.png"), torch.from_numpy(gray).expand(3, -1, -1))


def test_read_image_jpeg(tmp_path):
    y, x = np.mgrid[0:16, 0:24]
    rgb = np.stack([x * 10, y * 15, np.full_like(x, 128)], axis=2).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    img = read_image(tmp_path / "a.jpg")
    assert img.dtype == torch.uint8 and img.shape == (3, 16, 24)
    with Image.open(tmp_path / "a.jpg") as im:
        assert im.format == "JPEG"
        decoded = np.array(im.convert("RGB"))
    assert torch.equal(img, torch.from_numpy(decoded).permute(2, 0, 1))
    assert (img.int() - torch.from_numpy(rgb).permute(2, 0, 1).int()).abs().float().mean() < 3  # lossy but close


def test_read_image_refuses_16_bit(tmp_path):
    write_kitti_disparity(tmp_path / "d.png", torch.full((2, 3), 4.0))
    with pytest.raises(ValueError, match="high bit-depth image.*read_kitti_disparity"):
        read_image(tmp_path / "d.png")


def test_write_image(tmp_path):
    rgb = torch.randint(0, 256, (3, 5, 6), dtype=torch.uint8)
    write_image(tmp_path / "a.png", rgb)
    assert torch.equal(read_image(tmp_path / "a.png"), rgb)
    # floats: clamped to [0, 1], then rounded to the nearest level
    f = torch.tensor([[-0.5, 0.2, 0.5, 1.5, 1.0, 0.0]]).expand(3, 1, 6) * torch.ones(3, 2, 1)
    write_image(tmp_path / "f.png", f)
    assert read_image(tmp_path / "f.png")[0, 0].tolist() == [0, 51, 128, 255, 255, 0]
    gray = torch.randint(0, 256, (4, 7), dtype=torch.uint8)
    write_image(tmp_path / "g.bmp", gray)
    with Image.open(tmp_path / "g.bmp") as im:
        assert im.format == "BMP"
    assert torch.equal(read_image(tmp_path / "g.bmp"), gray.expand(3, -1, -1))


def test_write_image_errors(tmp_path):
    with pytest.raises(ValueError, match=r"image must have shape \(3, H, W\) or \(H, W\), got \(4, 2, 2\)"):
        write_image(tmp_path / "a.png", torch.zeros(4, 2, 2, dtype=torch.uint8))
    with pytest.raises(TypeError, match="image must be uint8, or floating point in \\[0, 1\\], got dtype int32"):
        write_image(tmp_path / "a.png", torch.zeros(3, 2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="image contains NaN"):
        write_image(tmp_path / "a.png", torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="cannot tell the image format from the suffix"):
        write_image(tmp_path / "a.unknownsuffix", torch.zeros(2, 2, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------------- visualisations

def test_colorize_invalid_black():
    nan, inf = float("nan"), float("inf")
    disp = torch.tensor([[nan, inf, -1.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    valid = torch.tensor([[True, True, True, True], [True, False, True, True]])
    rgb = colorize_disparity(disp, valid=valid)
    assert rgb.dtype == torch.uint8 and rgb.shape == (3, 2, 4)
    black = (rgb == 0).all(dim=0)
    assert black.tolist() == [[True, True, True, True], [False, True, False, False]]


def test_colorize_max_disp_scaling():
    disp = torch.tensor([[1.0, 2.0, 4.0, 8.0, 16.0]])
    # the default scale is the largest valid disparity (an invalid, larger one does not count)
    valid = torch.tensor([[True, True, True, True, False]])
    assert torch.equal(colorize_disparity(disp, valid=valid), colorize_disparity(disp, max_disp=8.0, valid=valid))
    # scaling disparities and max_disp together changes nothing; disp >= max_disp saturates
    a = colorize_disparity(disp, max_disp=4.0)
    assert torch.equal(a, colorize_disparity(disp * 3, max_disp=12.0))
    assert torch.equal(a[:, 0, 2], a[:, 0, 3]) and torch.equal(a[:, 0, 2], a[:, 0, 4])
    assert len({tuple(a[:, 0, i].tolist()) for i in range(3)}) == 3  # 1/4, 1/2, 1 of the scale differ
    b = colorize_disparity(disp, max_disp=16.0)
    assert torch.equal(b[:, 0, 2], a[:, 0, 0]) and torch.equal(b[:, 0, 3], a[:, 0, 1])
    assert not torch.equal(a, b)


def test_colorize_errors():
    disp = torch.ones(2, 3)
    with pytest.raises(ValueError, match="max_disp must be finite and > 0, got 0.0"):
        colorize_disparity(disp, max_disp=0)
    with pytest.raises(TypeError, match="max_disp must be a number or None"):
        colorize_disparity(disp, max_disp="10")
    with pytest.raises(ValueError, match=r"valid must have the shape of disp \(2, 3\), got \(3, 2\)"):
        colorize_disparity(disp, valid=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"disp must have shape \(H, W\), got \(1, 2, 3\)"):
        colorize_disparity(disp[None])


def test_write_disparity_and_probability_png(tmp_path):
    disp = torch.tensor([[0.0, 1.0, 2.0], [3.0, float("nan"), 6.0]])
    write_disparity_png(tmp_path / "d.png", disp, max_disp=5.0)
    with Image.open(tmp_path / "d.png") as im:
        assert im.format == "PNG" and im.mode == "RGB"
    assert torch.equal(read_image(tmp_path / "d.png"), colorize_disparity(disp, max_disp=5.0))

    prob = torch.tensor([[0.0, 0.25, 0.5], [1.0, 1.0 + 1e-7, 0.1]])
    write_probability_png(tmp_path / "p.png", prob)
    with Image.open(tmp_path / "p.png") as im:
        assert im.format == "PNG" and im.mode == "L"
        assert np.asarray(im).tolist() == [[0, 64, 128], [255, 255, 26]]
    write_probability_png(tmp_path / "m.png", torch.tensor([[True, False]]))
    with Image.open(tmp_path / "m.png") as im:
        assert np.asarray(im).tolist() == [[255, 0]]
    with pytest.raises(ValueError, match=r"prob must be in \[0, 1\], got values in \[0.0, 1.5\]"):
        write_probability_png(tmp_path / "p.png", torch.tensor([[0.0, 1.5]]))
    with pytest.raises(ValueError, match="prob contains NaN"):
        write_probability_png(tmp_path / "p.png", torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"prob must have shape \(H, W\)"):
        write_probability_png(tmp_path / "p.png", torch.zeros(1, 2, 2))


# --------------------------------------------------------------------------------------------------------------- PLY

_HEADER = (b"ply\nformat binary_little_endian 1.0\nelement vertex %d\nproperty float x\nproperty float y\n"
           b"property float z\n")
_RGB = b"property uchar red\nproperty uchar green\nproperty uchar blue\n"


def test_ply_round_trip_with_colors(tmp_path):
    g = torch.Generator().manual_seed(3)
    points = torch.randn(50, 3, generator=g, dtype=torch.float64) * 10
    colors = torch.randint(0, 256, (50, 3), generator=g, dtype=torch.uint8)
    write_ply(tmp_path / "c.ply", points, colors)
    raw = (tmp_path / "c.ply").read_bytes()
    header = _HEADER % 50 + _RGB + b"end_header\n"
    assert raw[:len(header)] == header and len(raw) == len(header) + 50 * 15
    # the first record, decoded independently: 3 little-endian float32 then 3 bytes, no padding
    x, y, z, r, gr, b = struct.unpack("<3f3B", raw[len(header):len(header) + 15])
    assert [x, y, z] == points[0].float().tolist() and [r, gr, b] == colors[0].tolist()
    p, c = read_ply(tmp_path / "c.ply")
    assert p.dtype == torch.float32 and c.dtype == torch.uint8
    assert torch.equal(p, points.float()) and torch.equal(c, colors)


def test_ply_round_trip_without_colors_and_float_colors(tmp_path):
    points = torch.tensor([[0.5, -1.25, 3.0], [1e-3, 2e5, -7.0]])
    write_ply(tmp_path / "p.ply", points)
    raw = (tmp_path / "p.ply").read_bytes()
    assert raw == _HEADER % 2 + b"end_header\n" + points.numpy().astype("<f4").tobytes()
    p, c = read_ply(tmp_path / "p.ply")
    assert torch.equal(p, points) and c is None

    write_ply(tmp_path / "f.ply", points.numpy(), np.array([[0.0, 0.5, 1.2], [1.0, 0.2, -1.0]]))
    p, c = read_ply(tmp_path / "f.ply")
    assert torch.equal(p, points) and c.tolist() == [[0, 128, 255], [255, 51, 0]]

    write_ply(tmp_path / "e.ply", torch.zeros(0, 3))
    assert (tmp_path / "e.ply").read_bytes() == _HEADER % 0 + b"end_header\n"
    p, c = read_ply(tmp_path / "e.ply")
    assert p.shape == (0, 3) and c is None


def test_read_ply_ascii_and_extra_properties(tmp_path):
    text = ("ply\nformat ascii 1.0\ncomment made by hand\nelement vertex 2\nproperty float x\nproperty float y\n"
            "property float z\nproperty float nx\nproperty uchar red\nproperty uchar green\nproperty uchar blue\n"
            "element face 0\nproperty list uchar int vertex_indices\nend_header\n"
            "1.5 -2 3e2 0.1 255 0 7\n0 0.25 -1 0.2 1 2 3\n")
    (tmp_path / "a.ply").write_text(text)
    p, c = read_ply(tmp_path / "a.ply")
    assert p.tolist() == [[1.5, -2.0, 300.0], [0.0, 0.25, -1.0]] and c.tolist() == [[255, 0, 7], [1, 2, 3]]
    # binary with a double coordinate and a skipped property, as other tools write them
    header = (b"ply\nformat binary_little_endian 1.0\nelement vertex 1\nproperty double x\nproperty float y\n"
              b"property float z\nproperty float confidence\nend_header\n")
    (tmp_path / "b.ply").write_bytes(header + struct.pack("<d3f", 0.5, 1.0, 2.0, 0.9))
    p, c = read_ply(tmp_path / "b.ply")
    assert p.tolist() == [[0.5, 1.0, 2.0]] and c is None


@pytest.mark.parametrize("raw, match", [
    (b"PLY\nformat ascii 1.0\n", "not a PLY file"),
    (b"ply\nformat binary_little_endian 1.0\nelement vertex 1\nproperty float x\n", "no 'end_header'"),
    (_HEADER % 2 + b"end_header\n" + bytes(12), "truncated: 2 vertices of 12 bytes need 24 bytes, the file has 12"),
    (b"ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty float y\nproperty float z\n"
     b"end_header\n1 2 3\n", "truncated: 2 vertices declared, 1 found"),
    (b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\nend_header\n1 2\n",
     r"no vertex property \['z'\]"),
    (b"ply\nformat binary_middle_endian 1.0\nelement vertex 0\nend_header\n", "format 'binary_middle_endian'"),
    (b"ply\nformat ascii 1.0\nelement face 1\nproperty list uchar int vertex_indices\nend_header\n3 0 1 2\n",
     "no 'vertex' element"),
    (_HEADER % 1 + b"property uchar red\nproperty uchar green\nend_header\n" + bytes(14), "colour properties"),
    (_HEADER % 1 + b"property float red\nproperty float green\nproperty float blue\nend_header\n" + bytes(24),
     "expected uchar"),
])
def test_read_ply_errors(tmp_path, raw, match):
    (tmp_path / "bad.ply").write_bytes(raw)
    with pytest.raises(ValueError, match=match):
        read_ply(tmp_path / "bad.ply")


def test_write_ply_errors(tmp_path):
    with pytest.raises(ValueError, match=r"points must have shape \(N, 3\), got \(4, 2\)"):
        write_ply(tmp_path / "a.ply", torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"colors must have shape \(N, 3\) = \(4, 3\) like points, got \(3, 3\)"):
        write_ply(tmp_path / "a.ply", torch.zeros(4, 3), torch.zeros(3, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"points has 1 non-finite point\(s\)"):
        write_ply(tmp_path / "a.ply", torch.tensor([[0.0, float("inf"), float("nan")], [0, 0, 0]]))
    with pytest.raises(TypeError, match="colors must be uint8, or floating point"):
        write_ply(tmp_path / "a.ply", torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.int64))
    assert not (tmp_path / "a.ply").exists()

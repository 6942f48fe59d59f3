"""tlv_fast.stereo.geometry: depth and points from disparity against hand-computed values; calibration files."""
import dataclasses

import pytest
import torch

from tlv_fast.stereo.geometry import (
    Calibration,
    disparity_to_depth,
    disparity_to_points,
    point_mask,
    points_from_calibration,
    read_calibration,
    read_kitti_calibration,
    read_middlebury_calibration,
)

NAN, INF = float("nan"), float("inf")


def _assert_exact(actual, expected):
    """float32 values equal to the float32 rounding of the expected (float64) values, NaN where expected."""
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64).float(), rtol=0, atol=0,
                               equal_nan=True)


# --------------------------------------------------------------------------------------------------------- depth

def test_depth_formula_and_missing_depth():
    disp = torch.tensor([1.0, 2.0, 0.0, -1.0, NAN, INF, 0.5])
    depth = disparity_to_depth(disp, focal=2.0, baseline=3.0)  # Z = 6 / d
    assert depth.dtype == torch.float32 and depth.shape == disp.shape
    _assert_exact(depth, [6.0, 3.0, NAN, NAN, NAN, NAN, 12.0])
    # with doffs = 1: Z = 6 / (d + 1); d = -1 gives d + doffs = 0, no depth
    depth = disparity_to_depth(disp, focal=2.0, baseline=3.0, doffs=1.0)
    _assert_exact(depth, [3.0, 2.0, 6.0, NAN, NAN, NAN, 4.0])


def test_depth_middlebury_numbers():
    # Middlebury 2014: Z [mm] = baseline * f / (d + doffs)
    disp = torch.tensor([[100.0, 0.0], [250.5, -131.111]], dtype=torch.float64)
    depth = disparity_to_depth(disp, 3997.684, 193.001, doffs=131.111)
    expected = [[193.001 * 3997.684 / (100.0 + 131.111), 193.001 * 3997.684 / 131.111],
                [193.001 * 3997.684 / (250.5 + 131.111), NAN]]
    _assert_exact(depth, expected)
    assert 3300 < depth[0, 0] < 3400  # about 3.3 m


def test_depth_errors():
    with pytest.raises(ValueError, match="focal must be > 0, got 0.0"):
        disparity_to_depth(torch.ones(2), 0, 1.0)
    with pytest.raises(ValueError, match="baseline must be finite, got nan"):
        disparity_to_depth(torch.ones(2), 1.0, NAN)
    with pytest.raises(TypeError, match="doffs must be a real number, got str"):
        disparity_to_depth(torch.ones(2), 1.0, 1.0, doffs="0")
    with pytest.raises(TypeError, match="disp must be a torch.Tensor"):
        disparity_to_depth([1.0, 2.0], 1.0, 1.0)


# -------------------------------------------------------------------------------------------------------- points

# A 2 x 3 disparity map; with f = 2, B = 3 (f B = 6) and cx = 1, cy = 0.5 (the image centre):
#   (v, u) = (0, 0), d = 1: Z = 6,   X = (0 - 1) * 6 / 2 = -3,      Y = (0 - 0.5) * 6 / 2 = -1.5
#   (0, 1), d = 2:          Z = 3,   X = 0,                         Y = -0.5 * 3 / 2 = -0.75
#   (0, 2), d = 0:          no depth
#   (1, 0), d = 3:          Z = 2,   X = -1 * 2 / 2 = -1,           Y = 0.5 * 2 / 2 = 0.5      (occluded below)
#   (1, 1), d = NaN:        no depth
#   (1, 2), d = 4:          Z = 1.5, X = (2 - 1) * 1.5 / 2 = 0.75,  Y = 0.5 * 1.5 / 2 = 0.375
DISP = torch.tensor([[1.0, 2.0, 0.0], [3.0, NAN, 4.0]])
OCCLUDED = torch.tensor([[False, False, False], [True, False, False]])
ALL_POINTS = [[-3.0, -1.5, 6.0], [0.0, -0.75, 3.0], [-1.0, 0.5, 2.0], [0.75, 0.375, 1.5]]


def test_points_by_hand():
    pts = disparity_to_points(DISP, 2.0, 3.0, cx=1.0, cy=0.5)
    assert pts.dtype == torch.float32 and pts.tolist() == ALL_POINTS
    pts = disparity_to_points(DISP, 2.0, 3.0, cx=1.0, cy=0.5, valid=~OCCLUDED)
    assert pts.tolist() == [ALL_POINTS[0], ALL_POINTS[1], ALL_POINTS[3]]


def test_points_default_principal_point_is_image_centre():
    assert disparity_to_points(DISP, 2.0, 3.0).tolist() == ALL_POINTS  # cx = (3 - 1) / 2, cy = (2 - 1) / 2
    # another principal point: cx = 0.5, cy = 1 (u shifts X, v shifts Y: a swap would show)
    pts = disparity_to_points(DISP, 2.0, 3.0, cx=0.5, cy=1.0, valid=~OCCLUDED)
    assert pts.tolist() == [[-1.5, -3.0, 6.0], [0.75, -1.5, 3.0], [1.125, 0.0, 1.5]]


def test_points_with_doffs_and_calibration():
    # doffs = 1: Z = 6 / (d + 1); the zero disparity now has depth 6
    calib = Calibration(focal=2.0, baseline=3.0, cx=1.0, cy=0.5, doffs=1.0)
    pts = points_from_calibration(DISP, calib, valid=~OCCLUDED)
    # (1, 2): Z = 6 / 5, X = (2 - 1) * Z / 2, Y = 0.5 * Z / 2
    _assert_exact(pts, [[-1.5, -0.75, 3.0], [0.0, -0.5, 2.0], [3.0, -1.5, 6.0], [0.6, 0.3, 1.2]])
    assert torch.equal(pts, disparity_to_points(DISP, 2.0, 3.0, cx=1.0, cy=0.5, valid=~OCCLUDED, doffs=1.0))
    assert torch.equal(pts[:, 2], disparity_to_depth(DISP, 2.0, 3.0, doffs=1.0)[point_mask(DISP, ~OCCLUDED, 1.0)])


def test_point_mask_and_colours_row_major():
    mask = point_mask(DISP, valid=~OCCLUDED)
    assert mask.dtype == torch.bool and mask.tolist() == [[True, True, False], [False, False, True]]
    assert point_mask(DISP).tolist() == [[True, True, False], [True, False, True]]
    assert point_mask(DISP, doffs=1.0).tolist() == [[True, True, True], [True, False, True]]
    # colours of the points: image[:, mask].T, in the order of disparity_to_points
    g = torch.Generator().manual_seed(0)
    disp = torch.rand(5, 7, generator=g) * 4 - 1
    disp[0, 0] = NAN
    valid = torch.rand(5, 7, generator=g) > 0.3
    image = torch.arange(3 * 5 * 7).view(3, 5, 7)
    pts = disparity_to_points(disp, 10.0, 1.0, valid=valid)
    m = point_mask(disp, valid)
    colours = image[:, m].T
    assert pts.shape == (int(m.sum()), 3) and colours.shape == pts.shape
    v, u = (colours[:, 0] // 7, colours[:, 0] % 7)  # the colour encodes the pixel
    assert torch.equal(pts[:, 2], (10.0 / disp[v, u].double()).float())
    assert torch.equal(pts[:, 0], ((u.double() - 3.0) * (10.0 / disp[v, u].double()) / 10.0).float())
    assert (v * 7 + u).diff().gt(0).all()  # row-major


def test_points_numpy_input_and_errors():
    assert disparity_to_points(DISP.numpy(), 2.0, 3.0).tolist() == ALL_POINTS
    with pytest.raises(ValueError, match=r"disp must have shape \(H, W\), got \(1, 2, 3\)"):
        disparity_to_points(DISP[None], 2.0, 3.0)
    with pytest.raises(TypeError, match="valid must be a bool mask, got dtype torch.float32"):
        disparity_to_points(DISP, 2.0, 3.0, valid=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"valid must have the shape of disp \(2, 3\), got \(3, 2\)"):
        point_mask(DISP, valid=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="disp must have a real"):
        point_mask(DISP > 0)
    with pytest.raises(ValueError, match="baseline must be > 0, got -3.0"):
        disparity_to_points(DISP, 2.0, -3.0)
    with pytest.raises(ValueError, match="cx must be finite, got inf"):
        disparity_to_points(DISP, 2.0, 3.0, cx=INF)
    with pytest.raises(TypeError, match="calib must be a Calibration, got dict"):
        points_from_calibration(DISP, {"focal": 2.0})


def test_calibration_dataclass():
    c = Calibration(721.5377, 0.54, 609.5593, 172.854)
    assert c.doffs == 0.0 and isinstance(c.focal, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.focal = 1.0
    with pytest.raises(ValueError, match="Calibration: focal must be > 0, got -1.0"):
        Calibration(-1.0, 0.5, 1.0, 1.0)
    with pytest.raises(TypeError, match="Calibration: cx must be a real number, got str"):
        Calibration(1.0, 0.5, "1", 1.0)


# ---------------------------------------------------------------------------------------------- calibration files

P_RECT_00 = ("7.215377e+02 0.000000e+00 6.095593e+02 0.000000e+00 0.000000e+00 7.215377e+02 1.728540e+02 "
             "0.000000e+00 0.000000e+00 0.000000e+00 1.000000e+00 0.000000e+00")
P_RECT_01 = ("7.215377e+02 0.000000e+00 6.095593e+02 -3.875744e+02 0.000000e+00 7.215377e+02 1.728540e+02 "
             "0.000000e+00 0.000000e+00 0.000000e+00 1.000000e+00 0.000000e+00")
P_RECT_02 = ("7.215377e+02 0.000000e+00 6.095593e+02 4.485728e+01 0.000000e+00 7.215377e+02 1.728540e+02 "
             "2.163791e-01 0.000000e+00 0.000000e+00 1.000000e+00 2.745884e-03")
P_RECT_03 = ("7.215377e+02 0.000000e+00 6.095593e+02 -3.395242e+02 0.000000e+00 7.215377e+02 1.728540e+02 "
             "2.199936e+00 0.000000e+00 0.000000e+00 1.000000e+00 2.729905e-03")


def _cam_to_cam(p2=P_RECT_02, p3=P_RECT_03):
    lines = ["calib_time: 09-Jan-2012 13:57:47", "corner_dist: 9.950000e-02"]
    for cam, p in (("00", P_RECT_00), ("01", P_RECT_01), ("02", p2), ("03", p3)):
        lines += [f"S_{cam}: 1.392000e+03 5.120000e+02",
                  f"K_{cam}: 9.842439e+02 0.000000e+00 6.900000e+02 0.000000e+00 9.808141e+02 2.331966e+02 "
                  "0.000000e+00 0.000000e+00 1.000000e+00",
                  f"D_{cam}: -3.728755e-01 2.037299e-01 2.219027e-03 1.383707e-03 -7.233722e-02",
                  f"S_rect_{cam}: 1.242000e+03 3.750000e+02",
                  f"R_rect_{cam}: 1.000000e+00 0 0 0 1.000000e+00 0 0 0 1.000000e+00",
                  f"P_rect_{cam}: {p}"]
    return "\n".join(lines) + "\n"


def test_read_kitti_cam_to_cam(tmp_path):
    (tmp_path / "calib_cam_to_cam.txt").write_text(_cam_to_cam())
    c = read_kitti_calibration(tmp_path / "calib_cam_to_cam.txt")
    assert (c.focal, c.cx, c.cy, c.doffs) == (721.5377, 609.5593, 172.854, 0.0)
    assert c.baseline == (44.85728 + 339.5242) / 721.5377
    assert abs(c.baseline - 0.5327) < 1e-4  # metres
    grey = read_kitti_calibration(tmp_path / "calib_cam_to_cam.txt", left="00", right="01")
    assert grey.baseline == 387.5744 / 721.5377
    assert read_calibration(tmp_path / "calib_cam_to_cam.txt") == c


def test_read_kitti_per_frame(tmp_path):
    # object / odometry style: "P0:" .. "P3:", plus other matrices
    text = (f"P0: {P_RECT_00}\nP1: {P_RECT_01}\nP2: {P_RECT_02}\nP3: {P_RECT_03}\n"
            "R0_rect: 9.999239e-01 9.837760e-03 -7.445048e-03 -9.869795e-03 9.999421e-01 -4.278459e-03 "
            "7.402527e-03 4.351614e-03 9.999631e-01\n"
            "Tr_velo_to_cam: 7.533745e-03 -9.999714e-01 -6.166020e-04 -4.069766e-03 1.480249e-02 7.280733e-04 "
            "-9.998902e-01 -7.631618e-02 9.998621e-01 7.523790e-03 1.480755e-02 -2.717806e-01\n\n")
    (tmp_path / "000000.txt").write_text(text)
    c = read_calibration(tmp_path / "000000.txt")
    assert c == Calibration(721.5377, (44.85728 + 339.5242) / 721.5377, 609.5593, 172.854, 0.0)
    assert read_kitti_calibration(tmp_path / "000000.txt", left=0, right=1).baseline == 387.5744 / 721.5377


def test_read_kitti_principal_points_differ(tmp_path):
    # a right camera whose principal point is 10 px further right: doffs = cx_right - cx_left = 10
    (tmp_path / "calib.txt").write_text(_cam_to_cam(p3=P_RECT_03.replace("6.095593e+02", "6.195593e+02")))
    c = read_kitti_calibration(tmp_path / "calib.txt")
    assert (c.cx, c.doffs) == (609.5593, 619.5593 - 609.5593)


def test_read_kitti_errors(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(f"P_rect_02: {P_RECT_02}\n")
    with pytest.raises(ValueError, match="no projection matrix for the right camera.*'P_rect_03' or 'P3'"):
        read_kitti_calibration(path)
    path.write_text(_cam_to_cam())
    with pytest.raises(ValueError, match=r"baseline .* must be > 0"):
        read_kitti_calibration(path, left="03", right="02")
    with pytest.raises(ValueError, match="left must be a camera number"):
        read_kitti_calibration(path, left="left")
    path.write_text(_cam_to_cam(p3=P_RECT_03.rsplit(" ", 1)[0]))
    with pytest.raises(ValueError, match="P_rect_03 must hold 12 finite numbers"):
        read_kitti_calibration(path)
    path.write_text(_cam_to_cam(p3=P_RECT_03.replace("7.215377e+02", "7.0e+02", 1)))
    with pytest.raises(ValueError, match="not a rectified pair"):
        read_kitti_calibration(path)


MIDDLEBURY = """cam0=[3997.684 0 1176.728; 0 3997.684 1011.728; 0 0 1]
cam1=[3997.684 0 1307.839; 0 3997.684 1011.728; 0 0 1]
doffs=131.111
baseline=193.001
width=2964
height=1988
ndisp=280
isint=0
vmin=31
vmax=257
dyavg=0.918
dymax=1.516
"""


def test_read_middlebury(tmp_path):
    (tmp_path / "calib.txt").write_text(MIDDLEBURY)
    c = read_middlebury_calibration(tmp_path / "calib.txt")
    assert c == Calibration(focal=3997.684, baseline=193.001, cx=1176.728, cy=1011.728, doffs=131.111)
    assert read_calibration(tmp_path / "calib.txt") == c
    # Windows line ends and spaces around '=' are fine
    (tmp_path / "crlf.txt").write_text(MIDDLEBURY.replace("=", " = ").replace("\n", "\r\n"), newline="")
    assert read_calibration(tmp_path / "crlf.txt") == c


def test_read_middlebury_errors(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(MIDDLEBURY.replace("doffs=131.111\n", ""))
    with pytest.raises(ValueError, match="lacks doffs"):
        read_middlebury_calibration(path)
    path.write_text(MIDDLEBURY.replace("0 0 1]", "0 0]", 1))
    with pytest.raises(ValueError, match="cam0 must be a 3 x 3 matrix"):
        read_middlebury_calibration(path)
    path.write_text(MIDDLEBURY.replace("baseline=193.001", "baseline=abc"))
    with pytest.raises(ValueError, match="baseline must be a number, got 'abc'"):
        read_middlebury_calibration(path)
    path.write_text(MIDDLEBURY.replace("baseline=193.001", "baseline=-193.001"))
    with pytest.raises(ValueError, match="baseline must be > 0"):
        read_middlebury_calibration(path)
    path.write_text("width=10\nheight=20\n")
    with pytest.raises(ValueError, match="neither a Middlebury calib.txt .* nor a KITTI calibration"):
        read_calibration(path)

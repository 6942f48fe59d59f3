"""tlv_fast.stereo.augment: the published STTR training transforms as torch functions."""
import pytest
import torch

from tlv_fast.stereo.augment import (
    PUBLISHED_RECIPE,
    add_noise,
    adjust_brightness_contrast,
    brightness_contrast,
    gauss_noise,
    horizontal_flip,
    mark_occlusion,
    random_crop,
    random_shift_rotate,
    rgb_shift,
    shift_channels,
    training_transform,
)
from tlv_fast.stereo.datasets import SyntheticStereoDataset

H, W = 128, 192
GEOM = ("left", "right", "disp", "occ_mask", "occ_mask_right", "disp_right")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def coordinate_sample():
    """Every key encodes its pixel position, so a crop's window can be read back from each key separately."""
    y, x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    img = torch.stack((y, x, (y + x) % 256)).to(torch.uint8)
    return {"left": img.clone(), "right": (img + 1).to(torch.uint8), "disp": (y * W + x).float(),
            "disp_right": (y * W + x).float() + 0.5, "occ_mask": (y * 7 + x * 3) % 5 == 0,
            "occ_mask_right": (y * 3 + x * 7) % 5 == 0, "name": "coords", "calib": None}


def window(s):
    """(y0, x0, h, w) of each key of a cropped coordinate_sample."""
    out = {}
    for k in GEOM:
        v = s[k]
        h, w = v.shape[-2:]
        if k in ("left", "right"):
            y0, x0 = int(v[0, 0, 0]) - (k == "right"), int(v[1, 0, 0]) - (k == "right")
        elif k in ("disp", "disp_right"):
            y0, x0 = divmod(int(v[0, 0]), W)
        else:
            continue
        out[k] = (y0, x0, h, w)
    return out


def synthetic(seed=0):
    return SyntheticStereoDataset(1, H, W, seed=seed)[0]


def test_published_recipe_values():
    r = PUBLISHED_RECIPE
    assert (r["optimizer"], r["lr"], r["lr_backbone"], r["lr_regression"]) == ("AdamW", 1e-4, 1e-4, 2e-4)
    assert (r["weight_decay"], r["lr_decay_rate"], r["clip_max_norm"]) == (1e-4, 0.99, 0.1)
    assert r["epochs"]["sceneflow"] == 15 and r["epochs"]["kitti2015"] == 300
    assert r["crop"]["sceneflow"] == (360, 640) and r["crop"]["kitti2015"] == (200, 640)
    assert r["loss_weights"] == {"rr": 1.0, "l1_raw": 1.0, "l1": 1.0, "occ_be": 1.0}
    assert r["batch_size"]["sceneflow"] == 1 and r["lr_decay_during_pretraining"] is False


def test_random_crop_published_rule_sizes_and_same_window_for_every_key():
    sample = coordinate_sample()
    sizes = set()
    for seed in range(40):
        s = random_crop(sample, 100, 150, gen(seed))
        win = window(s)
        assert len(set(win.values())) == 1, win  # left, right, disp, disp_right: one window
        y0, x0, h, w = win["left"]
        sizes.add((h, w))
        assert 100 <= h <= H and 150 <= w <= W and y0 + h <= H and x0 + w <= W
        for k in ("occ_mask", "occ_mask_right"):
            assert torch.equal(s[k], sample[k][y0:y0 + h, x0:x0 + w]), k
        assert s["name"] == "coords" and s["calib"] is None
    # the published crop size is random between the minimum and the full image, in both directions
    assert len({h for h, _ in sizes}) > 5 and len({w for _, w in sizes}) > 5
    assert torch.equal(sample["disp"], coordinate_sample()["disp"])  # the input is not modified


def test_random_crop_exact_small_images_and_determinism():
    sample = coordinate_sample()
    s = random_crop(sample, 64, 96, gen(3), exact=True)
    assert all(s[k].shape[-2:] == (64, 96) for k in GEOM)
    assert len(set(window(s).values())) == 1
    same = random_crop(sample, 64, 96, gen(3), exact=True)
    assert all(torch.equal(s[k], same[k]) for k in GEOM)
    other = [window(random_crop(sample, 64, 96, gen(i), exact=True))["left"] for i in range(5)]
    assert len(set(other)) > 1
    # minimum crop not smaller than the image: no random crop
    s = random_crop(sample, H, 100, gen(0))
    assert all(torch.equal(s[k], sample[k]) for k in GEOM)
    with pytest.raises(ValueError, match="larger than the image"):
        random_crop(sample, H + 1, W, gen(0), exact=True)
    kitti_like = dict(sample, disp_right=None, occ_mask_right=None)
    s = random_crop(kitti_like, 100, 150, gen(0))
    assert s["disp_right"] is None and s["occ_mask_right"] is None


def test_uint8_arithmetic_saturates_and_truncates():
    img = torch.tensor([0, 5, 100, 250, 255], dtype=torch.uint8).view(1, 1, 5).expand(3, 1, 5)
    assert shift_channels(img, (20.0, -20.0, 0.7))[0].flatten().tolist() == [20, 25, 120, 255, 255]
    assert shift_channels(img, (20.0, -20.0, 0.7))[1].flatten().tolist() == [0, 0, 80, 230, 235]
    assert shift_channels(img, (20.0, -20.0, 0.7))[2].flatten().tolist() == [0, 5, 100, 250, 255]
    assert adjust_brightness_contrast(img, 1.1, 0.1)[0].flatten().tolist() == [25, 31, 135, 255, 255]
    assert adjust_brightness_contrast(img, 0.9, -0.1)[0].flatten().tolist() == [0, 0, 64, 199, 204]
    assert add_noise(img, torch.full(img.shape, -6.5, dtype=torch.float64))[0].flatten().tolist() == \
        [0, 0, 93, 243, 248]
    assert shift_channels(img, (0, 0, 0)).dtype == torch.uint8


@pytest.mark.parametrize("op", [rgb_shift, brightness_contrast, gauss_noise])
def test_photometric_left_and_right_independent_and_labels_untouched(op):
    base = synthetic()
    same = dict(base, right=base["left"].clone())  # identical views: any difference comes from the draws
    for seed in range(3):
        s = op(same, gen(seed), p_asym=1.0)
        assert s["left"].dtype == torch.uint8 and s["right"].dtype == torch.uint8
        assert not torch.equal(s["left"], same["left"])
        assert not torch.equal(s["left"], s["right"])  # the right view got its own draw
        for k in ("disp", "disp_right", "occ_mask", "occ_mask_right"):
            assert torch.equal(s[k], base[k]), k
    if op is not gauss_noise:  # noise is drawn per pixel; shift and gain are per image
        s = op(same, gen(0), p_asym=0.0)
        assert torch.equal(s["left"], s["right"])  # no asymmetry: the left draw is reused
    a, b = op(base, gen(11)), op(base, gen(11))
    assert torch.equal(a["left"], b["left"]) and torch.equal(a["right"], b["right"])
    c = op(base, gen(12))
    assert not torch.equal(a["left"], c["left"])


def test_photometric_published_ranges():
    flat = {"left": torch.full((3, 8, 8), 128, dtype=torch.uint8), "right": torch.full((3, 8, 8), 128,
                                                                                        dtype=torch.uint8)}
    shifts, gains = set(), []
    for seed in range(60):
        s = rgb_shift(flat, gen(seed), p_asym=1.0)
        for k in ("left", "right"):
            d = s[k].int()[:, 0, 0] - 128
            assert d.abs().max() <= 20
            shifts.update(d.tolist())
        b = brightness_contrast(flat, gen(seed))["left"].int()[0, 0, 0]
        gains.append(int(b))
        n = gauss_noise(flat, gen(seed))["left"].double() - 128
        assert 2.0 < n.std() < 8.5  # variance in [10, 50]: std in [3.2, 7.1]
    assert min(shifts) <= -15 and max(shifts) >= 15
    # alpha in [0.9, 1.1], beta in [-0.1, 0.1] * 255: 128 * alpha + beta * 255 in [89.7, 166.3]
    assert 89 <= min(gains) and max(gains) <= 167 and max(gains) - min(gains) > 30


def test_random_shift_rotate_warps_only_the_right_image():
    base = synthetic()
    s = random_shift_rotate(base, gen(0))
    assert torch.equal(s["left"], base["left"])
    assert not torch.equal(s["right"], base["right"])
    for k in ("disp", "occ_mask", "disp_right", "occ_mask_right"):
        assert torch.equal(s[k], base[k])
    assert s["right"].dtype == torch.uint8
    ident = random_shift_rotate(base, gen(0), max_shift=0.0, max_rotation=0.0)
    assert torch.equal(ident["right"], base["right"])
    # a vertical ramp shifted by at most 1.5 rows and rotated by at most 0.2 degrees moves by < 2.5 levels of 1/row
    y = torch.arange(H, dtype=torch.float32).view(1, H, 1).expand(3, H, W)
    ramp = {"left": y.to(torch.uint8), "right": y.to(torch.uint8)}
    for seed in range(5):
        out = random_shift_rotate(ramp, gen(seed))["right"].float()
        assert (out - y)[:, 3:-3, :].abs().max() <= 2.5


def test_horizontal_flip_swaps_views():
    base = synthetic()
    s = horizontal_flip(base, gen(0), p=1.0)
    assert torch.equal(s["left"], base["right"].flip(-1)) and torch.equal(s["right"], base["left"].flip(-1))
    assert torch.equal(s["disp"], base["disp_right"].flip(-1))
    assert torch.equal(s["disp_right"], base["disp"].flip(-1))
    assert torch.equal(s["occ_mask"], base["occ_mask_right"].flip(-1))
    assert torch.equal(s["occ_mask_right"], base["occ_mask"].flip(-1))
    # still a valid stereo pair: a visible left pixel x matches right pixel x - d of the same colour
    left, right, disp, occ = s["left"], s["right"], s["disp"].long(), s["occ_mask"]
    y, x = torch.nonzero(~occ, as_tuple=True)
    assert torch.equal(left[:, y, x], right[:, y, x - disp[y, x]])
    kept = horizontal_flip(base, gen(0), p=0.0)
    assert all(torch.equal(kept[k], base[k]) for k in GEOM)
    flips = sum(not torch.equal(horizontal_flip(base, gen(i))["left"], base["left"]) for i in range(40))
    assert 8 < flips < 32
    with pytest.raises(ValueError, match="disp_right"):
        horizontal_flip(dict(base, disp_right=None), gen(0), p=1.0)


def test_mark_occlusion_published_rules():
    disp = torch.tensor([[0.0, 2.0, 1.5, 300.0, -1.0, float("nan"), 2.0, 1.0]])
    disp_right = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 3.0, 2.0, 1.0]])
    occ = torch.zeros(1, 8, dtype=torch.bool)
    occ[0, 6] = True
    s = mark_occlusion({"left": None, "disp": disp, "occ_mask": occ, "disp_right": disp_right,
                        "occ_mask_right": None})
    # x - d < 0 at x = 1 (2 > 1); disp > W, < 0 and NaN are no ground truth; the given occlusion stays
    assert s["occ_mask"].tolist() == [[False, True, False, False, False, False, True, False]]
    assert s["disp"].tolist() == [[0.0, 0.0, 1.5, 0.0, 0.0, 0.0, 0.0, 1.0]]
    # x + d_right > W: 5 + 3 = 8 is not > 8, 6 + 2 = 8 neither; 7 + 1 = 8 neither; x = 0: 1 not
    assert not s["occ_mask_right"].any()
    s = mark_occlusion({"disp": disp, "occ_mask": None, "disp_right": disp_right + 0.5, "occ_mask_right": None})
    assert s["occ_mask_right"].tolist() == [[False, False, False, False, False, True, True, True]]
    assert s["occ_mask"][0, 6].item() is False  # None starts empty


def test_training_transform_sceneflow_deterministic_and_consistent():
    base = synthetic(1)
    tr = training_transform(100, 150)
    a, b = tr(base, gen(5)), tr(base, gen(5))
    for k in GEOM:
        assert torch.equal(a[k], b[k]), k
    h, w = a["left"].shape[-2:]
    assert 100 <= h <= H and 150 <= w <= W
    assert a["left"].dtype == torch.uint8 and a["disp"].dtype == torch.float32 and a["occ_mask"].dtype == torch.bool
    assert all(a[k].shape[-2:] == (h, w) for k in GEOM)
    assert (a["disp"][a["occ_mask"]] == 0).all()
    x = torch.arange(w)
    assert not ((x - a["disp"] < 0) & ~a["occ_mask"]).any()
    outs = [tr(base, gen(i)) for i in range(6)]
    assert len({tuple(o["left"].shape) for o in outs}) > 1  # random crop size
    assert any(not torch.equal(outs[0]["left"][:, :50, :50], o["left"][:, :50, :50]) for o in outs[1:])
    exact = training_transform(96, 128, exact=True)
    assert exact(base, gen(0))["left"].shape == (3, 96, 128)
    with pytest.raises(ValueError, match="dataset"):
        training_transform(dataset="eth3d")


def test_training_transform_kitti_and_sceneflow_on_left_only_ground_truth():
    base = synthetic(2)
    kitti_like = dict(base, disp_right=None, occ_mask_right=None, occ_mask=None)
    s = training_transform(100, 150, dataset="kitti2015")(kitti_like, gen(0))
    assert s["occ_mask"] is not None and s["occ_mask_right"] is None and s["disp_right"] is None
    # the crop draws come first: the same generator gives the same window; then only the border is occluded
    cropped = random_crop(kitti_like, 100, 150, gen(0))["disp"]
    border = torch.arange(cropped.shape[-1]) - cropped < 0
    assert border.any() and torch.equal(s["occ_mask"], border)
    assert torch.equal(s["disp"], torch.where(border, 0.0, cropped))
    # the Scene Flow recipe skips the flip when there is no right-view ground truth instead of failing
    for seed in range(6):
        training_transform(100, 150)(kitti_like, gen(seed))

"""The published STTR training transforms and recipe, as plain torch functions.

Source: github.com/mli0603/stereo-transformer (Li et al., ICCV 2021). The transforms are in
`dataset/stereo_albumentation.py` (built on albumentations; re-implemented here without it), composed per dataset
in `dataset/scene_flow.py` and `dataset/kitti.py`, and finished by `dataset/preprocess.py`'s `augment`. The recipe
is `main.py`'s argument defaults and `scripts/pretrain.sh` / `scripts/kitti_finetune.sh`.

A sample is a dict as `tlv_fast.stereo.datasets` returns: left, right uint8 (3, H, W); disp float32 (H, W);
occ_mask, occ_mask_right bool (H, W) or None; disp_right float32 (H, W) or None; other keys are passed through.
Every function returns a new dict (the input is not modified) and draws its randomness from the torch.Generator it
is given, so a seeded generator reproduces a sample exactly.

Photometric transforms (brightness/contrast, RGB shift, Gaussian noise) follow the published "asymmetric" rule
(StereoTransformAsym): the left image gets freshly drawn parameters; with probability p_asym the right image gets
its own independent draw, otherwise the left's parameters. Arithmetic is as albumentations does it on uint8 images:
the result is clipped to [0, 255] and truncated to an integer. Only the image keys change; disparities and masks
never do. The published recipe has no gamma, hue/saturation/value, colour-jitter or grayscale augmentation.
"""
import math

import torch
import torch.nn.functional as F

__all__ = ["PUBLISHED_RECIPE", "random_crop", "horizontal_flip", "random_shift_rotate", "rgb_shift", "gauss_noise",
           "brightness_contrast", "mark_occlusion", "training_transform", "adjust_brightness_contrast",
           "shift_channels", "add_noise"]

PUBLISHED_RECIPE = {
    # main.py: torch.optim.AdamW over three parameter groups: names containing "backbone" (lr_backbone), names
    # containing "regression" (lr_regression), the rest (tokenizer, transformer: lr)
    "optimizer": "AdamW",
    "lr": 1e-4,  # main.py --lr default
    "lr_backbone": 1e-4,  # main.py --lr_backbone default
    "lr_regression": 2e-4,  # main.py --lr_regression default
    "weight_decay": 1e-4,  # main.py --weight_decay default
    # main.py: torch.optim.lr_scheduler.ExponentialLR(gamma=lr_decay_rate), stepped once per epoch, and not at all
    # when --pre_train is given (scripts/pretrain.sh gives it: Scene Flow pre-training runs at a constant lr)
    "lr_decay_rate": 0.99,
    "lr_decay_during_pretraining": False,  # main.py: `if not args.pre_train: lr_scheduler.step()`
    # keyed by tlv_fast.stereo.datasets.open_dataset names
    "epochs": {
        "default": 300,  # main.py --epochs default
        "sceneflow": 15,  # scripts/pretrain.sh --epochs 15 (with --pre_train)
        "kitti2015": 300,  # scripts/kitti_finetune.sh --epochs 300 (its --dataset kitti is KITTI 2012 + 2015; --ft)
    },
    "clip_max_norm": 0.1,  # main.py --clip_max_norm; utilities/train.py clip_grad_norm_ on all parameters
    "batch_size": {
        "default": 2,  # main.py --batch_size default
        "sceneflow": 1,  # scripts/pretrain.sh --batch_size 1
        "kitti2015": 1,  # scripts/kitti_finetune.sh --batch_size 1
    },
    # minimum crop (height, width); the crop size itself is random, up to the full image (random_crop below)
    "crop": {
        "sceneflow": (360, 640),  # dataset/scene_flow.py: random_crop(360, 640, ...) (FlyingThings3D train)
        "kitti2015": (200, 640),  # dataset/kitti.py: random_crop(200, 640, ...) (train split)
        "default": (360, 640),  # not published (main.py has no crop option): this module's choice, Scene Flow's
    },
    # main.py --loss_weight default 'rr:1.0, l1_raw:1.0, l1:1.0, occ_be:1.0'
    "loss_weights": {"rr": 1.0, "l1_raw": 1.0, "l1": 1.0, "occ_be": 1.0},
    "px_error_threshold": 3,  # main.py --px_error_threshold
    "seed": 42,  # main.py --seed (torch, numpy and random)
    "downsample": 3,  # main.py --downsample (attention stride)
    # dataset/kitti.py _split_data: first 95% of the training pairs train, the rest validate
    "kitti_train_fraction": 0.95,
}


# ------------------------------------------------------------------------------------------------------- helpers

def _uniform(generator, low, high):
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _bernoulli(generator, p):
    return float(torch.rand((), generator=generator, dtype=torch.float64)) < p


def _check_sample(sample, who):
    for k in ("left", "right"):
        if k not in sample:
            raise KeyError(f"{who}: the sample has no '{k}' (keys: {sorted(sample)})")
        img = sample[k]
        if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"{who}: sample['{k}'] must be a uint8 tensor (3, H, W), got "
                             f"{getattr(img, 'dtype', type(img))} {tuple(getattr(img, 'shape', ()))}")
    if sample["left"].shape != sample["right"].shape:
        raise ValueError(f"{who}: left {tuple(sample['left'].shape)} and right {tuple(sample['right'].shape)} differ")


def _truncate_u8(x):
    """float -> uint8 as albumentations on uint8 images: clip to [0, 255], then truncate (numpy astype)."""
    return x.clamp(0, 255).floor().to(torch.uint8)


def _asym(generator, p_asym, draw):
    """The published StereoTransformAsym rule: left parameters, then the right's own with probability p_asym."""
    left = draw()
    right = draw() if _bernoulli(generator, p_asym) else left
    return left, right


_GEOMETRIC_KEYS = ("left", "right", "disp", "occ_mask", "occ_mask_right", "disp_right")


# --------------------------------------------------------------------------------------------------- geometric

def random_crop(sample, height, width, generator, *, exact=False):
    """Crop every image-sized key (left, right, disp, occ_mask, occ_mask_right, disp_right) at one random window.

    Published rule (`dataset/stereo_albumentation.py`, random_crop(min_crop_height, min_crop_width, ...)): height
    and width are the *minimum* crop; the crop height is drawn uniformly from [height, H] and the width from
    [width, W] (integers, ends included), then the top-left corner uniformly over the positions where it fits.
    There is no rule on the fraction of valid pixels. When height >= H or width > W the published code does not
    crop at random but drops the last row and column; here the sample is returned uncropped instead.

    exact=True (this module's option, for batching): the crop is exactly height x width (an error if the image is
    smaller).
    """
    _check_sample(sample, "random_crop")
    h, w = sample["left"].shape[-2:]
    height, width = int(height), int(width)
    if height < 1 or width < 1:
        raise ValueError(f"random_crop: height and width must be >= 1, got {height} x {width}")
    if exact:
        if height > h or width > w:
            raise ValueError(f"random_crop: the crop {height} x {width} is larger than the image {h} x {w}")
        ch, cw = height, width
    elif height >= h or width > w:
        return dict(sample)
    else:
        ch = int(torch.randint(height, h + 1, (), generator=generator))
        cw = int(torch.randint(width, w + 1, (), generator=generator))
    y0 = int(torch.randint(0, h - ch + 1, (), generator=generator))
    x0 = int(torch.randint(0, w - cw + 1, (), generator=generator))
    out = dict(sample)
    for k in _GEOMETRIC_KEYS:
        if out.get(k) is not None:
            out[k] = out[k][..., y0:y0 + ch, x0:x0 + cw].contiguous()
    return out


def horizontal_flip(sample, generator, p=0.5):
    """With probability p, mirror the pair and swap the views (`dataset/stereo_albumentation.py`, horizontal_flip;
    the published code flips when random.random() >= 0.5). The new left image is the mirrored right image, its
    disparity the mirrored right disparity and occlusion the mirrored right occlusion, and vice versa, so that the
    geometry (right view shifted left) is kept. Needs disp_right and occ_mask_right (Scene Flow has them)."""
    _check_sample(sample, "horizontal_flip")
    if not _bernoulli(generator, p):
        return dict(sample)
    missing = [k for k in ("disp", "disp_right", "occ_mask", "occ_mask_right") if sample.get(k) is None]
    if missing:
        raise ValueError(f"horizontal_flip: swapping the views needs {missing}, which the sample lacks (the published "
                         f"recipe flips only Scene Flow, which has right-view ground truth)")
    out = dict(sample)
    out["left"], out["right"] = sample["right"].flip(-1), sample["left"].flip(-1)
    out["disp"], out["disp_right"] = sample["disp_right"].flip(-1), sample["disp"].flip(-1)
    out["occ_mask"], out["occ_mask_right"] = sample["occ_mask_right"].flip(-1), sample["occ_mask"].flip(-1)
    return out


def random_shift_rotate(sample, generator, max_shift=1.5, max_rotation=0.2):
    """Warp the right image only by a small vertical shift and rotation, to imitate imperfect rectification
    (`dataset/stereo_albumentation.py`, RandomShiftRotate: max_shift 1.5 px, max_rotation 0.2 degrees, always
    applied). shift and rotation are uniform in [-max, max]; the affine map [[cos, -sin, 0], [sin, cos, shift]]
    rotates about the image origin (top-left corner) and is applied as cv2.warpAffine does (each output pixel reads
    the input at the inverse map) with bilinear interpolation (the published call passes cv2.INTER_CUBIC in the
    `dst` position, so OpenCV's default bilinear is what runs) and replicated borders; the result is rounded to
    uint8. Disparities and masks are left as they are, as in the published code."""
    _check_sample(sample, "random_shift_rotate")
    shift = _uniform(generator, -max_shift, max_shift)
    rot = math.radians(_uniform(generator, -max_rotation, max_rotation))
    right = sample["right"]
    h, w = right.shape[-2:]
    c, s = math.cos(rot), math.sin(rot)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    # forward map: x' = c x - s y, y' = s x + c y + shift
    # inverse:     x = c x' + s (y' - shift), y = -s x' + c (y' - shift)
    src_x = c * xs + s * (ys - shift)
    src_y = -s * xs + c * (ys - shift)
    grid = torch.stack((2 * src_x / max(w - 1, 1) - 1, 2 * src_y / max(h - 1, 1) - 1), dim=-1)
    warped = F.grid_sample(right.double()[None], grid[None], mode="bilinear", padding_mode="border",
                           align_corners=True)[0]
    out = dict(sample)
    out["right"] = warped.round().clamp(0, 255).to(torch.uint8)
    return out


# -------------------------------------------------------------------------------------------------- photometric

def shift_channels(image, shifts):
    """uint8 (3, H, W) plus a per-channel value (r, g, b), clipped and truncated (albumentations shift_rgb)."""
    shifts = torch.as_tensor(shifts, dtype=torch.float64).view(3, 1, 1)
    return _truncate_u8(image.double() + shifts)


def adjust_brightness_contrast(image, alpha, beta):
    """uint8 image * alpha + beta * 255, clipped and truncated (albumentations brightness_contrast_adjust on uint8
    with brightness_by_max=True)."""
    return _truncate_u8(image.double() * alpha + beta * 255.0)


def add_noise(image, noise):
    """uint8 image + a float noise image, clipped and truncated (albumentations gauss_noise)."""
    return _truncate_u8(image.double() + noise)


def rgb_shift(sample, generator, limit=20.0, p_asym=0.3):
    """Shift each colour channel by a value uniform in [-limit, limit] (`RGBShiftStereo`: r/g/b_shift_limit 20;
    p_asym 0.3 for Scene Flow in dataset/scene_flow.py, 0.5 for KITTI in dataset/kitti.py; always applied)."""
    _check_sample(sample, "rgb_shift")
    left, right = _asym(generator, p_asym, lambda: [_uniform(generator, -limit, limit) for _ in range(3)])
    out = dict(sample)
    out["left"], out["right"] = shift_channels(sample["left"], left), shift_channels(sample["right"], right)
    return out


def brightness_contrast(sample, generator, brightness_limit=0.1, contrast_limit=0.1, p_asym=0.5):
    """Contrast alpha = 1 + U(-contrast_limit, contrast_limit), brightness beta = U(-brightness_limit,
    brightness_limit) (of 255): image * alpha + beta * 255 (`RandomBrightnessContrastStereo`: limits 0.1, brightness
    by max; p_asym 0.5 in both dataset/scene_flow.py and dataset/kitti.py; always applied). The published draw order
    is alpha, then beta."""
    _check_sample(sample, "brightness_contrast")

    def draw():
        alpha = 1.0 + _uniform(generator, -contrast_limit, contrast_limit)
        return alpha, _uniform(generator, -brightness_limit, brightness_limit)

    (al, bl), (ar, br) = _asym(generator, p_asym, draw)
    out = dict(sample)
    out["left"] = adjust_brightness_contrast(sample["left"], al, bl)
    out["right"] = adjust_brightness_contrast(sample["right"], ar, br)
    return out


def gauss_noise(sample, generator, var_limit=(10.0, 50.0), mean=0.0, p_asym=1.0):
    """Add i.i.d. Gaussian noise per pixel and channel with variance uniform in var_limit (`GaussNoiseStereo`:
    var_limit (10, 50), mean 0, in 0..255 units; p_asym 1.0 in dataset/scene_flow.py, so the right image always
    gets its own noise)."""
    _check_sample(sample, "gauss_noise")
    shape = sample["left"].shape

    def draw():
        sigma = math.sqrt(_uniform(generator, var_limit[0], var_limit[1]))
        return torch.randn(shape, generator=generator, dtype=torch.float64) * sigma + mean

    nl, nr = _asym(generator, p_asym, draw)
    out = dict(sample)
    out["left"], out["right"] = add_noise(sample["left"], nl), add_noise(sample["right"], nr)
    return out


# ------------------------------------------------------------------------------------------------ post-process

def mark_occlusion(sample):
    """The end of the published `dataset/preprocess.py` augment, run on every split after the transforms:

    - disparities above the image width W or below 0 (and, here, non-finite ones) become 0;
    - left pixels whose match falls off the image, x - d < 0, are added to occ_mask (compute_left_occ_region; an
      occ_mask of None starts empty, as the published KITTI reader's zeros do);
    - when disp_right is given, right pixels with x + d_right > W are added to occ_mask_right
      (compute_right_occ_region; the published test is "> W", not ">= W");
    - disp is set to 0 at occluded pixels.
    Crop changes what falls off the border, which is why the published code recomputes this after cropping.
    """
    if sample.get("disp") is None:
        raise KeyError("mark_occlusion: the sample has no 'disp'")
    out = dict(sample)
    disp = sample["disp"].float()
    w = disp.shape[-1]
    zero = torch.zeros((), dtype=disp.dtype)
    disp = torch.where(torch.isfinite(disp) & (disp >= 0) & (disp <= w), disp, zero)
    x = torch.arange(w, dtype=disp.dtype)
    occ = sample.get("occ_mask")
    occ = torch.zeros(disp.shape, dtype=torch.bool) if occ is None else occ.bool()
    occ = occ | (x - disp < 0)
    if sample.get("disp_right") is not None:
        dr = sample["disp_right"].float()
        dr = torch.where(torch.isfinite(dr), dr, zero)
        occ_r = sample.get("occ_mask_right")
        occ_r = torch.zeros(dr.shape, dtype=torch.bool) if occ_r is None else occ_r.bool()
        out["occ_mask_right"] = occ_r | (x + dr > w)
    out["occ_mask"] = occ
    out["disp"] = torch.where(occ, zero, disp)
    return out


# -------------------------------------------------------------------------------------------------- composition

_RECIPES = {"sceneflow": "sceneflow", "kitti2015": "kitti2015", "kitti": "kitti2015"}


def training_transform(height=None, width=None, dataset="sceneflow", *, exact=False):
    """The published training pipeline for `dataset` as a callable(sample, generator) -> sample.

    "sceneflow" (dataset/scene_flow.py, SceneFlowFlyingThingsDataset, split "train"): horizontal_flip (p 0.5),
    NaN disparities to 0, random_crop with minimum (360, 640), then the albumentations Compose: random_shift_rotate
    (right image), rgb_shift (p_asym 0.3), and one of gauss_noise (p_asym 1.0) or brightness_contrast (p_asym 0.5)
    chosen with equal probability (OneOf of two transforms with p 0.5 each), then mark_occlusion. A sample without
    right-view ground truth (disp_right / occ_mask_right None, e.g. KITTI) cannot be flipped: the flip is skipped
    for it (this module's rule; the published code only flips Scene Flow).

    "kitti2015" (alias "kitti"; dataset/kitti.py, KITTIBaseDataset, split "train"): random_crop with minimum
    (200, 640), rgb_shift (p_asym 0.5), brightness_contrast (p_asym 0.5), then mark_occlusion. No flip, noise or
    shift-rotate.

    height, width: the minimum crop (default: the published one for the dataset). exact=True crops exactly
    height x width instead (random_crop's option; needed to batch more than one pair, since the published crop has
    a random size).
    """
    if dataset not in _RECIPES:
        raise ValueError(f"training_transform: dataset must be one of {sorted(_RECIPES)}, got {dataset!r}")
    dataset = _RECIPES[dataset]
    dh, dw = PUBLISHED_RECIPE["crop"][dataset]
    height, width = dh if height is None else int(height), dw if width is None else int(width)

    if dataset == "sceneflow":
        def transform(sample, generator):
            flip = _bernoulli(generator, 0.5)
            s = dict(sample)
            if flip and sample.get("disp_right") is not None and sample.get("occ_mask_right") is not None:
                s = horizontal_flip(s, generator, p=1.0)
            for k in ("disp", "disp_right"):
                if s.get(k) is not None:
                    s[k] = torch.nan_to_num(s[k], nan=0.0)
            s = random_crop(s, height, width, generator, exact=exact)
            s = random_shift_rotate(s, generator)
            s = rgb_shift(s, generator, p_asym=0.3)
            if _bernoulli(generator, 0.5):
                s = gauss_noise(s, generator, p_asym=1.0)
            else:
                s = brightness_contrast(s, generator, p_asym=0.5)
            return mark_occlusion(s)
    else:
        def transform(sample, generator):
            s = random_crop(sample, height, width, generator, exact=exact)
            s = rgb_shift(s, generator, p_asym=0.5)
            s = brightness_contrast(s, generator, p_asym=0.5)
            return mark_occlusion(s)

    transform.__doc__ = f"STTR {dataset} training transform, {'crop' if exact else 'minimum crop'} {height} x {width}"
    return transform

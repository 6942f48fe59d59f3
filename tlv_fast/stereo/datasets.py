"""Stereo datasets in the folder layouts that the published STTR code reads.

The published code is github.com/mli0603/stereo-transformer (Li et al., "Revisiting Stereo Depth Estimation From a
Sequence-to-Sequence Perspective with Transformers", ICCV 2021); its readers are `dataset/scene_flow.py` and
`dataset/kitti.py`, the data folders are drawn in its README.md (Middlebury: see MiddleburyDataset). The facts each
class relies on are listed in its docstring; where this module departs from that code, the docstring says so.

Every dataset is a `torch.utils.data.Dataset` whose item is a dict:

    left, right      uint8 (3, H, W)
    disp             float32 (H, W), left disparity in pixels, 0 where there is no ground truth
    occ_mask         bool (H, W), left occlusion, or None when the dataset has none
    occ_mask_right   bool (H, W) or None
    disp_right       float32 (H, W) or None (right disparity; the published horizontal flip needs it)
    name             str, the path of the left image relative to the dataset root
    calib            geometry.Calibration or None

Items hold the ground truth as the files store it. The published code then applies `dataset/preprocess.py`'s
`augment` to every split (disparities outside [0, W] and occluded pixels set to 0, border occlusion added); that
step is `tlv_fast.stereo.augment.mark_occlusion`. `None` does not collate, so use `collate` (below) as the
DataLoader's `collate_fn`.
"""
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from . import io as stereo_io
from .geometry import read_middlebury_calibration
from .synthetic import synthetic_stereo

__all__ = ["SceneFlowDataset", "Kitti2015Dataset", "MiddleburyDataset", "SyntheticStereoDataset", "collate",
           "open_dataset", "write_example_dataset", "DATASET_NAMES"]

DATASET_NAMES = ("sceneflow", "kitti2015", "middlebury", "synthetic")

# the image extensions dataset/preprocess.py lists (IMG_EXTENSIONS), lower case
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp")


# ----------------------------------------------------------------------------------------------------------- helpers

def _natural_key(text):
    """Sort key that orders embedded numbers by value ('2' < '10'), as natsort's natsorted does in the published
    readers."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(text))]


def _require_dir(path, who, what):
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{who}: expected the folder {path} ({what}), which does not exist")
    return path


def _require_file(path, who, what):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{who}: expected the file {path} ({what}), which does not exist")
    return path


def _images_in(folder):
    return sorted((p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS),
                  key=lambda p: _natural_key(p.name))


def _subdirs(folder):
    return sorted((p for p in Path(folder).iterdir() if p.is_dir()), key=lambda p: _natural_key(p.name))


def _tensor(x):
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(x))


def _image(path):
    img = _tensor(stereo_io.read_image(path))
    if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
        raise ValueError(f"read_image({path}) gave {tuple(img.shape)} {img.dtype}, expected uint8 (3, H, W)")
    return img


def _gray(path):
    """A one-channel PNG (occlusion map, Middlebury mask) as uint8 (H, W): read_image returns 3 channels; a
    grayscale file gives three equal ones, so the first is the file's value."""
    return _image(path)[0]


def _pfm(path):
    return _tensor(stereo_io.read_pfm(path)).to(torch.float32)


def _no_gt_to_zero(disp):
    """Non-finite (NaN, +-inf) and negative disparities carry no ground truth: 0."""
    return torch.where(torch.isfinite(disp) & (disp > 0), disp, torch.zeros((), dtype=disp.dtype))


def _check_same_size(who, name, **arrays):
    shapes = {k: tuple(v.shape[-2:]) for k, v in arrays.items() if v is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{who}: the files of {name} differ in size: {shapes}")


def _item(who, *, left, right, disp, occ_mask, occ_mask_right=None, disp_right=None, name, calib=None):
    _check_same_size(who, name, left=left, right=right, disp=disp, occ_mask=occ_mask, occ_mask_right=occ_mask_right,
                     disp_right=disp_right)
    return {"left": left, "right": right, "disp": disp, "occ_mask": occ_mask, "occ_mask_right": occ_mask_right,
            "disp_right": disp_right, "name": name, "calib": calib}


def _rel(path, root):
    return Path(os.path.relpath(path, root)).as_posix()


def collate(items):
    """Batch dataset items (a `collate_fn` for torch.utils.data.DataLoader).

    Tensors are stacked (they must have the same shape: crop first), a key that is None in every item stays None,
    other values (names, calibrations) become lists. A key that is None in some items but not in others is an error.
    """
    items = list(items)
    if not items:
        raise ValueError("collate: got no items")
    keys = list(items[0])
    for i, it in enumerate(items[1:], 1):
        if list(it) != keys:
            raise ValueError(f"collate: item {i} has keys {sorted(it)}, item 0 has {sorted(keys)}")
    batch = {}
    for k in keys:
        vals = [it[k] for it in items]
        nones = sum(v is None for v in vals)
        if nones == len(vals):
            batch[k] = None
        elif nones:
            raise ValueError(f"collate: '{k}' is None in {nones} of {len(vals)} items (it must be None in all or "
                             f"in none; do not mix datasets with and without it)")
        elif all(isinstance(v, torch.Tensor) for v in vals):
            shapes = {tuple(v.shape) for v in vals}
            if len(shapes) > 1:
                raise ValueError(f"collate: '{k}' has different shapes {sorted(shapes)}; crop to one size first")
            batch[k] = torch.stack(vals)
        else:
            batch[k] = vals
    return batch


# --------------------------------------------------------------------------------------------------------- Scene Flow

_SCENEFLOW_SUBSETS = ("FlyingThings3D", "Monkaa")
_SCENEFLOW_PASSES = ("finalpass", "cleanpass")


class SceneFlowDataset(Dataset):
    """Scene Flow (Mayer et al., CVPR 2016; lmb.informatik.uni-freiburg.de) as the published STTR code reads it
    (`dataset/scene_flow.py`, classes SceneFlowFlyingThingsDataset and SceneFlowMonkaaDataset).

    FlyingThings3D (`subset="FlyingThings3D"`), with SPLIT = TRAIN for split "train" and TEST otherwise:

        root/frame_finalpass/SPLIT/<A|B|C>/<sequence>/left/<frame>.png     (and .../right/<frame>.png)
        root/disparity/SPLIT/<A|B|C>/<sequence>/left/<frame>.pfm           (and right)
        root/occlusion/SPLIT/left/<k>.png                                  (and right)

    The published code spells the image folder `frame_finalpass` (the download calls it `frames_finalpass`; both are
    accepted here, the published spelling first), finds the disparity by replacing that folder with `disparity` and
    the extension with .pfm, and pairs the flat occlusion folder with the images by position: the k-th occlusion
    map in natural sort order belongs to the k-th left image in natural sort order over the whole split (here an
    unequal count is an error). An occlusion map is occluded where non-zero (`.astype(bool)`). It reads only
    finalpass; `pass_="cleanpass"` reads `frame_cleanpass` / `frames_cleanpass` in the same layout (this module's
    extension).

    Monkaa (`subset="Monkaa"`, no split folders; the published code serves every split from all of it):

        root/frames_cleanpass/<scene>/left/<frame>.png,  root/disparity/<scene>/left/<frame>.pfm,
        root/occlusion/<scene>/left/<frame>.png     (and right for each)

    `root` is the folder that holds those folders; a root holding `<subset>/` instead is also accepted. NaN or
    negative disparities become 0 (the published training split applies np.nan_to_num).
    """

    def __init__(self, root, split="test", pass_="finalpass", subset="FlyingThings3D"):
        who = type(self).__name__
        if subset not in _SCENEFLOW_SUBSETS:
            raise ValueError(f"{who}: subset must be one of {_SCENEFLOW_SUBSETS}, got {subset!r}")
        if pass_ not in _SCENEFLOW_PASSES:
            raise ValueError(f"{who}: pass_ must be one of {_SCENEFLOW_PASSES}, got {pass_!r}")
        split_l = str(split).lower()
        if split_l not in ("train", "test", "validation"):
            raise ValueError(f"{who}: split must be 'train' (TRAIN) or 'test' / 'validation' (TEST), got {split!r}")
        root = _require_dir(root, who, "the Scene Flow root")
        frame_names = [f"frame_{pass_}", f"frames_{pass_}"]
        if subset == "Monkaa":
            frame_names.reverse()  # the published Monkaa reader spells it frames_cleanpass
        base = root
        if not any((root / f).is_dir() for f in frame_names) and (root / subset).is_dir():
            base = root / subset
        frames = next((base / f for f in frame_names if (base / f).is_dir()), None)
        if frames is None:
            raise FileNotFoundError(f"{who}: expected the folder {base / frame_names[0]} (or {frame_names[1]}) with "
                                    f"the {pass_} images of {subset}, which does not exist")
        self.root, self.split, self.pass_, self.subset = base, split, pass_, subset
        self._who = who
        self._frames = frames
        disp_root = _require_dir(base / "disparity", who, "the disparity PFMs")
        occ_root = _require_dir(base / "occlusion", who, "the occlusion maps")

        self._samples = []  # (left, right, disp, disp_right, occ, occ_right)
        if subset == "FlyingThings3D":
            self.split_folder = "TRAIN" if split_l == "train" else "TEST"
            split_dir = _require_dir(frames / self.split_folder, who, f"the {self.split_folder} split")
            lefts = []
            for letter in _subdirs(split_dir):
                for seq in _subdirs(letter):
                    if (seq / "left").is_dir():
                        lefts += _images_in(seq / "left")
            lefts.sort(key=lambda p: _natural_key(_rel(p, base)))
            occ_dir = _require_dir(occ_root / self.split_folder / "left", who, "the left occlusion maps")
            occs = _images_in(occ_dir)
            if len(occs) != len(lefts):
                raise ValueError(f"{who}: found {len(lefts)} left images under {split_dir} but {len(occs)} occlusion "
                                 f"maps in {occ_dir}; the published reader pairs them by sorted position, so the "
                                 f"counts must match")
            for left, occ in zip(lefts, occs):
                rel = left.relative_to(frames)  # SPLIT/A/seq/left/f.png
                self._samples.append(self._paths(left, rel, disp_root, occ, occ_root / self.split_folder / "right"
                                                 / occ.name))
        else:
            self.split_folder = None
            for scene in _subdirs(frames):
                if (scene / "left").is_dir():
                    for left in _images_in(scene / "left"):
                        rel = left.relative_to(frames)  # scene/left/f.png
                        occ = occ_root / rel
                        self._samples.append(self._paths(left, rel, disp_root, occ, occ_root / _swap_side(rel)))
        if not self._samples:
            raise FileNotFoundError(f"{who}: no left images (<...>/left/*.png) found under {frames}"
                                    + (f"/{self.split_folder}" if self.split_folder else ""))

    @staticmethod
    def _paths(left, rel, disp_root, occ, occ_right):
        right = left.parent.parent / "right" / left.name
        disp = (disp_root / rel).with_suffix(".pfm")
        disp_right = (disp_root / _swap_side(rel)).with_suffix(".pfm")
        return left, right, disp, disp_right, occ, occ_right

    def __len__(self):
        return len(self._samples)

    def __getitem__(self, idx):
        left, right, disp, disp_right, occ, occ_right = self._samples[idx]
        who = self._who
        return _item(
            who,
            left=_image(_require_file(left, who, "left image")),
            right=_image(_require_file(right, who, "right image")),
            disp=_no_gt_to_zero(_pfm(_require_file(disp, who, "left disparity"))),
            disp_right=_no_gt_to_zero(_pfm(_require_file(disp_right, who, "right disparity"))),
            occ_mask=_gray(_require_file(occ, who, "left occlusion map")) != 0,
            occ_mask_right=_gray(_require_file(occ_right, who, "right occlusion map")) != 0,
            name=_rel(left, self.root))


def _swap_side(rel):
    """Replace the path component 'left' by 'right' (the published code replaces the substring)."""
    parts = list(Path(rel).parts)
    i = len(parts) - 1 - parts[::-1].index("left")
    parts[i] = "right"
    return Path(*parts)


# ------------------------------------------------------------------------------------------------------- KITTI 2015

_KITTI_SPLITS = {"training": "training", "testing": "testing",  # the folder names: all files
                 "train": "training", "validation": "training", "validation_all": "training",  # published names
                 "test": "testing"}
_KITTI_TRAIN_FRACTION = 0.95  # dataset/kitti.py, KITTIBaseDataset._split_data (train_val_frac)


class Kitti2015Dataset(Dataset):
    """KITTI 2015 stereo (Menze and Geiger, CVPR 2015; www.cvlibs.net/datasets/kitti) in the downloaded layout:

        root/training/image_2/000000_10.png (left), image_3/ (right), disp_occ_0/ (all pixels), disp_noc_0/
        root/testing/image_2/, image_3/   (no ground truth)

    Only files whose name contains '_10' are pairs (the '_11' frames are the next time step), as in the published
    `dataset/kitti.py`. Disparities are 16-bit PNGs: value / 256 pixels, 0 = no ground truth.

    split: "training" / "testing" (all files of that folder), or the published split names: "train" (the first 95%
    of the training pairs in natural order), "validation" (the last 5%), "validation_all" (all training pairs),
    "test" (testing).

    occ: the published reader (`dataset/kitti.py`, KITTIBaseDataset) reads disp_occ_0 only and starts from an empty
    occlusion mask: the only occlusion it knows is the left border, which `preprocess.augment` adds after cropping
    (x - d < 0; `tlv_fast.stereo.augment.mark_occlusion`). `occ=False` does the same: occ_mask is None. `occ=True`
    (this module's choice, not the published code's) also reads disp_noc_0 and marks as occluded the pixels with
    ground truth in disp_occ_0 but not in disp_noc_0. Testing pairs have disp = 0 and occ_mask = None. KITTI has
    no right-view ground truth: disp_right and occ_mask_right are None.
    """

    def __init__(self, root, split="training", occ=True):
        who = type(self).__name__
        if split not in _KITTI_SPLITS:
            raise ValueError(f"{who}: split must be one of {sorted(_KITTI_SPLITS)}, got {split!r}")
        root = _require_dir(root, who, "the KITTI 2015 root")
        self.root, self.split, self.occ = root, split, bool(occ)
        self._who = who
        sub = root / _KITTI_SPLITS[split]
        _require_dir(sub, who, f"the {_KITTI_SPLITS[split]} split")
        left_dir = _require_dir(sub / "image_2", who, "left images")
        self._right_dir = _require_dir(sub / "image_3", who, "right images")
        self.has_gt = _KITTI_SPLITS[split] == "training"
        if self.has_gt:
            self._disp_dir = _require_dir(sub / "disp_occ_0", who, "disparity of all pixels")
            self._noc_dir = _require_dir(sub / "disp_noc_0", who, "disparity of non-occluded pixels (needed by "
                                         "occ=True; occ=False reads disp_occ_0 only)") if self.occ else None
        lefts = [p for p in _images_in(left_dir) if "_10" in p.name]
        if split in ("train", "validation") and len(lefts) > 1:
            cut = int(len(lefts) * _KITTI_TRAIN_FRACTION)
            lefts = lefts[:cut] if split == "train" else lefts[cut:]
        if not lefts:
            raise FileNotFoundError(f"{who}: no left images named *_10.png in {left_dir}")
        self._lefts = lefts

    def __len__(self):
        return len(self._lefts)

    def __getitem__(self, idx):
        who, left_path = self._who, self._lefts[idx]
        left = _image(left_path)
        right = _image(_require_file(self._right_dir / left_path.name, who, "right image"))
        h, w = left.shape[-2:]
        occ = None
        if self.has_gt:
            disp, valid = stereo_io.read_kitti_disparity(_require_file(self._disp_dir / left_path.name, who,
                                                                       "disparity of all pixels"))
            disp, valid = _tensor(disp).to(torch.float32), _tensor(valid).bool()
            disp = torch.where(valid, disp, torch.zeros(()))
            if self.occ:
                _, noc = stereo_io.read_kitti_disparity(_require_file(self._noc_dir / left_path.name, who,
                                                                      "disparity of non-occluded pixels"))
                noc = _tensor(noc).bool()
                _check_same_size(who, left_path.name, disp_occ_0=valid, disp_noc_0=noc)
                occ = valid & ~noc
        else:
            disp = torch.zeros(h, w, dtype=torch.float32)
        return _item(who, left=left, right=right, disp=disp, occ_mask=occ, name=_rel(left_path, self.root))


# ------------------------------------------------------------------------------------------------------- Middlebury

class MiddleburyDataset(Dataset):
    """Middlebury 2014 (Scharstein et al., GCPR 2014; vision.middlebury.edu/stereo) in the MiddEval3 layout the
    published STTR README.md draws:

        root/trainingQ/<scene>/im0.png, im1.png, disp0GT.pfm, mask0nocc.png, calib.txt
                               (disp1GT.pfm, mask1nocc.png: right view, read when present)

    split: the folder under root: trainingQ (the README's), trainingH, trainingF, or testQ/H/F (a split whose name
    starts with "test" has no ground truth: disp = 0, occ_mask = None). Scenes are the sub-folders, naturally
    sorted.

    disp0GT.pfm stores +inf where there is no ground truth; that becomes 0 (the published pipeline zeroes it through
    `preprocess.augment`'s disp > W rule). mask0nocc.png follows the Middlebury SDK convention (computemask.cpp in
    the MiddEval3 SDK): 255 = non-occluded, 128 = occluded, 0 = no ground truth. occ_mask = (mask == 128), as the
    STTR-derived reader dataset/middlebury.py of github.com/guoweiyu/Context-Enhanced-Stereo-Transformer does (the
    reader of mli0603/stereo-transformer itself was not available to check); pixels where the mask is 0 also get
    disp = 0 (this module's choice). calib = geometry.Calibration from calib.txt (None when the file is absent).
    """

    def __init__(self, root, split="trainingQ"):
        who = type(self).__name__
        root = _require_dir(root, who, "the Middlebury root")
        split_dir = _require_dir(root / str(split), who, f"the split {split!r}: one folder per scene")
        self.root, self.split, self._who = root, split, who
        self.has_gt = not str(split).lower().startswith("test")
        self._scenes = [s for s in _subdirs(split_dir) if (s / "im0.png").is_file()]
        if not self._scenes:
            raise FileNotFoundError(f"{who}: no scene folders with im0.png in {split_dir}")

    def __len__(self):
        return len(self._scenes)

    def _view(self, scene, k, required):
        disp_p, mask_p = scene / f"disp{k}GT.pfm", scene / f"mask{k}nocc.png"
        if not required and not (disp_p.is_file() and mask_p.is_file()):
            return None, None
        disp = _pfm(_require_file(disp_p, self._who, f"view {k} disparity"))
        mask = _gray(_require_file(mask_p, self._who, f"view {k} occlusion mask (255/128/0)"))
        _check_same_size(self._who, scene.name, **{disp_p.name: disp, mask_p.name: mask})
        disp = torch.where(mask == 0, torch.zeros(()), _no_gt_to_zero(disp))
        return disp, mask == 128

    def __getitem__(self, idx):
        scene, who = self._scenes[idx], self._who
        left = _image(scene / "im0.png")
        right = _image(_require_file(scene / "im1.png", who, "right image"))
        calib = read_middlebury_calibration(scene / "calib.txt") if (scene / "calib.txt").is_file() else None
        if self.has_gt:
            disp, occ = self._view(scene, 0, True)
            disp_r, occ_r = self._view(scene, 1, False)
        else:
            disp, occ, disp_r, occ_r = torch.zeros(left.shape[-2:], dtype=torch.float32), None, None, None
        return _item(who, left=left, right=right, disp=disp, occ_mask=occ, occ_mask_right=occ_r, disp_right=disp_r,
                     name=_rel(scene / "im0.png", self.root), calib=calib)


# -------------------------------------------------------------------------------------------------------- synthetic

def _to_uint8(img):
    """[0, 1] float -> uint8, rounding to the nearest level (the quantisation of an 8-bit PNG)."""
    return (img * 255).round().clamp(0, 255).to(torch.uint8)


class SyntheticStereoDataset(Dataset):
    """`n` synthetic pairs (docs/sttr.md §7; tlv_fast.stereo.synthetic_stereo): item i is
    synthetic_stereo(height, width, seed=seed + i, **kwargs) with left/right rounded to uint8. The ground truth is
    exact and dense: every pixel has a disparity, occ_mask / occ_mask_right are the true occlusions."""

    def __init__(self, n, height=128, width=192, seed=0, **kwargs):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"SyntheticStereoDataset: n must be an int >= 0, got {n!r}")
        self.n, self.height, self.width, self.seed, self.kwargs = n, height, width, seed, kwargs

    def __len__(self):
        return self.n

    def __getitem__(self, idx):
        if not -self.n <= idx < self.n:
            raise IndexError(f"SyntheticStereoDataset: index {idx} out of range for {self.n} pairs")
        idx %= self.n
        s = synthetic_stereo(self.height, self.width, seed=self.seed + idx, **self.kwargs)
        return _item("SyntheticStereoDataset", left=_to_uint8(s["left"]), right=_to_uint8(s["right"]),
                     disp=s["disp"].float(), occ_mask=s["occ_mask"], occ_mask_right=s["occ_mask_right"],
                     disp_right=s["disp_right"].float(), name=f"synthetic/{self.seed + idx:06d}.png")


# ------------------------------------------------------------------------------------------------------- open / write

def open_dataset(name, root, split=None, **kwargs):
    """Open a dataset by name: "sceneflow" (SceneFlowDataset, split default "test"), "kitti2015" (Kitti2015Dataset,
    "training"), "middlebury" (MiddleburyDataset, "trainingQ") or "synthetic" (SyntheticStereoDataset: root and
    split unused and must be None; n defaults to 8). kwargs go to the class."""
    if name == "sceneflow":
        return SceneFlowDataset(root, split="test" if split is None else split, **kwargs)
    if name == "kitti2015":
        return Kitti2015Dataset(root, split="training" if split is None else split, **kwargs)
    if name == "middlebury":
        return MiddleburyDataset(root, split="trainingQ" if split is None else split, **kwargs)
    if name == "synthetic":
        if root is not None or split is not None:
            raise ValueError(f"open_dataset('synthetic'): root and split must be None (the pairs are generated), got "
                             f"root={root!r}, split={split!r}")
        kwargs.setdefault("n", 8)
        return SyntheticStereoDataset(**kwargs)
    raise ValueError(f"open_dataset: unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")


def _write_mask(path, mask_u8):
    """A uint8 (H, W) map as an 8-bit grayscale PNG (as the Scene Flow occlusion maps and Middlebury masks are)."""
    stereo_io.write_image(path, mask_u8.to(torch.uint8).contiguous())


def _write_middlebury_calib(path, height, width, max_disp):
    # calib.txt as in MiddEval3: cam0/cam1 intrinsics (cam1's cx = cam0's cx + doffs), doffs, baseline (mm), size,
    # ndisp and the disparity bounds. The values are made up for the synthetic pairs.
    f, cx, cy, doffs, baseline = 1.5 * width, (width - 1) / 2, (height - 1) / 2, 0.0, 100.0
    text = (f"cam0=[{f} 0 {cx}; 0 {f} {cy}; 0 0 1]\n"
            f"cam1=[{f} 0 {cx + doffs}; 0 {f} {cy}; 0 0 1]\n"
            f"doffs={doffs}\nbaseline={baseline}\nwidth={width}\nheight={height}\n"
            f"ndisp={int(math.ceil(max_disp))}\nisint=0\nvmin=0\nvmax={int(math.ceil(max_disp))}\n"
            f"dyavg=0\ndymax=0\n")
    with open(path, "w") as fh:
        fh.write(text)


def _write_sceneflow(root, pairs, subset="FlyingThings3D"):
    root = Path(root)
    for split in (("TRAIN", "TEST") if subset == "FlyingThings3D" else (None,)):
        for i, p in enumerate(pairs):
            if subset == "FlyingThings3D":
                rel, occ_rel = Path(split, "A", "0000"), Path(split)
                occ_name = f"{i:07d}.png"  # flat, paired with the images by sorted position
            else:
                rel, occ_rel, occ_name = Path("scene"), Path("scene"), f"{i:04d}.png"
            frames = "frame_finalpass" if subset == "FlyingThings3D" else "frames_cleanpass"
            for side in ("left", "right"):
                suffix = "" if side == "left" else "_right"
                for d in (root / frames / rel / side, root / "disparity" / rel / side, root / "occlusion" / occ_rel
                          / side):
                    d.mkdir(parents=True, exist_ok=True)
                stereo_io.write_image(root / frames / rel / side / f"{i:04d}.png", _to_uint8(p[side]))
                stereo_io.write_pfm(root / "disparity" / rel / side / f"{i:04d}.pfm", p["disp" + suffix])
                _write_mask(root / "occlusion" / occ_rel / side / occ_name, p["occ_mask" + suffix].to(torch.uint8)
                            * 255)


def write_example_dataset(name, root, num_pairs=2, height=128, width=192, seed=0):
    """Write a tiny dataset in the layout of `name` ("sceneflow", "kitti2015" or "middlebury") under `root`, from
    synthetic pairs (pair i: tlv_fast.stereo.synthetic_stereo(height, width, seed=seed + i)), encoded as the
    real files are: 8-bit PNG images, PFM disparities, KITTI 16-bit PNG disparities (value / 256, 0 = none),
    Middlebury masks (255 / 128), Scene Flow occlusion maps (0 / 255).

    Every split folder the readers know gets the same pairs: Scene Flow TRAIN and TEST (finalpass only), KITTI
    training (disp_occ_0 valid everywhere, disp_noc_0 valid where not occluded) and testing (images only),
    Middlebury trainingQ (with calib.txt and the right view's disp1GT.pfm / mask1nocc.png). Reading back gives the
    synthetic ground truth: images as uint8 (rounded), disparities exactly (they are integers, so also KITTI's
    1/256 px steps). Returns root as a Path.
    """
    if name not in ("sceneflow", "kitti2015", "middlebury"):
        raise ValueError(f"write_example_dataset: unknown dataset {name!r}; expected one of sceneflow, kitti2015, "
                         f"middlebury (synthetic pairs need no files)")
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 1:
        raise ValueError(f"write_example_dataset: num_pairs must be an int >= 1, got {num_pairs!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    pairs = [synthetic_stereo(height, width, seed=seed + i) for i in range(num_pairs)]
    if name == "sceneflow":
        _write_sceneflow(root, pairs)
    elif name == "kitti2015":
        for sub in ("training", "testing"):
            for folder in ("image_2", "image_3") + (("disp_occ_0", "disp_noc_0") if sub == "training" else ()):
                (root / sub / folder).mkdir(parents=True, exist_ok=True)
            for i, p in enumerate(pairs):
                fname = f"{i:06d}_10.png"
                stereo_io.write_image(root / sub / "image_2" / fname, _to_uint8(p["left"]))
                stereo_io.write_image(root / sub / "image_3" / fname, _to_uint8(p["right"]))
                if sub == "training":
                    valid = p["disp"] > 0
                    stereo_io.write_kitti_disparity(root / sub / "disp_occ_0" / fname, p["disp"], valid)
                    stereo_io.write_kitti_disparity(root / sub / "disp_noc_0" / fname, p["disp"],
                                                    valid & ~p["occ_mask"])
    else:
        for i, p in enumerate(pairs):
            scene = root / "trainingQ" / f"scene{i:02d}"
            scene.mkdir(parents=True, exist_ok=True)
            stereo_io.write_image(scene / "im0.png", _to_uint8(p["left"]))
            stereo_io.write_image(scene / "im1.png", _to_uint8(p["right"]))
            for k, suffix in ((0, ""), (1, "_right")):
                stereo_io.write_pfm(scene / f"disp{k}GT.pfm", p["disp" + suffix])
                mask = torch.where(p["occ_mask" + suffix], 128, 255).to(torch.uint8)
                _write_mask(scene / f"mask{k}nocc.png", mask)
            _write_middlebury_calib(scene / "calib.txt", height, width, float(p["disp"].max()))
    return root

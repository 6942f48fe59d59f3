"""tlv_fast.stereo.datasets: the published STTR layouts, written from synthetic pairs and read back exactly."""
import shutil

import pytest
import torch

from tlv_fast.stereo import io as stereo_io
from tlv_fast.stereo.datasets import (
    DATASET_NAMES,
    Kitti2015Dataset,
    MiddleburyDataset,
    SceneFlowDataset,
    SyntheticStereoDataset,
    _write_sceneflow,
    collate,
    open_dataset,
    write_example_dataset,
)
from tlv_fast.stereo.synthetic import synthetic_stereo

H, W, N = 128, 192, 2
KEYS = ("left", "right", "disp", "occ_mask", "occ_mask_right", "disp_right")


@pytest.fixture(scope="module")
def truth():
    return [SyntheticStereoDataset(N, H, W, seed=0)[i] for i in range(N)]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The three example layouts, written once (the tests that edit files copy them)."""
    base = tmp_path_factory.mktemp("examples")
    return {name: write_example_dataset(name, base / name, num_pairs=N, height=H, width=W, seed=0)
            for name in ("sceneflow", "kitti2015", "middlebury")}


def _copy(example, name, tmp_path):
    return shutil.copytree(example[name], tmp_path / name)


def _assert_equal(item, ref, keys):
    for k in keys:
        assert item[k] is not None, k
        assert item[k].dtype == ref[k].dtype, k
        assert torch.equal(item[k], ref[k]), k


def test_synthetic_dataset_is_the_generator_rounded_to_uint8():
    ds = SyntheticStereoDataset(3, H, W, seed=5, num_layers=2)
    assert len(ds) == 3
    item = ds[2]
    ref = synthetic_stereo(H, W, seed=7, num_layers=2)
    assert item["left"].dtype == torch.uint8 and item["left"].shape == (3, H, W)
    assert torch.equal(item["left"], (ref["left"] * 255).round().to(torch.uint8))
    assert torch.equal(item["right"], (ref["right"] * 255).round().to(torch.uint8))
    for k in ("disp", "disp_right", "occ_mask", "occ_mask_right"):
        assert torch.equal(item[k], ref[k]), k
    assert item["disp"].dtype == torch.float32 and item["occ_mask"].dtype == torch.bool
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(ValueError, match="n must be"):
        SyntheticStereoDataset(-1)


def test_sceneflow_round_trip_both_splits(example, truth):
    root = example["sceneflow"]
    assert (root / "frame_finalpass" / "TEST" / "A" / "0000" / "left").is_dir()  # the published spelling
    assert (root / "occlusion" / "TEST" / "left").is_dir()
    for split in ("test", "train"):
        ds = SceneFlowDataset(root, split=split)
        assert len(ds) == N
        for i in range(N):
            item = ds[i]
            _assert_equal(item, truth[i], KEYS)
            folder = "TEST" if split == "test" else "TRAIN"
            assert item["name"] == f"frame_finalpass/{folder}/A/0000/left/{i:04d}.png"
            assert item["calib"] is None


def test_sceneflow_occlusion_maps_are_nonzero_is_occluded(example, tmp_path, truth):
    root = _copy(example, "sceneflow", tmp_path)
    occ = truth[0]["occ_mask"]
    # a map with other non-zero levels (1, 7) is still occluded wherever it is non-zero (.astype(bool))
    stereo_io.write_image(root / "occlusion/TEST/left/0000000.png", (occ.to(torch.uint8) * 7).clamp_max(255))
    stereo_io.write_image(root / "occlusion/TEST/right/0000000.png", truth[0]["occ_mask_right"].to(torch.uint8))
    item = SceneFlowDataset(root)[0]
    assert torch.equal(item["occ_mask"], occ)
    assert torch.equal(item["occ_mask_right"], truth[0]["occ_mask_right"])


def test_sceneflow_nan_and_negative_disparity_become_zero(example, tmp_path, truth):
    root = _copy(example, "sceneflow", tmp_path)
    disp = truth[1]["disp"].clone()
    disp[0, :5] = float("nan")
    disp[1, :5] = -3.0
    disp[2, :5] = float("inf")
    stereo_io.write_pfm(root / "disparity/TEST/A/0000/left/0001.pfm", disp)
    got = SceneFlowDataset(root)[1]["disp"]
    assert (got[:3, :5] == 0).all()
    assert torch.equal(got[3:], truth[1]["disp"][3:])


def test_sceneflow_accepts_download_spelling_and_subset_folder(example, tmp_path, truth):
    root = _copy(example, "sceneflow", tmp_path / "a")
    (root / "frame_finalpass").rename(root / "frames_finalpass")
    ds = SceneFlowDataset(root)
    _assert_equal(ds[0], truth[0], KEYS)
    assert ds[0]["name"].startswith("frames_finalpass/TEST/")
    outer = tmp_path / "outer"
    shutil.copytree(example["sceneflow"], outer / "FlyingThings3D")
    _assert_equal(SceneFlowDataset(outer)[1], truth[1], KEYS)


def test_sceneflow_monkaa_layout(tmp_path, truth):
    pairs = [synthetic_stereo(H, W, seed=i) for i in range(N)]
    _write_sceneflow(tmp_path, pairs, subset="Monkaa")
    assert (tmp_path / "frames_cleanpass" / "scene" / "left" / "0000.png").is_file()
    ds = SceneFlowDataset(tmp_path, subset="Monkaa", pass_="cleanpass")
    assert len(ds) == N
    for i in range(N):
        _assert_equal(ds[i], truth[i], KEYS)


def test_sceneflow_errors(example, tmp_path):
    with pytest.raises(FileNotFoundError, match="frame_cleanpass"):
        SceneFlowDataset(example["sceneflow"], pass_="cleanpass")
    with pytest.raises(FileNotFoundError, match="frame_finalpass"):
        SceneFlowDataset(tmp_path)  # empty root: says which folder it looked for
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        SceneFlowDataset(tmp_path / "does_not_exist")
    with pytest.raises(ValueError, match="split"):
        SceneFlowDataset(example["sceneflow"], split="val")
    with pytest.raises(ValueError, match="subset"):
        SceneFlowDataset(example["sceneflow"], subset="Driving")
    root = _copy(example, "sceneflow", tmp_path)
    (root / "occlusion/TEST/left/0000001.png").unlink()
    with pytest.raises(ValueError, match="2 left images .* 1 occlusion"):
        SceneFlowDataset(root)
    shutil.rmtree(root / "disparity")
    with pytest.raises(FileNotFoundError, match="disparity"):
        SceneFlowDataset(root)


def test_kitti_round_trip_and_occlusion_from_occ_and_noc(example, truth):
    root = example["kitti2015"]
    ds = Kitti2015Dataset(root)
    assert len(ds) == N
    for i in range(N):
        item = ds[i]
        _assert_equal(item, truth[i], ("left", "right", "disp", "occ_mask"))
        assert item["occ_mask"].any() and not item["occ_mask"].all()
        assert item["occ_mask_right"] is None and item["disp_right"] is None
        assert item["name"] == f"training/image_2/{i:06d}_10.png"
    # occ=False is the published reader: disp_occ_0 only, no occlusion ground truth
    item = Kitti2015Dataset(root, occ=False)[0]
    assert item["occ_mask"] is None
    assert torch.equal(item["disp"], truth[0]["disp"])


def test_kitti_occlusion_is_valid_in_occ_but_not_in_noc(example, tmp_path):
    root = _copy(example, "kitti2015", tmp_path)
    disp = torch.full((H, W), 12.0)
    valid_occ = torch.ones(H, W, dtype=torch.bool)
    valid_occ[:, :10] = False  # no ground truth at all
    valid_noc = valid_occ.clone()
    valid_noc[20:30, 50:60] = False  # occluded
    stereo_io.write_kitti_disparity(root / "training/disp_occ_0/000000_10.png", disp, valid_occ)
    stereo_io.write_kitti_disparity(root / "training/disp_noc_0/000000_10.png", disp, valid_noc)
    item = Kitti2015Dataset(root)[0]
    assert torch.equal(item["occ_mask"], valid_occ & ~valid_noc)
    assert (item["disp"][:, :10] == 0).all() and (item["disp"][:, 10:] == 12).all()


def test_kitti_disparity_is_quantised_to_1_256(example, tmp_path):
    root = _copy(example, "kitti2015", tmp_path)
    disp = torch.linspace(0.5, 40.3, H * W).view(H, W)
    stereo_io.write_kitti_disparity(root / "training/disp_occ_0/000001_10.png", disp)
    got = Kitti2015Dataset(root, occ=False)[1]["disp"]
    assert torch.equal(got, (disp.double() * 256).round().float() / 256)


def test_kitti_testing_and_published_splits(example, truth):
    root = example["kitti2015"]
    for split in ("testing", "test"):
        ds = Kitti2015Dataset(root, split=split)
        assert len(ds) == N
        item = ds[1]
        _assert_equal(item, truth[1], ("left", "right"))
        assert item["disp"].shape == (H, W) and not item["disp"].any() and item["disp"].dtype == torch.float32
        assert item["occ_mask"] is None
        assert item["name"] == "testing/image_2/000001_10.png"
    # dataset/kitti.py: the first int(0.95 n) training pairs train, the rest validate
    assert [it["name"] for it in Kitti2015Dataset(root, split="train")] == ["training/image_2/000000_10.png"]
    assert [it["name"] for it in Kitti2015Dataset(root, split="validation")] == ["training/image_2/000001_10.png"]
    assert len(Kitti2015Dataset(root, split="validation_all")) == N


def test_kitti_reads_only_10_frames_and_errors(example, tmp_path):
    root = _copy(example, "kitti2015", tmp_path)
    shutil.copy(root / "training/image_2/000000_10.png", root / "training/image_2/000000_11.png")
    assert len(Kitti2015Dataset(root)) == N
    with pytest.raises(ValueError, match="split"):
        Kitti2015Dataset(root, split="val")
    shutil.rmtree(root / "training/disp_noc_0")
    with pytest.raises(FileNotFoundError, match="disp_noc_0"):
        Kitti2015Dataset(root)
    assert Kitti2015Dataset(root, occ=False)[0]["occ_mask"] is None
    (tmp_path / "empty_kitti").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_kitti/training"):
        Kitti2015Dataset(tmp_path / "empty_kitti")


def test_middlebury_round_trip_calib_and_right_view(example, truth):
    ds = MiddleburyDataset(example["middlebury"])
    assert len(ds) == N
    for i in range(N):
        item = ds[i]
        _assert_equal(item, truth[i], KEYS)
        assert item["name"] == f"trainingQ/scene{i:02d}/im0.png"
        c = item["calib"]
        assert (c.focal, c.baseline, c.cx, c.cy, c.doffs) == (1.5 * W, 100.0, (W - 1) / 2, (H - 1) / 2, 0.0)


def test_middlebury_inf_and_mask_convention(example, tmp_path, truth):
    root = _copy(example, "middlebury", tmp_path)
    scene = root / "trainingQ" / "scene00"
    disp = truth[0]["disp"].clone()
    disp[:4, :4] = float("inf")  # Middlebury: unknown disparity
    mask = torch.full((H, W), 255, dtype=torch.uint8)  # 255 non-occluded
    mask[:4, :4] = 0  # 0: no ground truth
    mask[10:12, :] = 128  # 128: occluded
    mask[20, 0:3] = 0  # no ground truth although disp0GT has a value: 0 as well
    stereo_io.write_pfm(scene / "disp0GT.pfm", disp)
    stereo_io.write_image(scene / "mask0nocc.png", mask)
    (scene / "disp1GT.pfm").unlink()  # right view absent: None
    item = MiddleburyDataset(root)[0]
    expected = truth[0]["disp"].clone()
    expected[:4, :4] = 0
    expected[20, 0:3] = 0
    assert torch.equal(item["disp"], expected)
    assert torch.equal(item["occ_mask"], mask == 128)
    assert item["occ_mask_right"] is None and item["disp_right"] is None


def test_middlebury_test_split_and_errors(example, tmp_path, truth):
    root = _copy(example, "middlebury", tmp_path)
    scene = root / "testQ" / "sceneX"
    scene.mkdir(parents=True)
    for f in ("im0.png", "im1.png", "calib.txt"):
        shutil.copy(root / "trainingQ/scene00" / f, scene / f)
    item = MiddleburyDataset(root, split="testQ")[0]
    _assert_equal(item, truth[0], ("left", "right"))
    assert not item["disp"].any() and item["occ_mask"] is None and item["calib"] is not None
    with pytest.raises(FileNotFoundError, match="trainingF"):
        MiddleburyDataset(root, split="trainingF")
    (root / "trainingQ/scene01/disp0GT.pfm").unlink()
    ds = MiddleburyDataset(root)
    with pytest.raises(FileNotFoundError, match="disp0GT.pfm"):
        ds[1]
    (tmp_path / "m2" / "trainingQ").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no scene folders"):
        MiddleburyDataset(tmp_path / "m2")


def test_open_dataset_defaults_and_unknown_name(example, truth):
    assert isinstance(open_dataset("sceneflow", example["sceneflow"]), SceneFlowDataset)
    assert open_dataset("sceneflow", example["sceneflow"]).split_folder == "TEST"
    assert open_dataset("kitti2015", example["kitti2015"], split="testing")[0]["occ_mask"] is None
    assert len(open_dataset("middlebury", example["middlebury"])) == N
    syn = open_dataset("synthetic", None, n=3, height=H, width=W)
    assert len(syn) == 3 and torch.equal(syn[0]["left"], truth[0]["left"])
    assert len(open_dataset("synthetic", None)) == 8
    with pytest.raises(ValueError, match="root and split"):
        open_dataset("synthetic", "/somewhere")
    with pytest.raises(ValueError) as e:
        open_dataset("eth3d", "/somewhere")
    for name in DATASET_NAMES:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="unknown dataset"):
        write_example_dataset("synthetic", "/tmp/never_written")


def test_collate(example, truth):
    kitti = Kitti2015Dataset(example["kitti2015"])
    batch = collate([kitti[0], kitti[1]])
    assert batch["left"].shape == (2, 3, H, W) and batch["left"].dtype == torch.uint8
    assert torch.equal(batch["disp"][1], truth[1]["disp"])
    assert batch["occ_mask"].shape == (2, H, W)
    assert batch["occ_mask_right"] is None and batch["disp_right"] is None and batch["calib"] is None
    assert batch["name"] == ["training/image_2/000000_10.png", "training/image_2/000001_10.png"]
    loader = torch.utils.data.DataLoader(kitti, batch_size=2, collate_fn=collate)
    assert torch.equal(next(iter(loader))["right"], batch["right"])
    mixed = dict(kitti[0], occ_mask=None)
    with pytest.raises(ValueError, match="occ_mask"):
        collate([kitti[0], mixed])
    small = {k: (v[..., :-1] if isinstance(v, torch.Tensor) else v) for k, v in kitti[1].items()}
    with pytest.raises(ValueError, match="shape"):
        collate([kitti[0], small])
    with pytest.raises(ValueError, match="no items"):
        collate([])

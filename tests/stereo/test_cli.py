"""The stereo commands end to end on tiny generated data: infer (files and the point cloud's formula), eval (the
metrics of the predictions), train (checkpoints in the published layout, metrics CSV, resume), and user errors as
one line with exit status 2."""
import csv
import json
import os

import pytest
import torch

from tlv_fast.models import STTR
from tlv_fast.stereo import cli
from tlv_fast.stereo.datasets import open_dataset, write_example_dataset
from tlv_fast.stereo.geometry import disparity_to_points
from tlv_fast.stereo.inference import load_model, predict
from tlv_fast.stereo.io import read_image, read_pfm, read_ply, write_image
from tlv_fast.stereo.metrics import image_counts, summarize
from tlv_fast.stereo.synthetic import synthetic_stereo
from tlv_fast.stereo.training import published_state_dict

from helpers import REPO

H, W = 128, 144


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    s = synthetic_stereo(H, W, seed=5)
    write_image(d / "left.png", s["left"])
    write_image(d / "right.png", s["right"])
    return d


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A checkpoint of `stereo train` (tiny architecture, one step): also what eval and infer load."""
    out = tmp_path_factory.mktemp("run")
    status = cli.main(["train", "--dataset", "synthetic", "--out", str(out), "--preset", "tiny", "--epochs", "1",
                       "--max-steps", "1", "--crop", f"{H}x{W}"])
    assert status == 0
    return out / "epoch_0.pth.tar"


def test_infer_writes_disparity_occlusion_and_the_formulas_point_cloud(pair, tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    status = cli.main(["infer", str(pair / "left.png"), str(pair / "right.png"), "--out", str(out), "--checkpoint",
                       str(tiny_checkpoint), "--focal", "100", "--baseline", "0.5", "--device", "cpu"])
    assert status == 0
    assert "RANDOM" not in capsys.readouterr().err
    disp = read_pfm(out / "disparity.pfm")
    assert disp.shape == (H, W)
    model, random = load_model(str(tiny_checkpoint))
    assert not random
    pred = predict(model, read_image(pair / "left.png"), read_image(pair / "right.png"))
    assert torch.equal(disp, pred["disparity"])  # the PFM holds exactly the prediction
    assert read_image(out / "disparity.png").shape == (3, H, W)
    assert read_image(out / "occlusion.png").shape == (3, H, W)
    points, colors = read_ply(out / "points.ply")
    visible = pred["occlusion"] <= 0.5
    expect = disparity_to_points(disp, 100.0, 0.5, valid=visible)
    assert len(points) > 0 and torch.equal(points, expect)
    keep = visible & (disp > 0) & torch.isfinite(disp)
    assert torch.equal(colors, read_image(pair / "left.png")[:, keep].T)


def test_infer_without_checkpoint_says_the_weights_are_random(pair, tmp_path, capsys):
    status = cli.main(["infer", str(pair / "left.png"), str(pair / "right.png"), "--out", str(tmp_path), "--preset",
                       "tiny"])
    assert status == 0
    assert "RANDOM weights" in capsys.readouterr().err
    assert not (tmp_path / "points.ply").exists()  # no camera, no point cloud


def test_infer_pads_images_under_the_minimum_and_crops_back(tmp_path):
    model, _ = load_model(None, preset="tiny")
    s = synthetic_stereo(100, 130, seed=1, max_disparity=12)
    pred = predict(model, s["left"], s["right"])
    assert pred["disparity"].shape == (100, 130) and torch.isfinite(pred["disparity"]).all()


def test_infer_with_a_calibration_file(pair, tmp_path, tiny_checkpoint):
    calib = tmp_path / "calib.txt"
    calib.write_text("cam0=[200 0 70; 0 200 60; 0 0 1]\ncam1=[200 0 72; 0 200 60; 0 0 1]\ndoffs=2\nbaseline=150\n"
                     "width=144\nheight=128\nndisp=64\n")
    status = cli.main(["infer", str(pair / "left.png"), str(pair / "right.png"), "--out", str(tmp_path / "o"),
                       "--checkpoint", str(tiny_checkpoint), "--calib", str(calib), "--preview"])
    assert status == 0
    preview = read_image(tmp_path / "o" / "preview.png")  # image, disparity, occlusion, point cloud
    assert preview.shape[2] > 3 * preview.shape[1] and preview.float().std() > 10
    points, _ = read_ply(tmp_path / "o" / "points.ply")
    model, _ = load_model(str(tiny_checkpoint))
    pred = predict(model, read_image(pair / "left.png"), read_image(pair / "right.png"))
    # Middlebury: depth = f B / (d + doffs), principal point from cam0
    expect = disparity_to_points(pred["disparity"], 200.0, 150.0, cx=70.0, cy=60.0, valid=pred["occlusion"] <= 0.5,
                                 doffs=2.0)
    assert len(points) > 0 and torch.equal(points, expect)


@pytest.mark.parametrize("name", ["sceneflow", "kitti2015", "middlebury"])
def test_eval_reports_the_metrics_of_the_predictions(name, tmp_path, tiny_checkpoint, capsys):
    root = write_example_dataset(name, tmp_path / name, num_pairs=2, height=H, width=W)
    status = cli.main(["eval", "--dataset", name, "--root", str(root), "--checkpoint", str(tiny_checkpoint),
                       "--json", "--limit", "1"])
    assert status == 0
    result = json.loads(capsys.readouterr().out)
    data = open_dataset(name, str(root))
    model, _ = load_model(str(tiny_checkpoint))
    counts = []
    for i in range(1):  # --limit 1: only the first pair
        item = data[i]
        p = predict(model, item["left"], item["right"])
        occ = item.get("occ_mask")
        counts.append(image_counts(p["disparity"], item["disp"], valid=item["disp"] > 0,
                                   occlusion=p["occlusion"] if occ is not None else None, occ_mask=occ))
    expect = summarize(counts)
    assert result["images"] == 1
    for key in ("epe", "d1_all", "px3", "pixels"):
        assert result[key] == pytest.approx(expect[key]), key
    assert ("occ_iou" in result) == ("occ_iou" in expect)


def test_train_writes_published_checkpoints_and_resumes(tmp_path, tiny_checkpoint):
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    assert {"state_dict", "optimizer", "lr_scheduler", "epoch", "best_pred"} <= set(ckpt)
    rows = _rows(tiny_checkpoint.parent / "metrics.csv")
    assert len(rows) == 1 and rows[0]["epoch"] == "0" and float(rows[0]["loss"]) > 0
    # STTR.from_checkpoint loads it (with the recorded configuration)
    model, _ = load_model(str(tiny_checkpoint))
    assert model.config.dim == 16
    # resume: the next epoch, the same folder
    out = tiny_checkpoint.parent
    status = cli.main(["train", "--dataset", "synthetic", "--out", str(out), "--preset", "tiny", "--epochs", "2",
                       "--max-steps", "1", "--crop", f"{H}x{W}", "--resume", str(tiny_checkpoint)])
    assert status == 0
    rows = _rows(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert torch.load(out / "epoch_1.pth.tar", weights_only=True)["epoch"] == 1


def test_published_state_dict_has_exactly_the_published_keys():
    keys = {}
    with open(os.path.join(REPO, "tests", "data", "sttr_published_keys.txt")) as f:
        for line in f:
            if not line.startswith("#") and line.strip():
                name, shape = line.split()
                keys[name] = () if shape == "-" else tuple(int(s) for s in shape.split(","))
    sd = published_state_dict(STTR())
    assert {k: tuple(v.shape) for k, v in sd.items()} == keys
    assert STTR.from_checkpoint({"state_dict": sd}) is not None


@pytest.mark.parametrize("argv,match", [
    (["infer", "nope.png", "nope.png", "--out", "{tmp}"], "LEFT nope.png: no such file"),
    (["infer", "{left}", "{right}", "--out", "{tmp}", "--focal", "100"], "--focal and --baseline go together"),
    (["infer", "{left}", "{right}", "--out", "{tmp}", "--device", "cuda:0"], None),
    (["infer", "{left}", "{right}", "--out", "{tmp}", "--checkpoint", "missing.pth"], "--checkpoint missing.pth"),
    (["eval", "--dataset", "kitti2015", "--root", "{tmp}/none"], "--dataset kitti2015 --root"),
    (["eval", "--dataset", "middlebury"], "--root is required"),
    (["train", "--dataset", "synthetic", "--out", "{tmp}", "--resume", "nothing.tar"], "--resume nothing.tar"),
])
def test_user_errors_are_one_line_and_exit_2(argv, match, pair, tmp_path, capsys):
    if "cuda:0" in argv and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA (checks the message for a missing GPU)")
    argv = [a.format(tmp=tmp_path, left=pair / "left.png", right=pair / "right.png") for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert (match or "CUDA is not available") in err


def test_bad_option_values_exit_2_argparse_style(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--dataset", "synthetic", "--out", "x", "--crop", "64x64"])
    assert e.value.code == 2 and ">= 121" in capsys.readouterr().err


def test_console_script_and_module_entry_points(tmp_path):
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-m", "tlv_fast.stereo", "eval", "--dataset", "middlebury"],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2 and "--root is required" in res.stderr
    from tlv_fast.cli import main
    assert main(["stereo", "eval", "--dataset", "middlebury"]) == 2
    assert main(["nope"]) == 2

"""Stereo metrics against values computed by hand on constructed predictions."""
import math

import pytest
import torch

from tlv_fast.stereo.metrics import image_counts, per_image, summarize


def test_counts_and_metrics_on_a_constructed_prediction():
    gt = torch.tensor([[10.0, 20.0, 100.0, 0.0],
                       [50.0, 4.0, 80.0, 30.0]])
    # errors: 1, 4 (> 3 px but 20 % of 20 -> D1), 4 (> 3 px, 4 % of 100 -> not D1), -, 0, 10 (D1), 2, 3 (not > 3)
    pred = torch.tensor([[11.0, 24.0, 104.0, 7.0],
                         [50.0, 14.0, 82.0, 33.0]])
    c = image_counts(pred, gt)
    assert c == {"pixels": 7, "abs_error": 24.0, "px3": 3, "d1": 2}
    m = per_image(c)
    assert m["epe"] == pytest.approx(24 / 7) and m["d1_all"] == pytest.approx(2 / 7)
    assert m["px3"] == pytest.approx(3 / 7) and m["images"] == 1 and "occ_iou" not in m


def test_occluded_pixels_leave_the_disparity_metrics_and_enter_the_iou():
    gt = torch.full((2, 3), 10.0)
    pred = torch.tensor([[10.0, 30.0, 10.0], [10.0, 10.0, 16.0]])
    occ_gt = torch.tensor([[False, True, False], [False, False, True]])
    occ_p = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.6, 0.1]])  # predicted occluded: (0,0), (0,1), (1,1)
    c = image_counts(pred, gt, occlusion=occ_p, occ_mask=occ_gt)
    assert c["pixels"] == 4 and c["abs_error"] == 0.0
    # p & occ = {(0,1)}; ~p & valid = {(0,2), (1,0)} -> 3
    # (p & valid) | occ = {(0,0), (1,1), (0,1), (1,2)} -> 4; (~p & occ) | valid = {(1,2), (0,0), (0,2), (1,0), (1,1)}
    assert (c["occ_inter"], c["occ_union"]) == (3, 9)
    assert per_image(c)["occ_iou"] == pytest.approx(3 / 9)


def test_dataset_figures_are_pixel_weighted():
    a = image_counts(torch.tensor([[2.0]]), torch.tensor([[1.0]]))              # 1 pixel, error 1
    b = image_counts(torch.tensor([[5.0, 5.0, 5.0]]), torch.tensor([[5.0, 5.0, 1.0]]))  # error 4 on one of 3
    m = summarize([a, b])
    assert m["epe"] == pytest.approx(5 / 4) and m["px3"] == pytest.approx(1 / 4) and m["d1_all"] == pytest.approx(1 / 4)
    assert m["images"] == 2 and m["pixels"] == 4


def test_valid_mask_and_non_finite_ground_truth():
    gt = torch.tensor([[1.0, float("inf"), 3.0]])
    pred = torch.tensor([[1.0, 0.0, 9.0]])
    assert image_counts(pred, gt)["pixels"] == 2
    c = image_counts(pred, gt, valid=torch.tensor([[True, True, False]]))
    assert c == {"pixels": 1, "abs_error": 0.0, "px3": 0, "d1": 0}
    assert math.isnan(summarize([image_counts(pred, torch.zeros(1, 3))])["epe"])


def test_bad_input_names_the_argument():
    gt = torch.ones(2, 2)
    with pytest.raises(ValueError, match="pred must have shape"):
        image_counts(torch.ones(2, 3), gt)
    with pytest.raises(ValueError, match="valid must be a bool"):
        image_counts(gt, gt, valid=torch.ones(2, 2))
    with pytest.raises(ValueError, match="both .* or neither"):
        image_counts(gt, gt, occlusion=gt)

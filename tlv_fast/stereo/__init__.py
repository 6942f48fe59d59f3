"""STTR as a stereo tool: image and disparity files, calibration and point clouds, the standard datasets' layouts,
metrics, the published training recipe, and the `tlv-fast stereo infer|eval|train` commands (tlv_fast/stereo/cli.py).

    from tlv_fast.stereo import read_image, load_model, predict, disparity_to_points, write_ply
    model, _ = load_model("sceneflow_pretrained_model.pth.tar")
    out = predict(model, read_image("left.png"), read_image("right.png"))
    write_ply("points.ply", disparity_to_points(out["disparity"], focal, baseline, valid=out["occlusion"] <= 0.5))
"""
from .datasets import (
           Kitti2015Dataset,
           MiddleburyDataset,
           SceneFlowDataset,
           SyntheticStereoDataset,
           collate,
           open_dataset,
           write_example_dataset,
)
from .geometry import (
           Calibration,
           disparity_to_depth,
           disparity_to_points,
           point_mask,
           points_from_calibration,
           read_calibration,
           read_kitti_calibration,
           read_middlebury_calibration,
)
from .inference import load_model, predict
from .io import (
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
from .metrics import image_counts, per_image, summarize
from .synthetic import synthetic_batch, synthetic_stereo

__all__ = ["Calibration", "Kitti2015Dataset", "MiddleburyDataset", "SceneFlowDataset", "SyntheticStereoDataset",
           "collate", "colorize_disparity", "disparity_to_depth", "disparity_to_points", "image_counts", "load_model",
           "open_dataset", "per_image", "point_mask", "points_from_calibration", "predict", "read_calibration",
           "read_image", "read_kitti_calibration", "read_kitti_disparity", "read_middlebury_calibration",
           "read_pfm", "read_ply", "summarize", "synthetic_batch", "synthetic_stereo", "write_disparity_png",
           "write_example_dataset", "write_image", "write_kitti_disparity", "write_pfm", "write_ply",
           "write_probability_png"]

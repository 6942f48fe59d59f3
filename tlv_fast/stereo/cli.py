"""`tlv-fast stereo ...` / `python -m tlv_fast.stereo ...`: STTR on your own images and datasets.

    stereo infer LEFT RIGHT --out DIR [--checkpoint P] [--focal F --baseline B | --calib FILE] [--device D] [--fp16]
    stereo eval --dataset {sceneflow,kitti2015,middlebury,synthetic} --root DIR [--checkpoint P] [--limit N] [--json]
    stereo train --dataset ... --root DIR --out DIR [--resume CKPT] [--epochs N] [--crop HxW] ...

User errors (a missing file, a bad option, CUDA asked for where there is none) are one line on stderr and exit status
2; anything else is a bug and keeps its traceback.
"""
import argparse
import json
import os
import sys
import time

import torch

SPLITS = {"sceneflow": ("test", "train"), "kitti2015": ("training", "training"),
          "middlebury": ("trainingQ", "trainingQ"), "synthetic": (None, None)}  # (eval default, train default)


class UserError(Exception):
    """A mistake in the command line or its files: reported as one line, exit status 2."""


def _progress(done, total, text, state={"last": -1.0}):  # noqa: B006 (a throttle shared by the calls)
    frac = done / max(total, 1)
    tty = sys.stderr.isatty()
    if not tty and done < total and frac - state["last"] < 0.1:
        return
    state["last"] = frac if done < total else -1.0
    bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
    sys.stderr.write(f"{chr(13) if tty else ''}[{bar}] {done}/{total} {text}" + ("" if tty and done < total else "\n"))
    sys.stderr.flush()


def _device(name):
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name!r} is not a device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {name!r}")
    return device


def _load(args, device):
    from .inference import load_model
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        raise UserError(f"--checkpoint {args.checkpoint}: no such file")
    try:
        model, random = load_model(args.checkpoint, preset=args.preset, device=device)
    except RuntimeError as e:
        raise UserError(f"--checkpoint {args.checkpoint}: {e}") from None
    if random:
        print(f"note: no --checkpoint given: the model ({args.preset} architecture) has RANDOM weights, so its "
              "disparities are meaningless; pass --checkpoint with trained weights (the published STTR files, or "
              "one written by `stereo train`)", file=sys.stderr)
    return model


def _fp16(args, device):
    if args.fp16 and device.type != "cuda":
        raise UserError("--fp16 needs a CUDA device (float16 autocast); drop it on the CPU")
    return args.fp16


def _read_pair(left, right):
    from .io import read_image
    imgs = []
    for flag, path in (("LEFT", left), ("RIGHT", right)):
        if not os.path.isfile(path):
            raise UserError(f"{flag} {path}: no such file")
        try:
            imgs.append(read_image(path))
        except (OSError, ValueError) as e:
            raise UserError(f"{flag} {path}: cannot read it as an image ({e})") from None
    if imgs[0].shape != imgs[1].shape:
        raise UserError(f"LEFT and RIGHT must have the same size, got {tuple(imgs[0].shape[1:])} and "
                        f"{tuple(imgs[1].shape[1:])} (H, W)")
    return imgs


def _out_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {path}: cannot create the folder ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"--out {path}: the folder is not writable")
    return path


def _camera(args):
    """(focal, baseline, cx, cy, doffs) from --calib or --focal/--baseline, or None."""
    from .geometry import read_calibration
    if args.calib is not None:
        if args.focal is not None or args.baseline is not None:
            raise UserError("pass either --calib or --focal/--baseline, not both")
        if not os.path.isfile(args.calib):
            raise UserError(f"--calib {args.calib}: no such file")
        try:
            c = read_calibration(args.calib)
        except ValueError as e:
            raise UserError(f"--calib {args.calib}: {e}") from None
        return c.focal, c.baseline, c.cx, c.cy, c.doffs
    if (args.focal is None) != (args.baseline is None):
        raise UserError("--focal and --baseline go together (the point cloud needs both)")
    if args.focal is None:
        return None
    for flag, v in (("--focal", args.focal), ("--baseline", args.baseline)):
        if not v > 0:
            raise UserError(f"{flag} must be > 0, got {v}")
    return args.focal, args.baseline, args.cx, args.cy, 0.0


def write_preview(path, left, disp, occ, points=None, colors=None, max_disp=None, max_points=20000):
    """One PNG for a reader: the left image, the disparity (colour bar in pixels), the occlusion probability and,
    with a camera, the point cloud (a subsample of max_points within the 2-98 % range of each coordinate, coloured
    by depth; points.ply has them all, coloured from the image)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = 4 if points is not None else 3
    h, w = disp.shape
    fig = plt.figure(figsize=(4.2 * panels, 4.2 * h / w + 0.9), dpi=110)
    ax = fig.add_subplot(1, panels, 1)
    ax.imshow(left.permute(1, 2, 0).numpy())
    ax.set_title("left image")
    ax.axis("off")
    ax = fig.add_subplot(1, panels, 2)
    im = ax.imshow(disp.numpy(), cmap="turbo", vmin=0, vmax=max_disp or float(disp.max()))
    ax.set_title("disparity")
    ax.axis("off")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="pixels")
    ax = fig.add_subplot(1, panels, 3)
    im = ax.imshow(occ.numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_title("occlusion")
    ax.axis("off")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="probability")
    if points is not None:
        ax = fig.add_subplot(1, panels, 4, projection="3d")
        idx = torch.randperm(len(points), generator=torch.Generator().manual_seed(0))[:max_points]
        p = points[idx].numpy()
        lo, hi = torch.quantile(points[idx].double(), torch.tensor([0.02, 0.98], dtype=torch.float64), dim=0).numpy()
        keep = ((p >= lo) & (p <= hi)).all(1)  # the far tail of near-zero disparities would flatten the rest
        ax.scatter(p[keep, 0], p[keep, 2], -p[keep, 1], c=p[keep, 2], cmap="turbo_r", s=0.6, depthshade=False)
        ax.set_xlabel("X")
        ax.set_ylabel("Z (depth)")
        ax.set_zlabel("-Y")
        ax.view_init(elev=25, azim=-60)
        ax.set_title(f"point cloud ({len(points)} points)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def infer(args):
    """Disparity, occlusion and (with a camera) a coloured point cloud of one pair."""
    from .geometry import disparity_to_points, point_mask
    from .inference import predict
    from .io import write_disparity_png, write_pfm, write_ply, write_probability_png
    device = _device(args.device)
    fp16 = _fp16(args, device)
    if args.preview:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--preview needs matplotlib (pip install matplotlib)") from None
    left, right = _read_pair(args.left, args.right)
    camera = _camera(args)
    out = _out_dir(args.out)
    model = _load(args, device)
    t0 = time.perf_counter()
    pred = predict(model, left, right, fp16=fp16)
    seconds = time.perf_counter() - t0
    disp, occ = pred["disparity"], pred["occlusion"]
    written = [os.path.join(out, n) for n in ("disparity.pfm", "disparity.png", "occlusion.png")]
    write_pfm(written[0], disp)
    visible = occ <= 0.5
    write_disparity_png(written[1], disp, max_disp=args.max_disp, valid=visible if args.mask_occluded else None)
    write_probability_png(written[2], occ)
    if camera is not None:
        focal, baseline, cx, cy, doffs = camera
        keep = point_mask(disp, valid=visible, doffs=doffs)
        points = disparity_to_points(disp, focal, baseline, cx=cx, cy=cy, valid=visible, doffs=doffs)
        written.append(os.path.join(out, "points.ply"))
        write_ply(written[-1], points, left[:, keep].T.contiguous())
    if args.preview:
        written.append(os.path.join(out, "preview.png"))
        write_preview(written[-1], left, disp, occ, points if camera is not None else None,
                      left[:, keep].T if camera is not None else None, args.max_disp)
    print(f"stereo infer: {left.shape[2]} x {left.shape[1]} pair in {seconds:.2f} s on {device}; disparity "
          f"{float(disp.min()):.1f} .. {float(disp.max()):.1f} px, {100 * float((~visible).float().mean()):.1f} % "
          f"occluded; wrote " + ", ".join(written))
    return 0


def _dataset(args, train):
    from .datasets import open_dataset
    split = args.split or SPLITS[args.dataset][1 if train else 0]
    kwargs = {} if split is None else {"split": split}
    if args.dataset == "synthetic":
        if args.root is not None or args.split is not None:
            raise UserError("--dataset synthetic makes its pairs: no --root or --split (--pairs sets how many)")
        kwargs = {"n": args.pairs, "seed": 0 if train else 10_000}  # evaluation pairs differ from training pairs
    if args.root is None and args.dataset != "synthetic":
        raise UserError(f"--root is required for --dataset {args.dataset} (the folder that holds the dataset)")
    try:
        return open_dataset(args.dataset, args.root, **kwargs)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--dataset {args.dataset} --root {args.root}: {e}") from None


def evaluate(args):
    """EPE, D1-all, 3-px error and occlusion IoU over a dataset (tlv_fast.stereo.metrics)."""
    from .inference import predict
    from .metrics import image_counts, per_image, summarize
    device = _device(args.device)
    fp16 = _fp16(args, device)
    data = _dataset(args, train=False)
    n = len(data) if args.limit is None else min(args.limit, len(data))
    if n == 0:
        raise UserError(f"--dataset {args.dataset} --root {args.root}: no stereo pairs found")
    model = _load(args, device)
    counts, rows, t0 = [], [], time.perf_counter()
    for i in range(n):
        item = data[i]
        pred = predict(model, item["left"], item["right"], fp16=fp16)
        occ_gt = item.get("occ_mask")
        gt = item["disp"]
        c = image_counts(pred["disparity"], gt, valid=gt > 0, occlusion=pred["occlusion"] if occ_gt is not None
                         else None, occ_mask=occ_gt)
        counts.append(c)
        rows.append({"name": item.get("name", str(i)), **per_image(c)})
        m = summarize(counts)
        _progress(i + 1, n, f"EPE {m['epe']:.3f} px  D1 {100 * m['d1_all']:.2f} %  "
                            f"({time.perf_counter() - t0:.0f} s)")
    result = {"dataset": args.dataset, "root": args.root, "checkpoint": args.checkpoint, **summarize(counts)}
    if args.per_image:
        result["per_image"] = rows
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        occ = f", occlusion IoU {result['occ_iou']:.4f}" if "occ_iou" in result else ""
        print(f"{args.dataset}: {n} pairs, EPE {result['epe']:.4f} px, D1-all {100 * result['d1_all']:.3f} %, "
              f"3-px error {100 * result['px3']:.3f} %{occ} ({result['pixels']} pixels with ground truth)")
    return 0


def _crop(text):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 256x384, got {text!r}") from None
    if h < 121 or w < 121:
        raise argparse.ArgumentTypeError(f"both sides must be >= 121 (the model's minimum), got {text!r}")
    return h, w


def train(args):
    from . import training
    device = _device(args.device)
    data = _dataset(args, train=True)
    if len(data) == 0:
        raise UserError(f"--dataset {args.dataset} --root {args.root}: no stereo pairs found")
    out = _out_dir(args.out)
    if args.resume is not None and not os.path.isfile(args.resume):
        raise UserError(f"--resume {args.resume}: no such file")
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        raise UserError(f"--checkpoint {args.checkpoint}: no such file")
    try:
        training.train(data, out, dataset_name=args.dataset, preset=args.preset, checkpoint=args.checkpoint,
                       resume=args.resume, epochs=args.epochs, crop=args.crop, batch_size=args.batch_size, lr=args.lr,
                       max_steps=args.max_steps, device=device, amp=not args.no_amp, seed=args.seed,
                       workers=args.workers, progress=_progress)
    except training.ResumeError as e:
        raise UserError(f"--resume {args.resume}: {e}") from None
    return 0


def _parser():
    p = argparse.ArgumentParser(prog="tlv-fast stereo", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(q):
        q.add_argument("--checkpoint", help="weights: a published STTR file or a `stereo train` checkpoint "
                                            "(default: random weights, said so)")
        q.add_argument("--preset", default="sttr", choices=["sttr", "small", "tiny"],
                       help="architecture when no checkpoint says otherwise (default: the published one)")
        q.add_argument("--device", help="cpu or cuda (default: cuda when available)")

    def dataset_args(q, train):
        q.add_argument("--dataset", required=True, choices=sorted(SPLITS))
        q.add_argument("--root", help="the dataset's folder (its published layout)")
        splits = ", ".join(f"{k} {v[train]}" for k, v in SPLITS.items() if v[train])
        q.add_argument("--split", help=f"default: {splits}")
        pairs = 64 if train else 8
        q.add_argument("--pairs", type=int, default=pairs,
                       help=f"--dataset synthetic: how many pairs (default {pairs})")

    q = sub.add_parser("infer", help="disparity, occlusion and a point cloud of one rectified pair")
    q.add_argument("left")
    q.add_argument("right")
    q.add_argument("--out", required=True, help="folder for disparity.pfm/.png, occlusion.png, points.ply")
    model_args(q)
    q.add_argument("--fp16", action="store_true", help="float16 autocast (CUDA)")
    q.add_argument("--focal", type=float, help="focal length in pixels (with --baseline: write points.ply)")
    q.add_argument("--baseline", type=float, help="camera baseline (the point cloud's unit)")
    q.add_argument("--cx", type=float, help="principal point column (default: the image centre)")
    q.add_argument("--cy", type=float, help="principal point row (default: the image centre)")
    q.add_argument("--calib", help="KITTI calib_cam_to_cam.txt or Middlebury calib.txt instead of --focal/--baseline")
    q.add_argument("--max-disp", type=float, help="top of disparity.png's colour scale (default: the largest)")
    q.add_argument("--mask-occluded", action="store_true", help="paint occluded pixels black in disparity.png")
    q.add_argument("--preview", action="store_true", help="also preview.png: image, disparity, occlusion and the "
                                                         "point cloud in one figure (needs matplotlib)")
    q.set_defaults(run=infer)

    q = sub.add_parser("eval", help="EPE, D1-all, 3-px error and occlusion IoU over a dataset")
    dataset_args(q, train=False)
    model_args(q)
    q.add_argument("--fp16", action="store_true", help="float16 autocast (CUDA)")
    q.add_argument("--limit", type=int, help="only the first N pairs")
    q.add_argument("--json", action="store_true", help="print the metrics as JSON")
    q.add_argument("--per-image", action="store_true", help="with --json: also every image's metrics")
    q.set_defaults(run=evaluate)

    q = sub.add_parser("train", help="train or fine-tune with the published recipe")
    dataset_args(q, train=True)
    q.add_argument("--out", required=True, help="folder for checkpoints and metrics.csv")
    model_args(q)
    q.add_argument("--resume", help="a checkpoint of this command: continue from its epoch")
    q.add_argument("--epochs", type=int, help="default: the published count for the dataset")
    q.add_argument("--crop", type=_crop, help="the smallest random crop HxW (the published rule: a random size from "
                                               "it up to the image; default: the published one for the dataset)")
    q.add_argument("--batch-size", type=int, help="default: the published one (1 for Scene Flow and KITTI)")
    q.add_argument("--lr", type=float, help="base learning rate (default: published 1e-4; the backbone and "
                                           "regression-head rates keep their published ratios to it)")
    q.add_argument("--max-steps", type=int, help="at most this many steps per epoch")
    q.add_argument("--no-amp", action="store_true", help="fp32 on the GPU (default: float16 mixed precision)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--workers", type=int, default=0, help="data-loading processes")
    q.set_defaults(run=train)
    return p


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "max_steps", "limit", "pairs"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if getattr(args, "lr", None) is not None and not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    try:
        return args.run(args)
    except UserError as e:
        print(f"tlv-fast stereo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tlv-fast stereo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

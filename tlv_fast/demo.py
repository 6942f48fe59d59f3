"""Demos that run on data they make. `python -m tlv_fast.demo stereo --help` (or the `tlv-fast-demo` script).

stereo: trains an STTR on synthetic stereo pairs with exact ground truth (tlv_fast.stereo.synthetic) for a bounded time,
then writes a PNG (left image | ground-truth disparity | predicted disparity | predicted occlusion, with titles,
colour bars in pixels and the metrics when matplotlib is installed) and prints EPE, 3-px error and occlusion IoU on
a held-out pair, before and after training. On a CPU it uses the "small" config at
128 x 192; on a GPU the published config at 256 x 384.
"""
import argparse
import json
import os
import struct
import sys
import time
import zlib

import torch

_ANCHORS = torch.tensor([[0.19, 0.07, 0.23], [0.12, 0.45, 0.85], [0.1, 0.8, 0.65], [0.65, 0.9, 0.2],
                         [0.98, 0.7, 0.15], [0.75, 0.1, 0.1]])  # a perceptual-ish ramp, far (dark) to near (red)


def colorize(x, lo, hi):
    """(H, W) values -> (3, H, W) float RGB in [0, 1] on a fixed ramp between lo and hi."""
    t = ((x - lo) / max(hi - lo, 1e-6)).clamp(0, 1) * (len(_ANCHORS) - 1)
    i = t.floor().long().clamp_max(len(_ANCHORS) - 2)
    f = (t - i)[..., None]
    return (_ANCHORS[i] * (1 - f) + _ANCHORS[i + 1] * f).permute(2, 0, 1)


def write_png(path, rgb):
    """(3, H, W) float in [0, 1] -> an 8-bit RGB PNG (zlib-compressed scanlines, no dependency)."""
    img = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def write_figure(path, left, gt, pred, occlusion, lo, hi, before, after, steps, preset):
    """The four panels with titles, a colour bar in pixels under the disparities (the same ramp as colorize) and
    one for the occlusion probability, and the metrics as the figure's title. Returns the path, or None when
    matplotlib is not installed (the caller then writes the bare panels with write_png)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LinearSegmentedColormap
    except ImportError:
        print("matplotlib is not installed: the PNG has no titles or colour bars (pip install matplotlib)",
              file=sys.stderr)
        return None
    ramp = LinearSegmentedColormap.from_list("tlv_fast_depth", _ANCHORS.tolist())
    h, w = gt.shape
    fig, axes = plt.subplots(1, 4, figsize=(4 * 3.2, 3.2 * h / w + 1.4), constrained_layout=True)
    axes[0].imshow(left.permute(1, 2, 0).clamp(0, 1).numpy())
    axes[0].set_title("left image", fontsize=9)
    for ax, img, title in ((axes[1], gt, "ground-truth disparity"), (axes[2], pred, "predicted disparity")):
        shown = ax.imshow(img.numpy(), cmap=ramp, vmin=lo, vmax=hi)
        ax.set_title(title, fontsize=9)
        fig.colorbar(shown, ax=ax, orientation="horizontal", fraction=0.06, pad=0.04).set_label("pixels", fontsize=8)
    shown = axes[3].imshow(occlusion.clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
    axes[3].set_title("predicted occlusion", fontsize=9)
    fig.colorbar(shown, ax=axes[3], orientation="horizontal", fraction=0.06, pad=0.04).set_label(
        "probability", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])

    def line(m):
        return f"EPE {m['epe']:.2f} px, 3-px error {100 * m['px_error_rate']:.1f} %, occlusion IoU {m['iou']:.3f}"
    fig.suptitle(f"STTR ({preset}) after {steps} steps on synthetic pairs: {line(after)}\n"
                 f"before training: {line(before)}", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _progress(frac, text):
    bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
    sys.stderr.write(f"\r[{bar}] {100 * frac:5.1f}% {text}")
    sys.stderr.flush()


def _evaluate(model, pair, device):
    from .models import STTR, stereo_metrics
    model.eval()
    with torch.no_grad():
        out = model(STTR.preprocess(pair["left"]).to(device), STTR.preprocess(pair["right"]).to(device))
    model.train()
    out = {k: v.cpu() if torch.is_tensor(v) else v for k, v in out.items()}
    return out, stereo_metrics(out["disparity"], out["occlusion"], pair["disp"], pair["occ_mask"])


def stereo(args):
    from .models import STTR, sttr_loss
    from .stereo.synthetic import synthetic_batch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    preset = args.preset or ("sttr" if gpu else "small")
    h, w = args.height or (256 if gpu else 128), args.width or (384 if gpu else 192)
    seconds = args.seconds if args.seconds is not None else (300 if gpu else 150)
    torch.manual_seed(args.seed)
    model = STTR.from_preset(preset, stride=args.stride).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    data = dict(max_disparity=args.max_disparity, disparity_step=args.stride, num_layers=4)
    held_out = synthetic_batch(1, h, w, seed=10**6 + args.seed, **data)
    print(f"STTR preset {preset!r} ({sum(p.numel() for p in model.parameters()):,} parameters) on {device}, "
          f"{h}x{w} synthetic pairs, training for {seconds:.0f} s", file=sys.stderr)
    _, before = _evaluate(model, held_out, device)

    start, step, loss_avg = time.perf_counter(), 0, None
    while time.perf_counter() - start < seconds:
        b = synthetic_batch(args.batch, h, w, seed=args.seed * 10**5 + step * args.batch, **data)
        b = {k: v.to(device) for k, v in b.items()}
        out = model(STTR.preprocess(b["left"]), STTR.preprocess(b["right"]))
        loss = sttr_loss(out, b["disp"], b["occ_mask"], b["occ_mask_right"])["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # published: 0.1 at lr 1e-4
        opt.step()
        step += 1
        loss_avg = loss.item() if loss_avg is None else 0.9 * loss_avg + 0.1 * loss.item()
        _progress(min(1.0, (time.perf_counter() - start) / seconds), f"step {step} loss {loss_avg:.3f}")
    sys.stderr.write("\n")

    out, after = _evaluate(model, held_out, device)
    gt = held_out["disp"][0]
    lo, hi = 0.0, float(gt.max())
    figure = None if args.plain else write_figure(args.out, held_out["left"][0], gt, out["disparity"][0],
                                                    out["occlusion"][0], lo, hi, before, after, step, preset)
    if figure is None:
        gap = torch.ones(3, h, 4)
        panels = [held_out["left"][0], gap, colorize(gt, lo, hi), gap, colorize(out["disparity"][0], lo, hi), gap,
                  out["occlusion"][0].clamp(0, 1).expand(3, -1, -1)]
        write_png(args.out, torch.cat(panels, 2))
    report = {"preset": preset, "device": str(device), "size": [h, w], "steps": step, "seconds": seconds,
              "before": before, "after": after, "png": args.out}
    for name, m in (("before training", before), ("after training", after)):
        print(f"{name:>16}: EPE {m['epe']:.2f} px, 3-px error {100 * m['px_error_rate']:.1f} %, "
              f"occlusion IoU {m['iou']:.3f}")
    print(f"wrote {args.out} (left | ground truth | predicted disparity | occlusion)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tlv_fast.demo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="demo", required=True)
    p = sub.add_parser("stereo", help="train STTR on synthetic stereo pairs; write a PNG and the metrics")
    p.add_argument("--seconds", type=float, help="training time budget (default 150 on CPU, 300 on GPU)")
    p.add_argument("--preset", choices=["sttr", "small", "tiny"], help="model size (default: small on CPU)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--stride", type=int, default=3, help="attention stride (default 3)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-disparity", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default="stereo_demo.png", help="PNG path")
    p.add_argument("--json", help="also write the metrics as JSON here")
    p.add_argument("--plain", action="store_true",
                   help="the bare panels side by side (no titles, colour bars or metrics; needs no matplotlib)")
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return stereo(args)


def _check_args(parser, args):
    """User errors become one line and exit status 2 (argparse's convention), before any training starts."""
    for name in ("batch", "stride", "max_disparity"):
        value = getattr(args, name)
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value < 121:
            parser.error(f"--{name} must be >= 121 (the model's minimum image size), got {value}")
    if args.seconds is not None and not args.seconds >= 0:
        parser.error(f"--seconds must be >= 0, got {args.seconds}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            parser.error(f"--device {args.device!r} is not a device ({e})")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available here (torch {torch.__version__}); use "
                         "--device cpu")
        if device.type not in ("cpu", "cuda"):
            parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    for flag, path in (("--out", args.out), ("--json", args.json)):
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path)) or "."
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK) or os.path.isdir(path):
            parser.error(f"{flag} {path}: cannot write there (the folder {folder} is missing or not writable)")


if __name__ == "__main__":
    main()

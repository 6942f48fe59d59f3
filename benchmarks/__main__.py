"""Benchmark runner: providers side by side in one run; prints a table, writes a CSV and a PNG.

    python -m benchmarks attention --preset milestone          # the issue's shape, every provider
    python -m benchmarks attention --preset sweep --dtype fp16  # N = 512..16384
    python -m benchmarks attention --preset models              # ViT / BERT / GPT-decode / STTR shapes

On a machine without CUDA it runs the tiny `smoke` preset and says that the numbers are not speed.
"""
import argparse
import os
import sys

import torch

from . import attention
from .common import Progress, bench_ms, environment, plot, print_table, write_csv

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("op", nargs="?", default="attention", choices=["attention"])
    p.add_argument("--preset", default=None, help="milestone (GPU default), sweep, models, smoke (CPU default)")
    p.add_argument("--providers", default=None, help="comma-separated subset of " + ",".join(attention.PROVIDERS))
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--out", default="bench_out", help="folder for the CSV and the PNG")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment()
    preset = args.preset or ("milestone" if device == "cuda" else "smoke")
    if device == "cpu":
        print("No CUDA device: running the tiny smoke preset on the CPU. THESE NUMBERS ARE NOT SPEED; they only "
              "show that the runner works (tlv_fast resolves to its reference backend on CPU tensors).")
        preset = "smoke" if args.preset is None else preset
    providers = args.providers.split(",") if args.providers else (
        attention.PROVIDERS if device == "cuda" else attention.CPU_PROVIDERS)
    cases = attention.presets(preset)
    print(f"{args.op} / {preset} / {args.dtype} on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
          f"{env['date']})")

    rows = []
    progress = Progress(len(cases) * len(providers), preset)
    for case in cases:
        for prov in providers:
            rows.append(attention.run_case(case, prov, DTYPES[args.dtype], device, bench_ms))
            r = rows[-1]
            progress.step(f"{case.name} {case.mode} {prov}: " + (
                f"{r['ms']:.3f} ms {r['tflops']:.1f} TFLOP/s" if r["status"] == "ok" else r["status"]))

    for metric in ("tflops", "ms"):
        table = []
        for case in cases:
            line = {"case": case.name, "mode": case.mode}
            for r in rows:
                if r["case"] == case.name and r["mode"] == case.mode:
                    line[r["provider"]] = r.get(metric) if r["status"] == "ok" else r["status"][:3]
            table.append(line)
        print_table(table, ["case", "mode", *providers], f"{metric} ({'TFLOP/s' if metric == 'tflops' else 'median'})")
    failed = [r for r in rows if r["status"] not in ("ok",) and not r["status"].startswith("n/a")]
    for r in rows:
        if r["status"] != "ok":
            print(f"  {r['provider']:>15} {r['case']} {r['mode']}: {r['status']}")
        elif r.get("max_err") is not None and r["max_err"] > 0.05:
            print(f"  WARNING {r['provider']} {r['case']} {r['mode']}: max error {r['max_err']:.3g} vs eager fp32")

    stem = os.path.join(args.out, f"{args.op}-{preset}-{args.dtype}-{device}")
    for r in rows:
        r.update({k: env[k] for k in ("date", "device", "torch", "triton")})
    print(f"\nCSV: {write_csv(rows, stem + '.csv')}")
    for r in rows:
        r["panel"] = f"{r['mode']} D{r['D']}{' causal' if r['causal'] else ''}{' ' + r['mask'] if r['mask'] != 'none' else ''}"
        r["N (keys)"] = r["Nk"]
        r["TFLOP/s"] = r.get("tflops")
    png = plot([r for r in rows if r["status"] == "ok"], stem + ".png", "N (keys)", "TFLOP/s", "provider", "panel",
               f"{args.op} {preset} {args.dtype}, {env['device']}" + (" (CPU: not speed)" if device == "cpu" else ""))
    if png:
        print(f"PNG: {png}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

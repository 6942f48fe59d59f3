"""Benchmark runner: providers side by side in one run; prints a table, writes a CSV and a PNG.

    python -m benchmarks attention --preset milestone          # B=4 H=16 N=4096, every provider
    python -m benchmarks attention --preset sweep --dtype fp16  # N = 512..16384
    python -m benchmarks attention --preset models              # ViT / BERT / GPT-decode / STTR shapes
    python -m benchmarks sinkhorn --preset h200 --dtype fp32    # 960 problems of 321 x 321, 10 iterations
    python -m benchmarks sinkhorn --preset cpu --dtype fp32     # the C++ CPU path: 64 problems
    python -m benchmarks relpos --preset sttr --dtype fp16      # STTR attention: 960 lines, W = 320, 8 x 16
    python -m benchmarks models --preset anchors                # BERT-base, GPT-2 small, ViT-B/16 vs transformers
    python -m benchmarks sttr --preset h200                     # STTR 960x540 / 1080p inference, 640x384 training

Attention on a machine without CUDA runs the tiny `smoke` preset and says that the numbers are not speed. The
Sinkhorn `cpu` preset measures the C++ CPU implementation, which is what runs on CPU tensors.
"""
import argparse
import os
import sys

import torch

from . import attention, models, relpos, sinkhorn, sttr
from .common import Progress, bench_ms, environment, plot, print_table, write_csv

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
OPS = {"attention": attention, "sinkhorn": sinkhorn, "relpos": relpos, "models": models, "sttr": sttr}
UNITS = {"tflops": "TFLOP/s", "gbps": "GB/s against the one-read-one-write floor", "ms": "median ms",
         "peak_MiB": "MiB peak memory beyond the inputs"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["overhead"], ["compile-stats"]):  # a stand-in sm_90 driver: before anything loads triton
        from . import compile_stats, overhead
        return {"overhead": overhead, "compile-stats": compile_stats}[argv[0]].main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("op", nargs="?", default="attention", choices=list(OPS))
    p.add_argument("--preset", default=None, help="attention: milestone, sweep, models, smoke; "
                                                  "sinkhorn: h200, cpu, sizes, smoke; relpos: sttr, smoke; "
                                                  "models: anchors, smoke; sttr: h200, smoke")
    p.add_argument("--providers", default=None, help="comma-separated subset of the op's providers")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="default bf16 (attention, models), fp32 (sinkhorn), fp16 (relpos)")
    p.add_argument("--out", default="bench_out", help="folder for the CSV and the PNG")
    args = p.parse_args(argv)
    op = OPS[args.op]
    cpu = not torch.cuda.is_available()
    dtype_name = args.dtype or {"sinkhorn": "fp32", "relpos": "fp16", "models": "fp32" if cpu else "bf16",
                                "sttr": "fp32" if cpu else "fp16"}.get(args.op, "bf16")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment()
    preset = args.preset or op.default_preset(device)
    not_speed = device == "cpu" and args.op != "sinkhorn"
    if not_speed:
        print(f"No CUDA device: {args.op} runs on the CPU. THESE NUMBERS ARE NOT SPEED; they only show that the "
              "runner works (tlv_fast resolves to its reference backend on CPU tensors).")
    providers = args.providers.split(",") if args.providers else (op.PROVIDERS if device == "cuda" else
                                                                  op.CPU_PROVIDERS)
    cases = op.presets(preset)
    print(f"{args.op} / {preset} / {dtype_name} on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
          f"{env['date']})")

    rows = []
    progress = Progress(len(cases) * len(providers), preset)
    for case in cases:
        for prov in providers:
            r = op.run_case(case, prov, DTYPES[dtype_name], device, bench_ms)
            rows.append(r)
            progress.step(f"{case.name} {case.mode} {prov}: " + (
                f"{r['ms']:.3f} ms {r[op.METRIC]:.1f} {UNITS[op.METRIC].split()[0]}" if r["status"] == "ok"
                else r["status"]))

    metrics = list(dict.fromkeys([op.METRIC, "ms"] + (["peak_MiB"] if any("peak_MiB" in r for r in rows) else [])))
    for metric in metrics:
        table = []
        for case in cases:
            line = {"case": case.name, "mode": case.mode}
            for r in rows:
                if r["case"] == case.name and r["mode"] == case.mode:
                    line[r["provider"]] = r.get(metric) if r["status"] == "ok" else r["status"][:3]
            table.append(line)
        print_table(table, ["case", "mode", *providers], UNITS[metric])
    failed = [r for r in rows if r["status"] != "ok" and not r["status"].startswith("n/a")]
    for r in rows:
        if r["status"] != "ok":
            print(f"  {r['provider']:>15} {r['case']} {r['mode']}: {r['status']}")
        elif r.get("max_err") is not None and r["max_err"] > 0.05:
            print(f"  WARNING {r['provider']} {r['case']} {r['mode']}: max error {r['max_err']:.3g} vs the reference")

    stem = os.path.join(args.out, f"{args.op}-{preset}-{dtype_name}-{device}")
    for r in rows:
        r.update({k: env[k] for k in ("date", "device", "torch", "triton")})
    print(f"\nCSV: {write_csv(rows, stem + '.csv')}")
    unit = UNITS[op.METRIC].split()[0]
    for r in rows:
        r[unit] = r.get(op.METRIC)
    png = plot([r for r in rows if r["status"] == "ok"], stem + ".png", "size", unit, "provider", "panel",
               f"{args.op} {preset} {dtype_name}, {env['device']}" + (" (CPU: not speed)" if not_speed else ""))
    if png:
        print(f"PNG: {png}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark runner: providers side by side in one run; prints a table, writes a CSV and a PNG.

    python -m benchmarks attention --preset milestone          # B=4 H=16 N=4096, every provider
    python -m benchmarks attention --preset sweep --dtype fp16  # N = 512..16384
    python -m benchmarks attention --preset models              # ViT / BERT (padded, varlen) / GPT decode / STTR
    python -m benchmarks sinkhorn --preset h200 --dtype fp32    # 960 problems of 321 x 321, 10 iterations
    python -m benchmarks sinkhorn --preset cpu --dtype fp32     # the C++ CPU path: 64 problems
    python -m benchmarks relpos --preset sttr --dtype fp16      # STTR attention: 960 lines, W = 320, 8 x 16
    python -m benchmarks models --preset anchors                # BERT-base, GPT-2 small, ViT-B/16 vs transformers
    python -m benchmarks sttr --preset h200                     # STTR 960x540 / 1080p inference, 640x384 training
    python -m benchmarks sttr --preset memory --providers tlv_fast   # 960x540 inference memory, chunked or not
    python -m benchmarks summary DIR                            # the tables of DIR/*.csv (gpu_check.sh's summary)

Several runs in one process (one CUDA context, one torch.compile warm-up): separate them with `::`, e.g.
    python -m benchmarks attention --providers flex :: sinkhorn --preset h200 --providers compiled

Every row goes to the CSV and to stderr the moment it is measured (a run cut short keeps what it measured); the
PNG is drawn at the end. Columns: `ms` is the median of triton.testing.do_bench (back-to-back calls: host launch
overhead included); `graph_ms` (attention's model shapes) is one call replayed from a CUDA graph (no host overhead).

Attention on a machine without CUDA runs the tiny `smoke` preset and says that the numbers are not speed. The
Sinkhorn `cpu` preset measures the C++ CPU implementation, which is what runs on CPU tensors. `--tiny` shrinks any
preset's cases to interpreter size with one timed call each (the dry run of benchmarks/gpu_check.sh).
"""
import argparse
import csv
import glob
import os
import sys

UNITS = {"tflops": "TFLOP/s", "gbps": "GB/s against the one-read-one-write floor",
         "ms": "median ms (do_bench: host launch overhead included)",
         "graph_ms": "ms per CUDA-graph replay (no host launch overhead)",
         "peak_MiB": "MiB peak memory beyond the inputs"}
SEPARATOR = "::"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["overhead"], ["compile-stats"]):  # a stand-in sm_90 driver: before anything loads triton
        from . import compile_stats, overhead
        return {"overhead": overhead, "compile-stats": compile_stats}[argv[0]].main(argv[1:])
    if argv[:1] == ["summary"]:  # no torch: cheap enough to run after every stage of gpu_check.sh
        for path in argv[1:] or ["bench_out"]:
            print(summary(path))
        return 0
    runs, current = [], []
    for a in argv:
        if a == SEPARATOR:
            runs.append(current)
            current = []
        else:
            current.append(a)
    runs.append(current)
    status = 0
    for run_argv in runs:
        status = max(status, run(run_argv))
    return status


def _parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("op", nargs="?", default="attention", choices=["attention", "sinkhorn", "relpos", "models", "sttr"])
    p.add_argument("--preset", default=None, help="attention: milestone, sweep, models, smoke; "
                                                  "sinkhorn: h200, cpu, sizes, smoke; relpos: sttr, smoke; "
                                                  "models: anchors, smoke; sttr: h200, cpu, memory, smoke")
    p.add_argument("--providers", default=None, help="comma-separated subset of the op's providers, in order")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32", "fp64"],
                   help="default bf16 (attention, models), fp32 (sinkhorn), fp16 (relpos)")
    p.add_argument("--out", default=os.environ.get("BENCH_OUT", "bench_out"),
                   help="folder for the CSV and the PNG (default $BENCH_OUT, else bench_out)")
    p.add_argument("--csv", default=os.environ.get("BENCH_CSV"),
                   help="append the rows to this CSV instead of OUT/<op>-<preset>-<dtype>-<device>.csv "
                        "(default $BENCH_CSV)")
    p.add_argument("--tiny", action="store_true", default=os.environ.get("BENCH_TINY") == "1",
                   help="shrink every case to interpreter size, one timed call each: checks that the run works, "
                        "not speed (default on when BENCH_TINY=1)")
    p.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "7")),
                   help="CPU presets: timed rounds, every provider once per round in turn (default 7)")
    p.add_argument("--force", action="store_true",
                   help="run a GPU-sized preset on a machine without CUDA anyway (slow; its numbers are not speed)")
    p.add_argument("--no-png", action="store_true", default=os.environ.get("BENCH_NO_PNG") == "1",
                   help="no plot (default on when BENCH_NO_PNG=1)")
    return p


def run(argv):
    args = _parser().parse_args(argv)
    import torch

    from . import attention, common, models, relpos, sinkhorn, sttr
    from .common import Progress, RowLog, bench_ms, environment

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
    op = {"attention": attention, "sinkhorn": sinkhorn, "relpos": relpos, "models": models, "sttr": sttr}[args.op]
    cpu = not torch.cuda.is_available()
    dtype_name = args.dtype or {"sinkhorn": "fp32", "relpos": "fp16", "models": "fp32" if cpu else "bf16",
                                "sttr": "fp32" if cpu else "fp16"}.get(args.op, "bf16")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment()
    preset = args.preset or op.default_preset(device)
    try:
        cases = op.presets(preset)
    except ValueError as e:  # an unknown preset: one line, as argparse says it
        print(f"python -m benchmarks {args.op}: error: {e}", file=sys.stderr)
        return 2
    cpu_presets = getattr(op, "CPU_PRESETS", ("smoke",))
    if device == "cpu" and preset not in cpu_presets and not (args.force or args.tiny):
        print(f"{args.op} --preset {preset} is sized for a GPU and this machine has no CUDA device: run "
              f"`python -m benchmarks {args.op} --preset {cpu_presets[0]}` (CPU speed), or add --force to run it "
              "here anyway (slow; not speed).", file=sys.stderr)
        return 2
    interleave = (device == "cpu" and preset in getattr(op, "INTERLEAVED_PRESETS", ("cpu",))
                  and hasattr(op, "run_interleaved") and not args.tiny)
    # on a CPU, the ops whose tlv_fast path is C++ (attention, Sinkhorn) measure speed; the others run eager code
    not_speed = args.tiny or (device == "cpu" and not getattr(op, "CPU_IS_SPEED", False))
    if not_speed:
        print(f"{'Tiny shapes' if args.tiny else 'No CUDA device'}: {args.op} runs on the {device.upper()}. THESE "
              "NUMBERS ARE NOT SPEED; they only show that the runner works.", flush=True)
    providers = args.providers.split(",") if args.providers else (op.PROVIDERS if device == "cuda" else
                                                                  op.CPU_PROVIDERS)
    if args.tiny:
        cases = [op.tiny(c) for c in cases]
        common.CPU_REPS = 1
        common.TINY = True
    refused = _memory_check(op, cases, providers, dtypes[dtype_name], device, args)
    if refused:
        return refused
    autotune = os.environ.get("TLV_FAST_AUTOTUNE") == "1"
    print(f"{args.op} / {preset} / {dtype_name} on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
          f"{env['date']}){' TLV_FAST_AUTOTUNE=1' if autotune else ''}", flush=True)

    stem = os.path.join(args.out, f"{args.op}-{preset}-{dtype_name}-{device}")
    if args.csv:  # the PNG named after the CSV too: two stages running one preset keep both plots
        stem = os.path.join(args.out, f"{os.path.splitext(os.path.basename(args.csv))[0]}-{os.path.basename(stem)}")
    log = RowLog(args.csv, append=True) if args.csv else RowLog(stem + ".csv")
    rows = []
    progress = Progress(len(cases) * len(providers), f"{args.op} {preset}")
    interrupted = False
    try:
        _measure_all(op, cases, providers, interleave, args, dtypes[dtype_name], device, bench_ms, autotune, preset,
                     env, rows, log, progress)
    except KeyboardInterrupt:  # Ctrl-C: the table of what was measured (every row is in the CSV already)
        interrupted = True
        print(f"\ninterrupted after {len(rows)} measurement(s): the tables below hold what was measured",
              file=sys.stderr)
    return _report(args, op, cases, rows, log, stem, env, interleave, device, preset, dtype_name, not_speed,
                   interrupted)


def _measure_all(op, cases, providers, interleave, args, dtype, device, bench_ms, autotune, preset, env, rows, log,
                 progress):
    for case in cases:
        if interleave:
            measured = op.run_interleaved(case, providers, dtype, device, args.rounds)
        else:
            measured = (op.run_case(case, prov, dtype, device, bench_ms) for prov in providers)
        for r in measured:
            prov = r["provider"]
            if prov == "tlv_fast" and autotune:  # the autotuned tiles, told apart from the pinned ones
                r["provider"] = "tlv_fast-autotune"
            r.update({"op": args.op, "preset": preset, **{k: env[k] for k in ("date", "device", "torch", "triton")}})
            rows.append(r)
            log.add(r)
            progress.step(_line(r, op.METRIC))


def _report(args, op, cases, rows, log, stem, env, interleave, device, preset, dtype_name, not_speed, interrupted):
    from .common import plot, print_table
    metrics = list(dict.fromkeys([op.METRIC, "ms"] + [m for m in ("graph_ms", "peak_MiB")
                                                      if any(m in r for r in rows)]))
    labels = list(dict.fromkeys(r["provider"] for r in rows))
    for metric in metrics:
        table = []
        for case in cases:
            line = {"case": case.name, "mode": case.mode}
            for r in rows:
                if r["case"] == case.name and r["mode"] == case.mode:
                    line[r["provider"]] = r.get(metric) if r["status"] == "ok" else r["status"][:3]
            table.append(line)
        unit = UNITS[metric]
        if interleave and metric == "ms":
            unit = "median ms of interleaved rounds (wall clock)"
        elif device == "cpu" and metric == "peak_MiB":
            unit = "MiB peak memory of one call: RSS high-water growth in a fresh process (VmHWM after clear_refs)"
        print_table(table, ["case", "mode", *labels], unit)
    if "tlv_fast" in labels and len(labels) > 1:
        print(ratio_table(rows, cases, [p for p in labels if p != "tlv_fast"],
                          "medians of interleaved rounds" if interleave else "one run"))
    errors = [r for r in rows if r["status"] != "ok" and not r["status"].startswith("n/a")]
    for r in rows:
        if r["status"] != "ok":
            print(f"  {r['provider']:>17} {r['case']} {r['mode']}: {r['status']}")
        elif r.get("max_err") is not None and r["max_err"] > 0.05:
            print(f"  WARNING {r['provider']} {r['case']} {r['mode']}: max error {r['max_err']:.3g} vs the reference")
        if r.get("graph_note"):
            print(f"  {r['provider']:>17} {r['case']} {r['mode']}: CUDA graph {r['graph_note']}")
    print(f"\nCSV: {log.path}", flush=True)
    if not any(r["status"] == "ok" for r in rows):
        print(f"python -m benchmarks {args.op}: nothing could be measured"
              + (f" ({len(rows)} attempt(s): " + "; ".join(sorted({r['status'] for r in rows})) + ")" if rows else "")
              + ": no table or plot", file=sys.stderr)
        if interrupted:
            return 130
        # 3: every provider is unavailable on this machine (n/a), nothing failed; 1: something failed
        return 3 if rows and all(r["status"].startswith("n/a") for r in rows) else 1
    if not args.no_png:
        ylabel = {"tflops": "TFLOP/s", "ms": "ms (median" + (" of interleaved rounds)" if interleave else ")")}.get(
            op.METRIC, UNITS[op.METRIC])
        try:
            png = plot(rows, stem + ".png", "size", op.METRIC, "provider", "panel",
                       f"{args.op} {preset} {dtype_name}, {env['device']}, torch {env['torch']}, triton "
                       f"{env['triton']}" + (" (not speed)" if not_speed else ""), ylabel=ylabel)
            if png:
                print(f"PNG: {png}")
        except Exception as e:  # the plot is never required: the CSV has the numbers
            print(f"no plot: {type(e).__name__}: {e}")
    if interrupted:
        return 130
    return 1 if errors else 0


def _memory_check(op, cases, providers, dtype, device, args):
    """Before a run: the largest case's estimated peak per provider against the memory available now. A preset
    whose tlv_fast rows cannot fit is refused (exit 2, --force runs it anyway); other providers that cannot fit are
    named (their rows will say oom)."""
    from .common import available_bytes, gib
    if not hasattr(op, "memory_needed") or args.tiny:
        return 0
    free = available_bytes(device)
    if free is None:
        return 0
    need = {p: max(op.memory_needed(c, p, dtype) for c in cases) for p in providers}
    print(f"memory: the largest case needs about {', '.join(f'{p} {gib(n)}' for p, n in need.items())}; "
          f"{gib(free)} available on the {device.upper()}", flush=True)
    over = [p for p, n in need.items() if n > 0.9 * free]
    if "tlv_fast" in over and not args.force:
        print(f"python -m benchmarks {args.op}: error: preset {args.preset or op.default_preset(device)!r} needs "
              f"about {gib(need['tlv_fast'])} for tlv_fast alone and {gib(free)} is available: pick a smaller "
              "preset (or --force)", file=sys.stderr)
        return 2
    if over:
        print(f"memory: {', '.join(over)} will probably run out of memory on the largest cases (rows marked oom)",
              flush=True)
    return 0


def ratio_table(rows, cases, others, how):
    """Speed of tlv_fast relative to the other providers, case by case: their ms / tlv_fast's ms (> 1: tlv_fast is
    faster), against each one and against the best (fastest) of them."""
    lines = [f"\nspeed ratio (other ms / tlv_fast ms; > 1 means tlv_fast is faster), {how}",
             f"{'case':<40} {'mode':<8}" + "".join(f"{'vs ' + p:>16}" for p in others) + f"{'vs best other':>16}"]
    for case in cases:
        got = {r["provider"]: r for r in rows if r["case"] == case.name and r["mode"] == case.mode
               and r["status"] == "ok"}
        if "tlv_fast" not in got:
            continue
        ours = got["tlv_fast"]["ms"]
        cells = [f"{got[p]['ms'] / ours:>15.2f}x" if p in got else f"{'-':>16}" for p in others]
        best = min((got[p]["ms"], p) for p in others if p in got) if any(p in got for p in others) else None
        cells.append(f"{best[0] / ours:>6.2f}x ({best[1]})".rjust(16) if best else f"{'-':>16}")
        lines.append(f"{case.name:<40} {case.mode:<8}" + "".join(cells))
    return "\n".join(lines)


def _line(r, metric):
    """One row as its log line: the numbers, or the status."""
    if r["status"] != "ok":
        text = r["status"]
    else:
        unit = UNITS[metric].split()[0]
        text = f"{r['ms']:.3f} ms" + (f" {r[metric]:.1f} {unit}" if metric != "ms" else "")
        if r.get("graph_ms") is not None:
            text += f", graph {r['graph_ms']:.3f} ms"
        if r.get("peak_MiB") is not None:
            text += f", peak {r['peak_MiB']:.0f} MiB"
        if r.get("max_err") is not None:
            text += f", max err {r['max_err']:.2g}"
    if r.get("graph_note"):
        text += f" (graph: {r['graph_note']})"
    return f"{r['case']} {r['mode']} {r['provider']}: {text}"


def _cell(r):
    if r.get("status") != "ok":
        return (r.get("status") or "?")[:22]
    text = f"{float(r['ms']):.3f}ms"
    if r.get("op") == "attention" and r.get("tflops"):
        text = f"{float(r['tflops']):.3g}TF " + text
    if r.get("graph_ms"):
        text += f" g{float(r['graph_ms']):.3f}"
    if r.get("peak_MiB"):
        text += f" {float(r['peak_MiB']):.0f}MiB"
    return text


def summary(path):
    """Every CSV under `path` (a folder, sorted by name, or one file) as a table: a line per case and mode, a column
    per provider; cells are TFLOP/s (attention), do_bench ms, gNNN the CUDA-graph replay ms, peak MiB, or the
    status. Reads the CSVs only (no torch)."""
    files = sorted(glob.glob(os.path.join(path, "*.csv"))) if os.path.isdir(path) else \
        [path] if os.path.isfile(path) else []
    out = []
    for f in files:
        with open(f, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows:
            continue
        keys = list(dict.fromkeys((r.get("case", ""), r.get("mode", "")) for r in rows))
        providers = list(dict.fromkeys(r.get("provider", "") for r in rows))
        cells = {(r.get("case", ""), r.get("mode", ""), r.get("provider", "")): _cell(r) for r in rows}
        table = [[c, m, *(cells.get((c, m, p), "-") for p in providers)] for c, m in keys]
        header = ["case", "mode", *providers]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
        out.append(f"{os.path.basename(f)} ({len(rows)} rows)")
        for line in [header, *table]:
            out.append("  " + "  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())
    return "\n".join(out) if out else f"(no CSV rows under {path} yet)"


if __name__ == "__main__":
    sys.exit(main())

"""The timers, row log, tables, CSV and plot of the benchmark runner (every op's bench file uses these).

Two timers: `bench_ms` (triton.testing.do_bench: the median of back-to-back calls, host launch overhead included)
and `graph_ms` (the call captured once in a CUDA graph and replayed: device time without the host's launches).
"""
import csv
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import time
import traceback

import torch

CPU_REPS = 5  # timed calls per CPU measurement after one warm-up call; the runner's --tiny sets 1 (no warm-up)


class Unavailable(Exception):
    """A provider cannot run this case here (no CUDA device, a package or function that is absent, an input the
    provider does not take): the row's status is "n/a: <message>". Any other exception is an error of the row."""


def needs_cuda(device, what="needs CUDA"):
    if device != "cuda":
        raise Unavailable(what)


def environment():
    """Where the numbers come from: device, versions."""
    info = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
            "torch": torch.__version__}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "absent"
    info["device"] = (torch.cuda.get_device_name() if torch.cuda.is_available()
                      else f"CPU ({cpu_model()}, {platform.machine()}, {os.cpu_count()} cores, {cpu_isa()})")
    return info


def _cpuinfo():
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_model():
    """The CPU's model name (/proc/cpuinfo), or the platform's processor string."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def cpu_isa():
    """The widest vector ISA features that matter to the C++ kernels: AVX-512 (+BF16), AVX2, or neither."""
    flags = set()
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if "avx512f" in flags:
        return "AVX-512" + (" BF16" if "avx512_bf16" in flags else "")
    return "AVX2" if "avx2" in flags else (platform.machine() or "scalar")


def bench_ms(fn, device, grad_to_none=None):
    """Median milliseconds of fn(): triton.testing.do_bench on a GPU; a wall-clock median on the CPU (smoke only)."""
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    if CPU_REPS > 1:
        fn()
    times = []
    for _ in range(CPU_REPS):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_ms(fn, device, replays=20, repeats=5):
    """Median milliseconds of one call of fn() replayed from a CUDA graph, timed with CUDA events: fn is warmed up
    on a side stream, captured once, then `repeats` batches of `replays` replays are timed (no L2 flush between
    replays). Unlike bench_ms there is no host launch overhead in it. Raises Unavailable off CUDA."""
    needs_cuda(device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    del graph
    return statistics.median(times)


def graph_fields(fn, device):
    """{"graph_ms": ...}, or {"graph_note": why} when there is no CUDA or the capture failed (the row stays ok)."""
    try:
        return {"graph_ms": graph_ms(fn, device)}
    except Unavailable as e:
        return {"graph_note": f"n/a: {e}"}
    except Exception as e:  # a call that cannot be captured (a host sync, an allocation outside the graph's pool)
        if device == "cuda":
            torch.cuda.synchronize()
        return {"graph_note": f"capture failed: {_first_line(e)}"}


def _first_line(e, width=100):
    """The exception's first line, cut at a word boundary within `width` characters ("..." when cut)."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    if len(line) > width:
        line = line[:width].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
    return f"{type(e).__name__}: {line}"


_OOM_MARKERS = ("out of memory", "can't allocate memory", "DefaultCPUAllocator: can't allocate",
                "std::bad_alloc", "Cannot allocate memory")


def guarded(row, measure, device):
    """row updated with measure()'s fields and status "ok", or why it has no numbers: "oom" (a CUDA or CPU
    allocation failure); "n/a: ..." when the provider cannot run the case here (Unavailable, or an optional package
    that is not installed); "error: ..." for any other exception (its traceback goes to stderr: a bug in the
    provider or in the benchmark code). The status is a short, readable form; `reason` keeps the whole message."""
    try:
        row.update(measure())
        row["status"] = "ok"
    except torch.cuda.OutOfMemoryError as e:
        row["status"], row["reason"] = "oom", _whole(e)
    except Unavailable as e:
        row["status"], row["reason"] = f"n/a: {e}", str(e)
    except ImportError as e:
        row["status"], row["reason"] = f"n/a: {_first_line(e, 80)}", _whole(e)
    except (RuntimeError, MemoryError) as e:
        if isinstance(e, MemoryError) or any(m in str(e) for m in _OOM_MARKERS):
            row["status"], row["reason"] = "oom", _whole(e)
        else:
            _error(row, e)
    except Exception as e:
        _error(row, e)
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def _whole(e):
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _error(row, e):
    row["status"], row["reason"] = f"error: {_first_line(e)}", _whole(e)
    print(f"error in {row.get('case')} {row.get('mode')} {row.get('provider')}:", file=sys.stderr)
    traceback.print_exc()
    sys.stderr.flush()


TINY = False  # the runner's --tiny: shapes for the interpreter, not speed (no peak-memory processes either)


def cpu_peak_mib(op, case, provider, dtype):
    """Peak memory of one call on a CPU, honestly: a fresh process builds the inputs (op.peak_call), resets its RSS
    high-water mark (Linux /proc/self/clear_refs), runs the call once and reads the mark again (VmHWM); the growth
    over the resident size before the call, in MiB: what the call needed beyond the process and its inputs. (Not
    getrusage's ru_maxrss: Linux carries it over from the parent process across fork and exec.)"""
    if TINY:
        return None
    import json
    import subprocess
    spec = json.dumps({"op": op, "case": dataclasses.asdict(case), "provider": provider,
                       "dtype": str(dtype).split(".")[-1]})
    res = subprocess.run([sys.executable, "-m", "benchmarks.common", spec], capture_output=True, text=True,
                         timeout=1800, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if res.returncode != 0:
        raise RuntimeError(f"peak-memory process failed: {res.stderr.strip().splitlines()[-1:]}")
    return float(res.stdout.strip().splitlines()[-1])


def _peak_main(spec):
    import importlib
    import json
    s = json.loads(spec)
    module = importlib.import_module(f"benchmarks.{s['op']}")
    case = module.Case(**s["case"])
    step = module.peak_call(case, s["provider"], getattr(torch, {"fp32": "float32"}.get(s["dtype"], s["dtype"])))
    try:  # what any call pays once (the extension's library, BLAS and thread pools) is not the call's memory
        from tlv_fast import _ext
        _ext.load("cpu")
    except Exception:
        pass
    torch.randn(64, 64) @ torch.randn(64, 64)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    before = _status_kib("VmRSS")
    step()
    print((_status_kib("VmHWM") - before) / 1024.0)


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def interleaved_rows(make_row, prepare, providers, device, rounds):
    """Rows of a CPU measurement taken in turns: prepare(provider) -> (timed, leaves, finish(ms) -> fields) for each
    provider (one that cannot run gets its status now), one warm-up call each, then `rounds` rounds in which every
    provider is timed once (wall clock; the leaves' grads reset first); each row gets the median of its times."""
    rows, ready = {}, {}
    for prov in providers:
        row = make_row(prov)

        def setup(prov=prov):
            timed, leaves, finish = prepare(prov)
            timed()
            ready[prov] = (timed, leaves, finish, [])
            return {}
        rows[prov] = guarded(row, setup, device)
    for _ in range(rounds):
        for prov, (timed, leaves, _, times) in ready.items():
            for t in leaves or ():
                t.grad = None
            t0 = time.perf_counter()
            timed()
            times.append((time.perf_counter() - t0) * 1e3)
    for prov, (_, _, finish, times) in ready.items():
        guarded(rows[prov], lambda: finish(statistics.median(times)), device)
    return [rows[p] for p in providers]


class Progress:
    def __init__(self, total, label):
        self.total, self.done, self.label, self.t0 = total, 0, label, time.time()

    def step(self, what):
        """One line per finished measurement (a log cut short by a timeout keeps every result so far), with the
        time left estimated from the measurements so far (mean time per row x rows left)."""
        self.done += 1
        elapsed = time.time() - self.t0
        left = self.total - self.done
        eta = f", ~{elapsed / self.done * left:.0f}s left" if left else ""
        print(f"[{self.label} {self.done}/{self.total} {elapsed:5.0f}s{eta}] {what}", file=sys.stderr, flush=True)


def available_bytes(device):
    """Memory a run may use now: free CUDA memory, or the kernel's MemAvailable on a CPU (None if unknown)."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gib(n):
    return f"{n / 2**30:.1f} GiB"


def print_table(rows, columns, title):
    """Rows (dicts) as a fixed-width table; one column per provider is the caller's choice of `columns`."""
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print(f"\n{title}")
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    return str(v)


def write_csv(rows, path):
    """Every row, with the union of their keys as columns, written to a temporary file and renamed over `path`: a
    process killed at any moment leaves the previous complete file or the new one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
    return path


def read_csv(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class RowLog:
    """The CSV of a run, rewritten after every row (so a run cut short by a timeout keeps every row measured). With
    append, rows already in the file (an earlier command of the same stage) are kept ahead of the new ones."""

    def __init__(self, path, append=False):
        self.path = path
        self.rows = read_csv(path) if append else []

    def add(self, row):
        self.rows.append(row)
        write_csv(self.rows, self.path)


def bar_entries(rows, series, y):
    """The bars of one panel at one size: (labels, heights, failure status or None) per (case, series) in order of
    appearance; labels name the case too when the panel holds more than one. A series without a measured row gets
    height 0 and the status of its failure."""
    keys = list(dict.fromkeys((r.get("case", ""), r[series]) for r in rows))
    several = len({c for c, _ in keys}) > 1
    labels, heights, bad = [], [], []
    for case, s in keys:
        mine = [r for r in rows if (r.get("case", ""), r[series]) == (case, s)]
        ok = [r for r in mine if r.get("status") == "ok" and r.get(y) is not None]
        labels.append(f"{s}\n{case.split()[0]}" if several else s)
        heights.append(ok[0][y] if ok else 0.0)
        bad.append(None if ok else next((r["status"] for r in mine if r.get("status") != "ok"), "n/a"))
    return labels, heights, bad


def plot(rows, path, x, y, series, panel, title, ylabel=None):
    """One panel per distinct `panel` value, `y` against `x`, a line (or, at one size, a bar) per `series` value;
    rows whose status is not "ok" are marked where their value would be: a hatched empty bar, or an "x" on the
    axis, labelled with the short status (oom, n/a, err). None if there is no matplotlib or nothing to draw."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib)")
        return None
    panels = list(dict.fromkeys(r[panel] for r in rows))
    if not panels:
        return None
    cols = min(4, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.5 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, panels):
        sub = [r for r in rows if r[panel] == name]
        ok = [r for r in sub if r.get("status") == "ok" and r.get(y) is not None]
        failed = [r for r in sub if r.get("status") != "ok"]
        names = list(dict.fromkeys(r[series] for r in sub))
        if len({r[x] for r in sub}) == 1:  # one size: bars, one per series (and per case when the panel has several)
            labels, heights, bad = bar_entries(sub, series, y)
            bars = ax.bar(range(len(labels)), heights, tick_label=labels)
            top = max(heights) if any(heights) else 1.0
            for bar, status in zip(bars, bad):
                if status is not None:
                    bar.set_hatch("//")
                    bar.set_fill(False)
                    ax.text(bar.get_x() + bar.get_width() / 2, 0.02 * top, status[:3], ha="center",
                            va="bottom", fontsize=8, rotation=90)
            ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        else:
            for s in names:
                pts = sorted((r[x], r[y]) for r in ok if r[series] == s)
                line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)[0] if pts else None
                for r in (r for r in failed if r[series] == s):
                    ax.plot([r[x]], [0], marker="x", color=line.get_color() if line else "red",
                            label=None if line else f"{s} ({r['status'][:3]})")
                    ax.annotate(r["status"][:3], (r[x], 0), fontsize=7, xytext=(2, 4), textcoords="offset points")
            ax.set_xscale("log", base=2)
            ax.set_xlabel(x)
            ax.legend(fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel(ylabel or y)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":  # the fresh process of cpu_peak_mib
    _peak_main(sys.argv[1])

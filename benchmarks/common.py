"""The one timer, table, CSV and plot of the benchmark runner (every op's bench file uses these)."""
import csv
import datetime
import os
import platform
import statistics
import sys
import time

import torch


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
                      else f"CPU ({platform.machine()}, {os.cpu_count()} cores)")
    return info


def bench_ms(fn, device, grad_to_none=None):
    """Median milliseconds of fn(): triton.testing.do_bench on a GPU; a wall-clock median on the CPU (smoke only)."""
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def guarded(row, measure, device):
    """row updated with measure()'s fields and status "ok", or the reason it could not run (oom, n/a: ...)."""
    try:
        row.update(measure())
        row["status"] = "ok"
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
    except Exception as e:  # a provider that cannot run this case (no kernel, missing package, unsupported input)
        row["status"] = f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


class Progress:
    def __init__(self, total, label):
        self.total, self.done, self.label, self.t0 = total, 0, label, time.time()

    def step(self, what):
        """One line per finished measurement (a log cut short by a timeout keeps every result so far)."""
        self.done += 1
        print(f"[{self.label} {self.done}/{self.total} {time.time() - self.t0:5.0f}s] {what}", file=sys.stderr,
              flush=True)


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
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def plot(rows, path, x, y, series, panel, title):
    """One panel per distinct `panel` value, `y` against `x`, a line per `series` value. None if no matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib)")
        return None
    panels = list(dict.fromkeys(r[panel] for r in rows))
    cols = min(4, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.5 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, panels):
        sub = [r for r in rows if r[panel] == name and r.get(y) is not None]
        names = list(dict.fromkeys(r[series] for r in sub))
        if len({r[x] for r in sub}) == 1:  # one size: bars, one per series
            ax.bar(names, [next(r[y] for r in sub if r[series] == s) for s in names])
            ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        else:
            for s in names:
                pts = sorted((r[x], r[y]) for r in sub if r[series] == s)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
            ax.set_xscale("log", base=2)
            ax.set_xlabel(x)
            ax.legend(fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel(y)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""The benchmark runner works end to end on this machine (on a CPU: the smoke presets), a GPU-sized preset on a CPU
stops at once naming the CPU preset, and the CPU preset interleaves its providers."""
import csv
import os
import subprocess
import sys

import pytest
import torch

from helpers import HAS_CUDA, REPO


@pytest.mark.builds
@pytest.mark.skipif(HAS_CUDA, reason="the GPU runner is exercised by benchmarks/gpu_check.sh")
@pytest.mark.parametrize("op,stem,providers,unit", [
    ("attention", "attention-smoke-bf16-cpu", {"eager", "tlv_fast", "sdpa"}, "TFLOP/s"),
    ("sinkhorn", "sinkhorn-smoke-fp32-cpu", {"eager", "tlv_fast"}, "GB/s"),
    ("relpos", "relpos-smoke-fp16-cpu", {"eager", "tlv_fast"}, "median ms"),
    ("models", "models-smoke-fp32-cpu", {"hf-sdpa", "tlv_fast"}, "median ms"),
    ("sttr", "sttr-smoke-fp32-cpu", {"reference", "tlv_fast"}, "median ms"),
])
def test_runner_smoke_writes_table_csv_and_png(tmp_path, op, stem, providers, unit):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TLV_FAST_POISON") and
           not k.startswith("BENCH_")}
    env["OMP_NUM_THREADS"] = "1"  # spinning OpenMP threads are up to 10x slower on cores shared with other work
    res = subprocess.run([sys.executable, "-m", "benchmarks", op, "--preset", "smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert unit in res.stdout
    # every runner's tlv_fast rows run the C++ kernels on a CPU: speed (only --tiny says otherwise)
    assert "NOT SPEED" not in res.stdout
    with open(tmp_path / f"{stem}.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["provider"] for r in rows} == providers
    assert all(r["status"] == "ok" and float(r["ms"]) > 0 for r in rows)
    assert all(float(r["max_err"]) < 0.05 for r in rows if r.get("max_err"))  # every provider computed the op
    assert (tmp_path / f"{stem}.png").stat().st_size > 1000


def test_flop_convention():
    from benchmarks.attention import Case
    c = Case("x", 4, 16, 4096, 4096, 128)
    assert c.flops() == 4 * 4 * 16 * 4096 * 4096 * 128
    assert Case("x", 4, 16, 4096, 4096, 128, causal=True, mode="fwd+bwd").flops() == c.flops() * 0.5 * 3.5


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on machines without CUDA")
def test_gpu_sized_preset_on_a_cpu_stops_at_once_naming_the_cpu_preset():
    res = subprocess.run([sys.executable, "-m", "benchmarks", "attention", "--preset", "milestone"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 2 and "--preset cpu" in res.stderr and "--force" in res.stderr


def test_interleaved_rows_time_every_provider_in_turns():
    from benchmarks.common import interleaved_rows
    calls = []

    def prepare(prov):
        if prov == "missing":
            from benchmarks.common import Unavailable
            raise Unavailable("not here")
        return (lambda: calls.append(prov)), [], (lambda ms: {"ms": ms})
    rows = interleaved_rows(lambda p: {"provider": p}, prepare, ["a", "missing", "b"], "cpu", rounds=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # one warm-up each, then rounds in turn
    assert [r["status"] for r in rows] == ["ok", "n/a: not here", "ok"] and rows[0]["ms"] >= 0


def _main(argv, capsys):
    from benchmarks.__main__ import main
    status = main(argv)
    out = capsys.readouterr()
    return status, out.out, out.err


def test_unknown_preset_is_one_line_and_exit_2(capsys):
    status, out, err = _main(["attention", "--preset", "foo", "--no-png"], capsys)
    assert status == 2 and "unknown preset 'foo'" in err and "Traceback" not in err + out


def test_a_run_that_measures_nothing_says_so_and_keeps_whole_reasons(tmp_path, capsys, monkeypatch):
    from benchmarks import relpos

    def fails(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 1234567890123 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(relpos, "make_step", fails)
    status, out, err = _main(["relpos", "--preset", "smoke", "--out", str(tmp_path), "--no-png"], capsys)
    assert status == 1 and "nothing could be measured" in err and "oom" in err and "Traceback" not in err
    with open(tmp_path / "relpos-smoke-fp16-cpu.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["status"] == "oom" for r in rows)
    assert all(r["reason"].endswith("(Cannot allocate memory)") for r in rows)  # the whole message, not cut


def test_an_interrupted_run_prints_what_it_measured(tmp_path, capsys, monkeypatch):
    from benchmarks import relpos
    calls = []

    def run_case(case, provider, dtype, device, bench_ms):
        calls.append(provider)
        if len(calls) == 3:
            raise KeyboardInterrupt
        row = relpos._row(case, provider, dtype)
        row.update(status="ok", ms=10.0 if provider == "tlv_fast" else 25.0)
        return row
    monkeypatch.setattr(relpos, "run_case", run_case)
    status, out, err = _main(["relpos", "--preset", "smoke", "--out", str(tmp_path), "--no-png"], capsys)
    assert status == 130 and "interrupted after 2 measurement(s)" in err
    assert "2.50x" in out  # the ratio table of the rows measured before the interrupt
    with open(tmp_path / "relpos-smoke-fp16-cpu.csv") as f:
        assert len(list(csv.DictReader(f))) == 2


def test_the_environment_line_names_the_cpu_model_and_isa():
    from benchmarks.common import environment
    device = environment()["device"]
    assert HAS_CUDA or (device.startswith("CPU (") and any(isa in device for isa in ("AVX-512", "AVX2", "x86_64",
                                                                                    "aarch64", "arm64")))


def test_the_plot_marks_failed_providers_and_labels_its_unit(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.common import plot
    rows = [{"provider": "tlv_fast", "status": "ok", "ms": 3.0, "size": 64, "panel": "fwd"},
            {"provider": "eager", "status": "oom", "size": 64, "panel": "fwd"},
            {"provider": "tlv_fast", "status": "ok", "ms": 2.0, "size": 128, "panel": "bwd"},
            {"provider": "tlv_fast", "status": "ok", "ms": 4.0, "size": 256, "panel": "bwd"},
            {"provider": "eager", "status": "n/a: no", "size": 256, "panel": "bwd"}]
    path = plot(rows, str(tmp_path / "p.png"), "size", "ms", "provider", "panel", "t", ylabel="ms (median)")
    assert path and os.path.getsize(path) > 1000
    assert plot([], str(tmp_path / "q.png"), "size", "ms", "provider", "panel", "t") is None


def test_a_panel_with_two_cases_draws_a_bar_for_each():
    """Two cases in one panel (GPT causal and GQA causal share "fwd D64 causal"): every (case, provider) gets its
    bar; a provider that failed gets an empty one with its status."""
    from benchmarks.common import bar_entries
    rows = [{"case": "GPT causal", "provider": "tlv_fast", "status": "ok", "ms": 3.0},
            {"case": "GPT causal", "provider": "sdpa", "status": "ok", "ms": 4.0},
            {"case": "GQA causal", "provider": "tlv_fast", "status": "ok", "ms": 5.0},
            {"case": "GQA causal", "provider": "sdpa", "status": "oom", "ms": None}]
    labels, heights, bad = bar_entries(rows, "provider", "ms")
    assert labels == ["tlv_fast\nGPT", "sdpa\nGPT", "tlv_fast\nGQA", "sdpa\nGQA"]
    assert heights == [3.0, 4.0, 5.0, 0.0] and bad == [None, None, None, "oom"]
    assert bar_entries(rows[:2], "provider", "ms")[0] == ["tlv_fast", "sdpa"]  # one case: provider names only


def test_a_preset_that_cannot_fit_is_refused_before_it_runs(capsys, monkeypatch):
    from benchmarks import common
    monkeypatch.setattr(common, "available_bytes", lambda device: 1024)  # 1 KiB free
    status, out, err = _main(["attention", "--preset", "smoke", "--no-png"], capsys)
    assert status == 2 and "needs about" in err and "smaller preset" in err
    monkeypatch.setattr(common, "available_bytes", lambda device: 64 * 2**30)
    from benchmarks import attention
    case = attention.presets("cpu")[0]
    assert attention.memory_needed(case, "eager", torch.float32) > attention.memory_needed(case, "tlv_fast",
                                                                                           torch.float32)


def test_progress_estimates_the_time_left(capsys):
    from benchmarks.common import Progress
    p = Progress(3, "x")
    p.step("a")
    assert "left]" in capsys.readouterr().err
    p.step("b")
    p.step("c")
    assert "left" not in capsys.readouterr().err.splitlines()[-1]


def test_a_run_where_no_provider_is_available_exits_3(tmp_path, capsys):
    status, out, err = _main(["relpos", "--preset", "smoke", "--providers", "flex-table", "--out", str(tmp_path),
                              "--no-png"], capsys)
    assert (status == 3 and "nothing could be measured" in err) or HAS_CUDA

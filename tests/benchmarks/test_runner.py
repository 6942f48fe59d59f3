"""The benchmark runner works end to end on this machine (on a CPU: the smoke presets), a GPU-sized preset on a CPU
stops at once naming the CPU preset, and the CPU preset interleaves its providers."""
import csv
import os
import subprocess
import sys

import pytest

from helpers import HAS_CUDA, REPO


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

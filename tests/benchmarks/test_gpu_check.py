"""benchmarks/gpu_check.sh: its stage budgets fit the one cold GPU call, and its dry run (CPU, Triton interpreter,
tiny shapes) runs every stage's Python and leaves a CSV per benchmark stage and the summary."""
import csv
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import attention, models, relpos, sinkhorn, sttr
from benchmarks.__main__ import summary
from benchmarks.common import RowLog, Unavailable, graph_fields, guarded, read_csv

from helpers import REPO

pytestmark = pytest.mark.builds

SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")
LIMIT_S = 500  # the call is killed at ~540 s; what the stages may use, kill grace included
BENCH_STAGES = ["headline", "shapes", "relpos", "models", "sinkhorn", "sttr", "compiled", "autotune"]
CUDA_ONLY = {"sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "flex", "tutorial", "flex-table", "compiled"}


def _script():
    with open(SCRIPT) as f:
        return f.read()


def _table():
    """[(stage, budget)] of the comment table at the top of the script, and its stated total."""
    rows, total, inside = [], None, False
    for line in _script().splitlines():
        if not line.startswith("#"):
            if inside:
                break
            continue
        if re.match(r"#\s+stage\s+budget\s+what", line):
            inside = True
            continue
        m = re.match(r"#\s+total\s+(\d+)", line)
        if inside and m:
            total = int(m.group(1))
            break
        m = re.match(r"#\s{2,}(\w+)\s+(\d+)\s", line)
        if inside and m:
            rows.append((m.group(1), int(m.group(2))))
    return rows, total


def _calls():
    """[(kind, stage, budget)] of the stage calls in the script body, in order (a stage written in both branches of
    the dry-run switch counted once, with the same budget)."""
    calls = {}
    for line in _script().splitlines():
        m = re.match(r"\s*(stage|wait_build) (\w+) (\d+)\b", line)
        if m:
            kind, name, secs = m.group(1), m.group(2), int(m.group(3))
            assert calls.setdefault(name, (kind, name, secs)) == (kind, name, secs), f"{name}: two budgets"
    return list(calls.values())


def test_stage_budgets_fit_the_call():
    table, total = _table()
    calls = _calls()
    assert table, "no stage table in the script's header"
    assert [(name, secs) for _, name, secs in calls] == table, "the header table and the stage calls differ"
    assert total == sum(secs for _, secs in table), "the table's total is not the sum of its budgets"
    grace = int(re.search(r"timeout -k (\d+) \"\$secs\"", _script()).group(1))
    timed = sum(1 for kind, _, _ in calls if kind == "stage")
    assert total + grace * timed <= LIMIT_S, f"{total} s of budgets + {grace} s grace x {timed} stages > {LIMIT_S} s"
    order = [name for _, name, _ in calls]
    assert order.index("headline") < order.index("shapes") < order.index("pytest") < order.index("compiled") \
        < order.index("autotune"), "tlv_fast's headline first, compiled baselines and autotuning last"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BENCH_", "TRITON_", "TLV_FAST_")) and k not in ("OUT", "AUTOTUNE_CACHE")}
    env.update(OUT=str(out), PYTHON=sys.executable)
    t0 = time.time()
    res = subprocess.run(["bash", SCRIPT, "--dry-run"], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=300)
    return out, res, time.time() - t0


def test_dry_run_runs_every_stage(dry_run):
    out, res, seconds = dry_run
    logs = "".join(f"\n--- {p}\n" + p.read_text()[-1500:] for p in sorted(out.glob("*.log")))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:] + logs
    assert seconds < 120, f"the dry run took {seconds:.0f} s"
    names = [name for _, name, _ in _calls()]
    lines = [line for line in (out / "stages.txt").read_text().splitlines() if not line.startswith("build:")]
    assert [line.split()[0] for line in lines] == names
    assert all(" rc=0 " in line for line in lines), lines
    summary_text = (out / "summary.txt").read_text()
    assert "DRY RUN" in summary_text
    for name in names:  # one line per stage in the summary
        assert len(re.findall(rf"^{name}\s+rc=0\s", summary_text, re.M)) == 1, name
    for name in ("env.txt", "README.txt"):
        assert (out / name).stat().st_size > 0


def test_dry_run_rows(dry_run):
    out, res, _ = dry_run
    assert res.returncode == 0
    for stage in BENCH_STAGES:
        paths = list(out.glob(f"*_{stage}.csv"))
        assert len(paths) == 1, stage
        rows = read_csv(paths[0])
        assert rows, f"{stage}: no CSV rows"
        assert f"{os.path.basename(paths[0])} ({len(rows)} rows)" in (out / "summary.txt").read_text()
        for r in rows:
            where = f"{stage}: {r['case']} {r['mode']} {r['provider']}: {r['status']}"
            if r["provider"] in CUDA_ONLY:
                assert r["status"] == "n/a: needs CUDA", where
            else:  # tlv_fast (Triton through the interpreter, the C++ CPU ops), eager, reference, HF models
                assert r["status"] == "ok" and float(r["ms"]) > 0, where
            if r.get("max_err"):
                assert float(r["max_err"]) < 0.05, where
    headline = read_csv(next(out.glob("*_headline.csv")))
    assert len(headline) == 8 * 3 and [r["mode"] for r in headline[::3]] == ["fwd"] * 4 + ["fwd+bwd"] * 4
    shapes = read_csv(next(out.glob("*_shapes.csv")))
    assert any("varlen" in r["case"] and r["provider"] == "tlv_fast" for r in shapes)
    assert all(r["graph_note"] == "n/a: needs CUDA" for r in shapes if r["status"] == "ok")
    autotuned = read_csv(next(out.glob("*_autotune.csv")))
    assert {r["provider"] for r in autotuned} == {"tlv_fast-autotune"}


def test_a_killed_run_keeps_its_rows(tmp_path):
    """A stage cut by its budget (SIGTERM from `timeout`) keeps every row measured so far, in a complete CSV, and
    each row was printed to the log as it was measured."""
    path = tmp_path / "stage.csv"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCH_")}
    env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1", BENCH_TINY="1", BENCH_NO_PNG="1")
    with open(tmp_path / "stage.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks", "attention", "--preset", "milestone",
                                 "--providers", "tlv_fast,eager", "--csv", str(path)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 90
        while time.time() < deadline and len(read_csv(path)) < 2 and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    rows = read_csv(path)
    assert 2 <= len(rows) < 16, len(rows)  # killed mid-run, with what it had measured
    assert all(r["status"] == "ok" for r in rows)
    text = (tmp_path / "stage.log").read_text()
    assert "[attention milestone 1/16" in text and "[attention milestone 2/16" in text


def test_row_log_appends_and_rewrites(tmp_path):
    path = str(tmp_path / "x.csv")
    log = RowLog(path)
    log.add({"case": "a", "ms": 1.0, "status": "ok"})
    assert read_csv(path) == [{"case": "a", "ms": "1.0", "status": "ok"}]
    log = RowLog(path, append=True)  # a second command of the same stage
    log.add({"case": "b", "status": "n/a: needs CUDA", "graph_ms": 0.5})
    rows = read_csv(path)
    assert [r["case"] for r in rows] == ["a", "b"] and rows[1]["graph_ms"] == "0.5" and rows[0]["graph_ms"] == ""
    assert RowLog(path).rows == []  # without append: a fresh file


def test_guarded_statuses(capsys):
    def raises(e):
        def measure():
            raise e
        return measure
    assert guarded({}, lambda: {"ms": 1.0}, "cpu") == {"ms": 1.0, "status": "ok"}
    assert guarded({}, raises(Unavailable("needs CUDA")), "cpu")["status"] == "n/a: needs CUDA"
    assert guarded({}, raises(ImportError("no flash_attn")), "cpu")["status"].startswith("n/a: ImportError")
    status = guarded({"case": "c"}, raises(TypeError("bad call")), "cpu")["status"]
    assert status == "error: TypeError: bad call"  # a bug fails the run (the runner's exit status is 1)
    assert "TypeError: bad call" in capsys.readouterr().err  # with its traceback in the log


def test_graph_timing_off_cuda_is_a_note():
    assert graph_fields(lambda: None, "cpu") == {"graph_note": "n/a: needs CUDA"}


@pytest.mark.gpu
def test_graph_timing_on_cuda():
    x = torch.randn(1024, 1024, device="cuda")
    assert graph_fields(lambda: x @ x, "cuda")["graph_ms"] > 0


@pytest.mark.parametrize("op,preset", [(attention, "milestone"), (attention, "models"), (relpos, "sttr"),
                                       (sinkhorn, "h200"), (models, "anchors"), (sttr, "h200")])
def test_tiny_keeps_each_case_but_its_size(op, preset):
    for case in op.presets(preset):
        small = op.tiny(case)
        assert small.mode == case.mode and small.name == f"{case.name} (tiny)"
        if op is attention:
            assert (small.causal, small.mask, small.graph) == (case.causal, case.mask, case.graph)
            assert small.B <= 2 and small.H <= 2 and small.Nk <= 64 and small.D in (16, 32)
            assert small.Nq == min(case.Nq, 64)  # decode keeps its single query


def test_varlen_case():
    case = next(c for c in attention.presets("models") if c.mask == "varlen")
    assert (case.B, case.H, case.D) == (32, 12, 64) and case.graph
    lengths = attention.lengths_of(case)
    assert torch.equal(lengths, attention.lengths_of(case))  # deterministic
    assert 128 <= lengths.min() and lengths.max() <= 512 and len(set(lengths.tolist())) > 8
    assert case.flops() == 4 * 12 * 64 * sum(n * n for n in lengths.tolist())


def test_summary_table(tmp_path):
    rows = [{"case": "B4", "mode": "fwd", "provider": "tlv_fast", "op": "attention", "status": "ok", "ms": "0.5",
             "tflops": "301.2", "graph_ms": ""},
            {"case": "B4", "mode": "fwd", "provider": "sdpa-cudnn", "op": "attention", "status": "n/a: needs CUDA"},
            {"case": "ViT", "mode": "fwd", "provider": "tlv_fast", "op": "attention", "status": "ok", "ms": "0.2",
             "tflops": "100", "graph_ms": "0.15"}]
    with open(tmp_path / "03_headline.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    text = summary(str(tmp_path))
    assert "03_headline.csv (3 rows)" in text
    assert "301TF 0.500ms" in text and "n/a: needs CUDA" in text and "100TF 0.200ms g0.150" in text
    assert summary(str(tmp_path / "empty")).startswith("(no CSV rows")


def test_a_python_error_fails_the_run(monkeypatch, tmp_path):
    """A bug in a row (here: a provider whose call raises TypeError) is status "error: ...", not "n/a", and the
    runner exits 1, which fails the stage and the dry run."""
    from benchmarks.__main__ import main

    def broken(*args, **kwargs):
        raise TypeError("a bug")
    monkeypatch.setattr(attention, "provider_fn", lambda *args: broken)
    path = tmp_path / "x.csv"
    assert main(["attention", "--preset", "smoke", "--providers", "eager", "--tiny", "--no-png",
                 "--csv", str(path)]) == 1
    assert {r["status"] for r in read_csv(path)} == {"error: TypeError: a bug"}


def test_a_failing_stage_fails_the_script(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCH_")}
    env.update(OUT=str(tmp_path), PYTHON="false")  # every stage's command fails at once
    res = subprocess.run(["bash", SCRIPT, "--dry-run"], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=120)
    assert res.returncode == 1
    assert "headline   rc=1" in (tmp_path / "summary.txt").read_text()

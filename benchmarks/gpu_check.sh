#!/usr/bin/env bash
# The one prepared GPU check for a GPU machine, under 5 minutes: install, `pytest -m gpu`, quick benchmarks.
# Everything lands under $OUT (summary.txt first). Run from anywhere:  OUT=/some/dir bash benchmarks/gpu_check.sh
# Stage budgets (seconds) add up to 300: install 15, tests 95, attention milestone 70, sinkhorn 30, relpos 30,
# models 20, sttr 40;
# the C++/CUDA extension builds in the background from the start (tests that need it wait on its lock). Benchmark
# rows are logged as they finish, so a stage cut by its timeout keeps what it measured.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
summary="$OUT/summary.txt"
stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$(date -u +%FT%TZ) $name rc=$rc $((SECONDS - t0))s" | tee -a "$summary"
  tail -n 3 "$OUT/$name.txt" | sed 's/^/    /' | tee -a "$summary"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$summary"
stage install 15 python3 -m pip install --no-deps --no-build-isolation -e .
(timeout 240 python3 -m tlv_fast.build > "$OUT/build.txt" 2>&1; echo "build rc=$?" >> "$OUT/build.txt") &
stage pytest_gpu 95 python3 -m pytest -q -m gpu --maxfail=5 tests -p no:cacheprovider
export TRITON_PRINT_AUTOTUNING=1  # record the chosen tiles next to the numbers
stage bench_milestone 70 python3 -m benchmarks attention --preset milestone --out "$OUT"
stage bench_sinkhorn 30 python3 -m benchmarks sinkhorn --preset h200 --dtype fp32 --out "$OUT"
stage bench_relpos 30 python3 -m benchmarks relpos --preset sttr --dtype fp16 --out "$OUT"
stage bench_models 20 python3 -m benchmarks attention --preset models --providers tlv_fast,sdpa-flash,sdpa-cudnn --out "$OUT"
stage bench_sttr 40 python3 -m benchmarks sttr --preset h200 --out "$OUT"
wait
tail -n 2 "$OUT/build.txt" | tee -a "$summary"
echo "results in $OUT" | tee -a "$summary"

#!/usr/bin/env bash
# The one prepared GPU check: the key numbers of one GPU (an H200) from one cold call that may be killed at ~540 s.
# Everything lands under $OUT: summary.txt (written first, rewritten after every stage), env.txt, README.txt, one
# log (NN_stage.log) and one CSV (NN_stage.csv) per stage, build.log, png/.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh             # with a CUDA GPU, from anywhere
#   OUT=/tmp/dry  bash benchmarks/gpu_check.sh --dry-run   # on a CPU: every stage's Python with tiny shapes
#
# Stages, in this order, each under `timeout -k 3 BUDGET` (tests/benchmarks/test_gpu_check.py checks this table
# against the stage calls below, and that budgets plus the 3 s kill grace of each add up to <= 500 s):
#
#   stage       budget  what
#   env              10  nvidia-smi, versions, git revision -> env.txt and summary.txt
#   install          15  pip install --no-deps --no-build-isolation -e . ; then the C++/CUDA extension builds in
#                        the background (python -m tlv_fast.build: nvcc, 60-120 s cold) while Triton stages run
#   headline         80  attention B4 H16 N4096 D64/D128, causal and not, every fwd then every fwd+bwd, bf16:
#                        tlv_fast (pinned tiles), sdpa-cudnn, sdpa-flash
#   shapes           50  ViT B256 N197, BERT key padding B32 N512, BERT varlen (lengths 128..512), GPT decode
#                        Nq1 Nk8192, STTR B960 N320 D16: tlv_fast, cudnn, flash, efficient; do_bench + CUDA graph
#   relpos           25  STTR relative-position attention, 960 lines W320 8x16 fp16: tlv_fast, then eager
#   models           35  BERT-base, GPT-2 small fwd+bwd, ViT-B/16: tlv_fast, then HF sdpa / eager (if installed)
#   build_wait       30  wait (at most this long) for the background build: the next two stages need it
#   sinkhorn         20  960 problems of 321 x 321 fp32, 10 iterations: tlv_fast (CUDA extension), then eager
#   sttr             40  STTR end to end, 960x540 / 640x384 training / 1080p: tlv_fast, then reference
#   pytest           70  pytest -m gpu (tests that need the extension wait on its lock)
#   compiled         50  torch.compile baselines: Flex on the headline and model shapes, Triton's tutorial (when
#                        $TLV_TUTORIAL_ATTENTION names a copy), Flex with the relpos table, compiled Sinkhorn
#   autotune         40  TLV_FAST_AUTOTUNE=1 on the headline rows, TRITON_CACHE_DIR=$AUTOTUNE_CACHE (default
#                        $OUT/triton-cache): the choices and kernels stay there, a rerun pointed at it reuses them
#   total           465  (+ 3 s kill grace for each of the 11 timed stages = 498)
#
# Every benchmark row is appended to its stage's CSV and printed to its log the moment it is measured, so a stage
# cut by its budget keeps what it measured; PNGs are drawn at the end of a stage and are never needed.
# Columns: ms = median of triton.testing.do_bench (host launch overhead included); graph_ms = one call replayed
# from a CUDA graph (no host overhead; the model-shape rows of `shapes`); tflops, gbps, peak_MiB, max_err, status.
#
# --dry-run (CPU): TRITON_INTERPRET=1 (Triton kernels through the interpreter), BENCH_TINY=1 (every case shrunk
# to N <= 64, D 16/32, B and H <= 2, one timed call); no nvidia-smi, no pip install, no background build; the C++
# CPU ops where the op has one; providers that need CUDA give the row status "n/a: needs CUDA". Exits non-zero if
# any stage fails (a Python error in a row is status "error: ..." and fails its stage).
set -u
DRY=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    *) echo "usage: OUT=DIR bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT/png"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}  # `pip` may be another Python's: everything goes through $PY -m
export OUT PY PYTHONUNBUFFERED=1 BENCH_OUT="$OUT/png"
if ((DRY)); then
  # the CPU only; one OpenMP thread: steady timings when other processes share a few cores
  export CUDA_VISIBLE_DEVICES= TRITON_INTERPRET=1 BENCH_TINY=1 OMP_NUM_THREADS=1
fi
AUTOTUNE_CACHE=${AUTOTUNE_CACHE:-$OUT/triton-cache}
: > "$OUT/stages.txt"
n=0
failed=0
build_pid=

cat > "$OUT/README.txt" <<'EOF'
summary.txt     environment, one line per stage (rc, seconds used / budget, CSV rows), a table per stage CSV:
                cells are TFLOP/s (attention) and ms = median of triton.testing.do_bench (back-to-back calls, host
                launch overhead included); gN.NNN = ms of one call replayed from a CUDA graph (no host launch
                overhead; model-shape rows); NNNMiB = peak memory beyond the inputs; otherwise the row's status
                ("n/a: ..." cannot run here, "oom", "error: ..." with its traceback in the stage's log).
NN_stage.log    the stage's output: a line per row as it is measured; NN_stage.csv every row with all columns
                (ms, graph_ms, graph_note, tflops, gbps, peak_MiB, max_err vs fp32 eager, status, shapes, versions)
env.txt         GPU, driver, versions, git revision; build.log the background C++/CUDA build; png/ the plots
triton-cache/   the autotune stage's Triton cache (chosen tiles and kernels), reusable by a rerun
EOF

write_summary() {
  {
    echo "GPU check $(date -u +%FT%TZ), ${SECONDS}s in$( ((DRY)) && echo ': DRY RUN (CPU, Triton interpreter, tiny shapes: not speed)')"
    cat "$OUT/env.txt" 2>/dev/null
    echo
    echo "stage       rc    used/budget  rows"
    cat "$OUT/stages.txt"
    echo
    echo "Cells: TFLOP/s (attention), do_bench ms (host launch overhead included), gN.NNN = CUDA-graph replay ms"
    echo "(no host overhead), peak MiB, or the row's status. Columns: README.txt."
    timeout 10 "$PY" -m benchmarks summary "$OUT" 2>&1
  } > "$OUT/summary.txt.tmp"
  mv -f "$OUT/summary.txt.tmp" "$OUT/summary.txt"
}

record() {  # record NAME RC SECONDS BUDGET [CSV]: one line in stages.txt, then the summary again
  local rows=-
  [ -n "${5:-}" ] && [ -f "$5" ] && rows=$(($(wc -l < "$5") - 1))
  local note=
  case $2 in 124|137) note="  TIMEOUT (cut at its budget)" ;; esac
  printf '%-10s rc=%-3s %4ss/%3ss  %4s%s\n' "$1" "$2" "$3" "$4" "$rows" "$note" >> "$OUT/stages.txt"
  [ "$2" = 0 ] || failed=1
  write_summary
}

stage() {  # stage NAME BUDGET COMMAND...: the command under its budget, its log and CSV named NN_NAME
  local name=$1 secs=$2; shift 2
  n=$((n + 1))
  local id
  id=$(printf '%02d_%s' "$n" "$name")
  local t0=$SECONDS
  BENCH_CSV="$OUT/$id.csv" timeout -k 3 "$secs" "$@" > "$OUT/$id.log" 2>&1
  local rc=$?
  # exit 3 from the runner: no provider of the stage is available here (all n/a, none failed), as in a dry run
  # of the CUDA-only baselines
  if ((DRY)) && [ "$rc" -eq 3 ]; then rc=0; fi
  record "$name" "$rc" "$((SECONDS - t0))" "$secs" "$OUT/$id.csv"
}

wait_build() {  # wait_build NAME BUDGET: until the background build has exited, at most BUDGET seconds
  local name=$1 secs=$2 t0=$SECONDS
  while [ -n "$build_pid" ] && kill -0 "$build_pid" 2>/dev/null && ((SECONDS - t0 < secs)); do sleep 1; done
  local rc=0
  [ -n "$build_pid" ] && kill -0 "$build_pid" 2>/dev/null && rc=124
  record "$name" "$rc" "$((SECONDS - t0))" "$secs"
}

collect_env() {
  {
    date -u +%FT%TZ
    if ((DRY)); then
      echo "dry run: no nvidia-smi (CPU: $(getconf _NPROCESSORS_ONLN) cores)"
    else
      timeout 5 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit,temperature.gpu \
        --format=csv,noheader 2>&1
    fi
    timeout 5 "$PY" -c "import sys, importlib.metadata as m; print('python', sys.version.split()[0], *(f'{p} ' + \
m.version(p) for p in ('torch', 'triton')))" 2>&1
    ((DRY)) || timeout 3 nvcc --version 2>&1 | tail -n 1
    echo "git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(git status --short 2>/dev/null | wc -l) files changed"
  } > "$OUT/env.txt"
}
export -f collect_env
export DRY
unset TLV_FAST_AUTOTUNE  # pinned tiles everywhere but the autotune stage

write_summary
stage env 10 bash -c collect_env
if ((DRY)); then
  stage install 15 echo "dry run: no pip install"
  echo "dry run: no background build" > "$OUT/build.log"
else
  stage install 15 "$PY" -m pip install --no-deps --no-build-isolation -e .
  timeout -k 3 300 "$PY" -m tlv_fast.build > "$OUT/build.log" 2>&1 &
  build_pid=$!
fi

stage headline 80 "$PY" -m benchmarks attention --preset milestone --dtype bf16 \
  --providers tlv_fast,sdpa-cudnn,sdpa-flash
stage shapes 50 "$PY" -m benchmarks attention --preset models --dtype bf16 \
  --providers tlv_fast,sdpa-cudnn,sdpa-flash,sdpa-efficient
stage relpos 25 "$PY" -m benchmarks relpos --preset sttr --dtype fp16 --providers tlv_fast,eager
stage models 35 "$PY" -m benchmarks models --preset anchors --providers tlv_fast,hf-sdpa,hf-eager
wait_build build_wait 30
stage sinkhorn 20 "$PY" -m benchmarks sinkhorn --preset h200 --dtype fp32 --providers tlv_fast,eager
stage sttr 40 "$PY" -m benchmarks sttr --preset h200 --providers tlv_fast,reference
stage pytest 70 env -u BENCH_CSV -u BENCH_TINY -u BENCH_OUT "$PY" -m pytest -v -m gpu --maxfail=10 \
  -p no:cacheprovider --durations=10 tests
stage compiled 50 "$PY" -m benchmarks attention --preset milestone --dtype bf16 --providers flex,tutorial \
  :: attention --preset models --dtype bf16 --providers flex \
  :: relpos --preset sttr --dtype fp16 --providers flex-table \
  :: sinkhorn --preset h200 --dtype fp32 --providers compiled
mkdir -p "$AUTOTUNE_CACHE"
stage autotune 40 env TLV_FAST_AUTOTUNE=1 TRITON_CACHE_DIR="$AUTOTUNE_CACHE" TRITON_PRINT_AUTOTUNING=1 \
  "$PY" -m benchmarks attention --preset milestone --dtype bf16 --providers tlv_fast

if [ -n "$build_pid" ]; then
  if kill -0 "$build_pid" 2>/dev/null; then
    echo "build still running at the end: stopped" >> "$OUT/build.log"
    kill "$build_pid" 2>/dev/null  # timeout passes the signal on to the build
  fi
  wait "$build_pid"
  echo "build rc=$?" >> "$OUT/build.log"
  echo "build: $(tail -n 2 "$OUT/build.log" | tr '\n' ' ')" >> "$OUT/stages.txt"
fi
write_summary
echo "results in $OUT ($SECONDS s)"
exit $failed

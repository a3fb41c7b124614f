#!/usr/bin/env bash
# On a CUDA machine: build in place for this GPU, run the CUDA tests, every row of the GPU goals
# (benchmarks/bench_gpu.py: EGN vs naive, host syncs, RevGN vs Adam, the Gram solve with its floors,
# TF32 errors, the profiler breakdown), then, while time remains, torch.compile and CUDA-graph rows and
# Nsight Compute on the Gram solve. Everything lands in one folder, $OUT (default /tmp/revgn_gpu);
# $OUT/summary.md has one line per goal with its verdict, $OUT/stages.txt the time of each stage.
#
#   bash benchmarks/gpu_validate.sh                        # the GPU run (budget: BUDGET_S, 480 s)
#   DEVICE=cpu QUICK=1 SKIP_BUILD=1 TESTS=python_tests/ops/test_gpu.py bash benchmarks/gpu_validate.sh
#                                                          # CPU check of the script itself
#   bash benchmarks/gpu_validate.sh DATA_DIR [MINI_EPOCHS] [FULL_EPOCHS]   # then the paper run (long)
#
# Knobs (environment): DEVICE (cuda), QUICK (0; 1 = tiny sizes), SKIP_BUILD (0; 1 reuses the in-place
# build), FULL_TESTS (0 = the files with CUDA tests only), TESTS (test paths, replaces both), BUDGET_S
# (480: the optional stages start only before this many seconds), NCU (1 = run Nsight Compute when
# `ncu` exists), PYTHON (python3), MAX_JOBS (16), TORCH_CUDA_ARCH_LIST (9.0).
set -u
OUT=${OUT:-/tmp/revgn_gpu}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
BUDGET_S=${BUDGET_S:-480}
DATA_DIR=${1:-}
MINI_EPOCHS=${2:-10}
FULL_EPOCHS=${3:-100}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
rm -f "$OUT"/bench_*.json "$OUT"/stages.txt
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build below
T0=$(date +%s)
BENCH_ARGS=(--device "$DEVICE" --out "$OUT")
[ "$QUICK" = 1 ] && BENCH_ARGS+=(--quick)
FAILED=()

elapsed() { echo $(( $(date +%s) - T0 )); }
# stage NAME TIMEOUT_S CMD...: run with a time limit, log to $OUT/NAME.log, record the time and exit code.
# A failed stage fails the script, except the optional ones (OPTIONAL=1), which are only recorded.
stage() {
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  echo "== $name (limit ${limit} s, at $(elapsed) s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/stages.txt"
  [ $rc -ne 0 ] && [ "${OPTIONAL:-0}" != 1 ] && FAILED+=("$name")
  return $rc
}
# time_left NAME: true while the optional stages' budget lasts, else records that NAME was skipped.
time_left() {
  [ "$(elapsed)" -lt "$BUDGET_S" ] && return 0
  echo "== $1: skipped, $(elapsed) s used of BUDGET_S=$BUDGET_S" | tee -a "$OUT/stages.txt"
  return 1
}

{ command -v nvidia-smi > /dev/null \
    && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
  lscpu | grep "Model name"; uptime
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
          torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  if [ "$DEVICE" = cuda ]; then
    stage build 420 env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
      $PY setup.py build_ext --inplace || { tail -40 "$OUT/build.log"; exit 1; }
  else
    stage build 420 env REVGN_NO_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}" $PY setup.py build_ext --inplace \
      || { tail -40 "$OUT/build.log"; exit 1; }
  fi
fi

# A build without CUDA kernels would turn every CUDA test into a skip: refuse to go on.
$PY -c "
import sys, torch
from revgn_ext import ops
info = ops.build_info()
print('ops:', ops.backend(), info['load_path'], 'cuda_kernels', info['cuda_kernels'], info['library'])
sys.exit(0 if '$DEVICE' != 'cuda' or (info['cuda_kernels'] and torch.cuda.is_available()) else 1)
" | tee -a "$OUT/machine.txt" || { echo "CUDA kernels not loaded; see $OUT/build.log"; exit 1; }

if [ -n "${TESTS:-}" ]; then
  read -r -a TESTS <<< "$TESTS"
  TEST_LIMIT=240
elif [ "${FULL_TESTS:-0}" = 1 ]; then
  TESTS=(python_tests)
  TEST_LIMIT=600
else
  # The files with CUDA tests (the others run on the CPU only; test_backend.py's JIT test would repeat
  # the whole CUDA build, so it runs only with FULL_TESTS=1).
  TESTS=(python_tests/ops/test_gpu.py python_tests/ops/test_gram_cholesky.py python_tests/ops/test_coupling.py)
  TEST_LIMIT=240
fi
# Direct-call argument errors run in a process of their own (a crash there must not hide the rest).
stage tests "$TEST_LIMIT" env REVGN_REQUIRE_EXT=1 $PY -m pytest "${TESTS[@]}" -q -ra -p no:cacheprovider \
  --deselect python_tests/ops/test_coupling.py::test_kernels_reject_bad_inputs_directly
grep -E "^(FAILED|ERROR|XPASS|XFAIL)|passed|failed|skipped in" "$OUT/tests.log" | tail -30
stage tests_direct 60 $PY -m pytest python_tests/ops/test_coupling.py -q -p no:cacheprovider \
  -k test_kernels_reject_bad_inputs_directly
tail -1 "$OUT/tests_direct.log"

stage bench 300 $PY benchmarks/bench_gpu.py "${BENCH_ARGS[@]}"
grep -E "failed|Error" "$OUT/bench.log" | head -10

# Optional rows, each in a process of its own and only while the budget lasts.
time_left compiled && OPTIONAL=1 stage compiled 150 $PY benchmarks/bench_gpu.py "${BENCH_ARGS[@]}" --only compiled
if [ "$DEVICE" = cuda ]; then
  time_left graphs && OPTIONAL=1 stage graphs 60 $PY benchmarks/bench_gpu.py "${BENCH_ARGS[@]}" --only graphs
  NCU_BIN=$(command -v ncu || { [ -x /usr/local/cuda/bin/ncu ] && echo /usr/local/cuda/bin/ncu; })
  if [ "${NCU:-1}" = 1 ] && [ -n "$NCU_BIN" ] && time_left ncu; then
    # The NVTX ranges of bench_gpu.py's ncu_target row (profile sizes); at most 80 kernels, so that
    # cuSOLVER's many small launches at n = 1024 stay within the limit.
    if [ "$QUICK" = 1 ]; then RANGES=(--nvtx-include "gram_n32/" --nvtx-include "gram_n64/")
    else RANGES=(--nvtx-include "gram_n256/" --nvtx-include "gram_n1024/"); fi
    OPTIONAL=1 stage ncu 120 "$NCU_BIN" --nvtx "${RANGES[@]}" --launch-count 80 \
      --section SpeedOfLight --section LaunchStats --section Occupancy --print-summary per-kernel \
      $PY benchmarks/bench_gpu.py "${BENCH_ARGS[@]}" --only ncu_target
    grep -E "ERR_NVGPUCTRPERM|==ERROR==" "$OUT/ncu.log" | head -3
  else
    echo "== ncu: not run (NCU=${NCU:-1}, ncu: ${NCU_BIN:-not installed})" | tee -a "$OUT/stages.txt"
  fi
fi
rm -f "$OUT/bench_ncu_target.json"
$PY benchmarks/bench_gpu.py --out "$OUT" --summarize > /dev/null
cat "$OUT/summary.md"

if [ -n "$DATA_DIR" ]; then
  echo "== paper run (Fashion-MNIST, d=784, L=2, M=8000, n=1024)"
  start=$(date +%s)
  $PY -m revgn_ext.experiments reproduce --dataset fashion-mnist --data-dir "$DATA_DIR" --device "$DEVICE" \
    --blocks 2 --hidden 8000 --batch-size 1024 --full-batch-size 1024 --epochs "$MINI_EPOCHS" \
    --full-epochs "$FULL_EPOCHS" --no-progress --out "$OUT/paper" > "$OUT/paper.log" 2>&1
  echo "paper: exit $? in $(( $(date +%s) - start )) s" | tee -a "$OUT/stages.txt"
  tail -30 "$OUT/paper.log"
fi
echo "total $(elapsed) s; results in $OUT"
[ ${#FAILED[@]} -eq 0 ] || { echo "stages failed: ${FAILED[*]}"; exit 1; }

#!/usr/bin/env bash
# On a CUDA machine: build the extension in place for this GPU, run the kernel tests, then the kernel
# benchmarks. Logs and the results table go to $OUT (default /tmp/revgn_gpu).
#   bash benchmarks/gpu_kernels.sh [--no-bench]
set -u
OUT=${OUT:-/tmp/revgn_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" >> "$OUT/gpu.txt" 2>&1
echo "== build"
start=$(date +%s)
if ! TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
echo "== tests"
REVGN_REQUIRE_EXT=1 $PY -m pytest python_tests/test_gram_cholesky.py python_tests/test_coupling.py -q \
  -p no:cacheprovider -p no:logging > "$OUT/tests.log" 2>&1
echo "pytest exit $?"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -40
if [ "${1:-}" != "--no-bench" ]; then
  echo "== bench"
  $PY benchmarks/bench_kernels.py --device cuda --out "$OUT/kernels.md" > "$OUT/bench.log" 2>&1
  echo "bench exit $?"
  tail -5 "$OUT/bench.log"
  cat "$OUT/kernels.md" 2>/dev/null | tail -60
fi

#!/usr/bin/env bash
# On a CUDA machine: build the extension in place for this GPU, run the kernel tests, then the kernel
# benchmarks. Logs and the results table go to $OUT (default /tmp/revgn_gpu).
#   bash benchmarks/gpu_kernels.sh [--no-bench]
set -u
OUT=${OUT:-/tmp/revgn_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build below
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
# Direct-call argument errors are run in a process of their own, under cuda-gdb for a native backtrace
# if they crash.
REVGN_REQUIRE_EXT=1 $PY -m pytest python_tests/test_gram_cholesky.py python_tests/test_coupling.py -v --tb=short \
  -p no:cacheprovider -p no:logging --deselect python_tests/test_coupling.py::test_kernels_reject_bad_inputs_directly \
  > "$OUT/tests.log" 2>&1
echo "pytest exit $?"
grep -E "^(FAILED|ERROR)|^E  |passed|failed" "$OUT/tests.log" | tail -40
$PY -m pytest python_tests/test_coupling.py -v --tb=short -p no:cacheprovider -p no:logging \
  -k test_kernels_reject_bad_inputs_directly > "$OUT/direct.log" 2>&1
echo "direct-call errors: pytest exit $?"
tail -3 "$OUT/direct.log"
if grep -q "Segmentation" "$OUT/direct.log" && command -v cuda-gdb > /dev/null; then
  timeout 120 cuda-gdb -batch -ex run -ex bt --args $PY -m pytest python_tests/test_coupling.py -q -p no:cacheprovider \
    -k test_kernels_reject_bad_inputs_directly > "$OUT/gdb.log" 2>&1
  grep -E "^#" "$OUT/gdb.log" | head -25
fi
if [ "${1:-}" != "--no-bench" ]; then
  echo "== bench"
  $PY benchmarks/bench_kernels.py --device cuda --only "${BENCH_ONLY:-all}" --out "$OUT/kernels.md" \
    > "$OUT/bench.log" 2>&1
  echo "bench exit $?"
  grep -E "failed:" "$OUT/bench.log" | head -5
  tail -40 "$OUT/kernels.md" 2>/dev/null
fi

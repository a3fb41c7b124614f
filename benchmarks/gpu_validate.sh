#!/usr/bin/env bash
# On a CUDA machine: build in place for this GPU, run the whole test suite (CUDA tests included), the
# GPU step benchmarks, and a paper-configuration reproduction on Fashion-MNIST. Everything lands in
# $OUT (default /tmp/revgn_gpu).
#   bash benchmarks/gpu_validate.sh DATA_DIR [MINI_EPOCHS] [FULL_EPOCHS]
set -u
OUT=${OUT:-/tmp/revgn_gpu}
DATA_DIR=${1:?usage: gpu_validate.sh DATA_DIR [MINI_EPOCHS] [FULL_EPOCHS]}
MINI_EPOCHS=${2:-10}
FULL_EPOCHS=${3:-100}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build below
PY=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,driver_version --format=csv; lscpu | grep "Model name"
  $PY -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } \
  > "$OUT/machine.txt" 2>&1

echo "== build"
start=$(date +%s)
if ! TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; exit 1
fi
echo "built in $(( $(date +%s) - start )) s"

echo "== tests"
REVGN_REQUIRE_EXT=1 $PY -m pytest python_tests -q -ra -p no:cacheprovider > "$OUT/tests.log" 2>&1
echo "pytest exit $?"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -25

echo "== RevGN step vs Adam (MNIST config)"
$PY benchmarks/bench_revgn_step.py --device cuda --configs cpu,mnist --out "$OUT/revgn_gpu.md" > "$OUT/bench_revgn.log" 2>&1
echo "bench exit $?"; tail -8 "$OUT/revgn_gpu.md" 2>/dev/null

echo "== paper run (Fashion-MNIST, d=784, L=2, M=8000, n=1024)"
start=$(date +%s)
$PY -m revgn_ext.experiments reproduce --dataset fashion-mnist --data-dir "$DATA_DIR" --device cuda \
  --blocks 2 --hidden 8000 --batch-size 1024 --full-batch-size 1024 --epochs "$MINI_EPOCHS" \
  --full-epochs "$FULL_EPOCHS" --no-progress --out /tmp/paper > "$OUT/paper.log" 2>&1
echo "reproduce exit $? in $(( $(date +%s) - start )) s"
tail -30 "$OUT/paper.log"
tar czf "$OUT/paper.tgz" -C /tmp paper 2>/dev/null

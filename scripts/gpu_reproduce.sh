#!/usr/bin/env bash
# The GPU rows of docs/REPRODUCTION.md in one go (under 10 minutes on one H100/H200):
#
#     bash scripts/gpu_reproduce.sh            # PYTHON=python3.X to choose the interpreter
#
# 1. scripts/gpu_check.sh (GPU tests, NCCL at world size 1, ResNet-50 vs PyTorch);
# 2. scripts/bench_kfac.py --device gpu: K-FAC overhead on ResNet-50 at batch 8;
# 3. scripts/compare_optimizers.py --device gpu: SGD vs K-FAC, MNIST, batch 4,096;
# 4. scripts/small_scale_table.py --device gpu: the same at batches 1K, 4K, 16K and 60K
#    (60K as 3 micro-batches of 20,000, to bound the memory its activations take).
#
# Each step has its own time limit, so one stuck step cannot take the others' time. Logs,
# JSON and PNG files go to $OUT (else result/gpu) as one archive, results.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-result/gpu}"
WORK="$DEST/gpu_reproduce"
mkdir -p "$WORK"
WANTED="${PYTHON:-python3}"
PYTHON="$(command -v "$WANTED")" || { echo "gpu_reproduce: no interpreter '$WANTED'" >&2; exit 2; }
export PYTHON PYTHONUNBUFFERED=1
STATUS=0

step() {  # step SECONDS NAME COMMAND...: run with a time limit, log to $WORK/NAME.txt
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$WORK/$name.txt" 2>&1
    local code=$?
    grep -v '^{' "$WORK/$name.txt" | tail -n 24
    echo "== $name exit status $code"
    [ "$code" -eq 0 ] || STATUS=1
}

step 150 gpu_check env OUT="$WORK/check" bash scripts/gpu_check.sh
step 90 bench_kfac "$PYTHON" scripts/bench_kfac.py --device gpu --batchsize 8
step 150 compare_optimizers "$PYTHON" scripts/compare_optimizers.py --device gpu \
    --out "$WORK/compare"
step 190 small_scale_table "$PYTHON" scripts/small_scale_table.py --device gpu \
    --micro-batch 20000 --out "$WORK/small_scale"
for name in bench_kfac compare_optimizers small_scale_table; do
    grep '^{' "$WORK/$name.txt" | tail -n 1
done
tar -czf "$DEST/results.tgz" -C "$DEST" gpu_reproduce && rm -rf "$WORK"
exit "$STATUS"

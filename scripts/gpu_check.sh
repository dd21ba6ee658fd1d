#!/usr/bin/env bash
# The one-shot GPU check (issues 7 and 18), under 10 minutes on one H100.  Needs CuPy (with
# NCCL) and mpi4py; cuDNN Frontend (nvidia-cudnn-frontend, with a cuDNN library: PyTorch's
# CUDA wheels bring one) for the cuDNN rows and tests; torch is optional; nothing is
# downloaded: on a machine without a network, bring the nvidia-cudnn-frontend wheel (12 MB)
# and `pip install --no-deps` it (it imports and defines graphs without its dependencies;
# should running one ask for apache-tvm-ffi, 13 MB, bring that wheel too); the cuDNN library
# (nvidia-cudnn-cu12/-cu13, 550 MB) must be there already.  Run from anywhere:
#
#     bash scripts/gpu_check.sh            # PYTHON=python3.X to choose the interpreter
#
# 1. the GPU-marked tests: tests/test_gpu_*.py and every other test file marked gpu
#    (the NCCL communicator file is left to step 2);
# 2. the NCCL communicator tests at world size 1, under `mpiexec -n 1` (a plain process when
#    there is no mpiexec, or when mpiexec cannot start the job);
# 3. scripts/bench_gpu.py: ResNet-50 forward+backward at batch 32, 224x224, ours (im2col and
#    cuDNN graphs, float32 and float16) and the PyTorch twin (strict float32 and AMP), their
#    ratios; one K-FAC step (every-step refresh, refresh, stale; one factor at a time, and
#    cuDNN with batched inversion) vs one SGD step; one DistributedKFAC step over NCCL.
#
# Writes gpu_tests.xml, gpu_nccl_tests.xml, gpu_bench.json, gpu_check.log and the summary
# gpu_check.json into $OUT when it is set, else into docs/.  Exits non-zero when a test fails
# or is skipped, or when our ResNet-50 forward+backward takes more than twice PyTorch's time.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-docs}"
mkdir -p "$DEST"
# An absolute path: mpiexec may search another PATH and start a Python without our packages.
WANTED="${PYTHON:-python3}"
PYTHON="$(command -v "$WANTED")" || { echo "gpu_check: no interpreter '$WANTED'" >&2; exit 2; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HYDRA_LAUNCHER=fork OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
LOG="$DEST/gpu_check.log"
: > "$LOG"
START=$(date +%s)

say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

say "python: $("$PYTHON" --version 2>&1)"
"$PYTHON" scripts/bench_gpu.py --describe-device 2>&1 | tee -a "$LOG"
if ! "$PYTHON" -c "import pytest" 2>/dev/null; then
    say "pytest is not installed: the test steps cannot run"
fi

# -- 1. GPU-marked tests ---------------------------------------------------------------------
mapfile -t MARKED < <(grep -l -e "pytest.mark.gpu" -e "def test_.*(xp" tests/test_*.py \
                      | grep -v "tests/test_gpu_nccl_communicator.py")
say "step 1: pytest -m gpu on ${#MARKED[@]} files"
timeout 200 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" -rfEs \
    --junitxml="$DEST/gpu_tests.xml" "${MARKED[@]}" 2>&1 | tee -a "$LOG" | tail -25
say "step 1 exit status ${PIPESTATUS[0]}"

# -- 2. NCCL communicator at world size 1 ------------------------------------------------------
NCCL_TESTS=(-m pytest -q -p no:cacheprovider -o addopts="" -rfEs
            --junitxml="$DEST/gpu_nccl_tests.xml" tests/test_gpu_nccl_communicator.py)
MPIEXEC="$(command -v mpiexec || true)"
rm -f "$DEST/gpu_nccl_tests.xml"
if [ -n "$MPIEXEC" ]; then
    say "step 2: $MPIEXEC -n 1 pytest tests/test_gpu_nccl_communicator.py"
    timeout 60 "$MPIEXEC" -n 1 "$PYTHON" "${NCCL_TESTS[@]}" 2>&1 | tee -a "$LOG" | tail -15
    say "step 2 exit status ${PIPESTATUS[0]}"
fi
if [ ! -s "$DEST/gpu_nccl_tests.xml" ]; then
    say "step 2: plain process (no mpiexec, or mpiexec could not start the job)"
    timeout 60 "$PYTHON" "${NCCL_TESTS[@]}" 2>&1 | tee -a "$LOG" | tail -15
    say "step 2 exit status ${PIPESTATUS[0]}"
fi

# -- 3. benchmarks (each of the 8 parts in its own process, 60 s at most) ----------------------
say "step 3: scripts/bench_gpu.py"
timeout 330 "$PYTHON" scripts/bench_gpu.py --worker-timeout 60 --iters 6 \
    --json "$DEST/gpu_bench.json" \
    2>&1 | tee -a "$LOG" | grep -v "^{"
say "step 3 exit status ${PIPESTATUS[0]}"

# -- summary ---------------------------------------------------------------------------------
"$PYTHON" scripts/bench_gpu.py --summarize "$DEST" --elapsed "$(( $(date +%s) - START ))" \
    2>&1 | tee -a "$LOG"
STATUS=${PIPESTATUS[0]}
say "done; summary in $DEST/gpu_check.json (exit $STATUS)"
exit "$STATUS"

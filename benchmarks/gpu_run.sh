#!/usr/bin/env bash
# GPU verification of the kernels and models, in one go, on a CUDA machine with torch/triton/timm installed:
#     OUT=/some/dir bash benchmarks/gpu_run.sh
# With the project's `device` tool: run `OUT=$OUT bash benchmarks/gpu_run.sh` with carry=[".gpu"] and a timeout of
# 600 s; .gpu/wheels holds what the machine lacks (prepare here: `pip download -d .gpu/wheels pytest`).
#
# Steps, each under its own time limit so that the whole run stays under 9 minutes (a lent machine's call limit):
#   1. install the project (no dependency changes)                                              -> run.log
#   2. `pytest -m gpu`: compiled kernels vs the float64 reference (attention at Swin-B shapes,
#      deterministic bias gradients; sparse conv at Twins-L shapes)                             -> pytest_gpu.log
#   3. sparse vs dense depthwise conv at Twins-L stage shapes (batch 128, bf16)                 -> sparse_conv_gpu.json
#   4. grouped attention vs FlexAttention / gather+SDPA / eager at Swin-B stage shapes
#      (window 7, batch 128, bf16) and the whole GreenMIM step on both backends                 -> group_attention_*.json
#   5. GreenMIM vs SimMIM step time and peak memory, Swin-B/L then Twins-SVT-B/L (batch 128, bf16)
#                                                                              -> mim_step_gpu.json, mim_step_twins_gpu.json
# plus environment.txt and status.txt (each step's exit status; 124 = it hit its time limit): 8 files at most, the
# number the device tool brings back. Logs of steps 3-5 are appended to run.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_run}"
mkdir -p "$OUT"
unset TRITON_INTERPRET  # compiled kernels: the interpreter must be off when triton is imported
LOG="$OUT/run.log"

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c 'import sys, torch, triton, timm; print("python", sys.version.split()[0], "torch", torch.__version__,
             "triton", triton.__version__, "timm", timm.__version__)'
  git rev-parse HEAD 2>/dev/null
} > "$OUT/environment.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log its output, record its exit status
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%T), limit ${limit}s): $*" >> "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "$name rc=$rc" | tee -a "$OUT/status.txt" >> "$LOG"
  return $rc
}

: > "$OUT/status.txt"
step install 120 python -m pip install -q --no-deps --no-build-isolation -e .
if ! python -c 'import pytest' 2>/dev/null && [ -d .gpu/wheels ]; then
  step pytest-install 60 python -m pip install -q --no-index --find-links .gpu/wheels pytest
fi

echo "=== gpu tests ($(date -u +%T), limit 150s)" >> "$LOG"
timeout 150 python -m pytest -m gpu -q -rs tests/test_group_attention_kernel.py tests/test_sparse_conv_kernel.py \
  > "$OUT/pytest_gpu.log" 2>&1
echo "gpu-tests rc=$?" | tee -a "$OUT/status.txt" >> "$LOG"

step sparse-conv 60 python benchmarks/bench_sparse_conv.py --dtype bf16 --repeats 10 --warmup 3 \
  --out "$OUT/sparse_conv_gpu.json"
step group-attention 150 python benchmarks/bench_group_attention.py --windows 7 --repeats 10 --warmup 3 --out "$OUT"
step mim-step-swin 90 python benchmarks/bench_mim_step.py --models green_swin_base green_swin_large \
  --batch-size 128 --amp bf16 --steps 8 --warmup 3 --out "$OUT/mim_step_gpu.json"
step mim-step-twins 90 python benchmarks/bench_mim_step.py --models green_twins_svt_base green_twins_svt_large \
  --batch-size 128 --amp bf16 --steps 8 --warmup 3 --out "$OUT/mim_step_twins_gpu.json"

cat "$OUT/status.txt"
tail -n 3 "$OUT/pytest_gpu.log"
! grep -qv ' rc=0$' "$OUT/status.txt"

#!/usr/bin/env bash
# GPU verification of the kernels and models on a CUDA machine with torch/triton/timm installed, in parts that each
# fit one call of a lent machine (under 9 minutes):
#     OUT=/some/dir bash benchmarks/gpu_run.sh              # part 1
#     OUT=/some/dir GPU_RUN_PART=2 bash benchmarks/gpu_run.sh
# With the project's `device` tool: run `OUT=$OUT bash benchmarks/gpu_run.sh` with carry=[".gpu"] and a timeout of
# 600 s; .gpu/wheels holds what the machine lacks (prepare here: `pip download -d .gpu/wheels pytest`).
#
# Part 1 -- the static, compile-once step (run it first):
#   1. install the project (no dependency changes)                                              -> run.log
#   2. `pytest -m gpu`: compiled kernels vs the float64 reference (attention at Swin-B shapes on exact and static
#      layouts, deterministic bias gradients; sparse conv at Twins-L shapes; SwinV2-B vs dense) -> pytest_gpu.log
#   3. GreenMIM vs SimMIM, Swin-B, batch 128, bf16: eager, and compiled once replayed as CUDA graphs; step time,
#      GPU kernel time per step (wall / kernel: host-bound or not), peak memory, compilations  -> mim_step_gpu.json
#   4. Nsight Compute on the three attention kernels and the sparse conv at stage-1 shapes: DRAM bandwidth,
#      occupancy, top stall reasons                                                 -> ncu.csv, ncu_summary.md
# Part 2 -- the other models and the kernel benchmarks:
#   1. install; 2. Swin-L and Twins-SVT-B/L steps, eager and compiled (batch 128, bf16)    -> mim_step_part2.json
#   3. sparse vs dense depthwise conv (Twins-L shapes); grouped attention vs FlexAttention / gather+SDPA / eager
#      (Swin-B, window 7)                                                    -> sparse_conv_gpu.json, group_attention_*.json
# Each part also writes environment.txt and status.txt (each step's exit status; 124 = it hit its time limit): at
# most 8 files, the number the device tool brings back. Step logs are appended to run.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_run}"
PART="${GPU_RUN_PART:-1}"
mkdir -p "$OUT"
unset TRITON_INTERPRET  # compiled kernels: the interpreter must be off when triton is imported
LOG="$OUT/run.log"

{
  date -u
  echo "gpu_run.sh part $PART"
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
step install 90 python -m pip install -q --no-deps --no-build-isolation -e .
STEP=(--batch-size 128 --amp bf16 --steps 8 --warmup 3)

if [ "$PART" = 1 ]; then
  if ! python -c 'import pytest' 2>/dev/null && [ -d .gpu/wheels ]; then
    step pytest-install 60 python -m pip install -q --no-index --find-links .gpu/wheels pytest
  fi
  echo "=== gpu tests ($(date -u +%T), limit 110s)" >> "$LOG"
  timeout 110 python -m pytest -m gpu -q -rs tests/test_group_attention_kernel.py tests/test_sparse_conv_kernel.py \
    tests/test_green_swinv2.py \
    > "$OUT/pytest_gpu.log" 2>&1
  echo "gpu-tests rc=$?" | tee -a "$OUT/status.txt" >> "$LOG"
  step mim-step-swin-b 270 python benchmarks/bench_mim_step.py --models green_swin_base --modes eager cuda-graphs \
    "${STEP[@]}" --out "$OUT/mim_step_gpu.json"
  step ncu 90 ncu --csv --page raw --metrics "$(python benchmarks/ncu_summary.py --metrics)" \
    --kernel-name regex:'_group_attention|_sparse_conv' --launch-count 12 --log-file "$OUT/ncu.csv" \
    python benchmarks/ncu_kernels.py
  step ncu-summary 20 python benchmarks/ncu_summary.py "$OUT/ncu.csv" --out "$OUT/ncu_summary.md"
else
  step mim-step-others 330 python benchmarks/bench_mim_step.py \
    --models green_swin_large green_twins_svt_base green_twins_svt_large --modes eager compiled "${STEP[@]}" \
    --out "$OUT/mim_step_part2.json"
  step sparse-conv 45 python benchmarks/bench_sparse_conv.py --dtype bf16 --repeats 10 --warmup 3 \
    --out "$OUT/sparse_conv_gpu.json"
  step group-attention 90 python benchmarks/bench_group_attention.py --windows 7 --repeats 10 --warmup 3 --out "$OUT"
fi

cat "$OUT/status.txt"
[ -f "$OUT/pytest_gpu.log" ] && tail -n 3 "$OUT/pytest_gpu.log"
! grep -qv ' rc=0$' "$OUT/status.txt"

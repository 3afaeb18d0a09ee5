#!/usr/bin/env bash
# GPU verification of the group window attention and sparse convolution kernels, in one go, on a CUDA machine with
# torch/triton/timm already installed:
#     OUT=/some/dir bash benchmarks/gpu_run.sh
# Installs the project (no dependency changes), runs the `gpu` tests (compiled kernels vs the float64 reference at
# Swin-B shapes, bitwise-deterministic bias gradients; the sparse conv at Twins-L shapes), the sparse vs dense conv
# benchmark at Twins-L stage shapes (batch 128, bf16; seconds), then the attention benchmark at Swin-B stage shapes
# (batch 128, bf16) and the whole GreenMIM training step, then GreenMIM vs SimMIM step time and peak memory (Swin-B/L,
# then Twins-SVT-B/L; batch 128, bf16). Everything lands under $OUT (default benchmarks/results/gpu_run).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_run}"
mkdir -p "$OUT"
unset TRITON_INTERPRET  # compiled kernels: the interpreter must be off when triton is imported

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c 'import torch, triton, timm; print("torch", torch.__version__, "triton", triton.__version__, "timm", timm.__version__)'
  git rev-parse HEAD 2>/dev/null
} > "$OUT/environment.txt" 2>&1

python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1
install_rc=$?
# the GPU machine has torch/triton/timm but maybe not pytest: install it from wheels carried in .gpu/wheels
# (prepare here with: pip download -d .gpu/wheels pytest; then run with carry=[".gpu"])
if ! python -c 'import pytest' 2>/dev/null && [ -d .gpu/wheels ]; then
  python -m pip install -q --no-index --find-links .gpu/wheels pytest >> "$OUT/install.log" 2>&1 || install_rc=1
fi

python -m pytest -m gpu -q -rs tests/test_group_attention_kernel.py tests/test_sparse_conv_kernel.py \
  > "$OUT/pytest_gpu.log" 2>&1
test_rc=$?

python benchmarks/bench_sparse_conv.py --dtype bf16 --repeats 10 --warmup 3 --out "$OUT/sparse_conv_gpu.json" \
  > "$OUT/bench_sparse_conv.log" 2>&1
conv_rc=$?

python benchmarks/bench_group_attention.py --out "$OUT" > "$OUT/bench_group_attention.log" 2>&1
bench_rc=$?

python benchmarks/bench_mim_step.py --models green_swin_base green_swin_large --batch-size 128 --amp bf16 \
  --steps 10 --warmup 3 --out "$OUT/mim_step_gpu.json" > "$OUT/bench_mim_step.log" 2>&1
step_rc=$?

python benchmarks/bench_mim_step.py --models green_twins_svt_base green_twins_svt_large --batch-size 128 --amp bf16 \
  --steps 5 --warmup 2 --out "$OUT/mim_step_twins_gpu.json" > "$OUT/bench_mim_step_twins.log" 2>&1
twins_rc=$?

echo "install rc=$install_rc  gpu tests rc=$test_rc  sparse conv rc=$conv_rc  benchmark rc=$bench_rc" \
  "mim step rc=$step_rc  twins step rc=$twins_rc" | tee "$OUT/status.txt"
tail -n 3 "$OUT/pytest_gpu.log"
exit $(( install_rc || test_rc || conv_rc || bench_rc || step_rc || twins_rc ))

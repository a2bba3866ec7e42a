#!/usr/bin/env bash
# Everything sgsc checks on a GPU, in one call of the `device` tool (a lent H100/H200 machine, which has
# its own torch and Triton and no network):
#
#   run(command="bash bench/gpu_check.sh", timeout_s=590)
#
# Each step has its own time limit (about 9 minutes in all, under the tool's 10 per command).
#
# It installs sgsc without the C++ CPU kernels (SGSC_SKIP_CPP=1: they would have to be built against
# that machine's torch, and only the CUDA ops are under test), runs the tests that exercise the Triton
# kernels on the GPU, then the GPU benchmarks. Results land in $OUT (the tool brings back at most 8
# files): log.txt (versions, tests, every benchmark's table) and the benchmarks' JSON files.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG="$OUT/log.txt"

step() { echo -e "\n## $*" | tee -a "$LOG"; }

step "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  git log --oneline -1 2>/dev/null; } 2>&1 | tee -a "$LOG"

step "install (no C++ kernels)"
if ! SGSC_SKIP_CPP=1 timeout 60 $PY -m pip install --no-deps --no-build-isolation -q -e . >>"$LOG" 2>&1; then
  # no network there: if pip cannot build the editable install, lay the package out by hand
  # (kernels/ is installed as sgsc.kernels)
  echo "pip install failed: importing sgsc from a copy with kernels/ as sgsc/kernels" | tee -a "$LOG"
  mkdir -p /tmp/sgsc-src && rm -rf /tmp/sgsc-src/sgsc && cp -r sgsc /tmp/sgsc-src/sgsc && cp -r kernels /tmp/sgsc-src/sgsc/kernels
  export PYTHONPATH=/tmp/sgsc-src${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import sgsc, sgsc.kernels; print('sgsc from', sgsc.__file__)" 2>&1 | tee -a "$LOG"

step "tests on the GPU (Triton kernels, CUDA ops)"
if $PY -c "import pytest, hypothesis" 2>/dev/null; then
  timeout 150 $PY -m pytest -q -p no:cacheprovider tests/ops/test_packed_runtime.py tests/ops/test_fake_quantize.py \
    tests/ops/test_bitpack.py -k "triton or cuda or gpu or opcheck or compile or unpack_dequantize" 2>&1 | tail -20 | tee -a "$LOG"
else
  echo "pytest or hypothesis is not installed there: tests skipped" | tee -a "$LOG"
fi

# 16384^2 (128 MiB of 4-bit codes) outgrows the GPU's L2 (50 MB on an H100), so batch 1 reads memory.
step "packed runtime: fused dequant-GEMV/GEMM (Triton) against float32 F.linear and a copy of the packed bytes"
timeout 200 $PY bench/bench_packed_runtime.py --device cuda --size 16384 --batches 1,16,64 --repeats 51 \
  --out "$OUT" 2>&1 | tee -a "$LOG"

step "fake_quantize (Triton) against eager, torch.compile and PyTorch's fake-quant ops"
timeout 100 $PY bench/bench_fake_quantize.py --device cuda --min-run-time 0.3 --out "$OUT" 2>&1 | tee -a "$LOG"

step "bit-packing (Triton pack/unpack)"
timeout 60 $PY bench/bench_bitpack.py --out "$OUT" 2>&1 | tee -a "$LOG"
ls -la "$OUT" | tee -a "$LOG"

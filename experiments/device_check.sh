#!/usr/bin/env bash
# One prepared accelerator run: the compiled Pallas kernels against the XLA references, then the
# benchmarks whose figures go into BENCHMARKS.md. Runs from the repository root without installing
# (the accelerator image has jax, flax, optax, pytest, hypothesis; not grain or ml_collections, so
# only the op-level tests run here).
#   bash experiments/device_check.sh [OUT_DIR]
set -uo pipefail
out=${1:-${OUT:-/tmp/jaxrec_device}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} XLA_PYTHON_CLIENT_PREALLOCATE=false
py=python3
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/machine.txt"
$py -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$out/machine.txt"

echo "== compiled kernels vs references"
timeout 120 $py -m pytest -q -p no:cacheprovider --import-mode=importlib -W ignore::DeprecationWarning \
  tests/pallas_kernels tests/ops/scan_test.py tests/ops/gla_test.py 2>&1 | tail -25 | tee "$out/tests.txt"

echo "== bench_scan"
timeout 130 $py -m experiments.bench_scan --seq_lens=512,2048,4096,16384 --scan_widths=1024 \
  --repeats=10 2>&1 | grep -v Warning | tee "$out/bench_scan.md"

echo "== bench_newton"
timeout 100 $py -m experiments.bench_newton --cells=paragru,paralstm --seq_lens=4096,65536 \
  --widths=256 --batches=16 --repeats=5 --python_loop_max_t=0 2>&1 | grep -v Warning \
  | tee "$out/bench_newton.md"

#!/usr/bin/env bash
# The training-speed benchmark on a bare GPU machine, in one command (< 5 minutes).
#
#   bash benchmarks/bench_gpu.sh [OUT_DIR]
#
# Sets up jax as scripts/gpu_env.sh says (the machine's own CUDA jax; carried wheels in
# .whl/), then runs benchmarks/bench.py with the
# CIFAR-10 ResNet-20 epoch time, writing OUT_DIR/bench_gpu.json (default: docs/).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs}
mkdir -p "$out"
. scripts/gpu_env.sh
python3 benchmarks/bench.py --windows 5 --steps_scale 10 --cifar_epoch --out "$out/bench_gpu.json"

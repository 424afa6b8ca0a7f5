#!/usr/bin/env bash
# The training-speed benchmark on a bare GPU machine, in one command (< 5 minutes).
#
#   bash scripts/bench_gpu.sh [OUT_DIR]
#
# Installs lqjax and a CUDA build of jax (from PyPI, or from wheels in .whl/ when
# the machine has no network), then runs scripts/bench.py with the CIFAR-10
# ResNet-20 epoch time, writing OUT_DIR/bench_gpu.json (default: docs/).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs}
mkdir -p "$out"
if ! python3 -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$(pwd)
  else
    python3 -m pip install -q -e . "jax[cuda12]"
  fi
fi
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)
python3 -c "import jax; print(jax.default_backend(), jax.devices())"
python3 scripts/bench.py --windows 5 --cifar_epoch --out "$out/bench_gpu.json"

#!/usr/bin/env bash
# The training-speed benchmark on a bare GPU machine, in one command (< 5 minutes).
#
#   bash benchmarks/bench_gpu.sh [OUT_DIR]
#
# Uses the machine's own CUDA build of jax when it has one (flax, optax, ... from the
# machine too); otherwise installs lqjax and "jax[cuda12]" from PyPI. Python packages
# the machine lacks can come as wheels in .whl/ (for a machine with no network; e.g.
# zstandard, which the packed-file export needs). Then runs benchmarks/bench.py with the
# CIFAR-10 ResNet-20 epoch time, writing OUT_DIR/bench_gpu.json (default: docs/).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
if ! python3 -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
  python3 -m pip install -q -e . "jax[cuda12]"
fi
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)
python3 -c "import jax, flax, optax; print(jax.default_backend(), jax.devices(), 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)"
python3 benchmarks/bench.py --windows 5 --steps_scale 10 --cifar_epoch --out "$out/bench_gpu.json"

# Sourced by the GPU scripts: the machine's own CUDA jax (flax, optax, ... from it too), plus
# any wheels carried in .whl/ (a machine with no network; e.g. zstandard for the packed
# file's zstd variant), with lqjax importable from the checkout. Falls back to installing
# lqjax and "jax[cuda12]" from PyPI where the machine has no GPU jax and can reach PyPI.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
if ! python3 -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
  python3 -m pip install -q -e . "jax[cuda12]"
fi
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)
python3 -c "import jax, flax, optax; print(jax.default_backend(), jax.devices(), 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)"

"""Side-by-side check of the LSQ scale gradient's reduction (lqjax.quant._reduce_product_to).

  python benchmarks/bench_reduce.py [--windows 15]

For the quantized kernels of LeNet-300-100 (row scales), LeNet-5 and ResNet-20
(channel scales), times in one process, round-robin, the jitted LSQ scale
gradient ``sum_G(g * dQ/ds)`` (dQ/ds computed from the weight and scale as in
the backward pass) reduced as a plain sum (``_reduce_to``) and as the product
with a ones matrix lqjax uses on CPU (``_reduce_product_to``), and prints each
one's time per call and the ratio new/plain (median of per-round ratios).

Alone, as here, XLA does not fold even a ones-vector product into a naive loop;
inside a training step it did, which ``benchmarks/bench_cost.py`` measures.
"""

import argparse
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench  # noqa: E402  (benchmarks/bench.py)
from lqjax import qconfig, quant  # noqa: E402

# (model, kernel shape, granularity): the largest quantized kernels of each model.
SHAPES = [("lenet300", (784, 300), "row"), ("lenet300", (300, 100), "row"),
          ("lenet5", (5, 5, 6, 16), "channel"), ("lenet5", (400, 120), "channel"),
          ("resnet20", (3, 3, 64, 64), "channel"), ("resnet20", (3, 3, 16, 16), "channel")]
CALLS = 50


def lsq_grad_fn(reduce):
  def fn(g, x, scale):
    q = jnp.round(x / scale)
    dq = jnp.where(q < -8, -8.0, jnp.where(q > 7, 7.0, q - x / scale))
    return reduce(g, dq)
  return fn


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--windows", type=int, default=15)
  args = ap.parse_args(argv)
  if bench.check_windows(args.windows):
    return 2
  rng = np.random.default_rng(0)
  print(f"{jax.default_backend()}, {args.windows} windows of {CALLS} calls")
  for model, shape, gran in SHAPES:
    sshape = qconfig.scale_shape(shape, gran)
    g = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    s = jnp.full(sshape, 0.3, jnp.float32)
    plain = jax.jit(lsq_grad_fn(lambda a, b: quant._reduce_to(a * b, sshape)))
    new = jax.jit(lsq_grad_fn(lambda a, b: quant._reduce_product_to(a, b, sshape)))
    np.testing.assert_allclose(new(g, x, s), plain(g, x, s), rtol=1e-4, atol=1e-3)

    def window(f):
      def run():
        for _ in range(CALLS):
          out = f(g, x, s)
        return out
      return run

    times = [[t / CALLS for t in ts] for ts in
             bench.round_robin([window(plain), window(new)], args.windows, jax.block_until_ready)]
    print(f"{model:9s} {str(shape):16s} {gran:8s} plain {1e6 * statistics.median(times[0]):7.1f} us"
          f"  ones-matrix {1e6 * statistics.median(times[1]):7.1f} us"
          f"  new/plain {bench.median_ratio(times[1], times[0]):.3f}", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

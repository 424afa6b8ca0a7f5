"""What quantized training costs over float, by ablation (one process, round-robin windows).

  python scripts/bench_cost.py [--model lenet300] [--granularity row] [--windows 15]

Times the training step as training runs it (lqjax.train.make_chunk_runner, batch
gathered on the device) for a ladder of configurations, each adding one piece of
the quantizer to the one before:

1. float;
2. fake-quantized kernels, free bits, ``fixed`` rule (forward ``s * round(P / s)``
   and the straight-through gradient, no scale gradient), biases left float;
3. the biases fake-quantized too (one more quantizer per layer);
4. 4-bit codes (the clipped straight-through estimator's mask);
5. the ``lsq`` rule (its scale gradient's reduction ``sum(g * dQ/ds)``);

beside rung 5, the same lsq step with that sum taken as lqjax took it before (a
product with a ones vector, ``lqjax.quant._MV_ROWS = 1``, which XLA:CPU folds into a
naive loop); beside rung 3, the ``ratio`` rule (free bits; the norms ``||dL/dP||``
and ``||P||`` per group); and float a second time (the run's noise). Prints each
configuration's step time, its ratio to float (median of per-round ratios), the
step time it adds to its rung below (median of per-round differences), its kernel
count and XLA's bytes per step.
"""

import pathlib
import statistics
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench  # noqa: E402  (scripts/bench.py)
from lqjax import quant, train  # noqa: E402

# (name, the rung it adds to, TrainConfig overrides, rows of quant's ones matrix)
LADDER = [
    ("float", None, dict(float_model=True), None),
    ("kernels fake-quantized", "float", dict(rule="fixed", quantize_bias=False), None),
    ("+ biases", "kernels fake-quantized", dict(rule="fixed"), None),
    ("+ 4-bit clip (fixed)", "+ biases", dict(rule="fixed", bits=4), None),
    ("+ lsq scale gradient", "+ 4-bit clip (fixed)", dict(rule="lsq", bits=4), None),
    ("lsq, ones-vector sum", "+ 4-bit clip (fixed)", dict(rule="lsq", bits=4), 1),
    ("ratio (free bits)", "+ biases", dict(rule="ratio"), None),
    ("float, again", "float", dict(float_model=True), None),
]


def median_diff(a, b) -> float:
  """Median over rounds of a[i] - b[i] (the time a rung adds, paired like the ratios)."""
  return statistics.median(x - y for x, y in zip(a, b))


def main(argv=None):
  args = bench.lenet_step_args(__doc__, argv)
  if bench.check_windows(args.windows):
    return 2
  images, labels = bench.random_data(40 * bench.BATCH[args.model])
  steps = 100 if args.model == "lenet300" else 10
  prepared = []
  default_rows = quant._MV_ROWS
  for _, _, kw, rows in LADDER:
    if not kw.get("float_model"):
      kw = dict(kw, granularity=args.granularity, rounding="round")
    cfg = train.TrainConfig(dataset="mnist", model=args.model,
                            batch_size=bench.BATCH[args.model], optimizer="adam", **kw)
    quant._MV_ROWS = rows or default_rows  # read when the step is traced, in prepare_config
    try:
      real, _, _, holder = bench.prepare_config(cfg, images, labels, steps)
    finally:
      quant._MV_ROWS = default_rows
    prepared.append((real, holder))
  times = [[t / steps for t in ts] for ts in
           bench.round_robin([p[0] for p in prepared], args.windows, bench._sync, rotate=True)]
  by_name = {rung[0]: ts for rung, ts in zip(LADDER, times)}
  print(f"{args.model} / {args.granularity}, {jax.default_backend()}, "
        f"{args.windows} rotated rounds of {steps} steps")
  for (name, below, _, _), ts, (_, holder) in zip(LADDER, times, prepared):
    adds = "" if below is None else f"  adds {1e3 * median_diff(ts, by_name[below]):+6.3f} ms to '{below}'"
    print(f"{name:24s} {1e3 * statistics.median(ts):7.3f} ms/step  quantized/float "
          f"{bench.median_ratio(ts, times[0]):.3f}  kernels {holder['kernels']:4d}  "
          f"MB/step {holder['bytes_accessed'] / 1e6:6.1f}{adds}", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

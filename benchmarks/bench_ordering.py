"""Side-by-side check of lqjax.optim.apply_updates' ordering (one process, round-robin windows).

  python benchmarks/bench_ordering.py [--model lenet300] [--granularity row] [--windows 15]

Times the compiled training step on a constant batch for float, and for the lsq
and ratio rules with and without ordering each quantized weight's update after
its scale's update (which lets XLA drop a copy of every quantized weight), and
prints each one's step time and its ratio to float (median of per-round ratios).
Uses benchmarks/bench.py's compiled steps and timing.
"""

import pathlib
import statistics
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench  # noqa: E402  (benchmarks/bench.py)
from lqlab.config import TrainConfig


def main(argv=None):
  args = bench.lenet_step_args(__doc__, argv)
  if bench.check_windows(args.windows):
    return 2
  images, labels = bench.random_data(512)
  steps = 200 if args.model == "lenet300" else 10
  q = dict(granularity=args.granularity, rounding="round")
  variants = [("float", None, dict(float_model=True))]
  for rule, kw in (("lsq", dict(rule="lsq", bits=4)), ("ratio", dict(rule="ratio"))):
    variants += [(f"{rule}, weights copied", False, {**kw, **q}),
                 (f"{rule}, ordered", True, {**kw, **q})]
  consts = []
  for _, order, kw in variants:
    cfg = TrainConfig(dataset="mnist", model=args.model, batch_size=128,
                            optimizer="adam", **kw)
    consts.append(bench.prepare_config(cfg, images, labels, steps,
                                       order_after_scales=order)[1])
  times = [[t / steps for t in ts] for ts in bench.round_robin(consts, args.windows, bench._sync)]
  print(f"{args.model} / {args.granularity}, {jax.default_backend()}, "
        f"{args.windows} windows of {steps} steps")
  for (name, _, _), ts in zip(variants, times):
    print(f"{name:22s} {1e3 * statistics.median(ts):7.3f} ms/step  "
          f"quantized/float {bench.median_ratio(ts, times[0]):.3f}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

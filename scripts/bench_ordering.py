"""Side-by-side check of lqjax.train._after_scales (one process, round-robin windows).

  python scripts/bench_ordering.py [--model lenet300] [--granularity row] [--windows 15]

Times the compiled training step on a constant batch for float, and for the lsq
and ratio rules with and without ordering each quantized weight's update after
its scale's update (which lets XLA drop a copy of every quantized weight), and
prints each one's step time and its ratio to float (median of per-round ratios).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lqjax import train


def build(after, model, steps, images, labels, **kw):
  """A function running `steps` steps of one configuration (state carried)."""
  train._after_scales = after
  try:
    cfg = train.TrainConfig(dataset="mnist", model=model, batch_size=128, optimizer="adam", **kw)
    net = train.build_model(cfg, 10)
    tx = train.make_optimizer(cfg, 100)
    step_fn = train.make_train_step(cfg, net, tx, ((0.5,), (0.25,)))
    state = train.init_state(cfg, net, tx, images[:1].astype(jnp.float32), None)
    batch = (images[:128], labels[:128])
    step = jax.jit(step_fn, donate_argnums=(0,)).lower(state, batch, jax.random.key(0)).compile()
  finally:
    train._after_scales = ORIGINAL
  keys = [jax.random.fold_in(jax.random.key(0), i) for i in range(steps)]
  holder = {"s": state}

  def run():
    s = holder["s"]
    for k in keys:
      s, _ = step(s, batch, k)
    holder["s"] = s
    jax.block_until_ready(s.params)

  run()
  return run


ORIGINAL = train._after_scales


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="lenet300", choices=["lenet300", "lenet5"])
  ap.add_argument("--granularity", default="row")
  ap.add_argument("--windows", type=int, default=15)
  args = ap.parse_args(argv)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (512, 28, 28, 1), dtype=np.uint8))
  labels = jnp.asarray(rng.integers(0, 10, 512, dtype=np.int32))
  steps = 200 if args.model == "lenet300" else 10
  q = dict(granularity=args.granularity, rounding="round")
  cfgs = [("float", ORIGINAL, dict(float_model=True))]
  for rule, kw in (("lsq", dict(rule="lsq", bits=4)), ("ratio", dict(rule="ratio"))):
    cfgs += [(f"{rule}, weights copied", lambda p: p, {**kw, **q}),
             (f"{rule}, ordered", ORIGINAL, {**kw, **q})]
  fns = [(name, build(after, args.model, steps, images, labels, **kw)) for name, after, kw in cfgs]
  times = {name: [] for name, _ in fns}
  for _ in range(args.windows):
    for name, f in fns:
      t = time.perf_counter()
      f()
      times[name].append((time.perf_counter() - t) / steps)
  base = times["float"]
  print(f"{args.model} / {args.granularity}, {jax.default_backend()}, {args.windows} windows of {steps} steps")
  for name, ts in times.items():
    ratio = statistics.median(a / b for a, b in zip(ts, base))
    print(f"{name:22s} {1e3 * statistics.median(ts):7.3f} ms/step  quantized/float {ratio:.3f}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

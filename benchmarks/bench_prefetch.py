"""Side-by-side check of the training loop's batch prefetch (lqlab.step.make_chunk_runner).

  python benchmarks/bench_prefetch.py [--model lenet300] [--windows 24]

Times, in one process, for float and the fixed, lsq and ratio rules: the step on
a constant batch, the training loop's step (which gathers the next step's batch
while it trains on the current one), and a step that gathers its own batch
first (the loop before the prefetch). Windows are taken round-robin with the
order rotated each round, and every ratio is the median of per-round ratios.
"""

import argparse
import functools
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench  # noqa: E402  (benchmarks/bench.py)
from lqlab.config import TrainConfig
from lqlab.step import init_state, make_optimizer, make_train_step


def gather_first(cfg, step_fn, steps_per_epoch, rng, perm, images, labels, holder, steps):
  """The step that gathers its own batch before training on it (no prefetch)."""

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step_at(state):
    i = state.step % steps_per_epoch
    idx = jax.lax.dynamic_slice(perm, (i * cfg.batch_size,), (cfg.batch_size,))
    return step_fn(state, (images[idx], labels[idx]), jax.random.fold_in(rng, state.step))

  def run():
    s = holder["g"]
    for _ in range(steps):
      s, _ = step_at(s)
    holder["g"] = s
    return s
  return run


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="lenet300", choices=["lenet300", "lenet5"])
  ap.add_argument("--windows", type=int, default=24)
  args = ap.parse_args(argv)
  if bench.check_windows(args.windows):
    return 2
  n, bs = 40 * 128, 128
  images, labels = bench.random_data(n)
  steps = 200 if args.model == "lenet300" else 10
  gran = "row" if args.model == "lenet300" else "channel"
  variants = [("float", dict(float_model=True))] + [
      (rule, dict(rule=rule, granularity=gran, rounding="round",
                  **({"bits": 4} if rule != "ratio" else {})))
      for rule in ("fixed", "lsq", "ratio")]
  fns = []
  for _, kw in variants:
    cfg = TrainConfig(dataset="mnist", model=args.model, batch_size=bs, optimizer="adam",
                            **kw)
    real, const, _, holder = bench.prepare_config(cfg, images, labels, steps)
    tx = make_optimizer(cfg, 100)  # as bench.prepare_config makes it
    step_fn = make_train_step(cfg, holder["model"], tx, ((0.5,), (0.25,)))
    holder["g"] = init_state(cfg, holder["model"], tx, images[:1].astype(jnp.float32), None)
    first = gather_first(cfg, step_fn, n // bs, jax.random.key(0),
                         jax.random.permutation(jax.random.key(0), n), images, labels, holder,
                         steps)
    bench._sync(first())
    fns += [const, real, first]
  times = [[t / steps for t in ts]
           for ts in bench.round_robin(fns, args.windows, bench._sync, rotate=True)]
  print(f"{args.model} / {gran}, {jax.default_backend()}, {args.windows} windows of {steps} "
        f"steps (ms per step; ratios: median of per-round ratios)")
  print(f"{'rule':6s} {'const':>7s} {'prefetch':>9s} {'gather':>7s}  prefetch/const  "
        f"gather/const  prefetch/float  gather/float")
  for v, (name, _) in enumerate(variants):
    c, p, g = times[3 * v: 3 * v + 3]
    print(f"{name:6s} {1e3 * statistics.median(c):7.3f} {1e3 * statistics.median(p):9.3f} "
          f"{1e3 * statistics.median(g):7.3f}  {bench.median_ratio(p, c):14.3f}  "
          f"{bench.median_ratio(g, c):12.3f}  {bench.median_ratio(p, times[1]):14.3f}  "
          f"{bench.median_ratio(g, times[2]):12.3f}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

"""Training-speed benchmark: quantized vs float, measured side by side in one process.

  python scripts/bench.py [--models lenet300,lenet5,resnet20] [--out docs/bench.json]
                          [--readme README.md]

For each model at its default batch size it measures, after compilation, the
median over timed windows (``block_until_ready`` at each window's end) of the
train-step time for: float, and every rule (fixed, lsq, ratio) at two
granularities (tensor and channel/row). Steps run as in training (lqjax.train.make_chunk_runner):
one jitted call per step, the batch gathered on the device from the resident
dataset. It also times the same step on a constant batch (the data pipeline's
cost) and the evaluation of a reloaded packed model against the float model.

Prints a table with the ratio quantized/float per model and rule, writes it as
JSON (fields ``*_ratio``, plus machine and date), and, with --readme, rewrites
the README's Performance section between its bench markers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from lqjax import compress, data, train

BATCH = {"lenet300": 128, "lenet5": 128, "resnet20": 128}
DATASET = {"lenet300": "mnist", "lenet5": "mnist", "resnet20": "cifar10"}
SHAPE = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


def _timeit(fn, windows, sync):
  times = []
  for _ in range(windows):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench_config(cfg: train.TrainConfig, images, labels, steps: int, windows: int):
  """Seconds per step (real-data gather and constant batch) and compile time."""
  model = train.build_model(cfg, 10)
  tx = train.make_optimizer(cfg, 100)
  stats = ((0.5,) * images.shape[-1], (0.25,) * images.shape[-1])
  step_fn = train.make_train_step(cfg, model, tx, stats)
  state = train.init_state(cfg, model, tx, images[:1].astype(jnp.float32), None)
  n, bs = images.shape[0], cfg.batch_size
  rng = jax.random.key(0)

  run_chunk = train.make_chunk_runner(cfg, step_fn, n // bs, rng)
  const_step = jax.jit(step_fn, donate_argnums=(0,))
  const_batch = (images[:bs], labels[:bs])
  holder = {}

  def real(state, perm):
    holder["s"], _ = run_chunk(holder.get("s", state), perm, images, labels, steps)
    return holder["s"]

  def const(state):
    s = holder.get("s", state)
    for i in range(steps):
      s, _ = const_step(s, const_batch, jax.random.fold_in(rng, i))
    holder["s"] = s
    return s

  perm = jax.random.permutation(rng, n)
  sync = lambda s: jax.block_until_ready(s.params)
  t0 = time.perf_counter()
  sync(real(state, perm))
  compile_s = time.perf_counter() - t0
  sync(const(state))
  t_real = _timeit(lambda: real(state, perm), windows, sync) / steps
  t_const = _timeit(lambda: const(state), windows, sync) / steps
  return {"step_s": t_real, "const_batch_step_s": t_const, "compile_s": compile_s,
          "images_per_s": bs / t_real, "model": model, "state": holder["s"]}


def bench_eval(cfg, model, state, images, windows):
  """Eval time of the reloaded packed model vs the same network in float."""
  stats = ((0.5,) * images.shape[-1], (0.25,) * images.shape[-1])
  with tempfile.TemporaryDirectory() as d:
    path = pathlib.Path(d) / "m.lqz"
    compress.export(path, cfg, 10, stats, state.params, state.batch_stats)
    m2, v2, h2 = compress.load(path)
  fcfg = train.TrainConfig(**{**cfg.to_json(), "float_model": True,
                              "granularity": "tensor", "bias_granularity": "tensor"})
  fmodel = train.build_model(fcfg, 10)
  fvars = fmodel.init(jax.random.key(0), images[:1].astype(jnp.float32))
  fq = jax.jit(lambda x: m2.apply(v2, data.normalize(x, *stats), train=False))
  ff = jax.jit(lambda x: fmodel.apply(fvars, data.normalize(x, *stats), train=False))
  x = images[:1000]
  jax.block_until_ready(fq(x))
  jax.block_until_ready(ff(x))
  tq = _timeit(lambda: fq(x), windows, jax.block_until_ready)
  tf = _timeit(lambda: ff(x), windows, jax.block_until_ready)
  return {"eval_packed_s": tq, "eval_float_s": tf, "eval_ratio": tq / tf}


def peak_memory_mb():
  try:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  except Exception:  # pragma: no cover - not on every platform
    return None


def run(models, steps, windows):
  rows = []
  for name in models:
    ds_name = DATASET[name]
    rng = np.random.default_rng(0)
    n = 40 * BATCH[name]
    images = jnp.asarray(rng.integers(0, 256, (n,) + SHAPE[ds_name], dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, n, dtype=np.int32))
    gran = "row" if name == "lenet300" else "channel"
    variants = [("float", "-", dict(float_model=True))]
    for rule in ("fixed", "lsq", "ratio"):
      for g in ("tensor", gran):
        kw = dict(rule=rule, granularity=g, rounding="round")
        if rule in ("fixed", "lsq"):
          kw["bits"] = 4
        variants.append((rule, g, kw))
    base = None
    for rule, g, kw in variants:
      cfg = train.TrainConfig(dataset=ds_name, model=name, batch_size=BATCH[name],
                              optimizer="sgd" if name == "resnet20" else "adam", **kw)
      r = bench_config(cfg, images, labels, steps[name], windows)
      row = {"model": name, "rule": rule, "granularity": g, "batch_size": BATCH[name],
             **{k: v for k, v in r.items() if k not in ("model", "state")}}
      if base is None:
        base = row
      row["step_time_ratio"] = row["step_s"] / base["step_s"]
      row["data_pipeline_ratio"] = row["step_s"] / row["const_batch_step_s"]
      if rule == "ratio" and g != "tensor":
        row.update(bench_eval(cfg, r["model"], r["state"], images, windows))
      rows.append(row)
      print(f"{name:9s} {rule:6s} {g:8s} step {1e3 * row['step_s']:8.2f} ms  "
            f"ratio {row['step_time_ratio']:.3f}  const-batch {1e3 * row['const_batch_step_s']:8.2f} ms"
            f"  compile {row['compile_s']:.1f}s", flush=True)
  return rows


def cifar_epoch_seconds() -> float:
  """Wall time of one CIFAR-10 ResNet-20 epoch (50000 images, batch 128, quantized, ratio
  rule, channel scales) on random data of CIFAR's shape, after compilation."""
  n, bs = 50000, 128
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
  labels = jnp.asarray(rng.integers(0, 10, n, dtype=np.int32))
  cfg = train.TrainConfig(dataset="cifar10", model="resnet20", batch_size=bs, optimizer="sgd",
                          rule="ratio", granularity="channel", rounding="round")
  model = train.build_model(cfg, 10)
  tx = train.make_optimizer(cfg, n // bs)
  step_fn = train.make_train_step(cfg, model, tx, ((0.5,) * 3, (0.25,) * 3))
  state = train.init_state(cfg, model, tx, images[:1].astype(jnp.float32), None)
  run_chunk = train.make_chunk_runner(cfg, step_fn, n // bs, jax.random.key(0))
  perm = jax.random.permutation(jax.random.key(1), n)
  state, _ = run_chunk(state, perm, images, labels, 2)
  jax.block_until_ready(state.params)
  t0 = time.perf_counter()
  state, _ = run_chunk(state, perm, images, labels, n // bs - 2)
  jax.block_until_ready(state.params)
  return (time.perf_counter() - t0) * (n // bs) / (n // bs - 2)


def readme_section(doc) -> str:
  lines = [f"Measured by `python scripts/bench.py --readme README.md` on {doc['machine']} "
           f"({doc['date']}, jax {doc['jax']}, {doc['backend']}). Step time of quantized "
           f"training relative to float training (median of timed windows, same process):", "",
           "| model | rule | granularity | step (ms) | quantized/float |", "|---|---|---|---|---|"]
  for r in doc["rows"]:
    lines.append(f"| {r['model']} | {r['rule']} | {r['granularity']} | {1e3 * r['step_s']:.2f} "
                 f"| {r['step_time_ratio']:.3f} |")
  worst = max(r["step_time_ratio"] for r in doc["rows"])
  lines += ["", f"Worst quantized/float ratio: {worst:.3f}. Real-data step / constant-batch step: "
            f"{min(r['data_pipeline_ratio'] for r in doc['rows']):.3f} to "
            f"{max(r['data_pipeline_ratio'] for r in doc['rows']):.3f}."]
  if "cifar10_resnet20_epoch_s" in doc:
    lines.append(f"One CIFAR-10 ResNet-20 epoch (quantized, ratio rule): "
                 f"{doc['cifar10_resnet20_epoch_s']:.1f} s.")
  ev = [r for r in doc["rows"] if "eval_ratio" in r]
  if ev:
    lines.append("Evaluation of the reloaded packed model / float model: " + ", ".join(
        f"{r['model']} {r['eval_ratio']:.2f}" for r in ev) + ".")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default="lenet300,lenet5,resnet20")
  ap.add_argument("--windows", type=int, default=5)
  ap.add_argument("--out", default="docs/bench.json")
  ap.add_argument("--readme", default=None)
  ap.add_argument("--cifar_epoch", action="store_true",
                  help="also time one CIFAR-10 ResNet-20 epoch (slow on a CPU)")
  args = ap.parse_args(argv)
  models = args.models.split(",")
  bad = [m for m in models if m not in BATCH]
  if bad:
    print(f"error: unknown model(s) {', '.join(bad)}; expected {', '.join(BATCH)}", file=sys.stderr)
    return 2
  steps = {"lenet300": 50, "lenet5": 10, "resnet20": 3}
  rows = run(models, steps, args.windows)
  doc = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
         "backend": jax.default_backend(), "devices": len(jax.devices()),
         "date": datetime.date.today().isoformat(), "jax": jax.__version__,
         "peak_rss_mb": peak_memory_mb(), "rows": rows}
  if args.cifar_epoch:
    doc["cifar10_resnet20_epoch_s"] = cifar_epoch_seconds()
    print(f"CIFAR-10 ResNet-20 epoch: {doc['cifar10_resnet20_epoch_s']:.1f} s")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  train.write_json_atomic(out, doc)
  print(f"wrote {out}")
  if args.readme:
    p = pathlib.Path(args.readme)
    text = p.read_text()
    b, e = "<!-- bench:begin -->", "<!-- bench:end -->"
    if b in text and e in text:
      text = text[:text.index(b) + len(b)] + "\n" + readme_section(doc) + "\n" + text[text.index(e):]
      p.write_text(text)
      print(f"updated {p}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

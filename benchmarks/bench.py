"""Training-speed benchmark: quantized vs float, measured side by side in one process.

  python benchmarks/bench.py [--models lenet300,lenet5,resnet20] [--out docs/bench.json]
                          [--readme docs/PERFORMANCE.md]
  python benchmarks/bench.py --from_json docs/bench_gpu.json --readme docs/PERFORMANCE.md

For each model at its default batch size it measures, after compilation, the
train-step time for: float, and every rule (fixed, lsq, ratio) at two
granularities (tensor and channel/row), over timed windows (``block_until_ready``
at each window's end) taken round-robin: each round times every configuration
once, and a ratio quantized/float is the median of the per-round ratios, so a
change in machine load during the run moves numerator and denominator alike.
Steps run as in training (lqlab.step.make_chunk_runner): one jitted call per
step, the batch gathered on the device from the resident dataset. It also times
the same step on a constant batch (the data pipeline's cost) and the evaluation
of a reloaded packed model against the float model.

Prints a table with the ratio quantized/float per model and rule, writes it as
JSON (fields ``*_ratio``, plus machine and date), and, with --readme, rewrites
docs/PERFORMANCE.md (or the file given) between its bench markers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import statistics
import sys
import tempfile
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from lqjax import fileio, qconfig
from lqlab import files

from lqlab import data, export
from lqlab.config import TrainConfig
from lqlab.files import write_json_atomic
from lqlab.step import build_model, init_state, learns_scales, make_chunk_runner, make_optimizer, make_train_step

BATCH = {"lenet300": 128, "lenet5": 128, "resnet20": 128}
DATASET = {"lenet300": "mnist", "lenet5": "mnist", "resnet20": "cifar10"}
SHAPE = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
CONTROL = "repeat"  # the granularity column of the float control row
# scale_every of a weights-only configuration: after the first (warm-up) step, no step
# updates the scales
WEIGHTS_ONLY = 2 ** 30


def round_robin(fns, windows: int, sync, rotate: bool = False):
  """Times each of `fns` once per round for `windows` rounds: a list of times per fn.

  With `rotate`, round r starts with fn r (mod len), so that no fn always runs first.
  """
  times = [[] for _ in fns]
  for r in range(windows):
    shift = r % len(fns) if rotate else 0
    for j in [(shift + k) % len(fns) for k in range(len(fns))]:
      t0 = time.perf_counter()
      sync(fns[j]())
      times[j].append(time.perf_counter() - t0)
  return times


def random_data(n: int, shape=(28, 28, 1)):
  """`n` random uint8 images of `shape` and int32 labels in [0, 10), on the device (seed 0)."""
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.integers(0, 256, (n,) + tuple(shape), dtype=np.uint8)),
          jnp.asarray(rng.integers(0, 10, n, dtype=np.int32)))


def lenet_step_args(doc: str, argv=None, windows: int = 15, out: Optional[str] = None):
  """The flags of the LeNet step benchmarks (bench_ordering.py, bench_cost.py):
  --model, --granularity and --windows, parsed from `argv`; with `out`, also --out
  (default `out`) and --readme."""
  ap = argparse.ArgumentParser(description=doc.splitlines()[0])
  ap.add_argument("--model", default="lenet300", choices=["lenet300", "lenet5"])
  ap.add_argument("--granularity", default="row", choices=list(qconfig.GRANULARITIES))
  ap.add_argument("--windows", type=int, default=windows)
  if out is not None:
    ap.add_argument("--out", default=out)
    ap.add_argument("--readme", default=None)
    ap.add_argument("--from_json", default=None,
                    help="measure nothing: render this benchmark JSON into --readme")
  return ap.parse_args(argv)


def render_from_json(args, render) -> int:
  """``--from_json``: `render(readme path, doc)` the benchmark JSON into ``--readme``, measuring
  nothing; 2 with a one-line error for a missing --readme or an unreadable JSON."""
  if not args.readme:
    print("error: --from_json only renders into --readme; give --readme docs/PERFORMANCE.md",
          file=sys.stderr)
    return 2
  try:
    doc = files.read_json(args.from_json)
    return render(pathlib.Path(args.readme), doc)
  except (OSError, ValueError, KeyError) as e:
    print(f"error: cannot render {args.from_json}: {e}", file=sys.stderr)
    return 2


def check_windows(windows: int, minimum: int = 1) -> int:
  """0 if `windows` >= `minimum`; else prints the one-line error and returns the exit
  status 2 (a minimum of 3: a median of per-round ratios needs rounds to take it over)."""
  if windows >= minimum:
    return 0
  why = " (a median of ratios)" if minimum > 1 else ""
  print(f"error: --windows must be >= {minimum}{why}, got {windows}", file=sys.stderr)
  return 2


def measured_line(doc, subcommand: str, cells: str) -> str:
  """The first line of an integer benchmark's section: when, on which CPU (its integer
  flags), the command, what a cell is (`cells`), the rounds and the load at the start."""
  flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
           if f in doc.get("cpu_flags", [])]
  cpu = f"{doc['cpu_model']}, " if doc.get("cpu_model") else ""
  return (f"Measured {doc['date']} on {cpu}{doc['machine']} (jax {doc['jax']}; CPU flags: "
          f"{', '.join(flags) or 'none of avx2, avx512f, avx512_vnni, avx_vnni, amx_int8'}) "
          f"by `python benchmarks/run.py {subcommand} --readme docs/PERFORMANCE.md`; {cells}, "
          f"the median over {doc.get('windows', '?')} rounds side by side"
          + (f"; the 1-minute load average at the start was {doc['loadavg_1min_at_start']:.1f}"
             if "loadavg_1min_at_start" in doc else "") + ".")


def measure_side_by_side(cases, windows: int, reps: int):
  """cases: [(variant, jitted fn, args)], the first the float32 reference. Each is compiled,
  then timed round-robin (`reps` calls per window, rotating which runs first): a row per
  case with its median time per call and the median over rounds of float time / its time."""
  def calls(fn, args):
    def run():
      out = None
      for _ in range(reps):
        out = fn(*args)
      return out
    return run
  fns = [calls(f, a) for _, f, a in cases]
  for f in fns:
    jax.block_until_ready(f())  # compile and warm
  times = round_robin(fns, windows, jax.block_until_ready, rotate=True)
  times = [[t / reps for t in ts] for ts in times]
  return [{"variant": v, "seconds": statistics.median(ts), "vs_float": median_ratio(times[0], ts)}
          for (v, _, _), ts in zip(cases, times)]


def median_ratio(a, b) -> float:
  """Median over rounds of a[i] / b[i]."""
  return statistics.median(x / y for x, y in zip(a, b))


def prepare_config(cfg: TrainConfig, images, labels, steps: int, **step_kw):
  """Compiles one configuration's step; returns ``(real, const, compile_s, holder)``.

  ``real()`` runs `steps` training steps as training does (batch gathered on the
  device from the resident dataset), ``const()`` the same steps on one constant
  batch; both carry the state in ``holder["s"]``.
  """
  model = build_model(cfg, 10)
  tx = make_optimizer(cfg, 100)
  stats = ((0.5,) * images.shape[-1], (0.25,) * images.shape[-1])
  step_fn = make_train_step(cfg, model, tx, stats, **step_kw)
  state = init_state(cfg, model, tx, images[:1].astype(jnp.float32), None)
  n, bs = images.shape[0], cfg.batch_size
  rng = jax.random.key(0)
  run_chunk = make_chunk_runner(cfg, step_fn, n // bs, rng)
  const_batch = (images[:bs], labels[:bs])
  # compiled ahead of time: the same executable runs the constant-batch windows and is
  # the one whose kernels are counted (a weights-only configuration: its weights-only step)
  scale_step = learns_scales(cfg) and cfg.scale_every < WEIGHTS_ONLY
  const_step = jax.jit(step_fn, donate_argnums=(0,), static_argnames="scale_step").lower(
      state, const_batch, rng, scale_step=scale_step).compile()
  perm = jax.random.permutation(rng, n)
  holder = {"s": state, "model": model}

  def real():
    holder["s"], _ = run_chunk(holder["s"], perm, images, labels, steps)
    return holder["s"]

  # the step keys are derived once, outside the timed windows: a host-side fold_in per
  # step is a dispatch of its own, which a GPU step is short enough to feel
  keys = [jax.random.fold_in(rng, i) for i in range(steps)]

  def const():
    s = holder["s"]
    for k in keys:
      s, _ = const_step(s, const_batch, k)
    holder["s"] = s
    return s

  t0 = time.perf_counter()
  _sync(real())
  compile_s = time.perf_counter() - t0
  _sync(const())
  holder["kernels"] = count_kernels(const_step.as_text())
  holder["bytes_accessed"] = bytes_accessed(const_step)
  return real, const, compile_s, holder


_NOT_KERNELS = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast")


def count_kernels(hlo_text: str) -> int:
  """Instructions of the compiled step's entry computation that run as kernels
  (fusions, dots, copies, ...; not parameters, constants or tuple plumbing).

  On XLA:CPU each one is dispatched separately, which is what a small model pays for.
  """
  entry = hlo_text[hlo_text.index("ENTRY"):]
  ops = re.findall(r"= \S+ ([\w-]+)\(", entry)
  return sum(op not in _NOT_KERNELS for op in ops)


def bytes_accessed(compiled):
  """XLA's estimate of the bytes a compiled step reads and writes (None if unknown)."""
  try:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca["bytes accessed"])
  except Exception:  # cost analysis is optional per backend
    return None


def _lscpu(field: str):
  """The value of one ``lscpu`` line ("Flags", "Model name"), None where it cannot be read."""
  import subprocess
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  for line in out.splitlines():
    if line.startswith(field + ":"):
      return line.split(":", 1)[1].strip()
  return None


def cpu_flags() -> list:
  """The CPU's feature flags as lscpu reports them ([] where it cannot be read): which
  vector and integer-dot instructions (avx512_vnni, amx_int8, ...) the machine has."""
  return (_lscpu("Flags") or "").split()


def machine_info() -> dict:
  """The machine, its CPU flags, backend, date and versions a benchmark JSON records."""
  import flax
  return {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
          "cpu_model": _lscpu("Model name"), "cpu_flags": cpu_flags(), "backend": jax.default_backend(),
          "date": datetime.date.today().isoformat(), "jax": jax.__version__,
          "jaxlib": getattr(jax.lib, "__version__", None) or jax.__version__,
          "flax": flax.__version__}


def _sync(state):
  return jax.block_until_ready(state.params)


def bench_interleaved(cfgs, images, labels, steps: int, windows: int):
  """Step times of several configurations measured round-robin.

  Every round times one window of each configuration (real data, then a
  constant batch) back to back, so a change in machine load hits all of them
  alike; the ratio of configuration i to configuration 0 is the median over
  rounds of the per-round ratio. Returns one dict per configuration.
  """
  prepared = [prepare_config(c, images, labels, steps) for c in cfgs]
  times = round_robin([f for p in prepared for f in p[:2]], windows, _sync)
  real_t = [[t / steps for t in ts] for ts in times[0::2]]
  const_t = [[t / steps for t in ts] for ts in times[1::2]]
  out = []
  for i, (cfg, (_, _, compile_s, holder)) in enumerate(zip(cfgs, prepared)):
    step = statistics.median(real_t[i])
    out.append({
        "step_s": step, "const_batch_step_s": statistics.median(const_t[i]),
        "compile_s": compile_s, "images_per_s": cfg.batch_size / step,
        "step_time_ratio": median_ratio(real_t[i], real_t[0]),
        "data_pipeline_ratio": median_ratio(real_t[i], const_t[i]),
        "kernels": holder["kernels"], "bytes_accessed": holder["bytes_accessed"],
        "model": holder["model"], "state": holder["s"], "real_t": real_t[i]})
  return out


def bench_eval(cfg, model, state, images, windows):
  """Eval time of the reloaded packed model vs the same network in float."""
  stats = ((0.5,) * images.shape[-1], (0.25,) * images.shape[-1])
  with tempfile.TemporaryDirectory() as d:
    path = pathlib.Path(d) / "m.lqz"
    export.export(path, cfg, 10, stats, state.params, state.batch_stats)
    m2, v2, h2 = export.load(path)
  fcfg = TrainConfig(**{**cfg.to_json(), "float_model": True,
                              "granularity": "tensor", "bias_granularity": "tensor"})
  fmodel = build_model(fcfg, 10)
  fvars = fmodel.init(jax.random.key(0), images[:1].astype(jnp.float32))
  fq = jax.jit(lambda x: m2.apply(v2, data.normalize(x, *stats), train=False))
  ff = jax.jit(lambda x: fmodel.apply(fvars, data.normalize(x, *stats), train=False))
  x = images[:1000]
  jax.block_until_ready(fq(x))
  jax.block_until_ready(ff(x))
  tq, tf = round_robin([lambda: fq(x), lambda: ff(x)], windows, jax.block_until_ready)
  return {"eval_packed_s": statistics.median(tq), "eval_float_s": statistics.median(tf),
          "eval_ratio": median_ratio(tq, tf)}


def peak_memory_mb():
  try:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  except Exception:  # pragma: no cover - not on every platform
    return None


def every_k(scale_t, weights_t, float_t, k: int):
  """(step seconds, ratio to float) of a run that updates the scales every `k` steps, from
  per-round times of its scale step, its weights-only step and the float step: the median
  over rounds of ``(t_scale + (k-1) t_weights) / k``, and of that over ``t_float``."""
  mixed = [(a + (k - 1) * b) / k for a, b in zip(scale_t, weights_t)]
  return statistics.median(mixed), median_ratio(mixed, float_t)


def run(models, steps, windows, scale_every=(1,)):
  """Benchmarks `models`.

  The learned rules (lsq, ratio) are measured twice, side by side with the rest: their
  scale step (k=1: every step updates the scales) and their weights-only step. A run
  with the scales updated every k steps alternates one of the first with k-1 of the
  second, so its step time is ``(t_scale + (k-1) t_weights) / k``: for each k > 1 in
  `scale_every` a row with that ratio is derived per round from the two measured in it.
  """
  rows = []
  for name in models:
    ds_name = DATASET[name]
    images, labels = random_data(40 * BATCH[name], SHAPE[ds_name])
    gran = "row" if name == "lenet300" else "channel"
    variants = [("float", "-", dict(float_model=True))]
    for rule in ("fixed", "lsq", "ratio"):
      for g in ("tensor", gran):
        for k in ((1,) if rule == "fixed" else (1, WEIGHTS_ONLY)):
          kw = dict(rule=rule, granularity=g, rounding="round", scale_every=k)
          if rule in ("fixed", "lsq"):
            kw["bits"] = 4
          variants.append((rule, g, kw))
    # control: the float configuration again, measured like the others; its ratio to the
    # first float row is the noise of one ratio in this run
    variants.append(("float", CONTROL, dict(float_model=True)))
    cfgs = [TrainConfig(dataset=ds_name, model=name, batch_size=BATCH[name],
                              optimizer="sgd" if name == "resnet20" else "adam", **kw)
            for _, _, kw in variants]
    results = bench_interleaved(cfgs, images, labels, steps[name], windows)
    by_key = {}
    for (rule, g, _), cfg, r in zip(variants, cfgs, results):
      k = "weights-only" if cfg.scale_every >= WEIGHTS_ONLY else cfg.scale_every
      row = {"model": name, "rule": rule, "granularity": g, "scale_every": k,
             "batch_size": BATCH[name], "date": datetime.date.today().isoformat(),
             "windows": windows, "steps": steps[name],
             **{kk: v for kk, v in r.items() if kk not in ("model", "state", "real_t")}}
      if rule == "ratio" and g != "tensor" and k == 1:
        row.update(bench_eval(cfg, r["model"], r["state"], images, windows))
      rows.append(row)
      by_key[(rule, g, k)] = r
      print(f"{name:9s} {rule:6s} {g:8s} k={str(k):12s} step {1e3 * row['step_s']:8.2f} ms  "
            f"ratio {row['step_time_ratio']:.3f}  const-batch {1e3 * row['const_batch_step_s']:8.2f} ms"
            f"  compile {row['compile_s']:.1f}s  kernels {row['kernels']}", flush=True)
    base_t = results[0]["real_t"]
    for rule in ("lsq", "ratio"):
      for g in ("tensor", gran):
        on, off = by_key[(rule, g, 1)]["real_t"], by_key[(rule, g, "weights-only")]["real_t"]
        for k in (k for k in scale_every if k > 1):
          step_s, ratio = every_k(on, off, base_t, k)
          rows.append({"model": name, "rule": rule, "granularity": g, "scale_every": k,
                       "derived": True, "batch_size": BATCH[name], "windows": windows,
                       "date": datetime.date.today().isoformat(), "steps": steps[name],
                       "step_s": step_s, "step_time_ratio": ratio})
          print(f"{name:9s} {rule:6s} {g:8s} k={k:<12d} ratio {rows[-1]['step_time_ratio']:.3f}"
                f" (derived)", flush=True)
  return rows


def cifar_epoch_seconds() -> float:
  """Wall time of one CIFAR-10 ResNet-20 epoch (50000 images, batch 128, quantized, ratio
  rule, channel scales) on random data of CIFAR's shape, after compilation."""
  n, bs = 50000, 128
  images, labels = random_data(n, SHAPE["cifar10"])
  cfg = TrainConfig(dataset="cifar10", model="resnet20", batch_size=bs, optimizer="sgd",
                          rule="ratio", granularity="channel", rounding="round")
  model = build_model(cfg, 10)
  tx = make_optimizer(cfg, n // bs)
  step_fn = make_train_step(cfg, model, tx, ((0.5,) * 3, (0.25,) * 3))
  state = init_state(cfg, model, tx, images[:1].astype(jnp.float32), None)
  run_chunk = make_chunk_runner(cfg, step_fn, n // bs, jax.random.key(0))
  perm = jax.random.permutation(jax.random.key(1), n)
  state, _ = run_chunk(state, perm, images, labels, 2)
  jax.block_until_ready(state.params)
  t0 = time.perf_counter()
  state, _ = run_chunk(state, perm, images, labels, n // bs - 2)
  jax.block_until_ready(state.params)
  return (time.perf_counter() - t0) * (n // bs) / (n // bs - 2)


def cost_lines(rows, limit: float = 1.10) -> list:
  """Per model over `limit`: the slowest rule's extra time against its extra kernels."""
  out = []
  for model in dict.fromkeys(r["model"] for r in rows):
    rs = [r for r in rows if r["model"] == model]
    base = rs[0]
    worst = max((r for r in rs[1:] if r["granularity"] != CONTROL and "kernels" in r),
                key=lambda r: r["step_time_ratio"], default=None)
    if worst is None or worst["step_time_ratio"] <= limit or "kernels" not in base \
        or worst["kernels"] <= base["kernels"]:
      continue
    extra = (worst["step_time_ratio"] - 1) * base["step_s"]
    n = worst["kernels"] - base["kernels"]
    moved = ""
    if base.get("bytes_accessed") and worst.get("bytes_accessed"):
      moved = (f" It also moves {worst['bytes_accessed'] / 1e6:.1f} MB per step against "
               f"{base['bytes_accessed'] / 1e6:.1f} MB.")
    out.append(f"{model}: the slowest rule ({worst['rule']}/{worst['granularity']}) runs "
               f"{worst['kernels']} kernels per step against float's {base['kernels']}; its "
               f"extra {1e3 * extra:.2f} ms is {1e6 * extra / n:.0f} us per extra kernel.{moved}")
  return out


def readme_section(doc) -> str:
  where = doc["machine"] if doc["backend"] == "cpu" else \
      f"{doc.get('device_kind', doc['backend'])} (host {doc['machine']})"
  windows = {r.get("windows") for r in doc["rows"]} - {None, 9}
  flag = f" --windows {windows.pop()}" if len(windows) == 1 else ""
  how = f"`python benchmarks/bench.py{flag} --readme docs/PERFORMANCE.md`" \
      if doc["backend"] == "cpu" else \
      "`bash benchmarks/bench_gpu.sh` (rendered here by `python benchmarks/bench.py --from_json " \
      f"docs/bench_{doc['backend']}.json --readme docs/PERFORMANCE.md`)"
  lines = [f"Measured by {how} on {where} "
           f"({', '.join(sorted({r.get('date', doc['date']) for r in doc['rows']}))}, jax "
           f"{doc['jax']}, {doc['backend']}). Step time of quantized "
           f"training relative to float training (timed windows taken round-robin in one "
           f"process; the ratio is the median of the per-round ratios). Kernels: instructions "
           f"of the compiled step that XLA dispatches one by one. MB/step: the bytes the "
           f"compiled step reads and writes, by XLA's cost analysis.", "",
           "| model | rule | granularity | scales updated | step (ms) | quantized/float "
           "| kernels | MB/step |",
           "|---|---|---|---|---|---|---|---|"]
  for r in doc["rows"]:
    mb = f"{r['bytes_accessed'] / 1e6:.1f}" if r.get("bytes_accessed") else "-"
    k = r.get("scale_every", 1)
    when = "-" if r["rule"] in ("float", "fixed") else (
        "every step" if k == 1 else "never (weights-only step)" if k == "weights-only"
        else f"every {k} steps (derived)")
    lines.append(f"| {r['model']} | {r['rule']} | {r['granularity']} | {when} "
                 f"| {1e3 * r['step_s']:.2f} | {r['step_time_ratio']:.3f} "
                 f"| {r.get('kernels', '-')} | {mb} |")
  lines += [""]
  if any(r.get("derived") for r in doc["rows"]):
    lines += ["Rows *every k steps (derived)*: a run with the scales updated every k steps "
              "alternates one scale step with k-1 weights-only steps, so each round's ratio is "
              "(t_every_step + (k-1) t_weights_only) / (k t_float) from the two rows measured "
              "in that round; the median over rounds is shown."]
  for k in sorted({r.get("scale_every", 1) for r in doc["rows"]} - {"weights-only"}):
    # the fixed rule learns no scale: its rows stand for every k
    worst = {m: max(r["step_time_ratio"] for r in doc["rows"] if r["model"] == m
                    and r["rule"] != "float"
                    and (r["rule"] == "fixed" or r.get("scale_every", 1) == k))
             for m in dict.fromkeys(r["model"] for r in doc["rows"])}
    lines.append(f"Worst quantized/float ratio with the scales updated "
                 f"{'every step' if k == 1 else f'every {k} steps'}: "
                 + ", ".join(f"{m} {v:.3f}" for m, v in worst.items()) + ".")
  pipe = [r["data_pipeline_ratio"] for r in doc["rows"] if "data_pipeline_ratio" in r]
  lines += [f"Real-data step / constant-batch step: {min(pipe):.3f} to {max(pipe):.3f}."]
  control = [r for r in doc["rows"] if r["granularity"] == CONTROL]
  if control:
    lines.append("Noise: the float configuration measured a second time (rows float / "
                 f"{CONTROL}) comes out at " + ", ".join(
                     f"{r['model']} {r['step_time_ratio']:.3f}" for r in control)
                 + " of the first: ratios closer together than that spread are not told apart.")
  lines += cost_lines(doc["rows"])
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
  ap.add_argument("--windows", type=int, default=9)
  ap.add_argument("--out", default="docs/bench.json")
  ap.add_argument("--readme", default=None)
  ap.add_argument("--steps_scale", type=int, default=1,
                  help="multiply the steps per timed window (e.g. 10 on a GPU, where a "
                       "CPU-sized window is a few milliseconds)")
  ap.add_argument("--from_json", default=None,
                  help="measure nothing: render this benchmark JSON into --readme (e.g. "
                       "docs/bench_gpu.json, written on a GPU machine by bench_gpu.sh)")
  ap.add_argument("--scale_every", default=f"1,{TrainConfig().scale_every}",
                  help="comma-separated k: for each k > 1, a row derived from the learned "
                       "rules' scale step and weights-only step (default: the default k)")
  ap.add_argument("--cifar_epoch", action="store_true",
                  help="also time one CIFAR-10 ResNet-20 epoch (slow on a CPU)")
  args = ap.parse_args(argv)
  if args.from_json:
    return render_from_json(args, write_readme)
  if check_windows(args.windows):
    return 2
  models = args.models.split(",")
  bad = [m for m in models if m not in BATCH]
  if bad:
    print(f"error: unknown model(s) {', '.join(bad)}; expected {', '.join(BATCH)}", file=sys.stderr)
    return 2
  # steps per timed window: about 0.3 s or more each on this CPU
  steps = {"lenet300": 200, "lenet5": 10, "resnet20": 3}
  if args.steps_scale < 1:
    print(f"error: --steps_scale must be >= 1, got {args.steps_scale}", file=sys.stderr)
    return 2
  steps = {k: v * args.steps_scale for k, v in steps.items()}
  try:
    scale_every = sorted({int(k) for k in args.scale_every.split(",")})
    if scale_every[0] < 1:
      raise ValueError
  except ValueError:
    print(f"error: --scale_every takes integers >= 1 separated by commas, got "
          f"{args.scale_every!r}", file=sys.stderr)
    return 2
  rows = run(models, steps, args.windows, scale_every)
  out = pathlib.Path(args.out)
  if out.exists():  # keep the rows of models not measured this time
    try:
      old = json.loads(out.read_text()).get("rows", [])
    except ValueError as e:
      print(f"note: {out} is not valid JSON ({e}); only this run's rows are written",
            file=sys.stderr)
      old = []
    rows = [r for r in old if r["model"] not in models] + rows
    rows.sort(key=lambda r: list(BATCH).index(r["model"]) if r["model"] in BATCH else len(BATCH))
  doc = dict(machine_info(), devices=len(jax.devices()),
             device_kind=jax.devices()[0].device_kind, peak_rss_mb=peak_memory_mb(), rows=rows)
  if args.cifar_epoch:
    doc["cifar10_resnet20_epoch_s"] = cifar_epoch_seconds()
    print(f"CIFAR-10 ResNet-20 epoch: {doc['cifar10_resnet20_epoch_s']:.1f} s")
  out.parent.mkdir(parents=True, exist_ok=True)
  write_json_atomic(out, doc)
  print(f"wrote {out}")
  if args.readme:
    return write_readme(pathlib.Path(args.readme), doc)
  return 0


def write_readme(path: pathlib.Path, doc) -> int:
  """Rewrites the section of --readme's file between its bench markers (``bench`` for CPU
  measurements, ``bench-<backend>`` otherwise, e.g. ``bench-gpu``)."""
  tag = "bench" if doc["backend"] == "cpu" else f"bench-{doc['backend']}"
  return replace_section(path, tag, readme_section(doc))


def add_output_flags(ap: argparse.ArgumentParser, out: str, tag: str) -> None:
  """--out (the JSON), --readme (the file whose `tag` section gets the table) and
  --from_json (render a JSON, measure nothing)."""
  ap.add_argument("--out", default=out)
  ap.add_argument("--readme", default=None, help=f"also render the table into this file's "
                  f"<!-- {tag}:begin/end --> section (docs/PERFORMANCE.md)")
  ap.add_argument("--from_json", default=None, help="measure nothing: render this JSON into "
                  "--readme (default docs/PERFORMANCE.md)")
  ap.add_argument("--section", default=tag, help=f"the marker name of the section to "
                  f"rewrite (default {tag}; another CPU's results go in a section of their "
                  f"own, e.g. {tag}-amx, with --out naming their JSON)")


def parse_timing_args(argv, description: str, out: str, tag: str, render):
  """(args, None) for a side-by-side benchmark's ``--windows`` and output flags, or
  (args, exit status) when there is nothing more to measure: ``--from_json`` rendered, or
  fewer than 3 windows refused in one line."""
  ap = argparse.ArgumentParser(description=description)
  ap.add_argument("--windows", type=int, default=7)
  add_output_flags(ap, out, tag)
  args = ap.parse_args(argv)
  if args.from_json:
    return args, section_from_json(args, args.section, render)
  return args, (2 if check_windows(args.windows, 3) else None)


def section_from_json(args, tag: str, render) -> int:
  """``--from_json``: renders that JSON into the `tag` section of --readme (default
  docs/PERFORMANCE.md); 2 with a one-line error for an unreadable JSON."""
  try:
    doc = files.read_json(args.from_json)
  except (OSError, ValueError) as e:
    print(f"error: cannot read {args.from_json}: {e}", file=sys.stderr)
    return 2
  return replace_section(pathlib.Path(args.readme or "docs/PERFORMANCE.md"), tag, render(doc))


def write_doc(out, doc, readme, tag: str, render) -> int:
  """Writes the benchmark JSON `doc` to `out` (atomically) and, with `readme`, renders it
  into that file's ``tag`` section; the exit status."""
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  write_json_atomic(out, doc)
  print(f"wrote {out}")
  if readme:
    return replace_section(pathlib.Path(readme), tag, render(doc))
  return 0


def replace_section(path: pathlib.Path, tag: str, section: str) -> int:
  """Replaces the text between ``<!-- tag:begin -->`` and ``<!-- tag:end -->`` in `path`
  with `section` (the file is rewritten atomically); 2 with a one-line error if the
  markers are missing."""
  b, e = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
  try:
    text = path.read_text()
  except OSError as err:
    print(f"error: cannot read {path}: {err.strerror or err}", file=sys.stderr)
    return 2
  if b not in text or e not in text:
    print(f"error: {path} has no {b} ... {e} markers", file=sys.stderr)
    return 2
  text = text[:text.index(b) + len(b)] + "\n" + section + "\n" + text[text.index(e):]
  fileio.write_bytes_atomic(path, text.encode())
  print(f"updated {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""What quantized training costs over float, by ablation (one process, round-robin windows).

  python benchmarks/bench_cost.py [--model lenet300] [--granularity row] [--windows 15]
                               [--out docs/bench_cost.json] [--readme docs/PERFORMANCE.md]

Times the training step as training runs it (lqlab.step.make_chunk_runner, batch
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
and ``||P||`` per group); and float a second time (the run's noise).

Two rungs are not quantizers but floors, the least any learned-scale quantizer adds
to this step (``lqjax.quant.fake_quant`` is replaced while their steps are traced):

* ``floor: one pass``: every kernel goes through ``P * (s / s)`` with its per-group
  scale ``s`` (no gradient): one elementwise pass that reads each weight and writes a
  copy, as the forward fake-quantization does, with a straight-through gradient and
  no rounding, clipping or scale gradient;
* ``floor: + one sum of dL/dP per group``: the same, with the scale cotangent
  ``0 * sum_G (dL/dP)^2``: one reduction of a kernel-sized function of the gradient
  per step, the least a scale-gradient rule that reads the gradient per group does
  (LSQ's ``sum_G g * dQ/ds`` and the ratio rule's ``||dL/dP||_G^2`` are each one).

Prints each configuration's step time, its ratio to float (median of per-round
ratios), the step time it adds to its rung below (median of per-round differences),
its kernel count and XLA's bytes per step; writes them as JSON (--out) and, with
--readme FILE, rewrites FILE's section between its ``bench-cost`` markers.
"""

import contextlib
import pathlib
import statistics
import sys
from unittest import mock

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench  # noqa: E402  (benchmarks/bench.py)
from lqjax import quant  # noqa: E402
from lqlab.config import TrainConfig  # noqa: E402
from lqlab.files import write_json_atomic  # noqa: E402


def _floor_quantizer(with_sum: bool):
  """A stand-in for ``quant.fake_quant``: ``P * (s / s)``, gradient dL/dP straight
  through, scale cotangent 0 (or ``0 * sum_G (dL/dP)^2`` with `with_sum`)."""

  @jax.custom_vjp
  def f(x, s):
    return x * (s / s)

  def fwd(x, s):
    return f(x, s), s

  def bwd(s, g):
    # the ratio rule's own sum of g^2 (the form XLA does not merge with Adam's g^2)
    gs = 0.0 * quant._grad_sq_sum(g, s.shape) if with_sum else jnp.zeros_like(s)
    return g, gs

  f.defvjp(fwd, bwd)

  def fake_quant(x, scale, **_):
    return f(x, quant._expand_scale(jnp.asarray(scale, x.dtype), x.ndim))

  return fake_quant


FLOOR_KW = dict(rule="fixed", quantize_bias=False)
FLOOR_SUM = "floor: + one sum of dL/dP per group"
RULE_RUNGS = ("+ lsq scale gradient", "ratio (free bits)")  # set against the floor
# (name, the rung it adds to, TrainConfig overrides, attributes of lqjax.quant set
# while the step is traced)
LADDER = [
    ("float", None, dict(float_model=True), {}),
    ("floor: one pass", "float", FLOOR_KW, {"fake_quant": _floor_quantizer(False)}),
    (FLOOR_SUM, "floor: one pass", FLOOR_KW,
     {"fake_quant": _floor_quantizer(True)}),
    ("kernels fake-quantized", "float", dict(rule="fixed", quantize_bias=False), {}),
    ("+ biases", "kernels fake-quantized", dict(rule="fixed"), {}),
    ("+ 4-bit clip (fixed)", "+ biases", dict(rule="fixed", bits=4), {}),
    ("+ lsq scale gradient", "+ 4-bit clip (fixed)", dict(rule="lsq", bits=4), {}),
    ("lsq, ones-vector sum", "+ 4-bit clip (fixed)", dict(rule="lsq", bits=4), {"_MV_ROWS": 1}),
    ("ratio (free bits)", "+ biases", dict(rule="ratio"), {}),
    ("float, again", "float", dict(float_model=True), {}),
]


def median_diff(a, b) -> float:
  """Median over rounds of a[i] - b[i] (the time a rung adds, paired like the ratios)."""
  return statistics.median(x - y for x, y in zip(a, b))


def readme_section(doc) -> str:
  lines = [f"Measured by `python benchmarks/bench_cost.py --windows {doc['windows']} --readme "
           f"docs/PERFORMANCE.md` on {doc['machine']} ({doc['date']}, jax {doc['jax']}, "
           f"{doc['backend']}; {doc['model']}, {doc['granularity']} scales, "
           f"{doc['windows']} rotated rounds of {doc['steps']} steps). \"adds\": the median "
           "over rounds of the step time a configuration adds to the one it builds on.", "",
           "| configuration | builds on | quantized/float | adds (ms) | kernels | MB/step |",
           "|---|---|---|---|---|---|"]
  for r in doc["rows"]:
    adds = "-" if r["builds_on"] is None else f"{1e3 * r['adds_s']:+.3f}"
    lines.append(f"| {r['name']} | {r['builds_on'] or '-'} | {r['step_time_ratio']:.3f} | "
                 f"{adds} | {r['kernels']} | {r['bytes_accessed'] / 1e6:.1f} |")
  by = {r["name"]: r for r in doc["rows"]}
  floor, rules = by.get(FLOOR_SUM), [by[n] for n in RULE_RUNGS if n in by]
  if floor and rules:
    lines += ["", f"Floor: a step that only passes each kernel through one elementwise op and "
              f"sums one function of dL/dP per group runs at {floor['step_time_ratio']:.3f} of "
              f"float ({'over' if floor['step_time_ratio'] > 1.10 else 'within'} 1.10); " + ", ".join(f"{r['name']} {r['step_time_ratio']:.3f} "
                                    f"({r['step_time_ratio'] - floor['step_time_ratio']:+.3f})"
                                    for r in rules) + "."]
  return "\n".join(lines)


def main(argv=None):
  args = bench.lenet_step_args(__doc__, argv, out="docs/bench_cost.json")
  if args.from_json:
    return bench.render_from_json(args, lambda path, doc: bench.replace_section(
        path, "bench-cost", readme_section(doc)))
  if bench.check_windows(args.windows):
    return 2
  images, labels = bench.random_data(40 * bench.BATCH[args.model])
  steps = 100 if args.model == "lenet300" else 10
  prepared = []
  for _, _, kw, attrs in LADDER:
    if not kw.get("float_model"):
      kw = dict(kw, granularity=args.granularity, rounding="round")
    cfg = TrainConfig(dataset="mnist", model=args.model,
                            batch_size=bench.BATCH[args.model], optimizer="adam", **kw)
    # the attributes are read when the step is traced, in prepare_config
    with mock.patch.multiple(quant, **attrs) if attrs else contextlib.nullcontext():
      real, _, _, holder = bench.prepare_config(cfg, images, labels, steps)
    prepared.append((real, holder))
  times = [[t / steps for t in ts] for ts in
           bench.round_robin([p[0] for p in prepared], args.windows, bench._sync, rotate=True)]
  by_name = {rung[0]: ts for rung, ts in zip(LADDER, times)}
  print(f"{args.model} / {args.granularity}, {jax.default_backend()}, "
        f"{args.windows} rotated rounds of {steps} steps")
  rows = []
  for (name, below, _, _), ts, (_, holder) in zip(LADDER, times, prepared):
    row = {"name": name, "builds_on": below, "step_s": statistics.median(ts),
           "step_time_ratio": bench.median_ratio(ts, times[0]),
           "adds_s": None if below is None else median_diff(ts, by_name[below]),
           "kernels": holder["kernels"], "bytes_accessed": holder["bytes_accessed"]}
    rows.append(row)
    adds = "" if below is None else f"  adds {1e3 * row['adds_s']:+6.3f} ms to '{below}'"
    print(f"{name:36s} {1e3 * row['step_s']:7.3f} ms/step  quantized/float "
          f"{row['step_time_ratio']:.3f}  kernels {row['kernels']:4d}  "
          f"MB/step {row['bytes_accessed'] / 1e6:6.1f}{adds}", flush=True)
  doc = dict(bench.machine_info(), model=args.model, granularity=args.granularity,
             windows=args.windows, steps=steps, rows=rows)
  out = pathlib.Path(args.out)
  write_json_atomic(out, doc)
  print(f"wrote {out}")
  if args.readme:
    return bench.replace_section(pathlib.Path(args.readme), "bench-cost", readme_section(doc))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

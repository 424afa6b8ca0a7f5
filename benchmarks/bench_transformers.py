"""Quantized/float training-step time of the transformers, side by side in one run.

  python benchmarks/run.py transformers [--windows 9] [--out docs/bench_transformers.json]

The character-level GPT (lqlab.lm's step, nanoGPT's CPU configuration: 4 layers, width
128, context 64, batch 12) and the CIFAR-10 ViT (lqlab's step, batch 128), each in float
and under every rule: fixed and LSQ at 4 bits per row, LSQ per block of 64, and the
ratio rule per row. The learned rules are measured twice, their scale step and their
weights-only step; a run that updates the scales every k steps (the default k = 16)
takes ``(t_scale + (k-1) t_weights) / k``, derived per round (bench.every_k). Every
configuration is timed round-robin, one window each per round, so that load on the
machine hits all alike; a ratio is the median over rounds of the per-round ratio. A
second float row is the control: its ratio to the first is the noise of one ratio.
The JSON records the machine, the CPU's flags and the versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import (WEIGHTS_ONLY, add_output_flags, bench_interleaved, check_windows, every_k,
                   machine_info, median_ratio, random_data, round_robin, section_from_json,
                   write_doc)
from lqlab import lm
from lqlab.config import TrainConfig

K_DEFAULT = TrainConfig().scale_every
#: (rule, granularity, extra config) of the quantized variants.
VARIANTS = [("fixed", "row", dict(rule="fixed", bits=4)),
            ("lsq", "row", dict(rule="lsq", bits=4)),
            ("lsq", "block64", dict(rule="lsq", bits=4, granularity="block", block_size=64)),
            ("ratio", "row", dict(rule="ratio"))]


def _gpt_prepared(cfg: lm.LMConfig, train, steps: int, scale_step: bool):
  model = lm.build(cfg, 65)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = lm.make_optimizer(cfg)
  step = lm.make_step(cfg, graphdef, tx)
  holder = {"p": params, "o": tx.init(params)}
  keys = [jax.random.key(i) for i in range(steps)]

  def run():
    p, o = holder["p"], holder["o"]
    for k in keys:
      p, o, _ = step(p, o, rest, train, k, scale_step=scale_step)
    holder["p"], holder["o"] = p, o
    return p

  jax.block_until_ready(run())  # compile
  return run


def bench_gpt(windows: int, steps: int = 5):
  train = jnp.asarray(np.random.default_rng(0).integers(0, 65, 200_000), jnp.int32)
  cfgs = [("float", "-", lm.LMConfig(float_model=True), True)]
  for rule, g, kw in VARIANTS:
    kw = dict(kw)
    if "granularity" not in kw:
      kw["granularity"] = g
    c = lm.LMConfig(**kw)
    cfgs.append((rule, g, c, True))
    if rule != "fixed":
      cfgs.append((rule, g, c, False))
  cfgs.append(("float", "control", lm.LMConfig(float_model=True), True))
  fns = [_gpt_prepared(c, train, steps, s) for _, _, c, s in cfgs]
  times = round_robin(fns, windows, jax.block_until_ready, rotate=True)
  times = [[t / steps for t in ts] for ts in times]
  return _rows("gpt", cfgs, times, steps, windows, batch=12)


def _rows(model, cfgs, times, steps, windows, batch):
  base = times[0]
  rows, by = [], {}
  for (rule, g, _, scale), ts in zip(cfgs, times):
    k = 1 if scale else "weights-only"
    by[(rule, g, k)] = ts
    rows.append({"model": model, "rule": rule, "granularity": g, "scale_every": k,
                 "batch_size": batch, "steps": steps, "windows": windows,
                 "step_s": statistics.median(ts), "step_time_ratio": median_ratio(ts, base)})
  for rule, g, _ in VARIANTS:
    if rule == "fixed":
      continue
    step_s, ratio = every_k(by[(rule, g, 1)], by[(rule, g, "weights-only")], base, K_DEFAULT)
    rows.append({"model": model, "rule": rule, "granularity": g, "scale_every": K_DEFAULT,
                 "derived": True, "batch_size": batch, "steps": steps, "windows": windows,
                 "step_s": step_s, "step_time_ratio": ratio})
  return rows


def bench_vit(windows: int, steps: int = 2):
  images, labels = random_data(8 * 128, (32, 32, 3))
  cfgs, meta = [], []
  base = dict(dataset="cifar10", model="vit", batch_size=128, optimizer="adam")
  cfgs.append(TrainConfig(float_model=True, **base))
  meta.append(("float", "-", None, True))
  for rule, g, kw in VARIANTS:
    kw = dict(kw)
    kw.setdefault("granularity", g)
    for k in ((1,) if rule == "fixed" else (1, WEIGHTS_ONLY)):
      cfgs.append(TrainConfig(rounding="round", scale_every=k, **base, **kw))
      meta.append((rule, g, None, k == 1))
  cfgs.append(TrainConfig(float_model=True, **base))
  meta.append(("float", "control", None, True))
  res = bench_interleaved(cfgs, images, labels, steps, windows)
  return _rows("vit", meta, [r["real_t"] for r in res], steps, windows, batch=128)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--windows", type=int, default=9)
  ap.add_argument("--models", default="gpt,vit")
  add_output_flags(ap, "docs/bench_transformers.json", "bench-transformers")
  args = ap.parse_args(argv)
  if args.from_json:
    return section_from_json(args, args.section, render)
  if check_windows(args.windows, minimum=3):
    return 2
  models = args.models.split(",")
  bad = [m for m in models if m not in ("gpt", "vit")]
  if bad:
    print(f"error: unknown model(s) {', '.join(bad)}; expected gpt, vit", file=sys.stderr)
    return 2
  import os
  load = os.getloadavg()[0]  # other work on the machine widens the ratios' spread
  rows = []
  for m in models:
    rows += bench_gpt(args.windows) if m == "gpt" else bench_vit(args.windows)
  for r in rows:
    print(f"{r['model']:4s} {r['rule']:6s} {r['granularity']:8s} k={str(r['scale_every']):12s} "
          f"step {1e3 * r['step_s']:8.2f} ms  ratio {r['step_time_ratio']:.3f}"
          f"{' (derived)' if r.get('derived') else ''}", flush=True)
  doc = dict(machine_info(), loadavg_1min_at_start=load, rows=rows)
  return write_doc(args.out, doc, args.readme, args.section, render)


def render(doc) -> str:
  """The Markdown table of a transformers benchmark JSON."""
  vnni = [f for f in ("avx512_vnni", "amx_int8", "avx_vnni") if f in doc.get("cpu_flags", [])]
  lines = [f"Measured {doc['date']} on {doc['machine']} (jax {doc['jax']}, flax "
           f"{doc.get('flax')}; integer-dot flags: {', '.join(vnni) or 'none'}) by "
           f"`python benchmarks/run.py transformers --readme docs/PERFORMANCE.md`; the ratio is "
           f"the median over rounds of quantized / float step time, measured side by side "
           f"(the float control row is the noise of one ratio)"
           + (f"; the 1-minute load average at the start was {doc['loadavg_1min_at_start']:.1f}"
              if "loadavg_1min_at_start" in doc else "") + ".", "",
           "| model | rule | granularity | scales updated | step ms | quantized / float |",
           "|---|---|---|---|---|---|"]
  for r in doc["rows"]:
    k = r["scale_every"]
    when = ("never (weights only)" if k == "weights-only" else
            "every step" if k == 1 else f"every {k} steps (derived)")
    lines.append(f"| {r['model']} | {r['rule']} | {r['granularity']} | {when} | "
                 f"{1e3 * r['step_s']:.1f} | {r['step_time_ratio']:.3f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())

"""onnxruntime on the exported integer-weight graphs against the same model in float32.

  python benchmarks/run.py onnx [--windows 7] [--out docs/bench_onnx.json]
                                [--readme docs/PERFORMANCE.md]

The ONNX lqjax exports keeps each quantized tensor as integer codes (INT2/INT4 packed,
int8 and wider as they are) followed by ``DequantizeLinear``. This measures what that
costs or gains in onnxruntime (CPU provider) against a float twin: the same model
exported with ``weights="float"``, the dequantized weights as float32 initializers, so
both compute the same function. For
LeNet-300-100 and LeNet-5 (MNIST shapes, the scales as initialised) at LSQ 2, 4 and 8 bits
per row, at batch 256 and batch 1, with onnxruntime's graph optimisations at ``basic``
(exact rewrites) and ``all`` (which may fuse DequantizeLinear into integer-weight
kernels), timed round-robin side by side; a ratio is the median over rounds of float
time / integer-graph time (> 1: the integer graph is faster). The file bytes of each are
recorded, and the largest logit difference between the two.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import jax
import numpy as np

from bench import (machine_info, median_ratio, parse_timing_args, write_doc)
from lqjax import onnx_export
from lqlab import data, export
from lqlab.config import TrainConfig
from lqlab.step import build_model

MODELS = ("lenet300", "lenet5")
BITS = (2, 4, 8)
BATCHES = (256, 1)
CALLS = {256: 5, 1: 50}


def graphs(model: str, bits: int):
  """(integer-weight ONNX bytes, float twin ONNX bytes) of `model` at LSQ `bits` per row."""
  shape = data.image_shape("mnist")
  meta = {"mean": (0.13,), "std": (0.31,)}
  kw = dict(dataset="mnist", model=model, granularity="row", rounding="round")
  q = build_model(TrainConfig(rule="lsq", bits=bits, **kw), 10)
  params = q.init(jax.random.key(0), np.zeros((1,) + shape, np.float32))["params"]
  return tuple(export.onnx_bytes(q, {"params": params}, meta, shape, weights=w)
               for w in ("int", "float"))


def measure(model, bits, windows):
  qb, fb = graphs(model, bits)
  rows = []
  rng = np.random.default_rng(0)
  for level in ("basic", "all"):
    sq, sf = onnx_export.session(qb, level), onnx_export.session(fb, level)
    for batch in BATCHES:
      x = rng.integers(0, 256, (batch,) + data.image_shape("mnist"), dtype=np.uint8)
      name = sq.get_inputs()[0].name
      oq, of = sq.run(None, {name: x})[0], sf.run(None, {name: x})[0]
      times = [[], []]
      for r in range(windows):
        for j in ((0, 1) if r % 2 == 0 else (1, 0)):
          s = (sq, sf)[j]
          t0 = time.perf_counter()
          for _ in range(CALLS[batch]):
            s.run(None, {name: x})
          times[j].append((time.perf_counter() - t0) / CALLS[batch])
      rows.append({"model": model, "bits": bits, "level": level, "batch": batch,
                   "int_bytes": len(qb), "float_bytes": len(fb),
                   "int_ms": 1e3 * statistics.median(times[0]),
                   "float_ms": 1e3 * statistics.median(times[1]),
                   "float_over_int": median_ratio(times[1], times[0]),
                   "max_abs_logit_diff": float(np.max(np.abs(oq - of)))})
      r_ = rows[-1]
      print(f"{model:8s} {bits}-bit {level:5s} b{batch:<4d} int {r_['int_ms']:8.3f} ms  float "
            f"{r_['float_ms']:8.3f} ms  float/int {r_['float_over_int']:.2f}  "
            f"bytes {len(qb):,} vs {len(fb):,}  max|dlogit| {r_['max_abs_logit_diff']:.1e}",
            flush=True)
  return rows


def main(argv=None):
  args, status = parse_timing_args(argv, __doc__.splitlines()[0], "docs/bench_onnx.json",
                                   "bench-onnx", render)
  if status is not None:
    return status
  import onnxruntime
  load = os.getloadavg()[0]
  rows = [r for m in MODELS for b in BITS for r in measure(m, b, args.windows)]
  doc = dict(machine_info(), onnxruntime=onnxruntime.__version__, loadavg_1min_at_start=load,
             windows=args.windows, rows=rows)
  return write_doc(args.out, doc, args.readme, args.section, render)


def render(doc) -> str:
  """The Markdown table of an onnx benchmark JSON."""
  cpu = f"{doc['cpu_model']}, " if doc.get("cpu_model") else ""
  lines = [f"Measured {doc['date']} on {cpu}{doc['machine']} (onnxruntime "
           f"{doc.get('onnxruntime')}, jax {doc['jax']}) by `python benchmarks/run.py onnx "
           f"--readme docs/PERFORMANCE.md`; float/int is float-twin time / integer-graph "
           f"time (> 1: the integer graph is faster), the median over {doc['windows']} "
           f"rounds side by side.", "",
           "| model | bits | file bytes (int / float) | level | batch | int ms | float ms | "
           "float/int | max logit diff |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in doc["rows"]:
    lines.append(f"| {r['model']} | {r['bits']} | {r['int_bytes']:,} / {r['float_bytes']:,} | "
                 f"{r['level']} | {r['batch']} | {r['int_ms']:.3f} | {r['float_ms']:.3f} | "
                 f"{r['float_over_int']:.2f} | {r['max_abs_logit_diff']:.1e} |")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())

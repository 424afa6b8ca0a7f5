"""onnxruntime's integer kernels against its float ones, side by side in one run.

  python benchmarks/run.py ortint [--windows 7] [--out docs/bench_ortint.json]
                                  [--readme docs/PERFORMANCE.md]

What decides how ``lqjax.onnx_export.build_integer`` spells a layer: one-node graphs in
onnxruntime (CPU provider, all graph optimisations), each timed against the same
operation in float32:

* ``MatMulInteger`` (int32 sums) with uint8 or int8 activations and int8 weights, against
  ``MatMul``, at batch 256 (784x300, 1024x1024) and batch 1 (1024x1024); its sums are
  checked against exact integer products;
* ``ConvInteger`` (3x3, padding 1, batch 64 of 32x32) with uint8 x uint8, int8 x int8 and
  uint8 x int8 operands, against ``Conv``, at 16, 32 and 64 channels.

A ratio is the median over rounds of float time / integer time (> 1: the integer kernel is
faster). The JSON records the CPU's flags and the versions.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from bench import (machine_info, measure_side_by_side, measured_line, parse_timing_args,
                   write_doc)

DOTS = ((256, 784, 300), (256, 1024, 1024), (1, 1024, 1024))
CONV_CHANNELS = (16, 32, 64)
CONV_TYPES = ((np.uint8, np.uint8), (np.int8, np.int8), (np.uint8, np.int8))


def _one_node(op, x, w, **attrs):
  """A function running a one-node onnxruntime graph ``op(x, W)`` with W an initializer."""
  from onnx import helper, numpy_helper
  from lqjax import onnx_export
  xi = helper.make_tensor_value_info(
      "x", helper.np_dtype_to_tensor_dtype(x.dtype), ["B"] + list(x.shape[1:]))
  y = helper.make_value_info("y", helper.make_empty_tensor_value_info("y").type)
  g = helper.make_graph([helper.make_node(op, ["x", "w"], ["y"], **attrs)], "g", [xi], [y],
                        [numpy_helper.from_array(w, "w")])
  m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
  sess = onnx_export.session(m.SerializeToString(), "all")
  return lambda x: sess.run(None, {"x": x})[0]


def _codes(rng, dtype, shape):
  info = np.iinfo(dtype)
  return rng.integers(info.min, int(info.max) + 1, shape).astype(dtype)


def measure(windows):
  rng = np.random.default_rng(0)
  rows = []
  for b, k, n in DOTS:
    xf, wf = rng.standard_normal((b, k), np.float32), rng.standard_normal((k, n), np.float32)
    cases = [("float32", _one_node("MatMul", xf, wf), (xf,))]
    exact = {}
    for xt in (np.uint8, np.int8):
      xq, wq = _codes(rng, xt, (b, k)), _codes(rng, np.int8, (k, n))
      fn = _one_node("MatMulInteger", xq, wq)
      exact[f"{np.dtype(xt).name}xint8"] = bool(np.array_equal(
          fn(xq), xq.astype(np.int64) @ wq.astype(np.int64)))
      cases.append((f"{np.dtype(xt).name}xint8", fn, (xq,)))
    for r in measure_side_by_side(cases, windows, 5 if b > 1 else 50):
      rows.append({"op": "MatMulInteger", "shape": f"{b}x{k}x{n}", **r,
                   "exact": exact.get(r["variant"])})
  for c in CONV_CHANNELS:
    xf = rng.standard_normal((64, c, 32, 32), np.float32)
    wf = rng.standard_normal((c, c, 3, 3), np.float32)
    cases = [("float32", _one_node("Conv", xf, wf, pads=[1, 1, 1, 1]), (xf,))]
    for xt, wt in CONV_TYPES:
      xq, wq = _codes(rng, xt, xf.shape), _codes(rng, wt, wf.shape)
      cases.append((f"{np.dtype(xt).name}x{np.dtype(wt).name}",
                    _one_node("ConvInteger", xq, wq, pads=[1, 1, 1, 1]), (xq,)))
    for r in measure_side_by_side(cases, windows, 2):
      rows.append({"op": "ConvInteger", "shape": f"64x{c}x32x32, 3x3", **r})
  for r in rows:
    print(f"{r['op']:14s} {r['shape']:18s} {r['variant']:11s} {1e3 * r['seconds']:9.3f} ms "
          f"float/this {r['vs_float']:.2f}", flush=True)
  return rows


def main(argv=None):
  args, status = parse_timing_args(argv, __doc__.splitlines()[0], "docs/bench_ortint.json",
                                   "bench-ortint", render)
  if status is not None:
    return status
  try:
    import onnxruntime
  except ImportError:
    print("error: onnxruntime is not installed (pip install lqjax[export])", file=sys.stderr)
    return 2
  load = os.getloadavg()[0]
  rows = measure(args.windows)
  doc = dict(machine_info(), onnxruntime=onnxruntime.__version__,
             loadavg_1min_at_start=load, windows=args.windows, rows=rows)
  return write_doc(args.out, doc, args.readme, args.section, render)


def render(doc) -> str:
  """The Markdown table of an ortint benchmark JSON."""
  lines = [measured_line(doc, "ortint", "float32 time / integer kernel time (> 1: the integer "
                         f"kernel is faster; onnxruntime {doc.get('onnxruntime', '?')})"), "",
           "| op | shape | float32 ms | operands | float / integer | exact |",
           "|---|---|---|---|---|---|"]
  floats = {(r["op"], r["shape"]): r for r in doc["rows"] if r["variant"] == "float32"}
  for r in doc["rows"]:
    if r["variant"] != "float32":
      f = floats[(r["op"], r["shape"])]
      exact = {True: "yes", False: "no"}.get(r.get("exact"), "-")
      lines.append(f"| {r['op']} | {r['shape']} | {1e3 * f['seconds']:.3f} | {r['variant']} | "
                   f"{r['vs_float']:.2f}x | {exact} |")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())

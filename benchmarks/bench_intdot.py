"""Integer against float32 products on this CPU, side by side in one run.

  python benchmarks/run.py intdot [--windows 7] [--reps 3] [--only dot,conv]
                                  [--out docs/bench_intdot.json] [--readme docs/PERFORMANCE.md]

What an integer inference path could gain here, measured before it is designed. For each
shape, jitted, timed round-robin (one window of `--reps` calls each per round, so that load
on the machine hits all alike), every variant against the float32 product of the same
shape; a ratio is the median over rounds of float time / variant time (> 1: faster).

Dots (``lax.dot_general``), batch 256 and batch 1:

* ``int8``: int8 x int8 -> int32;
* ``dyn_i8``: float32 activations quantized per row inside jit (absmax / 127), the int8
  dot, and the rescale to float32;
* ``dyn_i8_pad`` (batch 1): ``dyn_i8`` with the row padded to
  ``lqjax.integer.PAD_ROWS`` rows for the dot (``lqjax.integer.padded_dot``), as the integer
  path does;
* ``w8_f32``: float32 activations times int8 weights converted to float32 inside jit
  (the weight-only path, and what a layer's float path computes);
* ``i4_i8``: int4 weights packed two to a byte, unpacked to int8 inside jit, then the
  int8 dot.

3x3 convolutions, stride 1, SAME, 32x32 images, C -> C channels:

* ``int8``: ``lax.conv_general_dilated`` on int8 inputs with an int32 result;
* ``patches_i8``: the nine shifted int8 slices concatenated (B, H, W, 9C) and one
  int8 x int8 -> int32 dot with the (9C, C) kernel;
* ``int8_pad32``: below 32 channels, the input and the kernel's input axis padded with
  zero channels to 32, then the int8 convolution (the same result).

The JSON records the machine, the CPU's flags (``lscpu``: avx512_vnni, amx_int8, ...)
and the versions: XLA:CPU's integer kernels differ between CPUs.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lqjax import integer

from bench import (add_output_flags, machine_info, measure_side_by_side, measured_line,
                   section_from_json, write_doc)

#: (name, batch, in, out) of the dots.
DOTS = [("784x300", 256, 784, 300), ("1024x1024", 256, 1024, 1024),
        ("4096x4096", 256, 4096, 4096), ("784x300", 1, 784, 300),
        ("1024x1024", 1, 1024, 1024), ("4096x4096", 1, 4096, 4096)]
#: (channels, batch) of the 3x3 convolutions on 32x32 images.
CONVS = [(16, 128), (32, 128), (64, 128), (16, 1)]
_I32 = dict(preferred_element_type=jnp.int32)


def _int8_dot(x, w):
  return lax.dot_general(x, w, (((1,), (0,)), ((), ())), **_I32)


def _dyn_i8(x, w, w_scale, dot=_int8_dot):
  """Per-row absmax int8 activations, the int8 dot, the float rescale."""
  a = jnp.maximum(jnp.max(jnp.abs(x), axis=1, keepdims=True), 1e-12) / 127.0
  q = jnp.clip(jnp.round(x / a), -127, 127).astype(jnp.int8)
  return dot(q, w).astype(jnp.float32) * a * w_scale


def _dyn_i8_pad(x, w, w_scale):
  return _dyn_i8(x, w, w_scale, integer.padded_dot)


def _i4_i8(x, packed):
  """The int4 codes (packed two a byte by lqjax.integer.pack) unpacked inside jit, then
  the int8 dot."""
  return _int8_dot(x, integer.unpack(packed, (x.shape[1], packed.size * 2 // x.shape[1]), 4))


def conv_f32(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_int8(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), **_I32)


def conv_patches_i8(x, w):
  """3x3 SAME convolution as nine shifted int8 slices and one int8 dot."""
  b, h, wd, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = jnp.concatenate([xp[:, i:i + h, j:j + wd, :] for i in range(3) for j in range(3)], -1)
  out = lax.dot_general(cols.reshape(b * h * wd, 9 * c), w.reshape(9 * c, -1),
                        (((1,), (0,)), ((), ())), **_I32)
  return out.reshape(b, h, wd, -1)


def conv_int8_pad32(x, w):
  """The int8 convolution with zero input channels added up to 32."""
  extra = 32 - x.shape[-1]
  return conv_int8(jnp.pad(x, ((0, 0),) * 3 + ((0, extra),)),
                   jnp.pad(w, ((0, 0), (0, 0), (0, extra), (0, 0))))


def bench_dots(windows, reps, rng):
  rows = []
  for name, batch, k, n in DOTS:
    xf = rng.standard_normal((batch, k), dtype=np.float32)
    wf = rng.standard_normal((k, n), dtype=np.float32)
    x8 = rng.integers(-127, 128, (batch, k), dtype=np.int8)
    w8 = rng.integers(-127, 128, (k, n), dtype=np.int8)
    w4 = rng.integers(-8, 8, (k, n))
    x, w = jnp.asarray(xf), jnp.asarray(wf)
    # the integer paths against numpy's exact integer products, once
    ref = x8.astype(np.int64) @ w8.astype(np.int64)
    np.testing.assert_array_equal(np.asarray(jax.jit(_int8_dot)(x8, w8)), ref)
    np.testing.assert_array_equal(np.asarray(jax.jit(_i4_i8)(x8, integer.pack(w4, 4))),
                                  x8.astype(np.int64) @ w4)
    cases = [("float32", jax.jit(jnp.dot), (x, w)),
             ("int8", jax.jit(_int8_dot), (jnp.asarray(x8), jnp.asarray(w8))),
             ("dyn_i8", jax.jit(_dyn_i8), (x, jnp.asarray(w8), jnp.float32(0.01)))]
    if batch < integer.PAD_ROWS:  # the padded route, where the integer path takes it
      np.testing.assert_array_equal(jax.jit(_dyn_i8_pad)(x, w8, 0.01),
                                    jax.jit(_dyn_i8)(x, w8, 0.01))
      cases.append(("dyn_i8_pad", jax.jit(_dyn_i8_pad), (x, jnp.asarray(w8), jnp.float32(0.01))))
    cases += [("w8_f32", jax.jit(lambda x, w: x @ w.astype(jnp.float32)), (x, jnp.asarray(w8))),
              ("i4_i8", jax.jit(_i4_i8), (jnp.asarray(x8), jnp.asarray(integer.pack(w4, 4))))]
    for r in measure_side_by_side(cases, windows, reps):
      rows.append({"op": "dot", "shape": name, "batch": batch, **r})
      _print(rows[-1])
  return rows


def bench_convs(windows, reps, rng):
  rows = []
  for c, batch in CONVS:
    xf = rng.standard_normal((batch, 32, 32, c), dtype=np.float32)
    wf = rng.standard_normal((3, 3, c, c), dtype=np.float32)
    x8 = rng.integers(-127, 128, (batch, 32, 32, c), dtype=np.int8)
    w8 = rng.integers(-127, 128, (3, 3, c, c), dtype=np.int8)
    x8j, w8j = jnp.asarray(x8), jnp.asarray(w8)
    want = np.asarray(jax.jit(conv_int8)(x8j, w8j))
    np.testing.assert_array_equal(np.asarray(jax.jit(conv_patches_i8)(x8j, w8j)), want)
    cases = [("float32", jax.jit(conv_f32), (jnp.asarray(xf), jnp.asarray(wf))),
             ("int8", jax.jit(conv_int8), (x8j, w8j)),
             ("patches_i8", jax.jit(conv_patches_i8), (x8j, w8j))]
    if c < 32:
      np.testing.assert_array_equal(np.asarray(jax.jit(conv_int8_pad32)(x8j, w8j)), want)
      cases.append(("int8_pad32", jax.jit(conv_int8_pad32), (x8j, w8j)))
    for r in measure_side_by_side(cases, windows, reps):
      rows.append({"op": "conv3x3", "shape": f"32x32, {c}->{c}", "batch": batch, **r})
      _print(rows[-1])
  return rows


def _print(r):
  print(f"{r['op']:8s} {r['shape']:14s} b{r['batch']:<4d} {r['variant']:10s} "
        f"{1e3 * r['seconds']:9.3f} ms  float/this {r['vs_float']:.2f}", flush=True)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--windows", type=int, default=7)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--only", default="dot,conv", help="comma list of dot, conv")
  add_output_flags(ap, "docs/bench_intdot.json", "bench-intdot")
  args = ap.parse_args(argv)
  if args.from_json:
    return section_from_json(args, args.section, render)
  if args.windows < 3 or args.reps < 1:
    print(f"error: --windows must be >= 3 (a median of ratios) and --reps >= 1, got "
          f"{args.windows} and {args.reps}", file=sys.stderr)
    return 2
  only = args.only.split(",")
  bad = [o for o in only if o not in ("dot", "conv")]
  if bad:
    print(f"error: unknown --only {', '.join(bad)}; expected dot, conv", file=sys.stderr)
    return 2
  load = os.getloadavg()[0]
  rng = np.random.default_rng(0)
  rows = (bench_dots(args.windows, args.reps, rng) if "dot" in only else []) + \
         (bench_convs(args.windows, args.reps, rng) if "conv" in only else [])
  doc = dict(machine_info(), loadavg_1min_at_start=load, windows=args.windows,
             reps=args.reps, rows=rows)
  if args.section != "bench-intdot":  # another CPU's section: the command names its outputs
    doc["output_args"] = f"--out {args.out} --section {args.section}"
  return write_doc(args.out, doc, args.readme, args.section, render)


def render(doc) -> str:
  """The Markdown table of an intdot benchmark JSON: one row per shape, one column per
  variant, each cell float time / variant time."""
  lines = [measured_line(doc, " ".join(["intdot", doc.get("output_args", "")]).strip(), "each cell is float32 time / this variant's time "
                                       "(> 1: faster)"), ""]
  for op, variants in (("dot", ["int8", "dyn_i8", "dyn_i8_pad", "w8_f32", "i4_i8"]),
                       ("conv3x3", ["int8", "patches_i8", "int8_pad32"])):
    rows = [r for r in doc["rows"] if r["op"] == op]
    if not rows:
      continue
    lines += [f"| {op} | batch | float32 ms | " + " | ".join(variants) + " |",
              "|---|---|---|" + "---|" * len(variants)]
    keys = list(dict.fromkeys((r["shape"], r["batch"]) for r in rows))
    for shape, batch in keys:
      by = {r["variant"]: r for r in rows if (r["shape"], r["batch"]) == (shape, batch)}
      lines.append(f"| {shape} | {batch} | {1e3 * by['float32']['seconds']:.3f} | "
                   + " | ".join(f"{by[v]['vs_float']:.2f}x" if v in by else "-"
                                for v in variants) + " |")
    lines.append("")
  return "\n".join(lines).rstrip()


if __name__ == "__main__":
  sys.exit(main())

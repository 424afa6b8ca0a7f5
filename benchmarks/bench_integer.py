"""Integer inference from the packed codes against the float32 model, side by side in one run.

  python benchmarks/run.py integer [--windows 7] [--models lenet300,lenet5,resnet20,vit,gpt,gpt_mlp]
                                   [--out docs/bench_integer.json] [--readme docs/PERFORMANCE.md]

For each model (LeNet-300-100 and LeNet-5 on MNIST shapes, ResNet-20 and the ViT, whose
attention projections and MLPs are all dots, on CIFAR-10 shapes, and the Shakespeare GPT,
NNX with its blocks run by nnx.scan, on windows of 64 characters, and its block's MLP
alone, 128 -> 512 -> 128 on (batch, 64, 128) activations)
and each setting (W8A8, W4A8: LSQ weights per row at 8 or 4 bits, every quantized
layer's input at 8 bits, its scale and offset calibrated on a random batch), three jitted
functions of the normalised input, timed round-robin in one run:

* ``float32``: the same architecture unquantized, float32 weights (the reference);
* ``fake_quant``: the trained quantized model as it runs in training (float weights,
  the quantizers in the graph);
* ``integer``: ``lqjax.integer_inference`` over the integer codes (lqjax/integer.py).

and, in onnxruntime (CPU provider, all graph optimisations), timed side by side in a
second group:

* ``ort_float32``: the float32 model exported to ONNX (the reference of the group);
* ``ort_integer``: ``lqjax.onnx_export.build_integer`` of the integer function: Dense
  layers as QuantizeLinear + MatMulInteger (uint8 x int8 -> int32) and the epilogue,
  convolutions on the float path (the GPT's scanned blocks as one ONNX Loop).

At batch 256 (throughput) and batch 1 (latency); a ratio is the median over rounds of
float32 time / variant time (> 1: faster). Also recorded: the bytes each function holds
on the device, the packed file's bytes, and the largest logit difference between the
integer and fake-quantized functions. The JSON records the CPU's flags and the versions.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bench import (add_output_flags, check_windows, machine_info, measure_side_by_side,
                   measured_line, section_from_json, write_doc)
import lqjax
from lqjax import compress, integer
from lqlab import data
from lqlab.config import TrainConfig
from lqlab.step import build_model

MODELS = {"lenet300": "mnist", "lenet5": "mnist", "resnet20": "cifar10", "vit": "cifar10",
          "gpt": "tinyshakespeare", "gpt_mlp": "tinyshakespeare"}
#: The GPT's MLP alone (``gpt_mlp``): its width and hidden width (lqlab.transformers.Block).
GPT_WIDTH, GPT_HIDDEN = 128, 512
#: The GPT's input: a batch of windows of this many characters from a 65-letter vocabulary.
GPT_CONTEXT, GPT_VOCAB = 64, 65
SETTINGS = {"W8A8": (8, 8), "W4A8": (4, 8)}
BATCHES = (256, 1)
CALLS = {256: 3, 1: 30}


def batch_of(model_name: str, batch: int, seed: int) -> jax.Array:
  """A random input batch: normalised images, or the GPT's character windows."""
  rng = np.random.default_rng(seed)
  if model_name == "gpt":
    return jnp.asarray(rng.integers(0, GPT_VOCAB, (batch, GPT_CONTEXT)), jnp.int32)
  if model_name == "gpt_mlp":  # a block's normalised activations
    return jnp.asarray(rng.standard_normal((batch, GPT_CONTEXT, GPT_WIDTH)), jnp.float32)
  return jnp.asarray(rng.standard_normal((batch,) + data.image_shape(MODELS[model_name])),
                     jnp.float32)


def ort_functions(float_blob, integer_blob, fake_out, x):
  """{variant: (onnxruntime's fn of x, the ONNX bytes, the largest logit difference of the
  integer graph against the fake-quantized model's `fake_out` on `x`)}."""
  from lqjax import onnx_export
  ort = {}
  for variant, blob in (("ort_float32", float_blob), ("ort_integer", integer_blob)):
    sess = onnx_export.session(blob, "all")
    name = sess.get_inputs()[0].name
    ort[variant] = (lambda x, sess=sess, name=name: sess.run(None, {name: np.asarray(x)})[0],
                    len(blob))
  ort_diff = float(np.max(np.abs(ort["ort_integer"][0](x) - np.asarray(fake_out))))
  return {k: (fn, size, ort_diff) for k, (fn, size) in ort.items()}


def _has_onnxruntime() -> bool:
  try:
    import onnxruntime  # noqa: F401
  except ImportError:  # the export extra is not installed: no onnxruntime rows
    return False
  return True


def nnx_functions(fp, q, x, onnx: bool = True):
  """:func:`functions` of an NNX float model `fp` and its quantized twin `q`, whose input
  scales are calibrated on `x`."""
  from flax import nnx
  lqjax.calibrate(q, x)
  int_fn = lqjax.integer_inference(q)
  call = nnx.jit(lambda m, x: m(x))
  diff = float(jnp.max(jnp.abs(int_fn(x) - call(q, x))))
  fns = {"float32": (lambda x: call(fp, x), nnx.state(fp)),
         "fake_quant": (lambda x: call(q, x), nnx.state(q)),
         "integer": (int_fn, int_fn.variables)}
  packed = compress.file_bytes(nnx.state(q, nnx.Param))
  if not (onnx and _has_onnxruntime()):
    return fns, {}, packed, diff
  from lqjax import onnx_export
  graph, state = nnx.split(fp)
  float_blob = onnx_export.to_bytes(lambda v, x: nnx.merge(graph, v)(x), state, x[:1])
  integer_blob = onnx_export.build_integer(lqjax.integer_inference(q, packed=False),
                                           x[:1]).SerializeToString()
  return fns, ort_functions(float_blob, integer_blob, call(q, x), x), packed, diff


def gpt_functions(setting: str):
  """:func:`functions` of the Shakespeare GPT (NNX, its blocks run by nnx.scan)."""
  from lqlab import lm
  w, a = SETTINGS[setting]
  x = batch_of("gpt", 256, 0)
  fp = lm.build(lm.LMConfig(float_model=True, context=GPT_CONTEXT), GPT_VOCAB)
  q = lm.build(lm.LMConfig(rule="lsq", bits=w, act_bits=a, context=GPT_CONTEXT), GPT_VOCAB)
  return nnx_functions(fp, q, x)


def mlp_functions(setting: str):
  """:func:`functions` of the GPT block's MLP alone (width 128 -> 512 -> 128, exact GELU,
  no biases, as in lqlab.transformers.Block), NNX."""
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(GPT_WIDTH, GPT_HIDDEN, use_bias=False, rngs=rngs)
      self.proj = nnx.Linear(GPT_HIDDEN, GPT_WIDTH, use_bias=False, rngs=rngs)

    def __call__(self, x):
      return self.proj(nnx.gelu(self.fc(x), approximate=False))

  w, a = SETTINGS[setting]
  x = batch_of("gpt_mlp", 256, 0)
  fp = MLP(nnx.Rngs(0))
  q = lqjax.quantize(MLP(nnx.Rngs(0)), lqjax.Rule(
      ".*", lqjax.QuantConfig(rule="lsq", bits=w, granularity="row"),
      inputs=lqjax.QuantConfig(rule="lsq", bits=a, rounding="round")))
  return nnx_functions(fp, q, x)


def functions(model_name: str, setting: str):
  """{variant: (jitted fn of x, variables it holds)}, the packed file's bytes, and the
  largest integer/fake-quant logit difference on a random batch."""
  if model_name == "gpt":
    return gpt_functions(setting)
  if model_name == "gpt_mlp":
    return mlp_functions(setting)
  ds = MODELS[model_name]
  w, a = SETTINGS[setting]
  kw = dict(dataset=ds, model=model_name, granularity="row", rounding="round")
  x = batch_of(model_name, 256, 0)
  fp = build_model(TrainConfig(float_model=True, **kw), 10)
  fv = fp.init(jax.random.key(0), x[:1], train=False)
  q = build_model(TrainConfig(rule="lsq", bits=w, act_bits=a, act_first_bits=8, **kw), 10)
  qv = q.init(jax.random.key(0), x[:1], train=False)
  qv = lqjax.calibrate(q, qv, x, train=False)
  int_fn = lqjax.integer_inference(q, qv, train=False)
  fake = jax.jit(lambda v, x: q.apply(v, x, train=False))
  flt = jax.jit(lambda v, x: fp.apply(v, x, train=False))
  diff = float(jnp.max(jnp.abs(int_fn(x) - fake(qv, x))))
  fns = {"float32": (lambda x: flt(fv, x), fv), "fake_quant": (lambda x: fake(qv, x), qv),
         "integer": (int_fn, int_fn.variables)}
  if not _has_onnxruntime():
    return fns, {}, compress.file_bytes(qv), diff
  from lqjax import onnx_export
  float_blob = onnx_export.to_bytes(lambda v, x: fp.apply(v, x, train=False), fv, x[:1])
  integer_blob = onnx_export.build_integer(lqjax.integer_inference(
      q, qv, packed=False, train=False), x[:1]).SerializeToString()
  return fns, ort_functions(float_blob, integer_blob, fake(qv, x), x), \
      compress.file_bytes(qv), diff


def measure(model_name, setting, windows):
  fns, ort, packed, diff = functions(model_name, setting)
  rows = []
  for batch in BATCHES:
    x = batch_of(model_name, batch, 1)
    cases = [(variant, fn, (x,)) for variant, (fn, _) in fns.items()]
    for r, (_, held) in zip(measure_side_by_side(cases, windows, CALLS[batch]), fns.values()):
      rows.append({"model": model_name, "setting": setting, "batch": batch, **r,
                   "device_bytes": integer.device_bytes(held), "packed_bytes": packed,
                   "max_abs_logit_diff_integer_vs_fake": diff})
      print(f"{model_name:9s} {setting} b{batch:<4d} {r['variant']:11s} "
            f"{1e3 * r['seconds']:9.3f} ms float/this {r['vs_float']:.2f}  device "
            f"{rows[-1]['device_bytes']} B (file {packed} B)", flush=True)
    if ort:
      xn = np.asarray(x)
      cases = [(variant, fn, (xn,)) for variant, (fn, _, _) in ort.items()]
      for r, (_, size, odiff) in zip(measure_side_by_side(cases, windows, CALLS[batch]),
                                     ort.values()):
        rows.append({"model": model_name, "setting": setting, "batch": batch, **r,
                     "onnx_bytes": size, "packed_bytes": packed,
                     "max_abs_logit_diff_ort_integer_vs_fake": odiff})
        print(f"{model_name:9s} {setting} b{batch:<4d} {r['variant']:11s} "
              f"{1e3 * r['seconds']:9.3f} ms float/this {r['vs_float']:.2f}  onnx {size} B",
              flush=True)
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--windows", type=int, default=7)
  ap.add_argument("--models", default=",".join(MODELS))
  ap.add_argument("--settings", default=",".join(SETTINGS))
  add_output_flags(ap, "docs/bench_integer.json", "bench-integer")
  args = ap.parse_args(argv)
  if args.from_json:
    return section_from_json(args, args.section, render)
  models, settings = args.models.split(","), args.settings.split(",")
  for given, known, what in ((models, MODELS, "--models"), (settings, SETTINGS, "--settings")):
    bad = [g for g in given if g not in known]
    if bad:
      print(f"error: unknown {what} {', '.join(bad)}; expected {', '.join(known)}",
            file=sys.stderr)
      return 2
  if check_windows(args.windows, 3):
    return 2
  load = os.getloadavg()[0]
  rows = [r for m in models for s in settings for r in measure(m, s, args.windows)]
  doc = dict(machine_info(), loadavg_1min_at_start=load, windows=args.windows, rows=rows)
  if args.section != "bench-integer":  # another section: the command names what it measured
    picked = "" if args.models == ",".join(MODELS) else f"--models {args.models} "
    doc["output_args"] = f"{picked}--out {args.out} --section {args.section}"
  return write_doc(args.out, doc, args.readme, args.section, render)


def render(doc) -> str:
  """The Markdown table of an integer benchmark JSON."""
  lines = [measured_line(doc, " ".join(["integer", doc.get("output_args", "")]).strip(), "float32 time / this variant's time (> 1: faster)"),
           "",
           "| model | setting | batch | float32 ms | fake_quant | integer | device bytes: "
           "float32 / integer | packed file bytes | max logit diff (integer vs fake) |",
           "|---|---|---|---|---|---|---|---|---|"]
  keys = list(dict.fromkeys((r["model"], r["setting"], r["batch"]) for r in doc["rows"]))
  ort = []
  for m, s, b in keys:
    by = {r["variant"]: r for r in doc["rows"] if (r["model"], r["setting"], r["batch"]) == (m, s, b)}
    f, i = by["float32"], by["integer"]
    lines.append(f"| {m} | {s} | {b} | {1e3 * f['seconds']:.3f} | "
                 f"{by['fake_quant']['vs_float']:.2f}x | {i['vs_float']:.2f}x | "
                 f"{f['device_bytes']} / {i['device_bytes']} | {i['packed_bytes']} | "
                 f"{i['max_abs_logit_diff_integer_vs_fake']:.1e} |")
    if "ort_integer" in by:
      f, i = by["ort_float32"], by["ort_integer"]
      ort.append(f"| {m} | {s} | {b} | {1e3 * f['seconds']:.3f} | {i['vs_float']:.2f}x | "
                 f"{f['onnx_bytes']} / {i['onnx_bytes']} | "
                 f"{i['max_abs_logit_diff_ort_integer_vs_fake']:.1e} |")
  if ort:
    missing = [m for m in dict.fromkeys(k[0] for k in keys)
               if not any(r["model"] == m and r["variant"] == "ort_integer" for r in doc["rows"])]
    lines += ["", "onnxruntime (CPU provider, all graph optimisations), in the same run: the "
              "float32 model's ONNX against `lqjax.onnx_export.build_integer` of the integer "
              "function (Dense layers and attention projections as QuantizeLinear + "
              "MatMulInteger, convolutions on the float path" + (
                  f"; no ONNX rows for {', '.join(missing)}" if missing else "") + "):", "",
              "| model | setting | batch | ORT float32 ms | ORT integer | ONNX bytes: float32 "
              "/ integer | max logit diff (ORT integer vs JAX fake) |",
              "|---|---|---|---|---|---|---|"] + ort
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())

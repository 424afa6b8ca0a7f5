"""Post-training min-max quantization of a trained float run (a baseline).

  python -m lqlab.ptq --from_run=runs/baselines_mnist_lenet300/fp32_s0 --bits=4 \\
      --workdir=runs/ptq/minmax_4bit_s0 [--granularity=row] [--export]

Each kernel group (per output channel by default) gets the symmetric min-max
scale ``s = max|P| / (2^(b-1) - 1)``, so its largest weight lands on the last
code of a b-bit grid; weights are rounded to the nearest code. Biases and batch
norm statistics stay float32 (counted at 32 bits). Nothing is trained: the
result is the float model seen through a b-bit grid, written to the same packed
file format (and checked on reload) as the trained schemes, with a results.json
of the same fields (``scheme`` is ``"ptq"``).

``--from_run`` may contain ``{seed}``, filled from ``--seed``, so a sweep config
can pair each PTQ run with the float run of the same seed.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from flax import traverse_util

from lqjax import qconfig, tree
from lqlab.evaluate import final_results, make_eval_fn
from lqlab.files import write_json_atomic
from lqlab.step import build_model, calibration_batch, data_shardings

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags (defined only when run as a program: the library import
  must not claim flag names that experiments/ also uses)."""
  flags.DEFINE_string("from_run", None, "workdir of a finished float (--float) run; may hold {seed}")
  flags.DEFINE_integer("bits", 8, "bits per kernel weight (>= 2)")
  flags.DEFINE_string("granularity", "row", "kernel scale granularity (row = per output channel)")
  flags.DEFINE_integer("seed", 0, "fills {seed} in --from_run")
  flags.DEFINE_string("workdir", None, "output run directory (its parent must exist)")
  flags.DEFINE_string("data_dir", None, "dataset folder (default: $LQJAX_DATA_DIR)")
  flags.DEFINE_bool("export", True, "write model.lqz / model.lqz.zst / model.onnx and check the reload")
  flags.DEFINE_integer("act_bits", None, "also quantize every layer's input at b bits, its range "
                       "calibrated on the first training batch (PTQ W<bits>A<act_bits>; the "
                       "first layer's input at 8 bits)")


def minmax_log_scale(p: jax.Array, granularity: qconfig.Granularity, bits: int,
                     sshape=None) -> jax.Array:
  """log of the symmetric min-max scale max|P_G| / (2^(b-1) - 1) for every group G.

  `sshape`: the quantized model's scale shape (its layer's layout decides it: a q/k/v
  kernel's row keeps heads and head_dim, a block scale cuts the inputs); default the shape
  `granularity` gives under the default layout. An all-zero group gets scale 1 (its codes
  are all 0 whatever the scale).
  """
  qp = 2.0 ** (bits - 1) - 1
  sshape = qconfig.scale_shape(p.shape, granularity) if sshape is None else tuple(sshape)
  pshape, vs = qconfig.grouped_shapes(p.shape, sshape)
  a = jnp.abs(jnp.reshape(p, pshape))
  axes = qconfig.shared_axes(pshape, vs)
  amax = jnp.max(a, axis=axes, keepdims=True) if axes else a
  return jnp.log(jnp.where(amax > 0, amax / qp, 1.0)).reshape(sshape)


def minmax_params(float_params, template, granularity: qconfig.Granularity, bits: int):
  """The params of a quantized model (tree `template`) from a float model's params.

  Every weight is copied from `float_params`; every ``<name>_quant/log_scale``
  is set from the sibling weight ``<name>`` by :func:`minmax_log_scale`.
  """
  src = traverse_util.flatten_dict(float_params)
  out = {}
  for key, leaf in traverse_util.flatten_dict(template).items():
    if tree.INPUT_QUANT in key:  # an input quantizer: lqjax.calibrate sets it
      out[key] = jnp.zeros(leaf.shape, leaf.dtype)
    elif key[-1] == tree.SCALE_NAME:
      owner = key[-2][:-len(tree.QUANT_SUFFIX)]
      p = src[key[:-2] + (owner,)]
      out[key] = leaf.replace_boxed(minmax_log_scale(p, granularity, bits, leaf.value.shape))
    elif key in src:
      if src[key].shape != leaf.shape:
        raise ValueError(f"parameter {'/'.join(key)}: float shape {src[key].shape} does not "
                         f"match the quantized model's {leaf.shape}")
      out[key] = src[key]
    else:
      raise ValueError(f"the float run has no parameter {'/'.join(key)}")
  return traverse_util.unflatten_dict(out)


def quantize_run(from_run, workdir, *, bits: int, granularity: qconfig.Granularity = "row",
                 data_dir=None, export: bool = True, act_bits=None) -> dict:
  """Min-max quantizes a finished float run; writes `workdir`/results.json (and the files)."""
  from lqlab import files
  from lqlab import data, train
  from lqlab import export as export_lib
  from_run, workdir = pathlib.Path(from_run), pathlib.Path(workdir)
  if bits < 2:
    raise ValueError(f"bits must be >= 2 for symmetric min-max quantization, got {bits}")
  if not (from_run / "results.json").is_file():
    raise FileNotFoundError(f"{from_run} holds no finished run (results.json is missing)")
  source = files.read_json(from_run / "results.json")
  if source.get("scheme") != "float":
    raise ValueError(f"{from_run} is not a float run (its scheme is {source.get('scheme')!r})")
  fcfg, _, fstate, stats, num_classes = train.restore(from_run)
  cfg = dataclasses.replace(fcfg, float_model=False, rule="fixed", bits=bits,
                            granularity=granularity, rounding="round", quantize_bias=False,
                            act_bits=act_bits)
  model = build_model(cfg, num_classes)
  sample = jnp.zeros((1,) + data.image_shape(cfg.dataset), jnp.float32)
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), sample, train=False))["params"]
  params = minmax_params(jax.device_get(fstate.params), template, granularity, bits)
  batch_stats = jax.device_get(fstate.batch_stats)

  devices, replicated, batch_sharding = data_shardings()
  ds = data.load(cfg.dataset, data_dir, limit=cfg.limit, sharding=replicated)
  if act_bits is not None:  # the inputs' ranges from the first batch of training's epoch 0
    import lqjax
    batch = calibration_batch(cfg, ds, stats)
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    params = lqjax.calibrate(model, variables, batch, train=False)["params"]
  evaluate = make_eval_fn(cfg, model, stats, batch_sharding)
  workdir.mkdir(exist_ok=True)
  write_json_atomic(workdir / "config.json", cfg.to_json())
  results = final_results(cfg, params, batch_stats, evaluate, ds, workdir,
                                train_seconds=source["train_seconds"], devices=devices,
                                ptq_from=str(from_run),
                                float_test_accuracy=source["test_accuracy"])
  results["scheme"] = "ptq"
  if export:
    state = types.SimpleNamespace(params=params, batch_stats=batch_stats)
    results.update(export_lib.export_after_training(cfg, model, state, ds, results))
  write_json_atomic(workdir / "results.json", results)
  return results


def main(argv):
  from lqlab import data
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  if not FLAGS.from_run or not FLAGS.workdir:
    _fail("--from_run and --workdir are required")
  workdir = pathlib.Path(FLAGS.workdir)
  if not workdir.parent.is_dir():
    _fail(f"the parent of --workdir ({workdir.parent}) does not exist")
  try:
    gran = qconfig.parse_granularity(FLAGS.granularity)
    res = quantize_run(FLAGS.from_run.format(seed=FLAGS.seed), workdir, bits=FLAGS.bits,
                       granularity=gran, data_dir=FLAGS.data_dir, export=FLAGS.export,
                       act_bits=FLAGS.act_bits)
  except (ValueError, FileNotFoundError, data.DatasetNotFoundError) as e:
    _fail(str(e))
  line = (f"ptq {FLAGS.bits}-bit {res['model']}: test_accuracy {res['test_accuracy']:.4f} "
          f"(float {res['float_test_accuracy']:.4f}) avg_bits {res['avg_bits']:.2f}")
  if "packed_bytes" in res:
    line += f" packed_bytes {res['packed_bytes']} (x{res['compression_ratio']:.1f})"
  print(line)
  print(f"results: {workdir / 'results.json'}")


def _fail(msg: str):
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


if __name__ == "__main__":
  define_flags()
  app.run(main)

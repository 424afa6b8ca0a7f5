"""google/qwix as an external reference point: weight-only QAT of the same model.

  pip install qwix
  python -m scripts.qwix_reference --dataset=mnist --bits=4 --epochs=10 --seed=0 \\
      --workdir=runs/qwix/int4_s0

The float model lqjax builds for the dataset (same architecture, data,
validation split, optimizer, schedule, seed and training loop as
``python -m experiments.<dataset> --float``) is wrapped by
``qwix.quantize_model(model, qwix.QtProvider([QtRule(weight_qtype=int<b>)]))``:
every Dense/Conv weight is fake-quantized in the forward pass to a symmetric
b-bit grid with an absmax scale per output channel (qwix's default calibration),
straight-through in the backward pass. Activations stay float, or with ``--qwix_act``
are int8 too (``act_qtype``):

- ``dynamic``: each call's absmax;
- ``static``: qwix's static range (``act_static_scale=True``), the running mean of the
  absmax over every training step so far, used fixed in evaluation. qwix keeps it in a
  ``quant_stats`` collection; this script's provider keeps the same statistic in
  ``batch_stats``, the collection the training loop already carries (mutable while
  training, read-only in evaluation), so nothing in the loop changes.

Nothing about the scales is learned: that is the difference to lqjax.

qwix writes no packed file, so the size reported is *accounted*, not measured:
``nominal_bytes`` = b bits per kernel weight + one float32 scale per output
channel + every other parameter at 32 bits. It is comparable to lqjax's
``packed_bytes_accounted``; lqjax's headline figure is the written file.
"""

from __future__ import annotations

import sys

import numpy as np
from absl import app, flags, logging

from experiments import common
from lqlab.step import build_model

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "mnist", "mnist | fashion_mnist | cifar10 | imagenette")
flags.DEFINE_string("qwix_act", "none", "activations: none | dynamic (int8, absmax per call) "
                    "| static (int8, the running mean of the absmax over training)")

QTYPES = {8: "int8", 4: "int4", 2: "int2"}


def nominal_bytes(params, bits: int) -> int:
  """Bytes of a weight-only b-bit model: b-bit kernels, a float32 scale per output channel."""
  import jax
  total = 0.0
  for leaf in jax.tree_util.tree_leaves(params):
    if leaf.ndim >= 2:  # a Dense or Conv kernel: quantized, scale per last axis
      total += leaf.size * bits / 8 + leaf.shape[-1] * 4
    else:
      total += leaf.size * 4
  return int(np.ceil(total))


def static_provider(rules):
  """A ``qwix.QtProvider`` whose static activation statistics live in ``batch_stats``.

  qwix's provider averages each input's calibration (its absmax, meaned over the batch
  axes) with ``averaging.SimpleMovingAverage`` in a ``quant_stats`` variable, updated
  while that collection is mutable. Here the variable is in ``batch_stats`` and updated
  while that collection is mutable (training steps, not initialisation or evaluation).
  """
  import qwix
  from qwix._src import averaging
  from qwix._src.utils import flax_util

  class StatsInBatchStats(qwix.QtProvider):
    def _update_and_get_quant_stat(self, name, batch_axes, calibration):
      module = flax_util.get_current_module()
      calibration = {k: v.mean(axis=batch_axes, keepdims=True) for k, v in calibration.items()}
      average = averaging.SimpleMovingAverage()
      stat = module.scope.variable("batch_stats", name, lambda: average.init(calibration))
      if not module.is_initializing() and module.is_mutable_collection("batch_stats"):
        stat.value = average.update(stat.value, calibration)
      return average.get_calibration(stat.value, calibration)

  return StatsInBatchStats(rules)


def run(argv):
  if len(argv) > 1:
    common._fail(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  import importlib
  import pathlib

  import jax
  import jax.numpy as jnp
  from lqlab import data, train
  try:
    import qwix
  except ImportError:
    common._fail("qwix is not installed: pip install qwix")
  if FLAGS.bits not in QTYPES:
    common._fail(f"--bits must be one of {sorted(QTYPES)} for qwix, got {FLAGS.bits}")
  if FLAGS.dataset not in data.DATASETS:
    common._fail(f"unknown --dataset {FLAGS.dataset!r}; expected one of {sorted(data.DATASETS)}")
  if not FLAGS.workdir:
    common._fail("--workdir is required")
  FLAGS.float = True
  get_config = importlib.import_module(f"experiments.{FLAGS.dataset}").get_config
  try:
    cfg = common.config_from_flags(get_config())
  except ValueError as e:
    common._fail(str(e))
  workdir = pathlib.Path(FLAGS.workdir)
  if not workdir.parent.is_dir():
    common._fail(f"the parent of --workdir ({workdir.parent}) does not exist")
  if FLAGS.qwix_act not in ("none", "dynamic", "static"):
    common._fail(f"unknown --qwix_act {FLAGS.qwix_act!r}; expected none, dynamic or static")
  name = QTYPES[FLAGS.bits]
  act = {} if FLAGS.qwix_act == "none" else dict(
      act_qtype=jnp.int8, act_static_scale=FLAGS.qwix_act == "static")
  rules = [qwix.QtRule(module_path=".*", weight_qtype=getattr(jnp, name), **act)]
  provider = static_provider(rules) if FLAGS.qwix_act == "static" else qwix.QtProvider(rules)
  model = qwix.quantize_model(build_model(cfg, 10), provider)

  def qwix_results(_cfg, _model, state, _ds, results):
    """Merged into results.json by the training loop: qwix's scheme and accounted size."""
    nominal = nominal_bytes(jax.device_get(state.params), FLAGS.bits)
    return {"scheme": "qwix", "rule": f"qwix_{name}", "avg_bits": FLAGS.bits,
            "qwix_act": FLAGS.qwix_act,
            "qwix_version": qwix.__version__, "nominal_bytes": nominal,
            "compression_ratio_nominal": results["fp32_bytes"] / nominal}

  try:
    res = train.train_and_evaluate(cfg, workdir, FLAGS.data_dir, progress=FLAGS.progress,
                                   after_train=qwix_results, model=model)
  except data.DatasetNotFoundError as e:
    common._fail(str(e))
  except (train.TrainingError, ValueError, FileNotFoundError) as e:
    common._fail(str(e), 1)
  nominal = res["nominal_bytes"]
  print(f"{FLAGS.dataset} {cfg.model} qwix {name}: test_accuracy "
        f"{res['test_accuracy']:.4f} val_accuracy {res['val_accuracy']:.4f} nominal_bytes "
        f"{nominal} (x{res['compression_ratio_nominal']:.1f}) train_seconds "
        f"{res['train_seconds']:.0f}")
  print(f"results: {workdir / 'results.json'}")


if __name__ == "__main__":
  app.run(run)
  sys.exit(0)

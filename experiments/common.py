"""The flag set shared by every entry point, and its translation to a TrainConfig.

Library code never reads FLAGS: this module builds one frozen
:class:`lqlab.train.TrainConfig` from them and calls the library.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS

flags.DEFINE_string("model", None, "lenet300 | lenet5 | resnet20 | resnet_small (default: per dataset)")
flags.DEFINE_string("rule", "ratio", "scale-gradient rule: fixed | lsq | ratio | ratio_lsq")
flags.DEFINE_float("threshold", None, "lambda of the ratio rules (>= 0; default: per dataset)")
flags.DEFINE_string("granularity", "row",
                    "kernel granularity: tensor|row|column|channel|spatial|element or axes '0,1'")
flags.DEFINE_string("bias_granularity", "tensor", "bias granularity (same names)")
flags.DEFINE_bool("quantize_bias", True, "quantize biases too")
flags.DEFINE_string("rounding", "round",
                    "round | floor (the thesis's floor loses ~1.3 points val accuracy on MNIST)")
flags.DEFINE_integer("bits", None, "clip codes to b bits (fixed-bit and LSQ baselines)")
flags.DEFINE_integer("init_bits", 8, "initial bit budget of free-bit scales")
flags.DEFINE_float("lsq_weight", 1.0, "weight of the LSQ term in rule ratio_lsq")
flags.DEFINE_float("relax_threshold", None,
                   "lambda_hi of the ratio rules: groups with r above it get finer grids")
flags.DEFINE_string("scale_schedule", "cosine", "scales' lr schedule: cosine | constant")
flags.DEFINE_float("scale_decay_fraction", 0.8,
                   "cosine scale schedule: fraction of the run after which the scales stop")
flags.DEFINE_string("scale_stop", "auto",
                    "auto | none | val. val: when val accuracy drops more than --scale_stop_tolerance "
                    "below the best epoch's, roll the scales back to that epoch and halve their "
                    "step. auto: val for the ratio rules, none for fixed and lsq")
flags.DEFINE_float("scale_stop_tolerance", 0.002, "val accuracy drop that triggers a brake")
flags.DEFINE_string("scale_stop_restore", "scales",
                    "what a brake rolls back to the best epoch: scales | all (the weights too)")
flags.DEFINE_string("optimizer", None, "weights' optimizer: adam | sgd (default: per dataset)")
flags.DEFINE_float("lr", None, "weights' learning rate (default: per dataset)")
flags.DEFINE_float("weight_decay", None, "weight decay (default: per dataset)")
flags.DEFINE_string("scale_optimizer", "sgd", "scales' optimizer on log s: sgd | adam")
flags.DEFINE_float("scale_lr", 0.02, "scales' learning rate (peak of the cosine schedule)")
flags.DEFINE_float("inverse_scale", 0.0, "coefficient of the inverse-scale penalty")
flags.DEFINE_float("bin_count", 0.0, "coefficient of the bin-count penalty")
flags.DEFINE_float("deviation", 0.0, "coefficient of the deviation penalty")
flags.DEFINE_float("target_bits", 0.0, "bits the bin-count penalty allows for free")
flags.DEFINE_integer("epochs", None, "epochs (default: per dataset)")
flags.DEFINE_integer("batch_size", None, "global batch size (default: per dataset)")
flags.DEFINE_integer("seed", 0, "random seed")
flags.DEFINE_string("workdir", None, "run directory (default: runs/<dataset>_<model>_<rule>_s<seed>)")
flags.DEFINE_string("data_dir", None, "dataset folder (default: $LQJAX_DATA_DIR)")
flags.DEFINE_bool("float", False, "no quantization: the FP32 baseline")
flags.DEFINE_integer("limit", None, "use only the first N examples of each split (smoke tests)")
flags.DEFINE_bool("export", False, "write the packed model file <workdir>/model.lqz at the end")
flags.DEFINE_bool("progress", True, "show a progress bar")


@dataclasses.dataclass(frozen=True)
class Defaults:
  model: str
  epochs: int
  batch_size: int
  optimizer: str
  lr: float
  weight_decay: float
  # lambda of the ratio rules. MNIST's was chosen on its validation split
  # (sweeps/tune_default_lenet300.json); the others keep 0.2 untuned.
  threshold: float = 0.2


def config_from_flags(dataset: str, d: Defaults):
  from lqjax import types
  from lqlab import train
  return train.TrainConfig(
      dataset=dataset, model=FLAGS.model or d.model, float_model=FLAGS.float, rule=FLAGS.rule,
      threshold=d.threshold if FLAGS.threshold is None else FLAGS.threshold,
      granularity=types.parse_granularity(FLAGS.granularity),
      bias_granularity=types.parse_granularity(FLAGS.bias_granularity),
      quantize_bias=FLAGS.quantize_bias, rounding=FLAGS.rounding, bits=FLAGS.bits,
      init_bits=FLAGS.init_bits, lsq_weight=FLAGS.lsq_weight,
      relax_threshold=FLAGS.relax_threshold, scale_schedule=FLAGS.scale_schedule,
      scale_decay_fraction=FLAGS.scale_decay_fraction,
      scale_stop=_scale_stop(FLAGS.scale_stop, FLAGS.rule),
      scale_stop_tolerance=FLAGS.scale_stop_tolerance,
      scale_stop_restore=FLAGS.scale_stop_restore,
      optimizer=FLAGS.optimizer or d.optimizer,
      lr=d.lr if FLAGS.lr is None else FLAGS.lr,
      weight_decay=d.weight_decay if FLAGS.weight_decay is None else FLAGS.weight_decay,
      scale_optimizer=FLAGS.scale_optimizer, scale_lr=FLAGS.scale_lr,
      inverse_scale=FLAGS.inverse_scale, bin_count=FLAGS.bin_count, deviation=FLAGS.deviation,
      target_bits=FLAGS.target_bits, epochs=FLAGS.epochs or d.epochs,
      batch_size=FLAGS.batch_size or d.batch_size, seed=FLAGS.seed, limit=FLAGS.limit)


def _scale_stop(flag: str, rule: str):
  if flag == "auto":
    return "val" if rule.startswith("ratio") else None
  return None if flag == "none" else flag


def _fail(msg: str, code: int = 2):
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(code)


def run(dataset: str, defaults: Defaults):
  """Runs the experiment for `dataset` from the parsed flags; exits non-zero on bad input."""
  from lqlab import data, train
  logging.set_verbosity(logging.WARNING)
  try:
    cfg = config_from_flags(dataset, defaults)
  except ValueError as e:
    _fail(str(e))
  tag = "float" if cfg.float_model else cfg.rule
  workdir = pathlib.Path(FLAGS.workdir or f"runs/{dataset}_{cfg.model}_{tag}_s{cfg.seed}")
  if FLAGS.workdir is None:
    workdir.parent.mkdir(parents=True, exist_ok=True)
  if not workdir.parent.is_dir():
    _fail(f"the parent of --workdir ({workdir.parent}) does not exist")
  after = None
  if FLAGS.export:
    from lqlab import export as export_lib
    after = export_lib.export_after_training
  try:
    res = train.train_and_evaluate(cfg, workdir, FLAGS.data_dir, progress=FLAGS.progress,
                                   after_train=after)
  except data.DatasetNotFoundError as e:
    _fail(str(e))
  except train.Interrupted as e:
    _fail(str(e), 130)
  except (train.TrainingError, ValueError, FileNotFoundError) as e:
    _fail(str(e), 1)
  line = (f"{dataset} {cfg.model} {tag}: test_accuracy {res['test_accuracy']:.4f} "
          f"val_accuracy {res['val_accuracy']:.4f} avg_bits {res['avg_bits']:.2f} "
          f"train_seconds {res['train_seconds']:.0f}")
  if "packed_bytes" in res:
    line += (f" packed_bytes {res['packed_bytes']} (x{res['compression_ratio']:.1f}) "
             f"entropy_coded_bytes {res['entropy_coded_bytes']}")
  print(line)
  print(f"results: {workdir / 'results.json'}")


def main(dataset: str, defaults: Defaults):
  app.run(lambda argv: run(dataset, defaults) if len(argv) == 1 else _fail(
      f"unexpected arguments: {' '.join(argv[1:])}"))

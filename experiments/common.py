"""The flag set shared by every entry point, and its translation to a TrainConfig.

Library code never reads FLAGS: this module builds one frozen
:class:`lqlab.config.TrainConfig` from them and calls the library.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys

from absl import app, flags, logging

from lqjax import qconfig
from lqlab.config import TrainConfig

FLAGS = flags.FLAGS

# Flags that are not part of a run's config.
flags.DEFINE_string("workdir", None, "run directory (default: runs/<dataset>_<model>_<rule>_s<seed>)")
flags.DEFINE_string("data_dir", None, "dataset folder (default: $LQJAX_DATA_DIR)")
flags.DEFINE_bool("export", True, "write the packed model file <workdir>/model.lqz (and the "
                  "zstd and ONNX variants) at the end and check its reload")
flags.DEFINE_bool("progress", True, "show a progress bar")
flags.DEFINE_string("mesh", None, "device mesh 'data:N,fsdp:M' (sizes multiply to the device "
                    "count): batch over both axes, parameters, scales and optimizer state "
                    "sharded over fsdp (each tensor's largest axis that M divides; replicated "
                    "when none does). Default: data parallel over every device")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 in a multi-process "
                    "run (jax.distributed); with --num_processes and --process_id")
flags.DEFINE_integer("num_processes", None, "processes of a multi-process run")
flags.DEFINE_integer("process_id", None, "this process's index in a multi-process run")
flags.DEFINE_integer("process_timeout", 300, "seconds to wait for every process to join (and "
                     "for a silent peer) before the run stops with an error")
# --float is the short name of --float_model.
_ALIASES = {"float": "float_model"}


def _define_config_flags():
  """One flag per TrainConfig field (default None: the experiment's config decides)."""
  for f in dataclasses.fields(TrainConfig):
    if f.name == "dataset":
      continue
    name = {v: k for k, v in _ALIASES.items()}.get(f.name, f.name)
    help_text = f.metadata.get("help", f.name)
    kind = str(f.type).replace("Optional[", "").rstrip("]")  # annotations are strings
    define = {"bool": flags.DEFINE_bool, "int": flags.DEFINE_integer,
              "float": flags.DEFINE_float}.get(kind, flags.DEFINE_string)
    define(name, None, help_text)


_define_config_flags()


def config_from_flags(base):
  """`base` (an experiment's ``get_config()``) with the flags given on the command line."""
  overrides = {}
  for f in dataclasses.fields(TrainConfig):
    if f.name == "dataset":
      continue
    name = {v: k for k, v in _ALIASES.items()}.get(f.name, f.name)
    value = getattr(FLAGS, name)
    if value is None:
      continue
    if f.name in ("granularity", "bias_granularity"):
      value = qconfig.parse_granularity(value)
    if f.name == "scale_stop" and value == "none":
      value = None
    overrides[f.name] = value
  return dataclasses.replace(base, **overrides)


_MULTI_PROCESS = []  # set once the run has joined other processes


def _fail(msg: str, code: int = 2):
  print(f"error: {msg}", file=sys.stderr, flush=True)
  if _MULTI_PROCESS:  # jax's shutdown barrier would wait for peers that may not come
    os._exit(code)
  sys.exit(code)


def run(base):
  """Runs experiment `base` (its TrainConfig) with the parsed flags; exits non-zero on bad input."""
  from lqjax import budget, rules
  from lqlab import data, distributed, train
  logging.set_verbosity(logging.WARNING)
  try:  # before any device is touched
    distributed.init_processes(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id, FLAGS.process_timeout)
    distributed.make_layout(FLAGS.mesh)  # the mesh fits the devices of every process
  except ValueError as e:
    _fail(str(e))
  import jax
  if jax.process_count() > 1:
    _MULTI_PROCESS.append(jax.process_count())
  main = distributed.is_main()
  dataset = base.dataset
  try:
    cfg = config_from_flags(base)
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
                                   after_train=after, mesh=FLAGS.mesh)
  except (data.DatasetNotFoundError, budget.BudgetError, rules.QuantizeError) as e:
    # bad input, found before compute
    _fail(str(e))
  except train.Interrupted as e:
    _fail(str(e), 130)
  except KeyboardInterrupt:  # a SIGINT outside the loop's own handling
    _fail(f"interrupted; re-run the same command to resume ({workdir})", 130)
  except (train.TrainingError, ValueError, FileNotFoundError) as e:
    _fail(str(e), 1)
  except OSError as e:  # a write that failed: full disk, read-only folder
    _fail(f"{e.filename or workdir}: {e.strerror or e}", 1)
  except Exception as e:  # a collective whose peer process stopped: one line, no hang
    msg = distributed.peer_failure(e)
    if msg is None:
      raise
    _fail(msg, 1)
  if not main:
    return
  line = (f"{dataset} {cfg.model} {tag}: test_accuracy {res['test_accuracy']:.4f} "
          f"val_accuracy {res['val_accuracy']:.4f} avg_bits {res['avg_bits']:.2f} "
          f"train_seconds {res['train_seconds']:.0f}")
  print(line)
  if "packed_bytes" in res:
    print(f"model: {res['packed_file']}: {res['packed_bytes']} bytes, "
          f"{res['compression_ratio']:.1f}x smaller than FP32 ({res['fp32_bytes']} bytes); "
          f"zstd {res['entropy_coded_bytes']} bytes ({res['entropy_coded_ratio']:.1f}x)")
  if res.get("collapsed"):
    print(f"warning: the run collapsed (avg_bits {res['avg_bits']:.2f}, test accuracy "
          f"{res['test_accuracy']:.4f}, chance {1 / res['num_classes']:.2f}): lower --threshold "
          f"or --scale_lr; results.json says collapsed: true", file=sys.stderr)
  print(f"results: {workdir / 'results.json'}")


def main(get_config):
  """Entry point of an experiment module: ``common.main(get_config)``."""

  def go(argv):
    if len(argv) > 1:
      _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
      base = get_config()
    except ValueError as e:
      _fail(str(e))
    run(base)

  app.run(go)

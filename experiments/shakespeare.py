"""Tiny Shakespeare: a character-level GPT (NNX, scanned blocks) with learned quantization.

Default command (nanoGPT's CPU configuration: 4 layers, 4 heads, width 128, context 64,
batch 12, 2000 iterations, lr 1e-3; the learned rule on every matrix)::

  python -m experiments.shakespeare

``--float`` trains the FP32 model; ``--rule=lsq --bits=4`` the LSQ baseline;
``--budget_bits=2`` meets a size; ``--granularity=block --block_size=32`` and
``--granularity=head`` choose the scale groups. See :mod:`lqlab.lm`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

from absl import app, flags

from lqjax import qconfig

FLAGS = flags.FLAGS


def _define_flags():
  from lqlab.lm import LMConfig
  for f in dataclasses.fields(LMConfig):
    name = "float" if f.name == "float_model" else f.name
    kind = str(f.type).replace("Optional[", "").rstrip("]")
    define = {"bool": flags.DEFINE_bool, "int": flags.DEFINE_integer,
              "float": flags.DEFINE_float}.get(kind, flags.DEFINE_string)
    define(name, None, f"{f.name} (default {f.default!r})")
  flags.DEFINE_string("workdir", None, "run directory (default: runs/shakespeare_gpt_<rule>_s<seed>)")
  flags.DEFINE_string("data_dir", None, "dataset folder (default: $LQJAX_DATA_DIR)")
  flags.DEFINE_bool("export", True, "write the packed model file <workdir>/model.lqz and check "
                    "its reload")
  flags.DEFINE_bool("progress", True, "print each evaluation")


_define_flags()


def _fail(msg: str, code: int = 2):
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(code)


def config_from_flags():
  from lqlab.lm import LMConfig
  kw = {}
  for f in dataclasses.fields(LMConfig):
    v = getattr(FLAGS, "float" if f.name == "float_model" else f.name)
    if v is None:
      continue
    if f.name == "granularity":
      v = qconfig.parse_granularity(v)
    kw[f.name] = v
  return LMConfig(**kw)


def main(argv):
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from lqjax import budget, rules
  from lqlab import checkpoints, data, files, lm, train
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    cfg = config_from_flags()
  except (ValueError, rules.QuantizeError) as e:
    _fail(str(e))
  workdir = pathlib.Path(FLAGS.workdir or f"runs/shakespeare_gpt_{cfg.tag}_s{cfg.seed}")
  if not workdir.parent.is_dir():
    if FLAGS.workdir is None:
      workdir.parent.mkdir(parents=True)
    else:
      _fail(f"the parent of --workdir ({workdir.parent}) does not exist")
  try:
    res = lm.train(cfg, workdir, FLAGS.data_dir, progress=FLAGS.progress, export=FLAGS.export)
  except (data.DatasetNotFoundError, budget.BudgetError, rules.QuantizeError) as e:
    _fail(str(e))
  except train.Interrupted as e:
    _fail(str(e), 130)
  except KeyboardInterrupt:  # a signal outside the loop (loading, the final evaluation)
    _fail(f"interrupted; re-run the same command to resume ({workdir})", 130)
  except (lm.TrainingError, checkpoints.CheckpointError, files.LockedError, ValueError) as e:
    _fail(str(e), 1)
  bits = f" avg_bits {res['avg_bits']:.2f}" if "avg_bits" in res else ""
  print(f"shakespeare gpt {cfg.tag}: val_loss {res['val_loss']:.4f} nats/char "
        f"({res['val_bpc']:.3f} bits/char){bits} train_seconds {res['train_seconds']:.0f}")
  if "packed_bytes" in res:
    print(f"model: {res['packed_file']}: {res['packed_bytes']} bytes, "
          f"{res['fp32_bytes'] / res['packed_bytes']:.1f}x smaller than FP32 "
          f"({res['fp32_bytes']} bytes); zstd {res['entropy_coded_bytes']} bytes")
  print(f"results: {workdir / 'results.json'}")


if __name__ == "__main__":
  app.run(main)

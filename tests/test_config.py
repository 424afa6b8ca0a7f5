"""One source of defaults: each experiment's get_config(), which flags override; the CLI and
the Python API build the same config, and every recorded command still builds its recorded
config."""

import dataclasses
import importlib
import json
import pathlib
import shlex

import pytest
from absl import flags

from experiments import common
from lqlab import config
from lqlab.config import TrainConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent
FLAGS = flags.FLAGS
EXPERIMENTS = ("mnist", "fashion_mnist", "cifar10", "imagenette")


def _cli_config(module: str, args):
  FLAGS.unparse_flags()
  FLAGS(["prog", *args])
  try:
    return common.config_from_flags(importlib.import_module(f"experiments.{module}").get_config())
  finally:
    FLAGS.unparse_flags()


@pytest.mark.parametrize("module", EXPERIMENTS)
def test_cli_and_python_api_build_the_same_config(module):
  get_config = importlib.import_module(f"experiments.{module}").get_config
  assert _cli_config(module, []) == get_config()
  args = ["--rule=lsq", "--bits=4", "--granularity=0,1", "--float=false", "--scale_stop=none",
          "--epochs=3", "--lr=0.5", "--noaugment"]
  want = dataclasses.replace(get_config(), rule="lsq", bits=4, granularity=(0, 1),
                             float_model=False, scale_stop=None, epochs=3, lr=0.5,
                             augment=False)
  assert _cli_config(module, args) == want


def test_library_defaults_are_the_recommended_recipe():
  """The API's TrainConfig() and the CLI agree on every field no experiment sets."""
  base = TrainConfig()
  for module in EXPERIMENTS:
    cfg = importlib.import_module(f"experiments.{module}").get_config()
    differ = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(base,
                                                                                         f.name)}
    assert differ <= {"dataset", "model", "epochs", "batch_size", "optimizer", "lr",
                      "weight_decay", "threshold"}, (module, differ)
  assert base.rounding == "round" and base.scale_schedule == "cosine" and base.brake == "val"


def _recorded():
  out = []
  for f in sorted((ROOT / "results").glob("*/results.jsonl")):
    for line in f.read_text().splitlines():
      row = json.loads(line)
      cmd = shlex.split(row.get("command", ""))
      # the image experiments (a language model's run is an LMConfig: test_transformers)
      if len(cmd) > 3 and cmd[:2] == ["python", "-m"] and cmd[2].startswith("experiments.") \
          and "test_accuracy" in row:
        out.append((f"{f.parent.name}/{row.get('workdir', '').rsplit('/', 1)[-1]}", cmd, row))
  return out


RECORDED = _recorded()


def test_recorded_commands_build_their_recorded_configs():
  assert len(RECORDED) > 100
  bad = []
  for name, cmd, row in RECORDED:
    args = [a for a in cmd[3:] if not a.startswith(("--workdir", "--data_dir", "--export",
                                                    "--noexport", "--progress", "--noprogress"))]
    args += config.reproduce_flags(row["config"], row["command"])  # changed defaults
    got = _cli_config(cmd[2].split(".", 1)[1], args).resolved_json()
    want = TrainConfig.from_json(row["config"]).resolved_json()
    if got != want:
      bad.append((name, {k: (want[k], got[k]) for k in want if want[k] != got[k]}))
  assert not bad, bad[:5]

"""A run's configuration: one frozen dataclass, the single source of its defaults.

Each field carries its command-line help (``metadata["help"]``); the experiments'
flags are made from these fields, and each experiment's ``get_config()`` sets the
fields that differ per dataset.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from lqjax import qconfig

from lqlab import data, models

OPTIMIZERS = ("adam", "sgd")
# Fields whose default changed after runs were recorded, with the value before: a record's
# config without the field reads as this value, and reproducing a command that did not name
# the field needs the flag today (reproduce_flags).
LEGACY_VALUES = {"scale_every": 1}
#: lambda of the ratio rule on inputs unless --act_threshold says otherwise.
ACT_THRESHOLD = 0.2
# The largest seed: jax.random.key takes int64, and the loop derives seed + 1 and seed + 2.
MAX_SEED = 2 ** 63 - 3


def _field(default, help_text: str):
  """A config field with its command-line help (the flags are made from these)."""
  return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Everything that defines a run. Variants via ``dataclasses.replace``."""

  dataset: str = _field("mnist", "dataset: " + ", ".join(data.DATASETS))
  model: str = _field("lenet300", "model: " + ", ".join(models.MODELS))
  float_model: bool = _field(False, "FP32 baseline: no quantizers at all")
  rule: str = _field("ratio", "scale-gradient rule: fixed | lsq | ratio | ratio_lsq")
  threshold: float = _field(0.2, "lambda of the ratio rules: groups with r < lambda coarsen")
  granularity: qconfig.Granularity = _field(
      "row", "kernel granularity: tensor|row|column|channel|spatial|element|head|block or axes "
             "'0,1'")
  block_size: Optional[int] = _field(
      None, "elements per scale group along a kernel's input axes, with --granularity=block")
  bias_granularity: qconfig.Granularity = _field("tensor", "bias granularity (same names)")
  quantize_bias: bool = _field(True, "quantize biases too")
  rounding: str = _field("round", "round (to nearest) | floor (the thesis's; loses ~1.3 points "
                                  "val accuracy on MNIST)")
  bits: Optional[int] = _field(None, "clip codes to b bits (fixed-bit and LSQ baselines)")
  grid: str = _field("midtread", "grid of fixed bit widths: midtread (levels s*q, zero among "
                                 "them) | midrise (s*(q+1/2), symmetric: at 1 bit the binary "
                                 "{-s/2, +s/2}); needs --bits")
  edge_bits: Optional[int] = _field(
      None, "bits of the first and last layer (the literature's 8-bit first/last setup, on "
            "the midtread grid); the rest use --bits and --grid")
  layer_bits: Optional[str] = _field(
      None, "per-layer bit widths 'module=bits,...' (module paths, e.g. conv1=8,fc1=2; the "
            "layer's kernel and bias): mixed precision with fixed widths, such as the HAWQ-v2 "
            "baseline's (scripts/hawq_bits.py); layers not named use --bits")
  act_bits: Optional[int] = _field(
      None, "quantize every quantized layer's input (activations) at b bits with a learned "
            "scale and offset (LSQ+; set from the first training batch by lqjax.calibrate)")
  act_first_bits: int = _field(8, "bits of the first layer's input (the image) under --act_bits")
  act_rule: str = _field("lsq", "how the input quantizers learn their scales under --act_bits: "
                                "lsq (LSQ+) | ratio (the ratio rule with r = B*||dL/da||/||a|| "
                                "and lambda --act_threshold; the offset as under lsq)")
  act_threshold: float = _field(ACT_THRESHOLD, "lambda of --act_rule=ratio")
  init_bits: int = _field(8, "initial bit budget of free-bit scales")
  lsq_weight: float = _field(1.0, "weight of the LSQ term in rule ratio_lsq")
  relax_threshold: Optional[float] = _field(
      None, "lambda_hi of the ratio rules: groups with r above it get finer grids")
  optimizer: str = _field("adam", "weights' optimizer: adam | sgd (momentum 0.9), cosine lr")
  lr: float = _field(1e-3, "weights' learning rate (peak of the cosine schedule)")
  weight_decay: float = _field(0.0, "weight decay")
  scale_optimizer: str = _field("sgd", "scales' optimizer on log s: sgd | adam")
  scale_lr: float = _field(0.02, "scales' learning rate (peak of the cosine schedule)")
  scale_schedule: str = _field("cosine", "scales' lr schedule: cosine (to 0 at "
                                         "scale_decay_fraction of the run) | constant")
  scale_decay_fraction: float = _field(
      0.8, "cosine scale schedule: fraction of the run after which the scales stop")
  scale_every: int = _field(
      16, "update the scales every k steps (the others train the weights only, without the "
          "scale gradient's reductions); the scales' lr is multiplied by k. 16: test accuracy "
          "and bits agree with k=1 within the seeds' spread (docs/RESULTS.md)")
  scale_stop: Optional[str] = _field(
      "auto", "validation brake: auto (val for the ratio rules, off for fixed and lsq) | val | "
              "none. val: when val accuracy drops more than scale_stop_tolerance below the best "
              "epoch's, roll the scales back to that epoch and halve their step")
  scale_stop_tolerance: float = _field(0.002, "val accuracy drop that triggers a brake")
  scale_stop_restore: str = _field(
      "scales", "what a brake rolls back to the best epoch: scales | all (the weights too)")
  budget_bits: Optional[float] = _field(
      None, "size budget: average bits per quantized weight, scale storage included. The "
            "learned grids are projected onto a budget that falls to this over the scale phase, "
            "exactly at its end, then the weights fine-tune on the frozen grids (lqjax.budget); "
            "lambda then shapes where the bits go")
  budget_bytes: Optional[int] = _field(
      None, "size budget as the packed file's size in bytes (header included); as budget_bits")
  inverse_scale: float = _field(0.0, "coefficient of the inverse-scale penalty")
  bin_count: float = _field(0.0, "coefficient of the bin-count penalty")
  deviation: float = _field(0.0, "coefficient of the deviation penalty")
  target_bits: float = _field(0.0, "bits the bin-count penalty allows for free (not a size "
                                   "budget: see budget_bits)")
  epochs: int = _field(5, "epochs")
  batch_size: int = _field(128, "global batch size")
  seed: int = _field(0, "random seed")
  augment: Optional[bool] = _field(None, "random crop + flip (default: on for cifar10 and "
                                         "imagenette)")
  limit: Optional[int] = _field(None, "use only the first N examples of each split (smoke tests)")
  chunk_steps: int = _field(100, "steps per jitted chunk (progress and signal granularity)")

  def __post_init__(self):
    if self.dataset not in data.DATASETS:
      raise ValueError(f"unknown dataset {self.dataset!r}; expected one of {', '.join(data.DATASETS)}")
    if self.model not in models.MODELS:
      raise ValueError(f"unknown model {self.model!r}; expected one of {', '.join(models.MODELS)}")
    if self.optimizer not in OPTIMIZERS or self.scale_optimizer not in OPTIMIZERS:
      raise ValueError(f"unknown optimizer; expected one of {', '.join(OPTIMIZERS)}")
    for name in ("lr", "scale_lr", "weight_decay", "inverse_scale", "bin_count", "deviation",
                 "target_bits"):
      v = getattr(self, name)
      if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    if not 0 < self.scale_decay_fraction <= 1:
      raise ValueError(f"scale_decay_fraction must be in (0, 1], got {self.scale_decay_fraction}")
    if self.scale_stop not in (None, "val", "auto"):
      raise ValueError(f"unknown scale_stop {self.scale_stop!r}; expected auto, val or none")
    if self.scale_stop_restore not in ("scales", "all"):
      raise ValueError(f"unknown scale_stop_restore {self.scale_stop_restore!r}; "
                       f"expected scales or all")
    if self.scale_schedule not in ("constant", "cosine"):
      raise ValueError(f"unknown scale_schedule {self.scale_schedule!r}; expected constant or cosine")
    if self.lr == 0:
      raise ValueError("lr must be > 0")
    for name in ("epochs", "batch_size", "chunk_steps", "scale_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if not (isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED):
      raise ValueError(f"seed must be a whole number in 0..{MAX_SEED}, got {self.seed}")
    if self.limit is not None and self.limit < 1:
      raise ValueError(f"limit must be >= 1, got {self.limit}")
    self.kernel_quant()  # validates rule, threshold, rounding, bits, granularities
    self.bias_quant()
    self._check_budget()
    for name in ("act_bits", "act_first_bits"):
      v = getattr(self, name)
      if v is not None and not 1 <= v <= 16:
        raise ValueError(f"{name} must be in 1..16, got {v}")
    if self.act_rule not in ("lsq", "ratio"):
      raise ValueError(f"act_rule must be lsq or ratio, got {self.act_rule!r}")
    if not (math.isfinite(self.act_threshold) and self.act_threshold >= 0):
      raise ValueError(f"act_threshold must be a finite number >= 0, got {self.act_threshold}")
    if self.act_bits is None and self.act_rule != "lsq":
      raise ValueError(f"act_rule={self.act_rule} learns the inputs' steps: it needs --act_bits")
    if self.act_rule != "ratio" and self.act_threshold != ACT_THRESHOLD:
      raise ValueError("act_threshold is lambda of --act_rule=ratio; give that rule too")
    if self.act_bits is not None and self.float_model:
      raise ValueError("act_bits quantizes the inputs of quantized layers: not with --float")
    if self.edge_bits is not None and not 1 <= self.edge_bits <= 16:
      raise ValueError(f"edge_bits must be in 1..16, got {self.edge_bits}")
    if self.layer_bits is not None:
      if self.float_model or self.budget or self.edge_bits is not None:
        raise ValueError("layer_bits sets each layer's width itself: not with --float, a size "
                         "budget or --edge_bits")
      self.layer_widths()

  def _check_budget(self):
    if self.budget_bits is None and self.budget_bytes is None:
      return
    if self.budget_bits is not None and self.budget_bytes is not None:
      raise ValueError("give budget_bits or budget_bytes, not both")
    for name in ("budget_bits", "budget_bytes"):
      v = getattr(self, name)
      if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {v}")
    if self.float_model:
      raise ValueError("a size budget needs a quantized model, not --float")
    if self.rule == "fixed" or self.bits is not None:
      raise ValueError(f"a size budget needs learned free-bit scales (rule lsq, ratio or "
                       f"ratio_lsq, no bits); got rule {self.rule}"
                       + (f" with bits {self.bits}" if self.bits is not None else ""))
    if self.scale_stop == "val":
      raise ValueError("a size budget sets the grids itself: the validation brake "
                       "(scale_stop val) would roll them back; use scale_stop auto or none")

  def layer_widths(self) -> dict:
    """``{module path: bits}`` of :attr:`layer_bits` (empty when unset)."""
    out = {}
    for item in ([] if self.layer_bits is None else self.layer_bits.split(",")):
      name, eq, bits = item.strip().rpartition("=")
      try:
        b = int(bits)
      except ValueError:
        b = None
      if not eq or not name or b is None or not 1 <= b <= 16 or name in out:
        raise ValueError(f"layer_bits: {item.strip()!r} is not 'module=bits' with bits in "
                         f"1..16, once per module (got {self.layer_bits!r})")
      out[name] = b
    return out

  @property
  def budget(self) -> bool:
    return self.budget_bits is not None or self.budget_bytes is not None

  def kernel_quant(self) -> Optional[qconfig.QuantConfig]:
    if self.float_model:
      return None
    return qconfig.QuantConfig(rule=self.rule, threshold=self.threshold, rounding=self.rounding,
                             bits=self.bits, grid=self.grid, granularity=self.granularity,
                             block_size=self.block_size, init_bits=self.init_bits, lsq_weight=self.lsq_weight,
                             relax_threshold=self.relax_threshold)

  def input_quant(self, first: bool = False) -> Optional[qconfig.QuantConfig]:
    """The recipe of the layers' inputs (`first`: the first layer's), or None."""
    if self.act_bits is None:
      return None
    return qconfig.QuantConfig(rule=self.act_rule, threshold=self.act_threshold,
                               rounding="round",
                               bits=self.act_first_bits if first else self.act_bits)

  def bias_quant(self) -> Optional[qconfig.QuantConfig]:
    if self.float_model or not self.quantize_bias:
      return None
    return dataclasses.replace(self.kernel_quant(), granularity=self.bias_granularity,
                               block_size=None)

  @property
  def brake(self) -> Optional[str]:
    """The validation brake in force: ``"val"`` or None (``"auto"`` resolved by the rule)."""
    if self.float_model or self.budget:
      return None  # no scales to brake, or a budget sets them
    if self.scale_stop == "auto":
      return "val" if self.rule.startswith("ratio") else None
    return self.scale_stop

  def resolved_json(self) -> dict:
    """:meth:`to_json` with ``scale_stop`` resolved (how two configs are compared)."""
    return {**self.to_json(), "scale_stop": self.brake}

  @property
  def use_augment(self) -> bool:
    return data.DATASET_SPECS[self.dataset].augmented if self.augment is None else self.augment

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    for k in ("granularity", "bias_granularity"):
      if isinstance(d[k], tuple):
        d[k] = list(d[k])
    return d

  @classmethod
  def from_json(cls, d: dict) -> "TrainConfig":
    d = dict(d)
    # a record from before a field existed ran with the field's value of that time
    for k, v in LEGACY_VALUES.items():
      d.setdefault(k, v)
    for k in ("granularity", "bias_granularity"):
      if isinstance(d.get(k), list):
        d[k] = tuple(d[k])
    return cls(**d)


FORMAT_META = "lqlab-run"


def run_meta(cfg: TrainConfig, num_classes, ds_stats) -> dict:
  """The ``meta`` a run's packed file holds: its config, class count and normalisation."""
  return {"format": FORMAT_META, "config": cfg.to_json(), "num_classes": int(num_classes),
          "mean": list(ds_stats[0]), "std": list(ds_stats[1])}


def reproduce_flags(recorded_config: dict, command: str = "") -> list:
  """Flags that a recorded command needs today to build its recorded config.

  For each field whose default changed (:data:`LEGACY_VALUES`: the value before), a run
  that had the old value without naming the field on its command line (its config records
  the old value, or predates the field) needs the flag now.
  """
  defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
  return [f"--{k}={v}" for k, v in LEGACY_VALUES.items()
          if recorded_config.get(k, v) == v != defaults[k] and f"--{k}=" not in command]

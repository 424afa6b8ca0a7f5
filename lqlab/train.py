"""Training: config, state, one pure jitted train step, evaluation, the loop.

* :class:`TrainConfig`: one frozen config for a run (validated on creation).
* ``train_step(state, batch, rng) -> (state, metrics)``: pure; built by
  :func:`make_train_step` for a model and config.
* :func:`train_and_evaluate`: data on the device, chunks of jitted steps (each
  gathers the next shuffled batch inside jit while it trains on the current one,
  so there is no per-step host transfer), data-parallel over every device (batch
  sharded along a ``data`` mesh axis, parameters replicated), orbax checkpoints every epoch
  and on SIGTERM/SIGINT, resume from the workdir, NaN guard, metrics.jsonl and
  results.json written atomically.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import signal
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct, traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lqjax
from lqjax import accounting, fileio, losses, optim, tree, types

from lqlab import data, models

OPTIMIZERS = ("adam", "sgd")


class TrainingError(RuntimeError):
  """A run that cannot go on (non-finite loss, incompatible workdir)."""


class Interrupted(RuntimeError):
  """SIGINT/SIGTERM arrived; a checkpoint was saved."""


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
  granularity: types.Granularity = _field(
      "row", "kernel granularity: tensor|row|column|channel|spatial|element or axes '0,1'")
  bias_granularity: types.Granularity = _field("tensor", "bias granularity (same names)")
  quantize_bias: bool = _field(True, "quantize biases too")
  rounding: str = _field("round", "round (to nearest) | floor (the thesis's; loses ~1.3 points "
                                  "val accuracy on MNIST)")
  bits: Optional[int] = _field(None, "clip codes to b bits (fixed-bit and LSQ baselines)")
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
  scale_stop: Optional[str] = _field(
      "auto", "validation brake: auto (val for the ratio rules, off for fixed and lsq) | val | "
              "none. val: when val accuracy drops more than scale_stop_tolerance below the best "
              "epoch's, roll the scales back to that epoch and halve their step")
  scale_stop_tolerance: float = _field(0.002, "val accuracy drop that triggers a brake")
  scale_stop_restore: str = _field(
      "scales", "what a brake rolls back to the best epoch: scales | all (the weights too)")
  inverse_scale: float = _field(0.0, "coefficient of the inverse-scale penalty")
  bin_count: float = _field(0.0, "coefficient of the bin-count penalty")
  deviation: float = _field(0.0, "coefficient of the deviation penalty")
  target_bits: float = _field(0.0, "bits the bin-count penalty allows for free")
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
    for name in ("epochs", "batch_size", "chunk_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.limit is not None and self.limit < 1:
      raise ValueError(f"limit must be >= 1, got {self.limit}")
    self.kernel_quant()  # validates rule, threshold, rounding, bits, granularities
    self.bias_quant()

  def kernel_quant(self) -> Optional[types.QuantConfig]:
    if self.float_model:
      return None
    return types.QuantConfig(rule=self.rule, threshold=self.threshold, rounding=self.rounding,
                             bits=self.bits, granularity=self.granularity,
                             init_bits=self.init_bits, lsq_weight=self.lsq_weight,
                             relax_threshold=self.relax_threshold)

  def bias_quant(self) -> Optional[types.QuantConfig]:
    if self.float_model or not self.quantize_bias:
      return None
    return dataclasses.replace(self.kernel_quant(), granularity=self.bias_granularity)

  @property
  def brake(self) -> Optional[str]:
    """The validation brake in force: ``"val"`` or None (``"auto"`` resolved by the rule)."""
    if self.float_model:
      return None  # no scales to brake
    if self.scale_stop == "auto":
      return "val" if self.rule.startswith("ratio") else None
    return self.scale_stop

  def resolved_json(self) -> dict:
    """:meth:`to_json` with ``scale_stop`` resolved (how two configs are compared)."""
    return {**self.to_json(), "scale_stop": self.brake}

  @property
  def use_augment(self) -> bool:
    return self.dataset in data.AUGMENTED if self.augment is None else self.augment

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    for k in ("granularity", "bias_granularity"):
      if isinstance(d[k], tuple):
        d[k] = list(d[k])
    return d

  @classmethod
  def from_json(cls, d: dict) -> "TrainConfig":
    d = dict(d)
    for k in ("granularity", "bias_granularity"):
      if isinstance(d.get(k), list):
        d[k] = tuple(d[k])
    return cls(**d)


MAX_BRAKES = 4
# The run stops when a step's loss exceeds this many times the first step's (divergence
# that has not reached inf or NaN yet).
EXPLODE_FACTOR = 1e3

# One example's (H, W, C) per dataset: the shapes models are initialised with.
INPUT_SHAPES = data.IMAGE_SHAPES


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  # An lqjax.optim.split state: it holds the scales' step multiplier (the brake's).
  opt_state: Any
  # The params at the best validation epoch so far (the brake rolls scales back to them).
  best_params: Any


def quant_rules(cfg: TrainConfig):
  """The lqjax rules of a run: every Dense and Conv, first and last included.

  ``spatial`` granularity needs a conv kernel: Dense kernels under a ``spatial``
  kernel config are quantized per tensor instead.
  """
  kernel, bias = cfg.kernel_quant(), cfg.bias_quant()
  rules = []
  if kernel.granularity == "spatial":
    rules.append(lqjax.Rule(models.DENSE_LAYERS, dataclasses.replace(kernel, granularity="tensor"),
                            bias=bias))
  rules.append(lqjax.Rule(".*", kernel, bias=bias))
  return rules


def build_model(cfg: TrainConfig, num_classes: int):
  """The run's model: the registry's float model, quantized by :func:`quant_rules`."""
  model = models.make_model(cfg.model, num_classes)
  return model if cfg.float_model else lqjax.quantize(model, quant_rules(cfg))


param_labels = optim.labels


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
  total = cfg.epochs * steps_per_epoch
  sched = optax.cosine_decay_schedule(cfg.lr, max(total, 1))
  if cfg.optimizer == "adam":
    weight_tx = optax.adamw(sched, weight_decay=cfg.weight_decay) if cfg.weight_decay \
        else optax.adam(sched)
  else:
    weight_tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                            optax.sgd(sched, momentum=0.9, nesterov=True))
  # cosine: decays to 0 at `scale_decay_fraction` of the run and stays there, so
  # the weights fine-tune on a settled grid for the rest.
  scale_sched = cfg.scale_lr if cfg.scale_schedule == "constant" else \
      optax.cosine_decay_schedule(cfg.scale_lr, max(int(cfg.scale_decay_fraction * total), 1))
  scale_tx = optax.sgd(scale_sched) if cfg.scale_optimizer == "sgd" else optax.adam(scale_sched)
  return optim.split(weight_tx, scale_tx)


def _preprocess(cfg, ds_stats, images, rng, train):
  if train and cfg.use_augment:
    images = data.random_crop_flip(rng, images)
  return data.normalize(images, *ds_stats)


_ORDER_AFTER_SCALES = ("lsq",)


def _after_scales(params):
  """Orders each quantized parameter's update after its scale's update, exactly.

  The donated step updates a weight in place. Its scale's gradient reads the old
  weight in a fusion that the weight's own update does not depend on, so XLA
  copies every quantized weight at the start of the step to keep that read
  valid (about 1 MB per step for LeNet-300-100's first layer). Adding
  ``0.0 * new_log_scale[0]`` makes the weight's update depend on the scale's,
  which XLA then schedules first, and the copies go. The values do not change:
  a finite log scale times 0.0 is 0.0. (``lax.optimization_barrier`` does not
  help here: XLA:CPU removes it before fusion.)

  By default applied for the rules in ``_ORDER_AFTER_SCALES`` only, as measured
  side by side by ``scripts/bench_ordering.py`` on LeNet-300-100 (2-core CPU,
  quantized/float step time, weights copied -> ordered, three runs): lsq 1.36-1.40
  -> 1.18-1.23, but ratio 1.09-1.10 -> 1.16-1.23, so ratio is left as it was.
  """
  flat = traverse_util.flatten_dict(params)
  for t in tree.quantized_tensors(params):
    flat[t.path] = flat[t.path] + 0.0 * t.log_scale.reshape(-1)[0]
  return traverse_util.unflatten_dict(flat)


def make_train_step(cfg: TrainConfig, model, tx, ds_stats,
                    order_after_scales: Optional[bool] = None):
  """Returns the pure ``train_step(state, batch, rng) -> (state, metrics)``.

  `order_after_scales`: apply :func:`_after_scales` (same values, scheduling only);
  None: for the rules in ``_ORDER_AFTER_SCALES``.
  """
  if order_after_scales is None:
    order_after_scales = cfg.rule in _ORDER_AFTER_SCALES
  order_after_scales = order_after_scales and not cfg.float_model

  def loss_fn(params, batch_stats, images, labels):
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
      logits, new = model.apply(variables, images, train=True, mutable=["batch_stats"])
      batch_stats = new["batch_stats"]
    else:
      logits = model.apply(variables, images, train=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    pen, _ = losses.quant_penalties(
        params, inverse_scale=cfg.inverse_scale, bin_count=cfg.bin_count,
        deviation=cfg.deviation, target_bits=cfg.target_bits)
    acc = jnp.mean(jnp.argmax(logits, -1) == labels)
    return ce + pen, (batch_stats, ce, acc)

  def train_step(state: TrainState, batch, rng):
    images, labels = batch
    images = _preprocess(cfg, ds_stats, images, rng, train=True)
    grads, (bs, ce, acc) = jax.grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, images, labels)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if order_after_scales:
      params = _after_scales(params)
    metrics = {"loss": ce, "accuracy": acc}
    return state.replace(step=state.step + 1, params=params, batch_stats=bs,
                         opt_state=opt_state), metrics

  return train_step


def make_ratio_stats_fn(cfg: TrainConfig, model, ds_stats):
  """Jitted ``fn(params, batch_stats, images, labels) -> {layer: r quantiles}``.

  r_G = ||dL/dP||_G / ||P||_G per scale group on one batch (the quantity the
  ratio rules compare with lambda); reports its 10/50/90th percentiles and the
  fraction of groups below lambda (the groups whose grid is coarsening)
  (:func:`lqjax.optim.ratio_stats`).
  """

  def ce(params, batch_stats, images, labels):
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    logits = model.apply(variables, _preprocess(cfg, ds_stats, images, None, False), train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def fn(params, batch_stats, images, labels):
    grads = jax.grad(ce)(params, batch_stats, images, labels)
    return optim.ratio_stats(params, grads, cfg.threshold)

  return fn


def make_chunk_runner(cfg: TrainConfig, train_step, steps_per_epoch: int, step_rng,
                      batch_sharding=None):
  """Returns ``run_chunk(state, perm, images, labels, n) -> (state, stacked metrics)``.

  Each step is one jitted call (state donated) that trains on a batch gathered
  from the device-resident dataset with the epoch's permutation, and gathers the
  next step's batch in the same call (prefetch): the gather does not depend on
  the step's result, so XLA runs it beside the step's compute instead of in
  front of it, and the step's own batch is a buffer ready when it starts. No
  host transfer per step. (A ``lax.scan`` over steps was measured 5x slower for
  convolutions on XLA:CPU, so steps are dispatched one by one; metrics stay on
  the device until the chunk ends.) The batches, and so the results, are the
  same as gathering each batch at its own step; a chunk starts with one gather
  of its own.
  """

  def gather(perm, images, labels, step):
    i = step % steps_per_epoch
    idx = jax.lax.dynamic_slice(perm, (i * cfg.batch_size,), (cfg.batch_size,))
    x, y = images[idx], labels[idx]
    if batch_sharding is not None:
      x = jax.lax.with_sharding_constraint(x, batch_sharding)
      y = jax.lax.with_sharding_constraint(y, batch_sharding)
    return x, y

  first_batch = jax.jit(gather)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step_at(state, batch, perm, images, labels):
    next_batch = gather(perm, images, labels, state.step + 1)
    state, metrics = train_step(state, batch, jax.random.fold_in(step_rng, state.step))
    return state, metrics, next_batch

  # one dispatch for the chunk's metrics: an eager jnp.stack dispatches once per step and
  # metric, which a GPU step of a small model (~0.2 ms) feels
  stack = jax.jit(lambda ms: jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *ms))

  def run_chunk(state, perm, images, labels, n_steps):
    batch = first_batch(perm, images, labels, state.step)
    ms = []
    for _ in range(n_steps):
      state, m, batch = step_at(state, batch, perm, images, labels)
      ms.append(m)
    return state, stack(ms)

  return run_chunk


def make_eval_fn(cfg: TrainConfig, model, ds_stats, sharding, batch_size: int = 500):
  """Returns jitted ``evaluate(params, batch_stats, images, labels) -> (acc, loss)``."""

  @jax.jit
  def logits_fn(params, batch_stats, images):
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    images = jax.lax.with_sharding_constraint(images, sharding)
    return model.apply(variables, _preprocess(cfg, ds_stats, images, None, False), train=False)

  def evaluate(params, batch_stats, split: data.Split):
    n = len(split)
    correct, loss = 0.0, 0.0
    for i in range(0, n, batch_size):
      x, y = split.image[i:i + batch_size], split.label[i:i + batch_size]
      if x.shape[0] % sharding.mesh.size:  # last partial batch: pad to the mesh
        pad = sharding.mesh.size - x.shape[0] % sharding.mesh.size
        logits = logits_fn(params, batch_stats, jnp.pad(x, ((0, pad),) + ((0, 0),) * 3))[:-pad]
      else:
        logits = logits_fn(params, batch_stats, x)
      correct += float(jnp.sum(jnp.argmax(logits, -1) == y))
      loss += float(jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y)))
    return correct / n, loss / n

  return evaluate


def predict_logits(cfg, model, ds_stats, params, batch_stats, images, batch_size=500):
  """Host-side logits for `images` (used to compare exported models)."""
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  fn = jax.jit(lambda v, x: model.apply(v, _preprocess(cfg, ds_stats, x, None, False), train=False))
  return np.concatenate([np.asarray(fn(variables, images[i:i + batch_size]))
                         for i in range(0, images.shape[0], batch_size)])


# ---------------------------------------------------------------- the loop


write_json_atomic = fileio.write_json_atomic


def _read_jsonl(path: pathlib.Path):
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class _SignalFlag:
  """Turns SIGINT/SIGTERM into a flag checked between chunks."""

  def __init__(self):
    self.hit = None

  def __enter__(self):
    self._old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, _frame):
    self.hit = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _scale_stop(cfg, state, meta, val_acc, epoch):
  """The validation brake (``scale_stop="val"``): :func:`lqjax.optim.brake_update` per epoch.

  The brake's state lives in the checkpoint: the best epoch's accuracy and
  number in `meta`, its parameters in ``state.best_params``, the scales' step
  multiplier in the optimizer state. Returns ``(state, meta, event)``.
  """
  if cfg.brake is None or cfg.float_model:
    return state, meta, None
  brake = optim.Brake(tolerance=cfg.scale_stop_tolerance, max_brakes=MAX_BRAKES,
                      restore=cfg.scale_stop_restore)
  bstate = optim.BrakeState(meta["best_val"], meta["best_epoch"], meta.get("brakes", 0),
                            state.best_params)
  bstate, params, opt_state, event = optim.brake_update(
      brake, bstate, state.params, state.opt_state, val_acc, epoch, "epoch")
  meta = dict(meta, best_val=bstate.best, best_epoch=bstate.best_step, brakes=bstate.brakes)
  if event is not None and float(optim.scale_mult(opt_state)) == 0.0:
    meta["frozen_at"] = epoch
  return state.replace(params=params, opt_state=opt_state, best_params=bstate.best_params), \
      meta, event


def _hash_path(workdir, step) -> pathlib.Path:
  return workdir / "checkpoint_hashes" / f"{step}.json"


def _write_hashes(workdir, step):
  """Records the sha256 of every file of checkpoint `step` (checked before a restore)."""
  fileio.write_json_atomic(_hash_path(workdir, step),
                           fileio.tree_hashes(workdir / "checkpoints" / str(step)))


def _write_error(e: Exception) -> str:
  """The operating system's reason in a failed write's message (tensorstore or Python)."""
  import re
  if isinstance(e, OSError) and e.strerror:
    return e.strerror
  m = re.search(r":\s*([^:\[]+?)\s*\[os_error_code='?(\d+)", str(e))
  if m:
    return m.group(1)
  return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def _clean_tmp(workdir):
  import shutil
  for tmp in (workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"):
    shutil.rmtree(tmp, ignore_errors=True)


def _set_aside(steps, workdir, mngr):
  """Moves damaged checkpoint steps out of orbax's folder (kept, never deleted)."""
  dest = workdir / "damaged_checkpoints"
  dest.mkdir(exist_ok=True)
  for step in steps:
    (workdir / "checkpoints" / str(step)).rename(dest / f"{step}_{int(time.time())}")
    _hash_path(workdir, step).unlink(missing_ok=True)
  mngr.reload()


def _restore_verified(mngr, workdir, state, progress):
  """(state, meta) of the newest intact checkpoint, or None when there is none at all.

  Each checkpoint's files are checked against the hashes recorded when it was
  saved; a damaged or unreadable step is reported and the one before it is used.
  No intact step left: TrainingError.
  """
  import orbax.checkpoint as ocp
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None
  problems = []
  for step in steps:
    hp = _hash_path(workdir, step)
    try:
      want = json.loads(hp.read_text())
    except (OSError, ValueError):
      want = None
    got = fileio.tree_hashes(workdir / "checkpoints" / str(step)) if want is not None else {}
    changed = sorted(k for k in set(want or {}) | set(got) if (want or {}).get(k) != got.get(k))
    if changed:  # a checkpoint without recorded hashes (older lqlab) is tried unverified
      problems.append(f"step {step}: {changed[0]} is damaged or missing")
      continue
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many kinds for a bad checkpoint
      problems.append(f"step {step}: unreadable ({type(e).__name__})")
      continue
    if problems:
      _set_aside([s for s in steps if s > step], workdir, mngr)
      print(f"warning: {workdir / 'checkpoints'}: {'; '.join(problems)}; resuming from step "
            f"{step} (the damaged steps are moved to {workdir / 'damaged_checkpoints'})",
            file=sys.stderr, flush=True)
    return restored["state"], dict(restored["meta"])
  raise TrainingError(f"no intact checkpoint in {workdir / 'checkpoints'} ({'; '.join(problems)})"
                      f"; use a new --workdir")


def _interrupted(signame, state, workdir) -> Interrupted:
  return Interrupted(f"{signame} at step {int(state.step)}: checkpoint saved in "
                     f"{workdir / 'checkpoints'}; re-run the same command to resume")


def init_state(cfg, model, tx, sample, sharding):
  rng = jax.random.key(cfg.seed)
  variables = model.init(rng, sample, train=False)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  state = TrainState(jnp.zeros((), jnp.int32), params, batch_stats, tx.init(params),
                     jax.tree_util.tree_map(jnp.copy, params))
  return jax.device_put(state, sharding) if sharding is not None else state


def data_shardings():
  """(devices, replicated, batch-sharded): the data-parallel layout over every device."""
  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  return devices, NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def train_and_evaluate(cfg: TrainConfig, workdir, data_dir: Optional[str] = None,
                       progress: bool = True, after_train=None, model=None) -> dict:
  """Trains (or resumes) a run in `workdir` and returns its results.

  Args:
    cfg: the run's configuration.
    workdir: holds config.json, checkpoints/, metrics.jsonl, results.json.
    data_dir: overrides ``$LQJAX_DATA_DIR``.
    progress: show a tqdm progress bar.
    after_train: optional ``fn(cfg, model, state, dataset, results) -> dict`` whose
      entries are merged into results (used for export).
    model: a flax module to train instead of the one `cfg` names, with the same
      parameters (e.g. a peer library's wrapper of the float model).
  """
  workdir = pathlib.Path(workdir)
  if not workdir.parent.is_dir():
    raise FileNotFoundError(f"workdir parent {workdir.parent} does not exist")
  if workdir.exists() and not workdir.is_dir():
    raise FileNotFoundError(f"workdir {workdir} is a file, not a directory; use a new --workdir")
  cfg_path = workdir / "config.json"
  if cfg_path.exists():
    _check_same_run(cfg, workdir)

  # Nothing is written until the config is valid and the data loaded.
  devices, replicated, batch_sharding = data_shardings()
  if cfg.batch_size % len(devices):
    raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {len(devices)} devices")
  ds = data.load(cfg.dataset, data_dir, limit=cfg.limit, sharding=replicated)
  n_train = len(ds.train)
  steps_per_epoch = n_train // cfg.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"batch_size {cfg.batch_size} exceeds the {n_train} training examples")

  try:
    workdir.mkdir(exist_ok=True)
    lock = fileio.lock_dir(workdir)
  except fileio.LockedError as e:
    raise TrainingError(f"workdir {e}") from None
  except PermissionError:
    raise TrainingError(f"workdir {workdir} is not writable; use a writable --workdir") from None
  except OSError as e:
    raise TrainingError(f"workdir {workdir}: {e.strerror or e}") from None
  try:
    return _train_locked(cfg, workdir, ds, devices, replicated, batch_sharding, steps_per_epoch,
                         progress, after_train, model)
  finally:
    lock.close()


def _check_same_run(cfg, workdir):
  """Refuses a workdir that holds another run, or this run with a shorter schedule."""
  # A field added after the run was made reads as its default.
  defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
  try:
    old = TrainConfig.from_json({**defaults, **json.loads(
        (workdir / "config.json").read_text())}).resolved_json()
  except (ValueError, TypeError, OSError) as e:
    raise TrainingError(f"{workdir / 'config.json'} is unreadable ({e}); use a new "
                        f"--workdir") from None
  mine = cfg.resolved_json()
  diff = sorted(k for k in set(old) | set(mine) if k != "epochs" and old.get(k) != mine.get(k))
  if diff:
    raise TrainingError(f"workdir {workdir} holds a run with another config (differs in "
                        f"{', '.join(diff)}); use a new --workdir")
  if cfg.epochs < old["epochs"]:
    raise TrainingError(f"workdir {workdir} holds a {old['epochs']}-epoch run; --epochs="
                        f"{cfg.epochs} would relabel it: use a new --workdir for a shorter "
                        f"schedule")


def _train_locked(cfg, workdir, ds, devices, replicated, batch_sharding, steps_per_epoch,
                  progress, after_train, model):
  import orbax.checkpoint as ocp
  from tqdm import tqdm

  n_train = len(ds.train)
  write_json_atomic(workdir / "config.json", cfg.to_json())
  stats = (ds.mean, ds.std)
  write_json_atomic(workdir / "data_stats.json",
                    {"mean": ds.mean, "std": ds.std, "num_classes": ds.num_classes})
  model = build_model(cfg, ds.num_classes) if model is None else model
  tx = make_optimizer(cfg, steps_per_epoch)
  state = init_state(cfg, model, tx, ds.train.image[:1].astype(jnp.float32), replicated)
  train_step = make_train_step(cfg, model, tx, stats)
  evaluate = make_eval_fn(cfg, model, stats, batch_sharding)
  ratio_fn = make_ratio_stats_fn(cfg, model, stats)
  bits_fn = jax.jit(accounting.average_bits)
  data_rng = jax.random.key(cfg.seed + 1)
  step_rng = jax.random.key(cfg.seed + 2)

  run_chunk = make_chunk_runner(cfg, train_step, steps_per_epoch, step_rng, batch_sharding)

  perm_fn = jax.jit(lambda e: data.epoch_permutation(data_rng, e, n_train))

  mngr = ocp.CheckpointManager(
      (workdir / "checkpoints").absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False))
  meta = {"loss_sum": 0.0, "acc_sum": 0.0, "steps_in_epoch": 0, "train_seconds": 0.0,
          "best_val": -1.0, "best_epoch": 0, "brakes": 0, "frozen_at": None}
  restored = _restore_verified(mngr, workdir, state, progress)
  if restored is not None:
    state, meta = restored
  start_step = int(state.step)
  start_epoch = start_step // steps_per_epoch
  rows = [r for r in _read_jsonl(workdir / "metrics.jsonl") if r["epoch"] <= start_epoch]
  total_steps = cfg.epochs * steps_per_epoch

  def save(state, meta):
    import logging as pylogging
    pylogging.disable(pylogging.ERROR)  # orbax logs a failed write's traceback; we say it once
    try:
      mngr.save(int(state.step), args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
      mngr.wait_until_finished()
      _write_hashes(workdir, int(state.step))
    except Exception as e:  # OSError from Python, ValueError from tensorstore
      _clean_tmp(workdir)
      kept = (f"step {mngr.latest_step()}, the last complete checkpoint, is kept"
              if mngr.latest_step() is not None else "no checkpoint was complete yet")
      try:
        mngr.close()
      except Exception:  # the manager may be as broken as the write
        pass
      raise TrainingError(f"cannot write a checkpoint in {workdir / 'checkpoints'} "
                          f"({_write_error(e)}); {kept}") from None
    finally:
      pylogging.disable(pylogging.NOTSET)

  t_start = time.time() - meta["train_seconds"]
  with _SignalFlag() as sig:
    for epoch in range(start_epoch, cfg.epochs):
      perm = perm_fn(epoch)
      bar = tqdm(total=steps_per_epoch, initial=int(state.step) % steps_per_epoch,
                 desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
      while int(state.step) < (epoch + 1) * steps_per_epoch:
        n = min(cfg.chunk_steps, (epoch + 1) * steps_per_epoch - int(state.step))
        step0 = int(state.step)
        new_state, m = run_chunk(state, perm, ds.train.image, ds.train.label, n)
        loss = np.asarray(m["loss"])
        if step0 == 0:
          meta["first_loss"] = float(loss[0])
        first = meta.get("first_loss", float(loss[0]))
        limit = max(EXPLODE_FACTOR * abs(first), EXPLODE_FACTOR)
        bad_mask = ~np.isfinite(loss) | (np.abs(loss) > limit)
        if np.any(bad_mask):
          bad = step0 + int(np.argmax(bad_mask))
          value = loss[bad - step0]
          what = f"became {value}" if not np.isfinite(value) else \
              f"exploded to {value:.3g} (it started at {first:.3g})"
          kept = (f"the checkpoint of step {mngr.latest_step()} in {workdir / 'checkpoints'} is "
                  f"kept" if mngr.latest_step() is not None else
                  "no checkpoint was saved yet (the first is written at the end of epoch 1)")
          mngr.close()
          raise TrainingError(f"loss {what} at step {bad} (epoch {epoch + 1}); stopped, {kept}: "
                              f"lower --lr or --scale_lr")
        state = new_state
        meta["loss_sum"] += float(loss.sum())
        meta["acc_sum"] += float(np.asarray(m["accuracy"]).sum())
        meta["steps_in_epoch"] += n
        bar.update(n)
        if progress:  # the bits cost a pass over every weight and a host sync
          bits = float(bits_fn(state.params)[0]) if not cfg.float_model else 32.0
          bar.set_postfix(loss=f"{loss.mean():.3f}",
                          acc=f"{np.asarray(m['accuracy']).mean():.3f}", bits=f"{bits:.2f}")
        if sig.hit and int(state.step) < (epoch + 1) * steps_per_epoch:
          meta["train_seconds"] = time.time() - t_start
          save(state, meta)
          mngr.close()
          bar.close()
          raise _interrupted(sig.hit, state, workdir)
      bar.close()
      val_acc, val_loss = evaluate(state.params, state.batch_stats, ds.val)
      avg, per_layer = bits_fn(state.params) if not cfg.float_model else (32.0, {})
      r_stats = {} if cfg.float_model else jax.tree_util.tree_map(float, ratio_fn(
          state.params, state.batch_stats, ds.val.image[:500], ds.val.label[:500]))
      state, meta, event = _scale_stop(cfg, state, meta, val_acc, epoch + 1)
      row = {"epoch": epoch + 1, "step": int(state.step),
             "train_loss": meta["loss_sum"] / max(meta["steps_in_epoch"], 1),
             "train_accuracy": meta["acc_sum"] / max(meta["steps_in_epoch"], 1),
             "val_accuracy": val_acc, "val_loss": val_loss, "avg_bits": float(avg),
             "bits_per_layer": {k: float(v) for k, v in per_layer.items()},
             "ratio_r": r_stats, "scale_mult": float(optim.scale_mult(state.opt_state)),
             "seconds": time.time() - t_start,
             **({"scale_stop": event} if event else {})}
      rows.append(row)
      fileio.write_jsonl_atomic(workdir / "metrics.jsonl", rows)
      meta = {**meta, "loss_sum": 0.0, "acc_sum": 0.0, "steps_in_epoch": 0,
              "train_seconds": time.time() - t_start}
      save(state, meta)
      if progress:
        print(f"epoch {epoch + 1}: train_loss {row['train_loss']:.4f} val_acc {val_acc:.4f} "
              f"avg_bits {row['avg_bits']:.2f} ({row['seconds']:.0f}s)", flush=True)
      if sig.hit and epoch + 1 < cfg.epochs:  # the epoch's checkpoint is saved
        mngr.close()
        raise _interrupted(sig.hit, state, workdir)
  mngr.close()
  train_seconds = meta["train_seconds"] if start_step >= total_steps else time.time() - t_start

  results = final_results(cfg, state.params, state.batch_stats, evaluate, ds, workdir,
                          train_seconds=train_seconds, devices=devices,
                          scales_frozen_at_epoch=meta.get("frozen_at"))
  results_path = workdir / "results.json"
  if start_step >= total_steps and results_path.exists():
    try:
      before = fileio.read_json(results_path)
    except (OSError, ValueError):
      before = None
    if before is not None and before.get("test_accuracy") != results["test_accuracy"]:
      raise TrainingError(
          f"{results_path} says test accuracy {before.get('test_accuracy')}, but the finished "
          f"run's checkpoint now gives {results['test_accuracy']}: the checkpoint changed since; "
          f"{results_path} is kept as it was")
  if after_train is not None:
    results.update(after_train(cfg, model, state, ds, results))
  write_json_atomic(results_path, results)
  return results


def collapsed(results: dict) -> bool:
  """A quantized run whose grid fell to (almost) one bin per group, or to chance accuracy."""
  if results.get("scheme") == "float":
    return False
  chance = 1.0 / max(int(results.get("num_classes", 10)), 1)
  return results["avg_bits"] < 0.05 or results["test_accuracy"] < 1.5 * chance


def model_variables(params, batch_stats):
  """One tree of every array of a model, for accounting and files: the params at
  the top (their paths as in the params collection) and ``batch_stats`` beside them."""
  return dict(params, batch_stats=batch_stats) if batch_stats else params


def final_results(cfg: TrainConfig, params, batch_stats, evaluate, ds, workdir, *,
                  train_seconds: float, devices, **extra) -> dict:
  """The results.json entries of a trained model: accuracies, bits and sizes, config."""
  val_acc, _ = evaluate(params, batch_stats, ds.val)
  test_acc, test_loss = evaluate(params, batch_stats, ds.test)
  report = accounting.model_report(model_variables(jax.device_get(params),
                                                   jax.device_get(batch_stats)))
  summ = accounting.summarize(report)
  penalty = cfg.inverse_scale or cfg.bin_count or cfg.deviation
  out = {
      "dataset": cfg.dataset, "model": cfg.model,
      "scheme": "float" if cfg.float_model else ("penalty" if penalty else "scale-rule"),
      "rule": None if cfg.float_model else cfg.rule, "threshold": cfg.threshold,
      "granularity": list(cfg.granularity) if isinstance(cfg.granularity, tuple) else cfg.granularity,
      "seed": cfg.seed, "epochs": cfg.epochs, "num_classes": ds.num_classes,
      "val_accuracy": val_acc, "test_accuracy": test_acc,
      "test_loss": test_loss, "fp32_bytes": summ["fp32_bytes"],
      "quantized_bits_per_layer": summ["quantized_bits_per_layer"] if not cfg.float_model else {},
      "avg_bits": summ["avg_bits"] if not cfg.float_model else 32.0,
      "packed_bytes_accounted": summ["packed_bytes_accounted"],
      "train_seconds": train_seconds, "devices": len(devices), **extra,
      "platform": devices[0].platform, "workdir": str(workdir), "config": cfg.to_json(),
  }
  out["collapsed"] = collapsed(out)
  return out


def restore(workdir):
  """Loads a run's final checkpoint without its dataset.

  Returns:
    (cfg, model, state, (mean, std), num_classes).
  """
  import orbax.checkpoint as ocp
  workdir = pathlib.Path(workdir)
  for f in ("config.json", "data_stats.json"):
    if not (workdir / f).is_file():
      raise FileNotFoundError(f"{workdir} is not a run directory: {f} is missing")
  try:
    cfg = TrainConfig.from_json(json.loads((workdir / "config.json").read_text()))
    ds = json.loads((workdir / "data_stats.json").read_text())
    ds["num_classes"], ds["mean"], ds["std"]
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f"{workdir}: config.json or data_stats.json is damaged ({e})") from None
  model = build_model(cfg, ds["num_classes"])
  tx = make_optimizer(cfg, 1)
  sample = jnp.zeros((1,) + INPUT_SHAPES[cfg.dataset])
  abstract = jax.eval_shape(lambda: init_state(cfg, model, tx, sample, None))
  mngr = ocp.CheckpointManager((workdir / "checkpoints").absolute())
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"{workdir} holds no checkpoint")
  damaged = (f"checkpoint step {step} in {workdir / 'checkpoints'} is damaged; re-run the "
             f"training command to fall back to the step before it")
  try:
    want = json.loads(_hash_path(workdir, step).read_text())
  except (OSError, ValueError):
    want = None  # made before checkpoints had hashes: read unverified
  if want is not None and fileio.tree_hashes(workdir / "checkpoints" / str(step)) != want:
    raise ValueError(damaged)
  try:
    state = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))["state"]
  except Exception as e:  # orbax raises many kinds for an unreadable checkpoint
    raise ValueError(f"{damaged} ({type(e).__name__})") from None
  finally:
    mngr.close()
  return cfg, model, state, (tuple(ds["mean"]), tuple(ds["std"])), ds["num_classes"]

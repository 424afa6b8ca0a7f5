"""The checkpointed training loop: :func:`train_and_evaluate` and :func:`restore`.

Data on the device, chunks of jitted steps (:mod:`lqlab.step`), orbax checkpoints
every epoch and on SIGTERM/SIGINT, each verified against the hashes recorded when
it was saved; resume from the workdir (falling back past a damaged step), one run
per workdir at a time (a lock file), guards against NaN and exploding losses,
metrics.jsonl and results.json written atomically, the validation brake per epoch.
Data parallel or FSDP over a mesh of every device, in one process or several
(:mod:`lqlab.distributed`: process 0 writes the files and logs).

The config, step and evaluation live in :mod:`lqlab.config`, :mod:`lqlab.step`
and :mod:`lqlab.evaluate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import signal
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from lqjax import accounting, budget, compress, optim

from lqlab import checkpoints, data, distributed, files
from lqlab.config import LEGACY_VALUES, TrainConfig, run_meta
from lqlab.evaluate import final_results, make_eval_fn, model_variables
from lqlab.step import (build_model, calibration_batch, init_state, make_chunk_runner,
                        make_fisher_fn, make_optimizer, make_ratio_stats_fn, make_train_step)


class TrainingError(RuntimeError):
  """A run that cannot go on (non-finite loss, incompatible workdir)."""


class Interrupted(RuntimeError):
  """SIGINT/SIGTERM arrived; a checkpoint was saved."""


MAX_BRAKES = 4


# The run stops when a step's loss exceeds this many times the first step's (divergence
# that has not reached inf or NaN yet).
EXPLODE_FACTOR = 1e3


def _read_metrics(path: pathlib.Path):
  """The rows of a run's metrics.jsonl; a cut-off last line (a write killed mid-line on a
  filesystem without atomic renames, or a copy) is dropped with a warning, since the
  checkpoint, not this log, is what a resume continues from."""
  return files.read_jsonl(path, cut_last_line_ok=True, warn=lambda msg: print(
      f"warning: {msg} (the log is rewritten from the checkpoint's epochs)", file=sys.stderr,
      flush=True))


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


@contextlib.contextmanager
def _stop_on_signal(when: str):
  """SIGINT/SIGTERM raise :class:`Interrupted` at once (one line, with the resume hint)
  while the run is at no point where a flag could be checked: loading, building and the
  final evaluation and export. Nothing half-written stays: every write is atomic."""

  def handle(signum, _frame):
    raise Interrupted(f"{signal.Signals(signum).name} {when}; re-run the same command to "
                      f"resume")

  old = {}
  for sig in (signal.SIGINT, signal.SIGTERM):
    try:
      old[sig] = signal.signal(sig, handle)
    except ValueError:  # not the main thread
      pass
  try:
    yield
  finally:
    for sig, h in old.items():
      signal.signal(sig, h)


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


def budget_target(cfg: TrainConfig, params, batch_stats, num_classes, ds_stats) -> float:
  """The run's budget in average bits per quantized weight, scale storage included.

  ``budget_bytes`` is converted with the file's own overhead (prefix, header and checksum:
  :func:`lqjax.compress.overhead_bytes`) and its float tensors at their size.
  """
  if cfg.budget_bits is not None:
    return float(cfg.budget_bits)
  variables = model_variables(jax.device_get(params), jax.device_get(batch_stats))
  return budget.target_bits_for_bytes(variables, cfg.budget_bytes, compress.overhead_bytes(
      variables, run_meta(cfg, num_classes, ds_stats)))


def check_model(cfg: TrainConfig, model, sample, num_classes, ds_stats):
  """Everything about the model that can be refused before the workdir is claimed: its
  rules and granularities (an abstract init: shapes only, no compute) and the budget."""
  jax.eval_shape(lambda: model.init(jax.random.key(cfg.seed), sample, train=False))
  check_budget(cfg, model, sample, num_classes, ds_stats)


def check_budget(cfg: TrainConfig, model, sample, num_classes, ds_stats):
  """Refuses, before any compute, a budget below what the model's least grids take."""
  if not cfg.budget:
    return
  variables = model.init(jax.random.key(cfg.seed), sample, train=False)
  target = budget_target(cfg, variables["params"], variables.get("batch_stats", {}),
                         num_classes, ds_stats)
  floor = budget.floor_bits(variables["params"])
  if target < floor:
    what = (f"--budget_bits={cfg.budget_bits:g}" if cfg.budget_bits is not None else
            f"--budget_bytes={cfg.budget_bytes} ({target:.3f} bits per weight after the header "
            f"and float tensors)")
    least = "1 bit per weight under --rounding=floor" if cfg.rounding == "floor" else \
        "pruned groups under --rounding=round"
    raise budget.BudgetError(f"{what} is below the {floor:.3f} bits per weight that the model's "
                             f"least grids take ({cfg.model}, {cfg.granularity} scales, "
                             f"{least}); ask for more, use coarser --granularity"
                             + (" or --rounding=round" if cfg.rounding == "floor" else ""))


def scale_phase_epochs(cfg: TrainConfig) -> int:
  """The epoch at whose end the scale phase (``scale_decay_fraction`` of the run) ends."""
  return max(1, round(cfg.scale_decay_fraction * cfg.epochs))


def _budget_step(cfg, state, meta, epoch, fisher_fn, target):
  """The run's size budget at the end of `epoch`: :class:`lqjax.budget.Schedule` over the
  scale phase. Returns ``(state, meta, event)``."""
  if not cfg.budget:
    return state, meta, None
  sched = budget.Schedule(target, scale_phase_epochs(cfg))
  start = meta.setdefault("budget_start_bits", budget.budget_bits_of(state.params))
  params, opt_state, info = sched.update(
      budget.ScheduleState(start), epoch, state.params, state.opt_state,
      lambda: fisher_fn(state.params, state.batch_stats))
  if info is None:
    return state, meta, None
  params = jax.device_put(params, jax.tree_util.tree_leaves(state.params)[0].sharding)
  if info["freeze"]:
    meta = dict(meta, frozen_at=epoch)
  event = (f"budget {info['budget']:.3f} bits: {info['before']:.3f} -> {info['after']:.3f} "
           f"({info['groups_moved']} groups moved)" + ("; grids frozen" if info["freeze"] else ""))
  return state.replace(params=params, opt_state=opt_state), meta, event


def _end_epoch(cfg, ds, state, meta, epoch, evaluate, bits_fn, ratio_fn, fisher_fn, t_start):
  """An epoch's end (1-based `epoch`): the size budget's projection, the validation
  accuracy, bits and r statistics, the brake. Returns ``(state, meta, metrics row)``."""
  stats = (ds.mean, ds.std)
  state, meta, budget_event = _budget_step(
      cfg, state, meta, epoch, fisher_fn,
      budget_target(cfg, state.params, state.batch_stats, ds.num_classes, stats)
      if cfg.budget else None)
  val_acc, val_loss = evaluate(state.params, state.batch_stats, ds.val)
  avg, per_layer = bits_fn(state.params) if not cfg.float_model else (32.0, {})
  r_stats = {} if cfg.float_model else jax.tree_util.tree_map(float, ratio_fn(
      state.params, state.batch_stats, ds.val.image[:500], ds.val.label[:500]))
  state, meta, event = _scale_stop(cfg, state, meta, val_acc, epoch)
  row = {"epoch": epoch, "step": int(state.step),
         "train_loss": meta["loss_sum"] / max(meta["steps_in_epoch"], 1),
         "train_accuracy": meta["acc_sum"] / max(meta["steps_in_epoch"], 1),
         "val_accuracy": val_acc, "val_loss": val_loss, "avg_bits": float(avg),
         "bits_per_layer": {k: float(v) for k, v in per_layer.items()},
         "ratio_r": r_stats, "scale_mult": float(optim.scale_mult(state.opt_state)),
         "seconds": time.time() - t_start,
         **({"scale_stop": event} if event else {}),
         **({"budget": budget_event} if budget_event else {})}
  return state, meta, row


def _check_losses(loss, step0, epoch, first, mngr, workdir):
  """Stops the run at a chunk's first non-finite or exploding loss (EXPLODE_FACTOR times
  the first step's), saying which checkpoint is kept."""
  limit = max(EXPLODE_FACTOR * abs(first), EXPLODE_FACTOR)
  bad_mask = ~np.isfinite(loss) | (np.abs(loss) > limit)
  if not np.any(bad_mask):
    return
  bad = step0 + int(np.argmax(bad_mask))
  value = loss[bad - step0]
  what = f"became {value}" if not np.isfinite(value) else \
      f"exploded to {value:.3g} (it started at {first:.3g})"
  kept = (f"the checkpoint of step {mngr.latest_step()} in {workdir / 'checkpoints'} is kept"
          if mngr.latest_step() is not None else
          "no checkpoint was saved yet (the first is written at the end of epoch 1)")
  mngr.close()
  raise TrainingError(f"loss {what} at step {bad} (epoch {epoch + 1}); stopped, {kept}: "
                      f"lower --lr or --scale_lr")


def _interrupted(signame, state, workdir) -> Interrupted:
  return Interrupted(f"{signame} at step {int(state.step)}: checkpoint saved in "
                     f"{workdir / 'checkpoints'}; re-run the same command to resume")


def train_and_evaluate(cfg: TrainConfig, workdir, data_dir: Optional[str] = None,
                       progress: bool = True, after_train=None, model=None,
                       mesh: Optional[str] = None) -> dict:
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
    mesh: ``"data:4,fsdp:2"``: the device mesh (:func:`lqlab.distributed.parse_mesh`);
      None: data parallel over every device. Not part of the run's config: a run
      resumes on another mesh.
  """
  workdir = pathlib.Path(workdir)
  if not workdir.parent.is_dir():
    raise FileNotFoundError(f"workdir parent {workdir.parent} does not exist")
  if workdir.exists() and not workdir.is_dir():
    raise FileNotFoundError(f"workdir {workdir} is a file, not a directory; use a new --workdir")
  cfg_path = workdir / "config.json"
  if cfg_path.exists():
    _check_same_run(cfg, workdir)

  with _stop_on_signal("while loading the data and building the model (nothing was trained "
                       "yet in this call)"):
    return _train(cfg, workdir, data_dir, progress and distributed.is_main(), after_train,
                  model, mesh)


def _train(cfg, workdir, data_dir, progress, after_train, model, mesh):
  # Nothing is written until the config is valid and the data loaded.
  layout = distributed.make_layout(mesh)
  devices = jax.devices()
  if cfg.batch_size % len(devices):
    raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {len(devices)} devices")
  # several processes: each holds only its devices' shard of the training examples
  place_train = (lambda x: distributed.shard_examples(x, layout)) \
      if jax.process_count() > 1 else None
  ds = data.load(cfg.dataset, data_dir, limit=cfg.limit, sharding=layout.replicated,
                 place_train=place_train)
  n_train = len(ds.train)
  steps_per_epoch = n_train // cfg.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"batch_size {cfg.batch_size} exceeds the {n_train} training examples")

  check_model(cfg, build_model(cfg, ds.num_classes) if model is None else model,
              ds.train.image[:1].astype(jnp.float32), ds.num_classes, (ds.mean, ds.std))

  try:
    if distributed.is_main():  # the others work in the folder process 0 holds
      workdir.mkdir(exist_ok=True)
      lock = files.lock_dir(workdir)
    else:
      lock = contextlib.nullcontext()
    distributed.barrier("lqlab_workdir")
  except files.LockedError as e:
    raise TrainingError(f"workdir {e}") from None
  except PermissionError:
    raise TrainingError(f"workdir {workdir} is not writable; use a writable --workdir") from None
  except OSError as e:
    raise TrainingError(f"workdir {workdir}: {e.strerror or e}") from None
  try:
    return _train_locked(cfg, workdir, ds, devices, layout, steps_per_epoch,
                         progress, after_train, model)
  finally:
    if distributed.is_main():
      lock.close()


def _check_same_run(cfg, workdir):
  """Refuses a workdir that holds another run, or this run with a shorter schedule."""
  # A field added after the run was made reads as its default, or as the value the runs
  # of that time had (config.LEGACY_VALUES, applied by TrainConfig.from_json).
  defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
              if f.name not in LEGACY_VALUES}
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
  if cfg.epochs != old["epochs"]:
    # the learning rates follow the schedule's length from the first step on: a longer or
    # shorter schedule is another run, and its record would replace this one's
    raise TrainingError(f"workdir {workdir} holds a {old['epochs']}-epoch run; --epochs="
                        f"{cfg.epochs} would relabel it (the schedule follows the epochs from "
                        f"the first step): use a new --workdir for another schedule")


def _train_locked(cfg, workdir, ds, devices, layout, steps_per_epoch,
                  progress, after_train, model):
  import orbax.checkpoint as ocp
  from tqdm import tqdm

  main = distributed.is_main()
  n_train = len(ds.train)
  stats = (ds.mean, ds.std)
  if main:
    files.write_json_atomic(workdir / "config.json", cfg.to_json())
    files.write_json_atomic(workdir / "data_stats.json",
                            {"mean": ds.mean, "std": ds.std, "num_classes": ds.num_classes})
  model = build_model(cfg, ds.num_classes) if model is None else model
  tx = make_optimizer(cfg, steps_per_epoch)
  sample = jnp.zeros((1,) + tuple(ds.train.image.shape[1:]), jnp.float32)
  state = init_state(cfg, model, tx, sample, layout, calibration_batch(cfg, ds, stats))
  state_sharding = layout.state_shardings(state)
  train_step = make_train_step(cfg, model, tx, stats)
  evaluate = make_eval_fn(cfg, model, stats, layout.batch)
  ratio_fn = make_ratio_stats_fn(cfg, model, stats)
  bits_fn = jax.jit(accounting.average_bits)
  fisher_fn = make_fisher_fn(cfg, model, stats, ds.train) if cfg.budget else None
  data_rng = jax.random.key(cfg.seed + 1)
  step_rng = jax.random.key(cfg.seed + 2)

  run_chunk = make_chunk_runner(cfg, train_step, steps_per_epoch, step_rng, layout.batch,
                                state_sharding)

  perm_fn = jax.jit(lambda e: data.epoch_permutation(data_rng, e, n_train))

  mngr = ocp.CheckpointManager(
      (workdir / "checkpoints").absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False))
  meta = {"loss_sum": 0.0, "acc_sum": 0.0, "steps_in_epoch": 0, "train_seconds": 0.0,
          "best_val": -1.0, "best_epoch": 0, "brakes": 0, "frozen_at": None}
  try:
    restored = checkpoints.restore_verified(mngr, workdir, state)
  except checkpoints.CheckpointError as e:
    raise TrainingError(str(e)) from None
  if restored is not None:
    state, meta = restored
  start_step = int(state.step)
  start_epoch = start_step // steps_per_epoch
  rows = [r for r in _read_metrics(workdir / "metrics.jsonl") if r["epoch"] <= start_epoch]
  total_steps = cfg.epochs * steps_per_epoch

  def save(state, meta):
    try:
      checkpoints.save(mngr, workdir, state, meta)
    except checkpoints.CheckpointError as e:
      raise TrainingError(str(e)) from None

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
        _check_losses(loss, step0, epoch, meta.get("first_loss", float(loss[0])), mngr, workdir)
        state = new_state
        meta["loss_sum"] += float(loss.sum())
        meta["acc_sum"] += float(np.asarray(m["accuracy"]).sum())
        meta["steps_in_epoch"] += n
        bar.update(n)
        if progress:  # the bits cost a pass over every weight and a host sync
          bits = float(bits_fn(state.params)[0]) if not cfg.float_model else 32.0
          bar.set_postfix(loss=f"{loss.mean():.3f}",
                          acc=f"{np.asarray(m['accuracy']).mean():.3f}", bits=f"{bits:.2f}")
        if distributed.any_process(sig.hit) and int(state.step) < (epoch + 1) * steps_per_epoch:
          meta["train_seconds"] = time.time() - t_start
          save(state, meta)
          mngr.close()
          bar.close()
          raise _interrupted(sig.hit or "a signal to another process", state, workdir)
      bar.close()
      state, meta, row = _end_epoch(cfg, ds, state, meta, epoch + 1, evaluate, bits_fn,
                                    ratio_fn, fisher_fn, t_start)
      rows.append(row)
      if main:
        files.write_jsonl_atomic(workdir / "metrics.jsonl", rows)
      meta = {**meta, "loss_sum": 0.0, "acc_sum": 0.0, "steps_in_epoch": 0,
              "train_seconds": time.time() - t_start}
      save(state, meta)
      if progress:
        print(f"epoch {epoch + 1}: train_loss {row['train_loss']:.4f} val_acc {row['val_accuracy']:.4f} "
              f"avg_bits {row['avg_bits']:.2f} ({row['seconds']:.0f}s)", flush=True)
      if distributed.any_process(sig.hit) and epoch + 1 < cfg.epochs:  # the epoch is saved
        mngr.close()
        raise _interrupted(sig.hit or "a signal to another process", state, workdir)
  mngr.close()
  if sig.hit:
    print(f"warning: {sig.hit} in the last epoch: the run is finishing (final evaluation and "
          f"export); a second signal stops it, and the same command then finishes it",
          file=sys.stderr, flush=True)
  with _stop_on_signal(f"during the final evaluation and export (training is complete: step "
                       f"{int(state.step)} is checkpointed)"):
    return _finish(cfg, workdir, ds, model, state, meta, evaluate, devices, stats, start_step,
                   total_steps, t_start, after_train, layout)


def _finish(cfg, workdir, ds, model, state, meta, evaluate, devices, stats, start_step,
            total_steps, t_start, after_train, layout):
  """The finished run's results (and its export), written last: results.json marks a run
  as done. Every process evaluates; process 0 alone exports and writes."""
  train_seconds = meta["train_seconds"] if start_step >= total_steps else time.time() - t_start

  extra = {}
  if cfg.budget:
    extra = {"budget_target_bits": budget_target(cfg, state.params, state.batch_stats,
                                                 ds.num_classes, stats),
             "budget_bits": budget.budget_bits_of(state.params)}
  host = distributed.fetch((state.params, state.batch_stats), layout)
  results = final_results(cfg, state.params, state.batch_stats, evaluate, ds, workdir,
                          train_seconds=train_seconds, devices=devices,
                          scales_frozen_at_epoch=meta.get("frozen_at"), host_variables=host,
                          mesh=",".join(f"{k}:{v}" for k, v in layout.sizes.items()),
                          processes=jax.process_count(), **extra)
  if not distributed.is_main():
    distributed.barrier("lqlab_finished")
    distributed.done()
    return results
  results_path = workdir / "results.json"
  if start_step >= total_steps and results_path.exists():
    try:
      before = files.read_json(results_path)
    except (OSError, ValueError):
      before = None
    if before is not None and before.get("test_accuracy") != results["test_accuracy"]:
      raise TrainingError(
          f"{results_path} says test accuracy {before.get('test_accuracy')}, but the finished "
          f"run's checkpoint now gives {results['test_accuracy']}: the checkpoint changed since; "
          f"{results_path} is kept as it was")
  if after_train is not None:
    if jax.process_count() > 1:  # process 0 alone: host copies, no collective
      state, ds = state.replace(params=host[0], batch_stats=host[1]), data.on_host(ds)
    results.update(after_train(cfg, model, state, ds, results))
  files.write_json_atomic(results_path, results)
  distributed.barrier("lqlab_finished")
  distributed.done()
  return results


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
  sample = jnp.zeros((1,) + data.image_shape(cfg.dataset))
  abstract = jax.eval_shape(lambda: init_state(cfg, model, tx, sample, None))
  mngr = ocp.CheckpointManager((workdir / "checkpoints").absolute())
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"{workdir} holds no checkpoint")
  damaged = (f"checkpoint step {step} in {workdir / 'checkpoints'} is damaged; re-run the "
             f"training command to fall back to the step before it")
  problem = checkpoints.verify(workdir, step)
  if problem:
    raise ValueError(f"{damaged} ({problem})")
  try:
    state = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))["state"]
  except Exception as e:  # orbax raises many kinds for an unreadable checkpoint
    raise ValueError(f"{damaged} ({type(e).__name__})") from None
  finally:
    mngr.close()
  return cfg, model, state, (tuple(ds["mean"]), tuple(ds["std"])), ds["num_classes"]

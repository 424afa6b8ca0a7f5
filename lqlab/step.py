"""The train state and one pure, jitted train step.

``train_step(state, batch, rng) -> (state, metrics)`` is built by
:func:`make_train_step` for a model and config; :func:`make_chunk_runner`
dispatches it step by step over a device-resident dataset (each step gathers the
next shuffled batch inside jit while it trains on the current one), data-parallel
over every device of a :class:`lqlab.distributed.Layout` (batch sharded over the
``data`` and ``fsdp`` mesh axes, parameters replicated or sharded over ``fsdp``). The model is the registry's float model quantized by lqjax rules.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lqjax
from lqjax import budget, losses, optim

from lqlab import data, models
from lqlab.config import TrainConfig

# One example's (H, W, C) per dataset: the shapes models are initialised with.


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  # An lqjax.optim.split state: it holds the scales' step multiplier (the brake's).
  opt_state: Any
  # The params at the best validation epoch so far (the brake rolls scales back to them).
  best_params: Any


def quant_rules(cfg: TrainConfig):
  """The lqjax rules of a run: every Dense and Conv, first and last included (those two
  at ``edge_bits`` on the midtread grid when it is set; the layers ``layer_bits`` names at
  their widths, on the run's grid).

  ``spatial`` granularity needs a conv kernel: Dense kernels under a ``spatial``
  kernel config are quantized per tensor instead. Under ``block`` the first layer, whose
  input is the image's few channels, is quantized per row.
  """
  kernel, bias = cfg.kernel_quant(), cfg.bias_quant()
  rules = []
  for layer, bits in cfg.layer_widths().items():
    rules.append(lqjax.Rule(re.escape(layer), dataclasses.replace(kernel, bits=bits),
                            bias=None if bias is None else dataclasses.replace(bias, bits=bits)))
  if cfg.edge_bits is not None:  # the literature's integer grid (midtread) at edge_bits
    edge = dict(bits=cfg.edge_bits, grid="midtread")
    rules.append(lqjax.Rule("|".join(models.MODEL_SPECS[cfg.model].edge_layers),
                            dataclasses.replace(kernel, **edge),
                            bias=None if bias is None else dataclasses.replace(bias, **edge)))
  if kernel.granularity == "block":  # the image's few input channels make no whole blocks
    first = models.MODEL_SPECS[cfg.model].edge_layers[0]
    rules.append(lqjax.Rule(re.escape(first), dataclasses.replace(
        kernel, granularity="row", block_size=None), bias=bias))
  if kernel.granularity == "spatial":
    rules.append(lqjax.Rule(models.MODEL_SPECS[cfg.model].dense_layers,
                            dataclasses.replace(kernel, granularity="tensor"),
                            bias=bias))
  rules.append(lqjax.Rule(".*", kernel, bias=bias))
  return _with_inputs(cfg, rules)


def _with_inputs(cfg: TrainConfig, rules):
  """`rules` with the run's input quantizers (``act_bits``; the first layer's input at
  ``act_first_bits``): a rule of its own for the first layer, with the recipe of the rule
  that decides it."""
  if cfg.input_quant() is None:
    return rules
  first = re.escape(models.MODEL_SPECS[cfg.model].edge_layers[0])
  path = models.MODEL_SPECS[cfg.model].edge_layers[0]
  decides = next(r for r in rules if re.fullmatch(r.module_path, path))
  out = [dataclasses.replace(r, inputs=cfg.input_quant()) for r in rules
         if r.module_path != first]
  return [dataclasses.replace(decides, module_path=first, inputs=cfg.input_quant(first=True))] + out


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
  # With updates every k steps (cfg.scale_every) the scales take a k times larger
  # step k times less often, so a run's total scale movement stays comparable; the
  # schedule counts scale updates.
  k = cfg.scale_every
  scale_sched = cfg.scale_lr * k if cfg.scale_schedule == "constant" else \
      optax.cosine_decay_schedule(cfg.scale_lr * k,
                                  max(int(cfg.scale_decay_fraction * total / k), 1))
  scale_tx = optax.sgd(scale_sched) if cfg.scale_optimizer == "sgd" else optax.adam(scale_sched)
  return optim.split(weight_tx, scale_tx)


def _preprocess(cfg, ds_stats, images, rng, train):
  if train and cfg.use_augment:
    images = data.random_crop_flip(rng, images)
  return data.normalize(images, *ds_stats)


def make_train_step(cfg: TrainConfig, model, tx, ds_stats,
                    order_after_scales: Optional[bool] = None):
  """Returns the pure ``train_step(state, batch, rng, scale_step=True) -> (state, metrics)``.

  ``scale_step=False`` (a Python bool: jit it as a static argument) trains the
  weights only: the log scales are under ``stop_gradient`` in the loss, so the
  compiled step holds none of the scale gradient's per-group reductions, and the
  scales and their optimizer state stay as they are. The forward quantization
  is the same.

  `order_after_scales`: the `order` of :func:`lqjax.optim.apply_updates` (same values,
  scheduling only); None: by each tensor's rule.
  """

  def loss_fn(params, batch_stats, images, labels, scale_step):
    if not scale_step:
      params = optim.stop_scale_gradients(params)
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

  def train_step(state: TrainState, batch, rng, scale_step: bool = True):
    images, labels = batch
    images = _preprocess(cfg, ds_stats, images, rng, train=True)
    grads, (bs, ce, acc) = jax.grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, images, labels, scale_step)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, scale_step=scale_step)
    params = optim.apply_updates(state.params, updates, scale_step=scale_step,
                                 order=order_after_scales)
    metrics = {"loss": ce, "accuracy": acc}
    return state.replace(step=state.step + 1, params=params, batch_stats=bs,
                         opt_state=opt_state), metrics

  return train_step


def eval_loss(cfg: TrainConfig, model, ds_stats):
  """``loss(params, batch_stats, images, labels)``: the mean cross-entropy in evaluation
  mode (no augmentation, running batch statistics)."""

  def loss(params, batch_stats, images, labels):
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    logits = model.apply(variables, _preprocess(cfg, ds_stats, images, None, False), train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return loss


def first_batches(split, batch_size: int, batches: int) -> list:
  """The first `batches` (at least one) whole batches of `split` as ``(images, labels)``."""
  n = min(batches, max(1, len(split) // batch_size))
  return [(split.image[i * batch_size:(i + 1) * batch_size],
           split.label[i * batch_size:(i + 1) * batch_size]) for i in range(n)]


def make_ratio_stats_fn(cfg: TrainConfig, model, ds_stats):
  """Jitted ``fn(params, batch_stats, images, labels) -> {layer: r quantiles}``.

  r_G = ||dL/dP||_G / ||P||_G per scale group on one batch (the quantity the
  ratio rules compare with lambda); reports its 10/50/90th percentiles and the
  fraction of groups below lambda (the groups whose grid is coarsening)
  (:func:`lqjax.optim.ratio_stats`).
  """

  ce = eval_loss(cfg, model, ds_stats)

  @jax.jit
  def fn(params, batch_stats, images, labels):
    grads = jax.grad(ce)(params, batch_stats, images, labels)
    return optim.ratio_stats(params, grads, cfg.threshold)

  return fn


def make_fisher_fn(cfg: TrainConfig, model, ds_stats, split, batches: int = 8):
  """``fn(params, batch_stats) -> tree of summed squared gradients`` (the empirical
  Fisher's diagonal, :func:`lqjax.budget.squared_gradients`) of the cross-entropy on
  the first `batches` batches of `split` (evaluation mode, no augmentation)."""

  grad = jax.jit(jax.grad(eval_loss(cfg, model, ds_stats)))
  chunks = first_batches(split, cfg.batch_size, batches)

  def fn(params, batch_stats):
    return budget.squared_gradients(lambda p, b: grad(p, batch_stats, *b), params, chunks)

  return fn


def learns_scales(cfg: TrainConfig) -> bool:
  """Whether a run's scales have a gradient (not float, not the fixed rule)."""
  return not cfg.float_model and cfg.rule != "fixed"


def scale_step_at(cfg: TrainConfig, step: int) -> bool:
  """Whether step `step` updates the scales: every ``scale_every``-th step of a run whose
  scales learn. The fixed rule's steps are all weights-only (its scale gradient is zero,
  so skipping the scales' optimizer changes no value)."""
  return learns_scales(cfg) and optim.is_scale_step(step, cfg.scale_every)


def make_chunk_runner(cfg: TrainConfig, train_step, steps_per_epoch: int, step_rng,
                      batch_sharding=None, state_sharding=None):
  """Returns ``run_chunk(state, perm, images, labels, n) -> (state, stacked metrics)``.

  `state_sharding` (a tree of shardings for the train state, e.g. FSDP's) keeps each
  step's new state where the old one was.

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

  # two compiled steps when the scales update every k > 1 steps: the scale step
  # (scale_step=True) and the weights-only step, chosen here on the host
  @functools.partial(jax.jit, donate_argnums=(0,), static_argnames=("scale_step",))
  def step_at(state, batch, perm, images, labels, scale_step):
    next_batch = gather(perm, images, labels, state.step + 1)
    state, metrics = train_step(state, batch, jax.random.fold_in(step_rng, state.step),
                                scale_step=scale_step)
    if state_sharding is not None:
      state = jax.lax.with_sharding_constraint(state, state_sharding)
    return state, metrics, next_batch

  # one dispatch for the chunk's metrics: an eager jnp.stack dispatches once per step and
  # metric, which a GPU step of a small model (~0.2 ms) feels
  stack = jax.jit(lambda ms: jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *ms))

  def run_chunk(state, perm, images, labels, n_steps):
    batch = first_batch(perm, images, labels, state.step)
    step0 = int(state.step) if learns_scales(cfg) and cfg.scale_every > 1 else 0  # one read
    ms = []
    for i in range(n_steps):
      state, m, batch = step_at(state, batch, perm, images, labels,
                                scale_step=scale_step_at(cfg, step0 + i))
      ms.append(m)
    return state, stack(ms)

  return run_chunk


def calibration_batch(cfg, ds, stats):
  """The normalised first batch of epoch 0 (the loop's shuffle), which sets the input
  quantizers' ranges (:func:`lqjax.calibrate`); None for a run without ``act_bits``."""
  if cfg.input_quant() is None:
    return None
  first = np.asarray(data.epoch_permutation(jax.random.key(cfg.seed + 1), 0, len(ds.train)))
  return data.normalize(jnp.asarray(ds.train.image[np.sort(first[:cfg.batch_size])]), *stats)


def init_state(cfg, model, tx, sample, sharding, calibration=None):
  """The run's initial train state; `sharding`: None (the default device), one sharding
  for every array, or a :class:`lqlab.distributed.Layout` (FSDP shardings per array).
  `calibration`: a normalised batch that sets the input quantizers' ranges
  (:func:`lqjax.calibrate`; runs with ``act_bits``)."""
  rng = jax.random.key(cfg.seed)
  variables = model.init(rng, sample, train=False)
  if calibration is not None and cfg.input_quant() is not None:
    variables = lqjax.calibrate(model, variables, calibration, train=False)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  state = TrainState(jnp.zeros((), jnp.int32), params, batch_stats, tx.init(params),
                     jax.tree_util.tree_map(jnp.copy, params))
  if sharding is None:
    return state
  if hasattr(sharding, "state_shardings"):
    sharding = sharding.state_shardings(state)
  return jax.device_put(state, sharding)


def data_shardings():
  """(devices, replicated, batch-sharded): the data-parallel layout over every device."""
  from lqlab import distributed
  layout = distributed.make_layout()
  return jax.devices(), layout.replicated, layout.batch

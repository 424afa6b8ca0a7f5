"""Pieces for your own training loop: the weights/scales split, the brake, diagnostics.

All of them are pure and work on any tree that :func:`lqjax.quantize` produces:
Linen params (log scales boxed with their recipe) and ``nnx.State`` (or what
``nnx.Optimizer`` hands an optax transform).

* :func:`split`: an optax transform that updates weights with one transform
  and log scales with another (``optax.multi_transform`` under labels taken
  from the tree), optionally with the scales' step scaled by a multiplier held
  in the optimizer state (the brake sets it).
* :class:`Brake` / :func:`brake_update`: the validation brake of the stable
  ratio variant, called from the user's own evaluation.
* :func:`ratio_stats`: r_G = ||dL/dP||_G / ||P||_G per group, from params and
  grads, the quantity the ratio rule compares with lambda.
* :func:`apply_updates`: ``optax.apply_updates`` that orders each lsq weight's update
  after its scale's, so that a donated step copies no quantized weight.
* Amortised scale updates: :func:`stop_scale_gradients` inside the loss and
  ``tx.update(..., scale_step=False)`` make a step that trains the weights
  only, so that the compiled step holds none of the scale gradient's per-group
  reductions (:func:`is_scale_step` says which steps update the scales).

Example (Linen)::

    >>> tx = lqjax.optim.split(optax.adam(1e-3), optax.sgd(0.02))
    >>> opt_state = tx.init(params)
    >>> updates, opt_state = tx.update(grads, opt_state, params)
    >>> params = lqjax.optim.apply_updates(params, updates)

Updating the scales every ``k`` steps (two compiled steps, the choice made
outside jit; multiply the scales' learning rate by ``k``, so that a run's total
scale movement stays comparable)::

    >>> @functools.partial(jax.jit, static_argnames="scale_step")
    ... def step(params, opt_state, batch, scale_step):
    ...   def loss(p):
    ...     if not scale_step:
    ...       p = lqjax.optim.stop_scale_gradients(p)
    ...     return loss_fn(p, batch)
    ...   grads = jax.grad(loss)(params)
    ...   updates, opt_state = tx.update(grads, opt_state, params, scale_step=scale_step)
    ...   params = lqjax.optim.apply_updates(params, updates, scale_step=scale_step)
    ...   return params, opt_state
    >>> for i, batch in enumerate(batches):
    ...   params, opt_state = step(params, opt_state, batch,
    ...                            lqjax.optim.is_scale_step(i, k))
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from lqjax import qconfig, quant, tree

WEIGHT, SCALE = "weight", "scale"


def labels(params):
  """``"scale"`` for every log-scale leaf of `params`, ``"weight"`` for the rest."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: SCALE if tree.is_scale_path(path) else WEIGHT, params)


class ScaleMultState(NamedTuple):
  """The multiplier of the scales' updates (1; halved by each brake; 0: frozen)."""

  mult: jax.Array


def scale_by_mult() -> optax.GradientTransformation:
  """Multiplies updates by a scalar kept in the state (:class:`ScaleMultState`)."""

  def init(params):
    del params
    return ScaleMultState(jnp.ones((), jnp.float32))

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(lambda u: u * state.mult.astype(u.dtype), updates), state

  return optax.GradientTransformation(init, update)


def skippable(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """`inner`, skipped on the updates called with ``scale_step=False``.

  A skipped update returns zero updates and leaves `inner`'s state as it was
  (its step count and moments do not advance). ``scale_step`` must be a Python
  bool: the choice is made outside jit, so that each of the two compiled steps
  holds only its own work.
  """
  inner = optax.with_extra_args_support(inner)

  def update(updates, state, params=None, *, scale_step=True, **extra_args):
    if not isinstance(scale_step, bool):
      raise TypeError(f"scale_step must be a Python bool (the choice is made outside jit), "
                      f"got {type(scale_step).__name__}")
    if scale_step:
      return inner.update(updates, state, params, **extra_args)
    return jax.tree_util.tree_map(jnp.zeros_like, updates), state

  return optax.GradientTransformationExtraArgs(inner.init, update)


def split(weights_tx: optax.GradientTransformation,
          scales_tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Weights through `weights_tx`, log scales through ``chain(scales_tx, scale_by_mult())``.

  The scales' step multiplier lives in the state and is what :func:`set_scale_mult`
  (and so the brake) changes; it starts at 1, so until a brake the transform is
  exactly ``multi_transform({weight: weights_tx, scale: scales_tx})``.

  ``update(grads, state, params, scale_step=False)`` updates the weights only:
  the scales, their optimizer state and its step count stay as they are
  (:func:`skippable`). Pair it with :func:`stop_scale_gradients` in the loss.
  """
  return optax.multi_transform(
      {WEIGHT: weights_tx, SCALE: skippable(optax.chain(scales_tx, scale_by_mult()))}, labels)


#: Rules whose weights :func:`apply_updates` updates after their scales by default: where
#: it was measured to pay (benchmarks/bench_ordering.py, LeNet-300-100 on a 2-core CPU,
#: quantized/float step time: lsq 1.36-1.40 -> 1.18-1.23; ratio 1.09-1.10 -> 1.16-1.23,
#: and the ratio rules order their read of P inside the quantizer instead).
ORDER_AFTER_SCALES = ("lsq",)


def apply_updates(params, updates, *, scale_step: bool = True, order: Optional[bool] = None):
  """``optax.apply_updates``, with each quantized weight's update ordered after its scale's.

  A donated step updates a weight in place. The lsq rule's scale gradient reads the old
  weight in a fusion that the weight's own update does not depend on, so XLA copies every
  quantized weight at the start of the step to keep that read valid (about 1 MB per step
  for LeNet-300-100's first layer). Adding ``0.0 * new_log_scale[0]`` makes the weight's
  update depend on the scale's, which XLA then schedules first, and the copies go. The
  values do not change: a finite log scale times 0.0 is 0.0. (``lax.optimization_barrier``
  does not help: XLA:CPU removes it before fusion.) The ratio rules need none of this:
  they read ||P|| in the forward pass (:mod:`lqjax.quant`).

  Args:
    params, updates: as for ``optax.apply_updates`` (Linen params or ``nnx.State``).
    scale_step: False in a weights-only step (no scale gradient: nothing to order).
    order: None: the tensors whose rule is in :data:`ORDER_AFTER_SCALES`; True: every
      quantized tensor; False: none.
  """
  new = optax.apply_updates(params, updates)
  if not scale_step or order is False:
    return new
  ordered = {t.path: t.p + 0.0 * t.log_scale.reshape(-1)[0]
             for t in tree.quantized_tensors(new)
             if order or t.config.rule in ORDER_AFTER_SCALES}
  return tree.replace_arrays(new, ordered) if ordered else new


def stop_scale_gradients(params):
  """`params` with every log scale under ``lax.stop_gradient``.

  Called inside the loss of a weights-only step: the scales' cotangent is then
  zero by construction, and XLA drops the quantizer's per-group reductions (the
  LSQ sum, the ratio rule's norms) from the compiled step. The forward
  quantization is unchanged.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jax.lax.stop_gradient(x) if tree.is_scale_path(path) else x, params)


def is_scale_step(step: int, every: int) -> bool:
  """Whether step `step` (0-based) updates the scales when they update every `every` steps."""
  if every < 1:
    raise ValueError(f"scale updates every {every} steps: expected >= 1")
  return int(step) % every == 0


def _is_mult(x):
  return isinstance(x, ScaleMultState)


def scale_mult(opt_state) -> jax.Array:
  """The scales' current step multiplier in an optimizer state made by :func:`split`."""
  found = [x.mult for x in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_mult)
           if _is_mult(x)]
  if len(found) != 1:
    raise ValueError("the optimizer state holds no lqjax.optim.split multiplier")
  return found[0]


def set_scale_mult(opt_state, mult):
  """`opt_state` with the scales' step multiplier set to `mult`."""
  return jax.tree_util.tree_map(
      lambda x: ScaleMultState(jnp.asarray(mult, jnp.float32)) if _is_mult(x) else x,
      opt_state, is_leaf=_is_mult)


def select(params, other, what: str = SCALE):
  """`params` with its scale (or, ``what="all"``, every) leaf taken from `other`."""
  return jax.tree_util.tree_map(
      lambda lab, cur, o: o if what == "all" or lab == SCALE else cur,
      labels(params), params, other)


# ------------------------------------------------------------ the validation brake


@dataclasses.dataclass(frozen=True)
class Brake:
  """The validation brake of the stable ratio variant.

  Tracks the best validation accuracy and the parameters it was reached with.
  When an evaluation falls more than `tolerance` below the best, the scales
  (``restore="scales"``) or all parameters (``"all"``) roll back to the best and
  the scales' step halves; after `max_brakes` brakes the scales freeze. The
  scale updates therefore shrink geometrically once coarsening starts to cost
  accuracy, whatever the schedule length.
  """

  tolerance: float = 0.002
  max_brakes: int = 4
  restore: str = "scales"

  def __post_init__(self):
    if not self.tolerance >= 0:
      raise ValueError(f"brake tolerance must be >= 0, got {self.tolerance}")
    if self.max_brakes < 1:
      raise ValueError(f"max_brakes must be >= 1, got {self.max_brakes}")
    if self.restore not in ("scales", "all"):
      raise ValueError(f"unknown brake restore {self.restore!r}; expected scales or all")


class BrakeState(NamedTuple):
  best: float
  best_step: int
  brakes: int
  best_params: Any


def brake_init(params) -> BrakeState:
  return BrakeState(-float("inf"), 0, 0, jax.tree_util.tree_map(jnp.copy, params))


def brake_update(brake: Brake, state: BrakeState, params, opt_state, val_accuracy: float,
                 step: int = 0, unit: str = "step"):
  """One brake decision after an evaluation.

  Args:
    brake: the settings.
    state: from :func:`brake_init` or the previous call.
    params: the current parameters.
    opt_state: the optimizer state of a :func:`split` transform.
    val_accuracy: this evaluation's accuracy (higher is better).
    step: a label of this evaluation (epoch or step), kept with the best.
    unit: what `step` counts, for the event's sentence.

  Returns:
    ``(state, params, opt_state, event)``: `event` is None, or a sentence that
    says what was rolled back and the new scale step multiplier.
  """
  mult = float(scale_mult(opt_state))
  if mult == 0.0:
    return state, params, opt_state, None
  if val_accuracy > state.best:
    return state._replace(best=float(val_accuracy), best_step=step,
                          best_params=jax.tree_util.tree_map(jnp.copy, params)), \
        params, opt_state, None
  if val_accuracy >= state.best - brake.tolerance:
    return state, params, opt_state, None
  n = state.brakes + 1
  new_mult = 0.0 if n >= brake.max_brakes else 0.5 ** n
  params = select(params, jax.tree_util.tree_map(jnp.copy, state.best_params), brake.restore)
  event = (f"val accuracy {val_accuracy:.4f} < best {state.best:.4f} ({unit} "
           f"{state.best_step}) - {brake.tolerance}: "
           f"{'parameters' if brake.restore == 'all' else 'scales'} rolled back to {unit} "
           f"{state.best_step}, scale step x{new_mult}")
  return state._replace(brakes=n), params, set_scale_mult(opt_state, new_mult), event


# ------------------------------------------------------------ diagnostics


def ratio_stats(params, grads, threshold: Optional[float] = None):
  """r_G = ||dL/dP||_G / ||P||_G per scale group of every quantized tensor.

  Args:
    params: the parameters (any quantized tree).
    grads: dL/dP of the same structure (e.g. from ``jax.grad``).
    threshold: lambda to compare with; None: each tensor's own config threshold.

  Returns:
    ``{tensor path: {"p10", "p50", "p90", "frac_below"}}``: quantiles of r and the
    fraction of groups below lambda (the groups whose grid is coarsening).
  """
  gflat = tree.flat_leaves(grads)
  out = {}
  for t in tree.quantized_tensors(params):
    lam = t.config.threshold if threshold is None else threshold
    pshape, sshape = qconfig.grouped_shapes(t.p.shape, t.log_scale.shape)
    _, r = quant.ratio_growth(jnp.reshape(gflat[t.path][0], pshape), jnp.reshape(t.p, pshape),
                              sshape, lam)
    r = r.reshape(-1)
    out[t.name] = {"p10": jnp.percentile(r, 10), "p50": jnp.percentile(r, 50),
                   "p90": jnp.percentile(r, 90), "frac_below": jnp.mean(r < lam)}
  return out

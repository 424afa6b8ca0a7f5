"""Size budgets: move scale groups' grids so that a model meets a size exactly.

The learned rules decide where bits go as training runs; they do not aim at a
size. :func:`project` takes a model's current grids (one bit width per scale
group) and moves the fewest, least sensitive groups up or down until the
model's average bits per quantized weight, scale storage included, meets a
target. Training with a budget (``lqlab``'s ``--budget_bits`` /
``--budget_bytes``) projects at epoch ends onto a budget that falls from the
model's size to the target over the scale phase, then a last time exactly, and
fine-tunes the weights on the frozen grids for the rest of the run.

The cost of a group's grid is the loss increase that its rounding noise is
expected to cause, from the empirical Fisher (a sum of squared gradients over a
few batches, :func:`squared_gradients`): with step s, rounding adds noise of
variance s^2/12 to each weight, so ``cost_G(b) = F_G * s_b^2 / 12`` with F_G
the group's summed squared gradient and s_b the smallest step whose grid spans
the group in 2^b codes. At 0 bits every code is 0 (the group is pruned) and the
cost is ``F_G * mean(P^2)``. Coarsening takes the group with the smallest cost
increase per bit saved; refining the one with the largest decrease per bit
spent (greedy marginal analysis; the cost is convex in b, so each group's steps
come in order). Every group then gets the smallest step for its bit width, which
uses its whole code range; pruned groups share one step (:data:`PRUNED_LOG_SCALE`),
which the entropy-coded file then stores almost for free.

The budget counts every quantized tensor's code bits plus
:data:`OVERHEAD_BITS` per scale group (the float32 scale, int32 offset and
uint8 width the packed file stores), over the quantized weights' count.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lqjax import accounting, qconfig, quant, tree

OVERHEAD_BITS = 8 * accounting.GROUP_OVERHEAD_BYTES
# The widest grid a refinement gives a group.
MAX_BITS = 16
# log s of every pruned group (s ~ 4.9e8: every weight of any trained model rounds to 0).
PRUNED_LOG_SCALE = 20.0


class BudgetError(ValueError):
  """A budget that cannot be met (below what the scales alone cost, or no learned scales)."""


@dataclasses.dataclass
class _Groups:
  """One quantized tensor's scale groups: range, size and sensitivity per group."""

  qt: tree.QTensor
  lo: np.ndarray
  hi: np.ndarray
  n: int  # elements per group
  fisher: np.ndarray  # summed squared gradient per group
  msq: np.ndarray  # mean P^2 per group (the cost of pruning it)
  bits: np.ndarray  # current bit width per group


def _round_fn(rounding):
  return np.floor if rounding == "floor" else np.round


def _span(lo, hi, s, rounding):
  f = _round_fn(rounding)
  return f(hi / s) - f(lo / s) + 1


def _bits_of_span(span):
  return accounting.code_bits(0, np.maximum(span, 1) - 1)


def min_step(lo, hi, bits, rounding):
  """The smallest step whose grid spans [lo, hi] (per group) in 2^bits codes.

  0 bits: every value rounds to code 0 (the group is pruned).
  """
  lo, hi, bits = np.asarray(lo, np.float64), np.asarray(hi, np.float64), np.asarray(bits)
  levels = np.exp2(bits.astype(np.float64))
  width = np.maximum(hi - lo, 0.0)
  amp = np.maximum(np.abs(lo), np.abs(hi))
  s = np.where(bits > 0, width / np.maximum(levels - 1, 1), 2.0 * amp)
  s = np.where(s > 0, s, np.where(amp > 0, amp, 1.0))  # single-valued groups: any step
  s = s * (1 + 1e-6)
  for _ in range(60):  # rounding ties and float error: widen until the codes fit
    over = _span(lo, hi, s, rounding) > levels
    if not np.any(over):
      break
    s = np.where(over, s * (1 + 1e-4), s)
  return s.astype(np.float32)


def _groups(params, fisher_flat) -> list:
  out = []
  for t in tree.quantized_tensors(params):
    if t.config.bits is not None or t.config.rule == "fixed":
      continue
    pshape, sshape = qconfig.grouped_shapes(t.p.shape, t.log_scale.shape)
    p = np.asarray(t.p, np.float64).reshape(pshape)
    axes = qconfig.shared_axes(pshape, sshape)
    red = (lambda f, x: f(x, axis=axes, keepdims=True).reshape(-1)) if axes else \
        (lambda f, x: x.reshape(-1))
    f2 = fisher_flat.get(t.path) if fisher_flat is not None else None
    f2 = np.ones_like(p) if f2 is None else np.asarray(f2, np.float64).reshape(pshape)
    s = np.asarray(quant.scale_from_log(t.log_scale), np.float64).reshape(-1)
    lo, hi = red(np.min, p), red(np.max, p)
    out.append(_Groups(t, lo, hi, p.size // max(s.size, 1), red(np.sum, f2),
                       red(np.mean, p * p), _bits_of_span(_span(lo, hi, s, t.config.rounding))))
  return out


def _least(g: _Groups) -> int:
  """The fewest bits a group's grid can have: 0 (pruned) under round-to-nearest; 1 under
  floor, where values of both signs never share a code."""
  return 0 if g.qt.config.rounding == "round" else 1


def _cost(g: _Groups, i: int, b: int) -> float:
  if b == 0:
    return float(g.fisher[i] * g.msq[i])
  s = (g.hi[i] - g.lo[i]) / (2.0 ** b - 1)
  return float(g.fisher[i] * s * s / 12.0)


def size_bits(params) -> tuple:
  """(code bits, scale groups, quantized weights) of `params`, as the packed file counts them."""
  rows = [r for r in accounting.model_report(params) if r.quantized]
  code = sum(r.bits_mean * r.elements for r in rows)
  return code, sum(r.groups for r in rows), sum(r.elements for r in rows)


def budget_bits_of(params) -> float:
  """Average bits per quantized weight, scale storage included (what ``target_bits`` counts)."""
  code, groups, n = size_bits(params)
  return (code + OVERHEAD_BITS * groups) / max(n, 1)


def _least_code_bits(code, gs) -> int:
  """The code bits of a model whose every learned-scale group is at its fewest bits
  (:func:`_least`), the tensors a budget does not move counted as they are."""
  movable = sum(int(np.sum(g.bits)) * g.n for g in gs)
  least = sum(int(np.sum(np.minimum(g.bits, _least(g)))) * g.n for g in gs)
  return code - movable + least


def floor_bits(params) -> float:
  """The least average bits a budget can ask of `params`, scale storage included.

  Every learned-scale group at its fewest bits: 0 (pruned) under round-to-nearest, 1
  under floor rounding (values of both signs never share a code), plus the scales' storage;
  fixed-bit tensors count as they are.
  """
  code, n_groups, n_q = size_bits(params)
  return (OVERHEAD_BITS * n_groups + _least_code_bits(code, _groups(params, None))) / max(n_q, 1)


def project(params, target_bits: float, fisher=None, *, coarsen_only: bool = False):
  """Moves groups' grids so that :func:`budget_bits_of` is at most `target_bits`, as close as
  the groups' sizes allow.

  Args:
    params: a quantized tree (Linen params with boxed scales, or ``nnx.State``).
    target_bits: average bits per quantized weight, scale storage included.
    fisher: a tree like `params` holding each weight's summed squared gradient
      (:func:`squared_gradients`); None: every weight counts alike (the cost of a
      group's grid is then its rounding noise alone).
    coarsen_only: only take bits away (a model already under the target is
      returned as it is).

  Returns:
    ``(params, info)``: the tree with new log scales for the learned-scale tensors
    (fixed-bit tensors are left alone and their bits count as they are), and
    ``{"before", "after", "target", "groups_moved"}`` in average bits.

  Raises:
    BudgetError: the target is below :func:`floor_bits`.
  """
  code, n_groups, n_q = size_bits(params)
  fisher_flat = None if fisher is None else {
      path: v for path, (v, _) in tree.flat_leaves(fisher).items()}
  gs = _groups(params, fisher_flat)
  if not gs:
    raise BudgetError("no tensor with learned free-bit scales: a budget needs a learned rule "
                      "(lsq, ratio, ratio_lsq) without --bits")
  floor = (OVERHEAD_BITS * n_groups + _least_code_bits(code, gs)) / max(n_q, 1)
  if not target_bits >= floor:
    raise BudgetError(f"a budget of {target_bits:g} bits per weight is below the "
                      f"{floor:.3f} that the model's least grids take ({n_groups} scale groups "
                      f"of {OVERHEAD_BITS} bits over {n_q} quantized weights, every learned "
                      f"group at its fewest bits: 1 under floor rounding, 0 under round)")
  before = (code + OVERHEAD_BITS * n_groups) / max(n_q, 1)
  movable = sum(int(np.sum(g.bits)) * g.n for g in gs)
  fixed_code = code - movable  # tensors a budget does not move
  target_code = target_bits * n_q - OVERHEAD_BITS * n_groups - fixed_code
  total = movable
  bits = [g.bits.copy() for g in gs]
  moved = set()
  if total > target_code:
    heap = [((_cost(g, i, b - 1) - _cost(g, i, b)) / g.n, j, i)
            for j, g in enumerate(gs) for i, b in enumerate(g.bits) if b > _least(g)]
    heapq.heapify(heap)
    while total > target_code and heap:
      _, j, i = heapq.heappop(heap)
      g, b = gs[j], int(bits[j][i])
      bits[j][i] = b - 1
      total -= g.n
      moved.add((j, i))
      if b - 1 > _least(g):
        heapq.heappush(heap, ((_cost(g, i, b - 2) - _cost(g, i, b - 1)) / g.n, j, i))
  elif not coarsen_only:
    heap = [(-(_cost(g, i, b) - _cost(g, i, b + 1)) / g.n, j, i)
            for j, g in enumerate(gs) for i, b in enumerate(g.bits)
            if b < MAX_BITS and g.hi[i] > g.lo[i]]
    heapq.heapify(heap)
    while heap:
      _, j, i = heapq.heappop(heap)
      g, b = gs[j], int(bits[j][i])
      if total + g.n > target_code:
        continue
      bits[j][i] = b + 1
      total += g.n
      moved.add((j, i))
      if b + 1 < MAX_BITS:
        heapq.heappush(heap, (-(_cost(g, i, b + 1) - _cost(g, i, b + 2)) / g.n, j, i))
  else:
    return params, {"before": before, "after": before, "target": target_bits, "groups_moved": 0}
  new = {}
  for g, b in zip(gs, bits):
    s = min_step(g.lo, g.hi, b, g.qt.config.rounding).astype(np.float64)
    log_s = np.clip(np.log(s), -quant.LOG_SCALE_MAX, quant.LOG_SCALE_MAX)
    # a pruned group (every code 0) takes one shared step, so that the entropy-coded file
    # stores its scale once; a single-valued group keeps its grid (it costs 0 bits already)
    old_log_s = np.asarray(g.qt.log_scale, np.float64).reshape(-1)
    log_s = np.where((b == 0) & (g.hi > g.lo), max(PRUNED_LOG_SCALE, float(np.max(log_s))),
                     np.where(g.hi > g.lo, log_s, old_log_s))
    new[g.qt.scale_path] = jnp.asarray(log_s.reshape(g.qt.log_scale.shape),
                                       g.qt.log_scale.dtype)
  out = tree.replace_arrays(params, new)
  after = budget_bits_of(out)
  if after > target_bits * (1 + 1e-9):
    raise BudgetError(f"a budget of {target_bits:g} bits per weight was not met: the grids "
                      f"reach {after:.3f} at the fewest bits the groups allow")
  return out, {"before": before, "after": after, "target": target_bits,
               "groups_moved": len(moved)}


class ScheduleState(NamedTuple):
  """What a :class:`Schedule` carries between epochs (keep it in your checkpoint)."""

  start_bits: float  # the model's budget bits when the schedule began


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A size budget in your own training loop: call :meth:`update` at each epoch's end.

  Over the scale phase (epochs 1..`phase_epochs`) the grids are projected
  (:func:`project`) onto a budget that falls from the model's size to `target_bits` as
  ``target + (start - target) * (1 - e/E)^3``, coarsening only, so the learned rule may
  stay below it; at the phase's last epoch exactly onto `target_bits`, both ways, and the
  scales freeze (their step multiplier in a :func:`lqjax.optim.split` state is set to 0).
  After the phase, an epoch projects again only where the fine-tuned weights moved the
  size more than `tolerance` (relative) off the target.

  Example::

      sched = lqjax.budget.Schedule(target_bits=2.0, phase_epochs=8)
      bstate = sched.init(params)
      # at the end of each epoch (1-based):
      params, opt_state, info = sched.update(bstate, epoch, params, opt_state, fisher)
  """

  target_bits: float
  phase_epochs: int
  tolerance: float = 0.01

  def __post_init__(self):
    if not (isinstance(self.target_bits, (int, float)) and np.isfinite(self.target_bits)
            and self.target_bits > 0):
      raise BudgetError(f"target_bits must be a finite number > 0, got {self.target_bits}")
    if isinstance(self.phase_epochs, bool) or not isinstance(self.phase_epochs, int) \
        or self.phase_epochs < 1:
      raise BudgetError(f"phase_epochs must be a whole number >= 1, got {self.phase_epochs}")

  def init(self, params) -> ScheduleState:
    return ScheduleState(budget_bits_of(params))

  def budget(self, epoch: int, start_bits: float):
    """``(bits, coarsen_only)``: what the end of `epoch` (1-based) projects onto."""
    if epoch < self.phase_epochs:
      frac = (1 - epoch / self.phase_epochs) ** 3
      return self.target_bits + (start_bits - self.target_bits) * frac, True
    return self.target_bits, False

  def update(self, state: ScheduleState, epoch: int, params, opt_state=None, fisher=None):
    """Projects `params` at the end of `epoch` (1-based).

    Args:
      state: from :meth:`init`.
      epoch: the epoch that just ended, 1-based.
      params: the quantized tree (Linen params or ``nnx.State``).
      opt_state: a :func:`lqjax.optim.split` state, whose scales are frozen at the
        phase's end; None: freezing is left to you (``info["freeze"]`` says when).
      fisher: squared gradients like `params` (:func:`squared_gradients`), or a
        function of no arguments that returns them (called only when the epoch
        projects); None: every weight counts alike.

    Returns:
      ``(params, opt_state, info)``; `info` is None for an epoch that does not project,
      else ``{"budget", "before", "after", "groups_moved", "freeze"}``.
    """
    goal, coarsen_only = self.budget(epoch, state.start_bits)
    if epoch > self.phase_epochs and \
        abs(budget_bits_of(params) - self.target_bits) <= self.tolerance * self.target_bits:
      return params, opt_state, None
    f = fisher() if callable(fisher) else fisher
    new, info = project(params, goal, f, coarsen_only=coarsen_only)
    freeze = epoch == self.phase_epochs
    if freeze and opt_state is not None:
      from lqjax import optim
      opt_state = optim.set_scale_mult(opt_state, 0.0)
    return new, opt_state, {"budget": goal, **info, "freeze": freeze}


def target_bits_for_bytes(variables, budget_bytes: int, overhead_bytes: int = 0) -> float:
  """The average bits per quantized weight (scale storage included) at which the packed
  payload of `variables` is `budget_bytes` minus `overhead_bytes` (the file's header and
  checksum), the float tensors (batch norm, float layers) counted at 32 bits."""
  rows = accounting.model_report(variables)
  float_bytes = sum(r.bytes for r in rows if not r.quantized)
  n_q = sum(r.elements for r in rows if r.quantized)
  # each tensor's codes are padded to a whole byte
  pad_bits = 8 * sum(1 for r in rows if r.quantized)
  return (8 * (budget_bytes - overhead_bytes - float_bytes) - pad_bits) / max(n_q, 1)


def squared_gradients(grad_fn, params, batches):
  """The empirical Fisher's diagonal: ``sum over batches of grad_fn(params, batch) ** 2``.

  `grad_fn(params, batch)` returns dL/dparams (a tree like `params`).
  """
  acc = None
  for batch in batches:
    g = jax.tree_util.tree_map(jnp.square, grad_fn(params, batch))
    acc = g if acc is None else jax.tree_util.tree_map(jnp.add, acc, g)
  return acc

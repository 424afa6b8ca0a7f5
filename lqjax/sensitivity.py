"""Per-layer bit widths from a Hessian sensitivity proxy: the HAWQ-v2 mixed-precision baseline.

HAWQ-v2 (Dong et al., "HAWQ-V2: Hessian Aware trace-Weighted Quantization of
Neural Networks", NeurIPS 2020) gives each layer one bit width. It scores layer
l at b bits by

    Omega_l(b) = Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2

the layer's Hessian trace per weight times the squared error a b-bit grid
leaves, and picks the widths that minimise ``sum_l Omega_l(b_l)`` under a size.

* :func:`hessian_traces`: Tr(H) of every leaf of a (float) parameter tree by
  Hutchinson's estimator, ``E_v[v^T H v]`` with Rademacher v, one
  Hessian-vector product per sample (forward-over-reverse).
* :func:`grid_error`: ``||Q_b(W) - W||^2`` of one quantized tensor, each scale
  group on its signed b-bit grid with the step that minimises its error (a
  search over clipping ranges; min-max grids are far from optimal at 2 bits).
* :func:`allocate`: the widths, exactly: a Pareto front of (size, cost) over the
  layers, merged one layer at a time (:func:`pareto_choice`).

A layer is a module: its quantized tensors (kernel and bias) share one width.
Size is counted as :mod:`lqjax.budget` counts it: b bits per weight plus
:data:`lqjax.budget.OVERHEAD_BITS` per scale group, over the quantized weights.
The widths become per-layer :class:`~lqjax.Rule` s with ``bits`` set, trained
with the ``lsq`` rule: that is the baseline. A negative trace estimate (a
non-convex point, or estimator noise) counts as 0.
"""

from __future__ import annotations

from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lqjax import budget, qconfig, quant, tree

# Clipping ranges searched per group: the step is c * max|W_G| / 2^(b-1), c in (0, 1].
CLIP_FRACTIONS = np.linspace(0.025, 1.0, 40)
DEFAULT_CHOICES = tuple(range(1, 9))


def hessian_traces(loss_fn, params, batches, key, samples: int = 1) -> Dict[tree.Path, float]:
  """Hutchinson estimates of the Hessian trace of `loss_fn` on each leaf of `params`.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, twice differentiable (a float
      model: the quantizer's straight-through gradient has no second derivative).
    params: the parameter tree (arrays).
    batches: an iterable of batches; the estimate averages over all of them.
    key: PRNG key of the probe vectors.
    samples: probe vectors per batch.

  Returns:
    ``{path: trace}``: the mean over batches and probes of ``v_l . (H v)_l``,
    the diagonal block of leaf l (v has independent Rademacher entries, so this
    estimates ``Tr(H_ll)`` without bias).
  """
  grad = jax.grad(loss_fn)

  @jax.jit
  def probe(params, batch, key):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    v = jax.tree_util.tree_unflatten(treedef, [
        jax.random.rademacher(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves)])
    _, hv = jax.jvp(lambda p: grad(p, batch), (params,), (v,))
    return jax.tree_util.tree_map(lambda a, b: jnp.sum(a * b), v, hv)

  total, count = None, 0
  for batch in batches:
    for _ in range(samples):
      key, sub = jax.random.split(key)
      t = probe(params, batch, sub)
      total = t if total is None else jax.tree_util.tree_map(jnp.add, total, t)
      count += 1
  if total is None:
    raise ValueError("hessian_traces needs at least one batch")
  return {path: float(v) / count for path, (v, _) in tree.flat_leaves(total).items()}


def grid_error(p, sshape, bits: int, rounding: str = "round", grid: str = "midtread") -> float:
  """``||Q_b(P) - P||^2``: every scale group (the scale's shape `sshape`) on its signed
  `bits`-bit grid (midtread s*q or midrise s*(q+1/2)), with the step from
  :data:`CLIP_FRACTIONS` that leaves the least error."""
  o = qconfig.grid_offset(grid, bits)
  pshape, sshape = qconfig.grouped_shapes(np.shape(p), sshape)
  p = np.asarray(p, np.float64).reshape(pshape)
  axes = qconfig.shared_axes(p.shape, sshape)
  amax = np.max(np.abs(p), axis=axes, keepdims=True) if axes else np.abs(p)
  qn, qp = quant.code_range(bits)
  rnd = np.floor if rounding == "floor" else np.round
  best = None
  for c in CLIP_FRACTIONS:
    s = np.where(amax > 0, c * amax / 2.0 ** (bits - 1), 1.0)
    err = ((np.clip(rnd(p / s - o), qn, qp) + o) * s - p) ** 2
    err = np.sum(err, axis=axes, keepdims=True) if axes else err
    best = err if best is None else np.minimum(best, err)
  return float(np.sum(best))


def pareto_choice(sizes, costs, limit):
  """The choice per layer that minimises the summed cost with summed size <= `limit`.

  Args:
    sizes, costs: ``sizes[l][k]``, ``costs[l][k]``: layer l's size and cost at its
      option k (sizes are integers, so that equal sums compare exactly).
    limit: the largest summed size allowed.

  Returns:
    ``(choices, size, cost)``, or None when no assignment fits. Exact: the
    front of non-dominated partial assignments is kept after each layer, and
    points that cannot fit with the remaining layers' smallest options are cut.
  """
  rest = np.cumsum([min(s) for s in sizes][::-1])[::-1].tolist() + [0]
  front = [(0, 0.0, ())]
  for layer, (sz, co) in enumerate(zip(sizes, costs)):
    cand = sorted((s + int(a), c + float(b), ch + (k,))
                  for s, c, ch in front for k, (a, b) in enumerate(zip(sz, co))
                  if s + int(a) + rest[layer + 1] <= limit)
    front, best = [], np.inf
    for point in cand:
      if point[1] < best:
        front.append(point)
        best = point[1]
    if not front:
      return None
  size, cost, choices = min(front, key=lambda x: (x[1], x[0]))
  return list(choices), size, cost


def layer_of(path: tree.Path) -> str:
  """The module path of a parameter path (``("conv1", "kernel")`` -> ``"conv1"``)."""
  return "/".join(path[:-1])


def allocate(params, target_bits: float, traces: Dict[tree.Path, float],
             choices: Sequence[int] = DEFAULT_CHOICES):
  """One bit width per layer that minimises the HAWQ-v2 cost at `target_bits` or below.

  Args:
    params: a quantized tree (for each tensor's scale groups, rounding and grid) holding
      the trained float weights (e.g. a float run's weights put in with
      :func:`lqjax.tree.replace_arrays`).
    target_bits: average bits per quantized weight, scale storage included (as
      :func:`lqjax.budget.budget_bits_of` counts).
    traces: ``{parameter path: Hessian trace}`` (:func:`hessian_traces` on the
      float model, whose parameter paths the quantized tree shares).
    choices: the widths a layer may take.

  Returns:
    ``({layer: bits}, info)`` with info ``{"target", "bits", "cost", "layers"}``:
    the allocation's average bits and summed cost, and per layer its weights,
    trace per weight and cost at every choice.

  Raises:
    budget.BudgetError: the target is below every layer at its fewest bits.
    KeyError: a quantized tensor without a trace.
  """
  layers: Dict[str, dict] = {}
  n_total = 0
  for t in tree.quantized_tensors(params):
    if t.path not in traces:
      raise KeyError(f"no Hessian trace for {t.name}")
    n = int(np.prod(t.p.shape))
    n_total += n
    groups = int(np.prod(t.log_scale.shape))
    per_weight = max(float(traces[t.path]), 0.0) / max(n, 1)
    lay = layers.setdefault(layer_of(t.path), {"weights": 0, "trace_per_weight": 0.0,
                                              "size": np.zeros(len(choices), np.int64),
                                              "cost": np.zeros(len(choices))})
    lay["weights"] += n
    lay["trace_per_weight"] += per_weight * n  # a weighted mean, finished below
    for k, b in enumerate(choices):
      lay["size"][k] += n * b + budget.OVERHEAD_BITS * groups
      lay["cost"][k] += per_weight * grid_error(t.p, t.log_scale.shape, b, t.config.rounding,
                                                t.config.grid)
  names = sorted(layers)
  limit = int(np.floor(target_bits * n_total + 1e-9))
  got = pareto_choice([layers[n]["size"] for n in names], [layers[n]["cost"] for n in names],
                      limit)
  if got is None:
    least = sum(int(layers[n]["size"].min()) for n in names) / max(n_total, 1)
    raise budget.BudgetError(f"a budget of {target_bits:g} bits per weight is below the "
                             f"{least:.3f} that every layer at {min(choices)} bits takes")
  picks, size, cost = got
  for lay in layers.values():
    lay["trace_per_weight"] /= max(lay["weights"], 1)
  info = {"target": float(target_bits), "bits": size / max(n_total, 1), "cost": cost,
          "layers": {n: {"weights": layers[n]["weights"],
                         "trace_per_weight": layers[n]["trace_per_weight"],
                         "cost": dict(zip(map(int, choices), layers[n]["cost"].tolist()))}
                     for n in names}}
  return {n: int(choices[k]) for n, k in zip(names, picks)}, info

"""The quantizer: pure functions and one `jax.custom_vjp` with scale-gradient rules.

Stages, each usable alone:
``scale_from_log`` -> ``init_scale`` -> ``quantize_codes`` -> ``dequantize``
-> ``fake_quant`` (forward ``scale * codes``, custom backward).

Forward (METHOD.md section 1)::

    q = floor(P / s - o)   (or round)  integer codes, clipped to the signed
    Q(P) = s * (q + o)                  b-bit range when ``bits`` is set

o is the grid's offset (:data:`lqjax.qconfig.GRIDS`): 0 on the ``midtread`` grid
(zero is a level), 1/2 on the ``midrise`` grid (symmetric levels, no zero; fixed
bits only). At 1 bit the midrise grid is the binary {-s/2, +s/2}, the midtread
grid {-s, 0}.

With ``floor``, a value within a few float32 ulps of a grid point snaps to it,
so that ``Q(Q(P)) == Q(P)`` holds in floating point (``s*q/s`` can land one ulp
below ``q``, and a plain floor would then drop a whole bin).

Backward (METHOD.md section 2):

* parameter: straight-through estimator, dL/dP := dL/dQ; with ``bits`` set
  the gradient is zeroed where the unclipped code falls outside the range
  (clipped STE).
* scale, by ``rule`` (none at all when the scale is not differentiated, e.g.
  under ``stop_gradient`` in a weights-only step: no reduction is traced):

  - ``fixed``: zero.
  - ``lsq`` (Esser et al., ICLR 2020, "Learned Step Size Quantization"):
    dQ/ds = q + o - P/s inside the clip range, the clip level (qn + o or qp + o)
    outside,
    summed over the group against dL/dQ and times 1/sqrt(N * Qp), N the
    group's element count. The clip test uses the unclipped code, as PyTorch's
    ``_fake_quantize_learnable_per_tensor_affine`` does, so with
    ``rounding="round"`` the two agree. With free bits Qp is
    :data:`FREE_BITS_QP` = 127, the 8-bit range every free-bit scale starts
    from (a per-group max |code| was measured to cost a second reduction pass).
  - ``ratio`` (the thesis's rule): per group G,
    ``r_G = ||dL/dP||_G / (||P||_G + eps)``; ``g_G = tanh(lambda - r_G)`` where
    ``r_G < lambda`` and 0 elsewhere. **Magnitude m (open point): the step on
    log s equals g_G**, i.e. the scale cotangent is ``-g_G / s`` so that an
    SGD step ``log_s -= lr * dL/dlog_s`` is ``log_s += lr * g_G``:
    multiplicative growth, independent of the scale's absolute size.
  - ``relax_threshold`` (lambda_hi, ratio rules): groups with r_G > lambda_hi
    get g_G = -tanh(r_G - lambda_hi), a finer grid (two-threshold variant).
  - ``ratio_lsq``: the ratio term plus ``lsq_weight`` times the LSQ gradient,
    which lets the task loss push back when a coarser grid starts to hurt.

Every scale cotangent is reduced to the scale's exact shape.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from lqjax import qconfig

# log s is clipped to [-LOG_SCALE_MAX, LOG_SCALE_MAX]: exp stays positive and
# finite in float32 (exp(40) ~ 2.4e17, exp(-40) ~ 4.2e-18).
LOG_SCALE_MAX = 40.0
# Relative tolerance (in units of |code|) within which floor snaps to a grid point.
_SNAP = 4 * float(jnp.finfo(jnp.float32).eps)
_RATIO_EPS = 1e-12
# Qp of the LSQ gradient scale when the bit width is free (8-bit reference range).
FREE_BITS_QP = 127.0
# While set (by :func:`passthrough`), fake_quant returns its input: for tracing a
# model whose weights are already on their grid (the ONNX exporter).
_PASSTHROUGH = contextvars.ContextVar("lqjax_passthrough", default=False)


@contextlib.contextmanager
def passthrough():
  """Within this context :func:`fake_quant` is the identity (at trace time).

  For tracing a model whose quantized weights are already dequantized, s * q,
  so that Q is the identity on them anyway: the exporter then sees the layer's
  own computation on the weights and nothing of the quantizer.
  """
  token = _PASSTHROUGH.set(True)
  try:
    yield
  finally:
    _PASSTHROUGH.reset(token)


def scale_from_log(log_scale: jax.Array) -> jax.Array:
  """s = exp(log s), guarded: always > 0 and finite (NaN maps to s = 1)."""
  log_scale = jnp.nan_to_num(log_scale, nan=0.0)
  return jnp.exp(jnp.clip(log_scale, -LOG_SCALE_MAX, LOG_SCALE_MAX))


def code_range(bits: Optional[int]) -> tuple[float, float]:
  """Signed integer range [-2^(b-1), 2^(b-1)-1]; (-inf, inf) for free bits."""
  if bits is None:
    return -jnp.inf, jnp.inf
  return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1


def _reduce_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums `x` over the axes along which `shape` (same ndim) broadcasts."""
  axes = qconfig.shared_axes(x.shape, shape)
  out = jnp.sum(x, axis=axes, keepdims=True) if axes else x
  assert out.shape == tuple(shape), (out.shape, shape)
  return out


# Rows of the ones matrix of :func:`_reduce_to_mv`; see there why not 1.
_MV_ROWS = 2


def _reduce_to_mv(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """:func:`_reduce_to` as a product with a ones matrix (two rows; the first is kept).

  Used for the LSQ gradient's ``sum(g * dq/ds)`` on CPU. XLA:CPU reduces the plain
  sum over leading axes (row and channel scales) column by column. It also fuses a
  matrix-vector product whose output has rank <= 1 and whose vector operand is
  small into one loop with its producers, a naive traversal: with a ones *vector*,
  that loop computed dq/ds and the sum element by element, and took 207 us of a
  LeNet-300-100 step (a jax.profiler trace) for a 784x300 kernel. A ones matrix of
  two rows gives a rank-2 output, so the product ``g * dq/ds`` is written by its
  own vectorised fusion and summed by the library matrix product (52 + 70 us in the
  same trace). A sum over every axis (tensor scales) sums the leading axes so and
  the last one plainly: XLA:CPU otherwise turns it into a windowed tree reduction,
  slower in the LeNet-300-100 step. Reduced axes that are neither all leading nor
  all trailing, and 1-D parameters, use the plain sum, as does every other backend
  (via :func:`_reduce_product_to`), where it was not measured. ``HIGHEST``
  precision: a float32 sum on every backend.
  """
  axes = qconfig.shared_axes(x.shape, shape)
  k = len(axes)
  if not axes or x.ndim == 1:
    return _reduce_to(x, shape)
  if k == x.ndim:  # every axis (tensor scales): the leading ones here, then the last plainly
    return _reduce_to(_reduce_to_mv(x, (1,) * (x.ndim - 1) + x.shape[-1:]), shape)
  n = math.prod(x.shape[a] for a in axes)
  hi = jax.lax.Precision.HIGHEST
  if tuple(axes) == tuple(range(k)):
    ones = jnp.ones((_MV_ROWS, n), x.dtype)
    out = jnp.dot(ones, x.reshape(n, -1), precision=hi)[:1]
  elif tuple(axes) == tuple(range(x.ndim - k, x.ndim)):
    ones = jnp.ones((n, _MV_ROWS), x.dtype)
    out = jnp.dot(x.reshape(-1, n), ones, precision=hi)[:, :1]
  else:
    return _reduce_to(x, shape)
  return out.reshape(shape)


def _reduce_product_to(a: jax.Array, b: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """``sum(a * b)`` reduced to `shape`: a product with a ones matrix on CPU, a sum elsewhere."""
  return jax.lax.platform_dependent(
      a, b, cpu=lambda a, b: _reduce_to_mv(a * b, shape),
      default=lambda a, b: _reduce_to(a * b, shape))


def _expand_scale(scale: jax.Array, ndim: int) -> jax.Array:
  if scale.ndim > ndim:
    raise ValueError(f"scale of shape {scale.shape} has more axes than the parameter ({ndim})")
  return scale.reshape((1,) * (ndim - scale.ndim) + scale.shape)


def _unclipped_codes(x, scale, rounding, offset=0.0):
  v = x / scale
  if offset:
    v = v - offset
  if rounding == "round":
    return jnp.round(v)
  if rounding == "floor":
    r = jnp.round(v)
    near = jnp.abs(v - r) <= _SNAP * jnp.maximum(1.0, jnp.abs(r))
    return jnp.where(near, r, jnp.floor(v))
  raise ValueError(f"unknown rounding {rounding!r}; expected one of {', '.join(qconfig.ROUNDINGS)}")


def _codes(x, scale, rounding, bits, offset=0.0):
  q = _unclipped_codes(x, scale, rounding, offset)
  if bits is not None:
    qn, qp = code_range(bits)
    q = jnp.clip(q, qn, qp)
  return q


def quantize_codes(x: jax.Array, scale: jax.Array, *, rounding: str = "floor",
                   bits: Optional[int] = None, grid: str = "midtread") -> jax.Array:
  """Integer codes q = floor(x / s - o) (or round), clipped when `bits` is set.

  Returns int32 codes (saturated to the int32 range).
  """
  offset = qconfig.grid_offset(grid, bits)
  scale = _expand_scale(jnp.asarray(scale, x.dtype), x.ndim)
  q = _codes(x, scale, rounding, bits, offset)
  i32 = jnp.iinfo(jnp.int32)
  return jnp.clip(q, i32.min, i32.max).astype(jnp.int32)


def dequantize(codes: jax.Array, scale: jax.Array, dtype=jnp.float32,
               grid: str = "midtread") -> jax.Array:
  """Q = s * (q + o), o the grid's offset."""
  offset = qconfig.grid_offset(grid, fixed=True)
  q = codes.astype(dtype)
  return jnp.asarray(scale, dtype) * (q + offset if offset else q)


def init_scale(x: jax.Array, granularity: qconfig.Granularity, *,
               bits: Optional[int] = None, init_bits: int = 8) -> jax.Array:
  """Initial scale for parameter `x`, one per group.

  * ``bits`` set (fixed-bit and LSQ baselines): LSQ's ``2 * mean|P_G| / sqrt(Qp)``.
  * free bits: ``(max P_G - min P_G) / (2^init_bits - 1)``, i.e. the group's
    range spread over an initial budget of `init_bits` bits. A group with zero
    range (a zero-initialised bias) assumes a unit range.

  Always strictly positive.
  """
  axes = qconfig.reduced_axes(x.shape, granularity)
  x = jax.lax.stop_gradient(x)
  if bits is not None:
    qp = max(2.0 ** (bits - 1) - 1, 1.0)
    s = 2.0 * jnp.mean(jnp.abs(x), axis=axes, keepdims=True) / jnp.sqrt(qp)
    s = jnp.where(s > 0, s, 1.0 / qp)
  else:
    rng = jnp.max(x, axis=axes, keepdims=True) - jnp.min(x, axis=axes, keepdims=True)
    rng = jnp.where(rng > 0, rng, 1.0)
    s = rng / (2.0 ** init_bits - 1)
  s = jnp.broadcast_to(s, qconfig.scale_shape(x.shape, granularity))
  return jnp.maximum(s, jnp.exp(-LOG_SCALE_MAX)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fake_quant(x, scale, threshold, lsq_weight, rule, rounding, bits, offset):
  q = _codes(x, scale, rounding, bits, offset)
  return scale * (q + offset if offset else q)


def _fake_quant_fwd(x, scale, threshold, lsq_weight, rule, rounding, bits, offset):
  # symbolic_zeros=True: the differentiable inputs arrive as CustomVJPPrimal, and
  # `scale.perturbed` says (at trace time) whether the scale is differentiated. A
  # scale under stop_gradient (a weights-only step) gets no cotangent, so none of
  # the rule's per-group reductions is traced, forward or backward.
  x, learn = x.value, scale.perturbed and rule != "fixed"
  scale, threshold, lsq_weight = scale.value, threshold.value, lsq_weight.value
  # Residuals hold no new array of the parameter's size: the codes are
  # recomputed in the backward pass where a rule needs them (fused there by XLA),
  # which measured faster than storing and re-reading them.
  out = _fake_quant(x, scale, threshold, lsq_weight, rule, rounding, bits, offset)
  if not learn:
    return out, (x, scale, None)
  if rule not in ("ratio", "ratio_lsq"):
    return out, (x, scale, (threshold, lsq_weight, None))
  # The ratio rules' ||P||^2 per group, taken here from the pre-update P and tied to
  # the output by + 0.0 * min(., 1) (the same values, up to the sign of a zero; NaN
  # only where P has one), so that this read of P comes before the loss and so
  # before the donated train step updates P in place. Read in the backward pass,
  # with no data path to the update, it made XLA copy every quantized weight at
  # the step's start (tests/test_train.py checks the compiled step has no copy).
  x_sq = _reduce_to(jnp.square(x), scale.shape)
  return out + 0.0 * jnp.minimum(x_sq, 1.0), (x, scale, (threshold, lsq_weight, x_sq))


def _lsq_grad(g, x, scale, q_raw, bits, offset=0.0):
  """LSQ scale gradient, reduced to the scale's shape."""
  qn, qp = code_range(bits)
  v = x / scale
  dq_ds = jnp.where(q_raw < qn, qn, jnp.where(q_raw > qp, qp, q_raw - v))
  if offset:  # the levels are q + o: every case of dQ/ds shifts by o
    dq_ds = dq_ds + offset
  n = x.size // scale.size
  qmax = FREE_BITS_QP if bits is None else max(qp, 1.0)
  return _reduce_product_to(g, dq_ds, scale.shape) / jnp.sqrt(n * qmax)


def _grad_sq_sum(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """``||g||^2`` per group, reduced to `shape`, as ``4 * ||g / 2||^2``.

  The same sum (scaling by a power of two is exact; only squares under float32's
  normal range, ~1e-38, round differently), but not an expression XLA merges with the
  optimizer's own square of g (Adam's second moment), which it then writes out for
  this sum to read: one pass over each kernel's gradient fewer (LeNet-300-100
  ratio/row: 23.1 -> 20.9 MB per step).
  """
  half = 0.5 * g
  return 4.0 * _reduce_to(half * half, shape)


def ratio_growth(g, x, scale_shape, threshold, relax_threshold=jnp.inf, x_sq=None):
  """The thesis's g_G = tanh(lambda - r_G) where r_G < lambda, else 0.

  With a finite `relax_threshold` (lambda_hi >= lambda), groups with
  r_G > lambda_hi get g_G = -tanh(r_G - lambda_hi): their grid is made finer
  again (the two-threshold variant).

  Args:
    g: dL/dP (= dL/dQ under the STE), shape of the parameter.
    x: the parameter P.
    scale_shape: the scale's shape (same ndim as `x`).
    threshold: lambda.
    relax_threshold: lambda_hi (inf: never relax, the thesis's rule).
    x_sq: ||P||^2 per group if already computed (`x` is then not read).

  Returns:
    (g_G, r_G), both of `scale_shape`.
  """
  gn = jnp.sqrt(_grad_sq_sum(g, scale_shape))
  pn = jnp.sqrt(_reduce_to(jnp.square(x), scale_shape) if x_sq is None else x_sq)
  return ratio_growth_of(gn / (pn + _RATIO_EPS), threshold, relax_threshold)


def ratio_growth_of(r, threshold, relax_threshold=jnp.inf):
  """(g_G, r) of :func:`ratio_growth` for ratios `r` already taken."""
  grow = jnp.where(r < threshold, jnp.tanh(threshold - r), 0.0)
  relax = jnp.where(r > relax_threshold, -jnp.tanh(r - relax_threshold), 0.0)
  return grow + relax, r


def _fake_quant_bwd(rule, rounding, bits, offset, res, g):
  x, scale, learn = res
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    return None, None, None, None
  needs_codes = bits is not None or (learn is not None and rule in ("lsq", "ratio_lsq"))
  q_raw = _unclipped_codes(x, scale, rounding, offset) if needs_codes else None
  if bits is None:
    gx = g
  else:
    qn, qp = code_range(bits)
    gx = jnp.where((q_raw >= qn) & (q_raw <= qp), g, 0.0)
  if learn is None:  # the fixed rule, or a scale that is not differentiated
    return gx, None, None, None
  threshold, lsq_weight, x_sq = learn
  if rule == "lsq":
    gs = _lsq_grad(g, x, scale, q_raw, bits, offset)
  elif rule in ("ratio", "ratio_lsq"):
    growth, _ = ratio_growth(g, x, scale.shape, threshold[0], threshold[1], x_sq)
    gs = -growth / scale
    if rule == "ratio_lsq":
      gs = gs + lsq_weight * _lsq_grad(g, x, scale, q_raw, bits, offset)
  else:
    raise ValueError(f"unknown rule {rule!r}; expected one of {', '.join(qconfig.RULES)}")
  assert gs.shape == scale.shape, (gs.shape, scale.shape)
  return gx, gs.astype(scale.dtype), None, None


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd, symbolic_zeros=True)


def fake_quant(x: jax.Array, scale: jax.Array, *, rule: str = "ratio",
               threshold=0.0, rounding: str = "floor", bits: Optional[int] = None,
               lsq_weight=1.0, relax_threshold=None, grid: str = "midtread") -> jax.Array:
  """Fake-quantizes `x`: returns ``scale * codes`` with the chosen gradients.

  Args:
    x: the parameter P.
    scale: positive scale broadcastable to `x` (e.g. from
      :func:`lqjax.qconfig.scale_shape`). Its cotangent has its exact shape.
    rule: scale-gradient rule, one of ``fixed``, ``lsq``, ``ratio``,
      ``ratio_lsq`` (module docstring).
    threshold: lambda of the ratio rules (may be traced; no gradient).
    rounding: ``floor`` (thesis) or ``round``.
    bits: clip codes to the signed b-bit range (clipped STE); None: free.
    grid: ``midtread`` (levels s * q) or ``midrise`` (s * (q + 1/2); needs `bits`).
    lsq_weight: weight of the LSQ term in ``ratio_lsq`` (may be traced).
    relax_threshold: lambda_hi of the ratio rules: groups with r above it get a
      finer grid (see :func:`ratio_growth`); None: never (the thesis's rule).

  Returns:
    Q(P), same shape and dtype as `x`.
  """
  if rule not in qconfig.RULES:
    raise ValueError(f"unknown rule {rule!r}; expected one of {', '.join(qconfig.RULES)}")
  if _PASSTHROUGH.get():
    return x
  if rounding not in qconfig.ROUNDINGS:
    raise ValueError(
        f"unknown rounding {rounding!r}; expected one of {', '.join(qconfig.ROUNDINGS)}")
  if bits is not None and not 1 <= bits <= 16:
    raise ValueError(f"bits must be in 1..16 or None, got {bits}")
  offset = qconfig.grid_offset(grid, bits)
  if isinstance(threshold, (int, float)) and threshold < 0:
    raise ValueError(f"threshold must be >= 0, got {threshold}")
  scale_in = jnp.asarray(scale, x.dtype)
  scale_full = _expand_scale(scale_in, x.ndim)
  if relax_threshold is not None and isinstance(threshold, (int, float)) \
      and relax_threshold < threshold:
    raise ValueError(f"relax_threshold ({relax_threshold}) must be >= threshold ({threshold})")
  lam_hi = jnp.inf if relax_threshold is None else relax_threshold
  thresholds = jnp.stack([jnp.asarray(threshold, x.dtype), jnp.asarray(lam_hi, x.dtype)])
  out = _fake_quant(x, scale_full, thresholds,
                    jnp.asarray(lsq_weight, x.dtype), rule, rounding, bits, offset)
  return out


def _grouped(p, log_scale):
  """`p` and `log_scale` reshaped so that the scale broadcasts (a block scale's blocked axes
  split, :func:`lqjax.qconfig.grouped_shapes`); unchanged without blocks."""
  pshape, sshape = qconfig.grouped_shapes(p.shape, log_scale.shape)
  return p.reshape(pshape), log_scale.reshape(sshape)


def quantize_param(p: jax.Array, log_scale: jax.Array, config: qconfig.QuantConfig) -> jax.Array:
  """Q(P) of a parameter under its recipe: the quantizer's one entry point for layers.

  Args:
    p: the latent parameter P.
    log_scale: its log scale (the shape from ``config.granularity``; a block scale has
      the number of blocks along the blocked axes).
    config: the tensor's :class:`~lqjax.qconfig.QuantConfig`.
  """
  pv, lv = _grouped(p, log_scale)
  out = fake_quant(pv, scale_from_log(lv), rule=config.rule, threshold=config.threshold,
                   rounding=config.rounding, bits=config.bits, grid=config.grid,
                   lsq_weight=config.lsq_weight, relax_threshold=config.relax_threshold)
  return out.reshape(p.shape)


def init_log_scale(p: jax.Array, config: qconfig.QuantConfig,
                   layout: Optional[qconfig.Layout] = None) -> jax.Array:
  """The initial log scale of parameter `p` under `config` (:func:`init_scale`'s rule, per
  group, block groups included), of :func:`lqjax.qconfig.config_scale_shape`'s shape."""
  sshape = qconfig.config_scale_shape(p.shape, config, layout)
  pshape, sv = qconfig.grouped_shapes(p.shape, sshape)
  pv = p.reshape(pshape)
  keep = tuple(i for i, d in enumerate(sv) if d != 1 or pv.shape[i] == 1)
  s = init_scale(pv, keep, bits=config.bits, init_bits=config.init_bits)
  return jnp.log(s).reshape(sshape)


def codes_of(p, log_scale, config: qconfig.QuantConfig) -> jax.Array:
  """The int32 codes of `p` under its log scale and recipe, in `p`'s shape (jittable)."""
  pv, lv = _grouped(jnp.asarray(p), jnp.asarray(log_scale))
  codes = quantize_codes(pv, scale_from_log(lv), rounding=config.rounding, bits=config.bits,
                         grid=config.grid)
  return codes.reshape(jnp.shape(p))


def dequantize_as(codes, log_scale, grid: str = "midtread", dtype=jnp.float32) -> jax.Array:
  """:func:`dequantize` of codes under a stored log scale, block scales included."""
  cv, lv = _grouped(jnp.asarray(codes), jnp.asarray(log_scale))
  return dequantize(cv, scale_from_log(lv), dtype, grid).reshape(jnp.shape(codes))


@functools.partial(jax.jit, static_argnames=("rounding", "bits", "grid"))
def _codes_and_scale(p, log_scale, rounding, bits, grid):
  pv, lv = _grouped(p, log_scale)
  s = scale_from_log(lv)
  codes = quantize_codes(pv, s, rounding=rounding, bits=bits, grid=grid)
  return codes.reshape(p.shape), s.reshape(log_scale.shape)


def tensor_codes(p, log_scale, config: qconfig.QuantConfig):
  """(codes int32 numpy, scale float32 numpy) of one quantized parameter under `config`.

  The codes have `p`'s shape, the scale the log scale's; the values are
  ``dequantize_as(codes, log_scale, config.grid)``.

  Computed in one jitted program (exp, divide, round fused as in the model's
  quantizer): op-by-op evaluation rounds exp(log s) differently in the last ulp,
  which flipped codes at .5 ties on a trained ResNet-20.
  """
  codes, s = _codes_and_scale(jnp.asarray(p), jnp.asarray(log_scale), config.rounding,
                              config.bits, config.grid)
  return np.asarray(codes), np.asarray(s, np.float32)

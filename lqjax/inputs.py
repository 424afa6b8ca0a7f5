"""Learned quantization of a layer's inputs (activations): LSQ+ with a learned offset.

A rule's ``inputs`` (``Rule(".*", config, inputs=QuantConfig(rule="lsq", bits=8,
rounding="round"))``) puts an input quantizer in front of every Dense, DenseGeneral,
Conv, ConvTranspose and Einsum layer (and registered layer) that the rule selects; an
Embed's input is token ids and stays as it is. The quantizer owns two scalars (a
stacked layer's, one per layer of the stack), stored beside the layer's parameters::

    params/fc1/input_quant/log_scale    log s
    params/fc1/input_quant/zero_point   z (float)

Forward, with the signed b-bit range [qn, qp] = [-2^(b-1), 2^(b-1) - 1]::

    q = clip(round((x - z) / s), qn, qp)        integer codes (floor with rounding="floor")
    Q(x) = s * q + z

The offset z places the b-bit grid over an input that is not symmetric, such as a
post-ReLU activation (LSQ+, Bhalgat et al., CVPR-W 2020), and costs an integer layer
one constant per output: ``W^T Q(x) = s * W^T q + z * sum_in W``.

Backward (autodiff of the straight-through form; LSQ's and LSQ+'s gradients):

* x: 1 where the unclipped code is inside [qn, qp], 0 outside;
* s: ``q - (x - z) / s`` inside, the clip level outside;
* z: 0 inside, 1 outside;
* both scaled by LSQ's ``1 / sqrt(N * qp)``, N the input's elements per example.

Rules: ``lsq`` learns s and z; ``fixed`` keeps them where initialisation put them;
``ratio`` carries the thesis's rule over: s grows by ``d log s = -tanh(lambda - r)`` where
``r = B * ||dL/dQ(x)|| / ||x||`` (:func:`ratio_of`; B the batch) is below ``threshold``
lambda (and shrinks above ``relax_threshold``, if set), z learns as under ``lsq``.
One scale per tensor (``granularity="tensor"``, the only one an integer dot can take
out of its sum over the inputs); bits 1..16 must be given.

Initialisation (:func:`init_params`): from the first batch the quantizer sees,
s and z put the grid over [a * min x, a * max x] with the shrink factor a in
:data:`SHRINKS` that gives the smallest squared error on that batch. Linen models take
it from the batch given to ``init`` (a constant dummy batch gets a unit range); call
:func:`lqjax.calibrate` with a batch of real data before training, as the
application does with its first training batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lqjax import qconfig, quant
from lqjax.tree import INPUT_QUANT, SCALE_NAME, ZERO_NAME  # noqa: F401  (the names, here too)
#: Shrink factors a of the initial range [a * min x, a * max x], tried on the first batch.
SHRINKS = tuple(float(a) for a in np.linspace(1.0, 0.3, 15))  # ties keep the wider range
INPUT_RULES = ("lsq", "fixed", "ratio")
_RATIO_EPS = 1e-12

_CALIBRATING = contextvars.ContextVar("lqjax_calibrating", default=False)
_QDQ = contextvars.ContextVar("lqjax_input_qdq", default=None)


@contextlib.contextmanager
def qdq_hook(fn):
  """While set, :func:`fake_quant` (inference only) is ``fn(x, log_scale, zero_point, cfg)``
  where that returns an array, e.g. the ONNX export's QuantizeLinear/DequantizeLinear."""
  token = _QDQ.set(fn)
  try:
    yield
  finally:
    _QDQ.reset(token)


@contextlib.contextmanager
def calibrating():
  """Within this context input quantizers set s and z from the input they see
  (:func:`init_params`); see :func:`lqjax.calibrate`."""
  token = _CALIBRATING.set(True)
  try:
    yield
  finally:
    _CALIBRATING.reset(token)


def is_calibrating() -> bool:
  return _CALIBRATING.get()


def check_config(cfg) -> None:
  """ValueError unless `cfg` is a recipe an input quantizer can learn (one line)."""
  if not isinstance(cfg, qconfig.QuantConfig):
    raise ValueError(f"inputs must be a lqjax.QuantConfig or None, got {type(cfg).__name__}")
  if cfg.rule not in INPUT_RULES:
    raise ValueError(f"inputs rule {cfg.rule!r} is not available for activations; use one of "
                     f"{', '.join(INPUT_RULES)}")
  if cfg.bits is None:
    raise ValueError("inputs need fixed bits (1..16): an activation's width is not learned")
  if cfg.granularity != "tensor":
    raise ValueError(f"inputs take granularity 'tensor' (one scale per input tensor, which an "
                     f"integer dot can take out of its sum), got {cfg.granularity!r}")
  if cfg.grid != "midtread":
    raise ValueError(f"inputs take grid 'midtread' (the offset places the grid), got "
                     f"{cfg.grid!r}")


def _codes(v, rounding):
  return jnp.round(v) if rounding == "round" else jnp.floor(v)


def _grad_scaled(t, g):
  """`t` in the forward pass, exactly (so the integer path sees the same s and z); its
  gradient times `g` in the backward pass (LSQ's gradient scale)."""
  tg = t * g
  return jax.lax.stop_gradient(t) + (tg - jax.lax.stop_gradient(tg))


def fake_quant(x, log_scale, zero_point, cfg: qconfig.QuantConfig):
  """Q(x) = s * clip(round((x - z) / s), qn, qp) + z, with LSQ+'s gradients (see above).

  `log_scale` and `zero_point` are one layer's scalars.
  """
  hook = _QDQ.get()
  out = None if hook is None else hook(x, log_scale, zero_point, cfg)
  if out is not None:
    return out
  qn, qp = quant.code_range(cfg.bits)
  per_example = max(1, int(math.prod(x.shape[1:])) if x.ndim > 1 else int(x.size))
  g = 1.0 / math.sqrt(per_example * max(qp, 1.0))
  s = quant.scale_from_log(jnp.asarray(log_scale))
  z = jnp.asarray(zero_point)
  if cfg.rule == "fixed":
    s, z = jax.lax.stop_gradient(s), jax.lax.stop_gradient(z)
  elif cfg.rule == "ratio":  # s's gradient is the rule's own; z's is LSQ+'s, scaled by g
    thresholds = jnp.asarray([cfg.threshold, jnp.inf if cfg.relax_threshold is None
                              else cfg.relax_threshold], x.dtype)
    return _ratio_quant(x, s.astype(x.dtype), _grad_scaled(z, g).astype(x.dtype), thresholds,
                        cfg.bits, cfg.rounding)
  else:
    s, z = _grad_scaled(s, g), _grad_scaled(z, g)
  s, z = s.astype(x.dtype), z.astype(x.dtype)
  v = (x - z) / s
  raw = _codes(jax.lax.stop_gradient(v), cfg.rounding)
  hard = jnp.clip(raw, qn, qp)
  inside = (raw >= qn) & (raw <= qp)
  q = jnp.where(inside, v + jax.lax.stop_gradient(hard - v), hard)
  return q * s + z


def _qdq(x, s, z, bits, rounding):
  qn, qp = quant.code_range(bits)
  return jnp.clip(_codes((x - z) / s, rounding), qn, qp) * s + z


def ratio_of(g, x):
  """r of an input quantizer: ``B * ||dL/dQ(x)|| / ||x||`` over the batch (B = x.shape[0]).

  The loss is a mean over the batch, so each example's gradient is B times its row of `g`:
  r is the ratio of the per-example norms, and does not change with the batch size."""
  batch = x.shape[0] if x.ndim > 1 else 1
  return batch * jnp.sqrt(jnp.sum(jnp.square(g))) / (jnp.sqrt(jnp.sum(jnp.square(x)))
                                                      + _RATIO_EPS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ratio_quant(x, s, z, thresholds, bits, rounding):
  """Q(x) with the ratio rule's gradient for s (see :func:`fake_quant`)."""
  return _qdq(x, s, z, bits, rounding)


def _ratio_quant_fwd(x, s, z, thresholds, bits, rounding):
  return _qdq(x, s, z, bits, rounding), (x, s, z, thresholds)


def _ratio_quant_bwd(bits, rounding, res, g):
  x, s, z, thresholds = res
  qn, qp = quant.code_range(bits)
  raw = _codes((x - z) / s, rounding)
  inside = (raw >= qn) & (raw <= qp)
  gz = jnp.sum(jnp.where(inside, 0.0, g))
  growth, _ = quant.ratio_growth_of(ratio_of(g, x), thresholds[0], thresholds[1])
  return (jnp.where(inside, g, 0.0), (-growth / s).astype(s.dtype), gz.astype(z.dtype),
          jnp.zeros_like(thresholds))


_ratio_quant.defvjp(_ratio_quant_fwd, _ratio_quant_bwd)


def codes(x, log_scale, zero_point, cfg: qconfig.QuantConfig):
  """The int32 codes of `x` (what :func:`fake_quant` multiplies by s)."""
  s = quant.scale_from_log(log_scale).astype(x.dtype)
  return codes_at(x, s, jnp.asarray(zero_point, x.dtype), cfg.bits, cfg.rounding)


def codes_at(x, s, z, bits: int, rounding: str = "round"):
  """clip(round((x - z) / s), qn, qp) as int32, for a step `s` and offset `z` given."""
  qn, qp = quant.code_range(bits)
  return jnp.clip(_codes((x - z) / s, rounding), qn, qp).astype(jnp.int32)


def init_params(x, cfg: qconfig.QuantConfig):
  """(log s, z) that put the b-bit grid over [a * min x, a * max x], `a` from
  :data:`SHRINKS` with the smallest squared error of Q(x) on `x` (the widest on a tie); a
  constant `x` (a dummy batch) gets the range [c - 1, c + 1] around its value c."""
  x = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
  lo, hi = jnp.min(x), jnp.max(x)
  levels = 2.0 ** cfg.bits - 1
  qn, _ = quant.code_range(cfg.bits)
  varies = hi > lo
  flat = jnp.where(varies, 0.0, 1.0)
  lo, hi = lo - flat, hi + flat
  best = None
  for a in SHRINKS:
    s = (hi - lo) * a / levels
    z = lo * a - qn * s
    err = jnp.mean((fake_quant(x, jnp.log(s), z, _fixed(cfg)) - x) ** 2)
    cand = (err, jnp.log(s), z)
    if best is None:
      best = cand
    else:
      better = (err < best[0]) & varies
      best = tuple(jnp.where(better, new, old) for new, old in zip(cand, best))
  return best[1], best[2]


def _fixed(cfg):
  return dataclasses.replace(cfg, rule="fixed")

"""The second scheme: quantization-encouraging losses (METHOD.md section 5).

Each penalty is a pure function of a parameter tree (Linen params, an
``nnx.State`` or module) and a coefficient (its "penalty rate"); it finds every
quantized parameter P, its scale s and its recipe through
:func:`lqjax.tree.quantized_tensors`, so it works on any quantized model. Group reductions follow the
scale's shape: axes where s has size 1 are shared by one scale.

1. inverse scale: ``alpha * mean(1/s)`` over all scales of a quantizer,
   averaged over quantizers. Pushes scales up.
2. bin count: ``beta * mean_G relu(log2(bins_G) - target_bits)`` with
   ``bins_G = (max P_G - min P_G) / s_G + 1``, averaged over quantizers.
3. deviation: ``gamma * mean((P - Q(P))^2)``, averaged over quantizers, with
   Q(P) = s * stop_gradient(codes): the gradient pulls P to its grid point and
   s to fit the parameters.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from lqjax import qconfig, quant, tree


def _mean_over_quantizers(params, fn, coef=1.0):
  if isinstance(coef, (int, float)) and coef == 0:
    return jnp.zeros(())  # skip the work for a disabled penalty
  terms = [fn(t.p, t.log_scale, t.config) for t in tree.quantized_tensors(params)]
  if not terms:
    return jnp.zeros(())
  return jnp.mean(jnp.stack(terms))


def inverse_scale_penalty(params: Mapping[str, Any], coef: float) -> jax.Array:
  """alpha * mean(1/s)."""
  return coef * _mean_over_quantizers(
      params, lambda p, ls, cfg: jnp.mean(1.0 / quant.scale_from_log(ls)), coef)


def group_bins(p: jax.Array, log_scale: jax.Array) -> jax.Array:
  """bins_G = (max P_G - min P_G) / s_G + 1, of the scale's shape."""
  pshape, sshape = qconfig.grouped_shapes(p.shape, log_scale.shape)
  p = p.reshape(pshape)
  axes = qconfig.shared_axes(pshape, sshape)
  hi = jnp.max(p, axis=axes, keepdims=True) if axes else p
  lo = jnp.min(p, axis=axes, keepdims=True) if axes else p
  return ((hi - lo) / quant.scale_from_log(log_scale.reshape(sshape)) + 1.0).reshape(
      log_scale.shape)


def bin_count_penalty(params: Mapping[str, Any], coef: float,
                      target_bits: float = 0.0) -> jax.Array:
  """beta * mean_G relu(log2(bins_G) - target_bits)."""
  return coef * _mean_over_quantizers(
      params,
      lambda p, ls, cfg: jnp.mean(jax.nn.relu(jnp.log2(group_bins(p, ls)) - target_bits)),
      coef)


def deviation_penalty(params: Mapping[str, Any], coef: float) -> jax.Array:
  """gamma * mean((P - Q(P))^2), Q with each tensor's own rounding and bits."""

  def dev(p, ls, cfg):
    q = jax.lax.stop_gradient(quant.codes_of(p, ls, cfg))
    return jnp.mean(jnp.square(p - quant.dequantize_as(q, ls, cfg.grid, p.dtype)))

  return coef * _mean_over_quantizers(params, dev, coef)


def quant_penalties(params: Mapping[str, Any], *, inverse_scale: float = 0.0,
                    bin_count: float = 0.0, deviation: float = 0.0,
                    target_bits: float = 0.0):
  """Sum of the three penalties over every quantizer in a model.

  Returns:
    (total, {"inverse_scale": ..., "bin_count": ..., "deviation": ...}).
  """
  for name, c in (("inverse_scale", inverse_scale), ("bin_count", bin_count),
                  ("deviation", deviation)):
    if not c >= 0:
      raise ValueError(f"penalty coefficient {name} must be >= 0, got {c}")
  terms = {
      "inverse_scale": inverse_scale_penalty(params, inverse_scale),
      "bin_count": bin_count_penalty(params, bin_count, target_bits),
      "deviation": deviation_penalty(params, deviation),
  }
  return sum(terms.values()), terms

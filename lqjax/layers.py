"""Flax layers: the nested quantizer module and quantized versions of any layer.

* :class:`Quantizer` owns one trainable ``log_scale`` (shape from the
  granularity) in the ``params`` collection and maps P -> Q(P).
* :func:`quantized` turns an existing linen layer class into one whose
  parameters pass through a :class:`Quantizer` on their way to the layer's
  computation. It overrides ``Module.param`` (the layer's own injection point for
  parameters), so the layer's code is not rewritten and no ``lax`` op is
  patched. It works for every layer that creates its parameters with
  ``self.param`` inside a compact method: Dense, DenseGeneral, Conv (depthwise
  too, via ``feature_group_count``), ConvTranspose, Embed, ...
* :data:`QuantDense`, :data:`QuantConv`, :data:`QuantEmbed` are ready-made.

Parameter layout: the quantizer of parameter ``kernel`` is the child module
``kernel_quant`` of the layer, holding ``log_scale``::

    params/Dense_0/kernel                  float weights (the latent P)
    params/Dense_0/kernel_quant/log_scale  log s

Scale initialisation (:func:`lqjax.quant.init_scale`): free bit widths start
from ``init_bits`` bits over each group's range; fixed bit widths use LSQ's
``2 mean|P| / sqrt(Qp)``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Type

import flax.linen as nn
import jax.numpy as jnp

from lqjax import quant, types

QUANT_SUFFIX = "_quant"


class Quantizer(nn.Module):
  """Nested quantizer: owns ``log_scale`` and returns Q(P).

  Attributes:
    config: the :class:`lqjax.types.QuantConfig` of this parameter.
  """

  config: types.QuantConfig

  @nn.compact
  def __call__(self, p):
    cfg = self.config
    shape = types.scale_shape(p.shape, cfg.granularity)
    log_scale = self.param(
        "log_scale",
        lambda _rng: jnp.log(quant.init_scale(
            p, cfg.granularity, bits=cfg.bits, init_bits=cfg.init_bits)))
    if log_scale.shape != shape:
      raise ValueError(
          f"{self.name}: stored scale shape {log_scale.shape} does not match "
          f"granularity {cfg.granularity!r} for a parameter of shape {p.shape} ({shape})")
    scale = quant.scale_from_log(log_scale)
    return quant.fake_quant(p, scale, rule=cfg.rule, threshold=cfg.threshold,
                            rounding=cfg.rounding, bits=cfg.bits,
                            lsq_weight=cfg.lsq_weight, relax_threshold=cfg.relax_threshold)


def quantized(layer_cls: Type[nn.Module]) -> Type[nn.Module]:
  """Returns a subclass of `layer_cls` that quantizes chosen parameters.

  The subclass takes one extra attribute, ``quant``: a mapping from parameter
  name (``"kernel"``, ``"bias"``, ``"embedding"``, ...) to a
  :class:`~lqjax.types.QuantConfig`; parameters not named stay float.

  Example::

    QDense = quantized(nn.Dense)
    layer = QDense(10, quant={"kernel": QuantConfig(granularity="row")})
  """

  class _Quantized(layer_cls):
    quant: Optional[Mapping[str, types.QuantConfig]] = None

    def param(self, name: str, init_fn: Callable[..., Any], *init_args, **kwargs):
      value = super().param(name, init_fn, *init_args, **kwargs)
      cfg = (self.quant or {}).get(name)
      if cfg is None:
        return value
      return Quantizer(cfg, name=name + QUANT_SUFFIX)(value)

  _Quantized.__name__ = "Quantized" + layer_cls.__name__
  _Quantized.__qualname__ = _Quantized.__name__
  return _Quantized


QuantDense = quantized(nn.Dense)
QuantConv = quantized(nn.Conv)
QuantEmbed = quantized(nn.Embed)


def layer_quant(kernel: Optional[types.QuantConfig],
                bias: Optional[types.QuantConfig] = None) -> dict:
  """The ``quant`` mapping for a layer with a kernel and a bias."""
  out = {}
  if kernel is not None:
    out["kernel"] = kernel
  if bias is not None:
    out["bias"] = bias
  return out


def iter_quantized(params: Mapping[str, Any]):
  """Yields ``(path, P, log_scale)`` for every quantized parameter in `params`.

  `path` is the tuple of keys of P (e.g. ``("Dense_0", "kernel")``); the scale
  lives at ``path[:-1] + (path[-1] + "_quant", "log_scale")``.
  """
  from flax import traverse_util  # local: keeps the module import light
  flat = traverse_util.flatten_dict(params)
  for path, value in flat.items():
    if len(path) >= 2 and path[-1] == "log_scale" and path[-2].endswith(QUANT_SUFFIX):
      p_path = path[:-2] + (path[-2][: -len(QUANT_SUFFIX)],)
      if p_path in flat:
        yield p_path, flat[p_path], value

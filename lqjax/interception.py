"""``lqjax.quantize``: one entry point for Linen and NNX models.

It dispatches on the model's API to :mod:`lqjax.linen_quant` or
:mod:`lqjax.nnx_quant`; both use the rules of :mod:`lqjax.rules`.
"""

from __future__ import annotations

from lqjax import rules as rules_lib


def quantize(model, rules=None):
  """Returns `model` with learned-scale quantizers on the parameters `rules` select.

  Args:
    model: a ``flax.linen.Module`` (unbound) or a ``flax.nnx.Module``. Its code
      is not touched.
    rules: a :class:`~lqjax.rules.Rule`, a sequence of them (first match wins), or None for
      ``Rule()`` (every supported layer's kernels and embeddings with the default
      :class:`~lqjax.qconfig.QuantConfig`).

  Returns:
    Linen: a module of a subclass of the model's class, with the same fields and
    the same ``init``/``apply`` signature; each quantized parameter ``kernel``
    gains a sibling ``kernel_quant/log_scale``. NNX: a copy of the model, called
    like the original, whose log scales are ``nnx.Param`` subclasses (so
    ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` trains them).

  Raises:
    QuantizeError: a model quantized already, a model of neither API, rules that
      are not Rules; later (Linen ``init``, or here for NNX) a rule that matches no
      module, an unsupported layer, or a config invalid for a tensor.
  """
  rules = rules_lib.as_rules(rules)
  import flax.linen as nn
  if isinstance(model, nn.Module):
    from lqjax import linen_quant
    return linen_quant.quantize(model, rules)
  try:
    from flax import nnx
  except ImportError:  # pragma: no cover
    nnx = None
  if nnx is not None and isinstance(model, nnx.Module):
    from lqjax import nnx_quant
    return nnx_quant.quantize(model, rules)
  raise rules_lib.QuantizeError(f"lqjax.quantize takes a flax.linen or flax.nnx Module, got "
                      f"{type(model).__name__}")


def calibrate(model, *args, **kwargs):
  """Sets every input quantizer's scale and offset from a batch of real data.

  Each layer's input quantizer (a Rule's ``inputs``, :mod:`lqjax.inputs`) puts its
  b-bit grid over the range of the input it sees in this forward pass, shrunk by the
  factor with the smallest squared error; the layers downstream see inputs quantized
  with the new values. Call it once before training with a batch of a few hundred
  examples.

  Linen: ``variables = lqjax.calibrate(model, variables, batch, **apply_kwargs)`` returns
  new variables (``model.apply``'s arguments; pass ``train=False`` or the like where the
  model has one). NNX: ``lqjax.calibrate(model, batch, ...)`` sets the values in place and
  returns the model.
  """
  import flax.linen as nn
  if isinstance(model, nn.Module):
    from lqjax import linen_quant
    if not args:
      raise TypeError("lqjax.calibrate(model, variables, batch, ...): variables are missing")
    return linen_quant.calibrate(model, *args, **kwargs)
  from lqjax import nnx_quant
  return nnx_quant.calibrate(model, *args, **kwargs)


def integer_inference(model, variables=None, *, min_rows=None, packed=True, **kwargs):
  """A jitted ``fn(x)``: `model` (quantized by :func:`lqjax.quantize`) run from its integer
  codes (:mod:`lqjax.integer`). Linen: ``integer_inference(model, variables, train=False)``,
  `kwargs` going to ``model.apply``; NNX: ``integer_inference(module)``, `kwargs` going to
  its call. ``min_rows``: dots with fewer rows take the float path (default
  :data:`lqjax.integer.MIN_ROWS`, 1: none do; a batch-1 dot is padded to a few rows).
  ``packed=False`` holds codes of at most 4 bits one a byte (no unpacking per call, twice or
  four times the bytes). ``fn.variables`` are the arrays it holds on the device."""
  from lqjax import integer
  min_rows = integer.MIN_ROWS if min_rows is None else min_rows
  import flax.linen as nn
  if isinstance(model, nn.Module):
    from lqjax import linen_quant
    return linen_quant.integer_inference(model, variables, min_rows, kwargs, packed)
  try:
    from flax import nnx
  except ImportError:  # pragma: no cover
    nnx = None
  if nnx is not None and isinstance(model, nnx.Module):
    if variables is not None:
      raise TypeError("lqjax.integer_inference(module) of an NNX module takes no variables")
    from lqjax import nnx_quant
    return nnx_quant.integer_inference(model, min_rows, kwargs, packed)
  raise TypeError("lqjax.integer_inference takes a Linen or NNX model made by lqjax.quantize "
                  f"(got {type(model).__name__})")

"""Linen: the nested quantizer module, and quantization of an unchanged model by rules.

* :class:`Quantizer` owns one trainable ``log_scale`` (shape from the
  granularity), stored as a :class:`lqjax.tree.QuantScale` box that carries the
  tensor's config, and maps P -> Q(P).
* :func:`quantize` (through :func:`lqjax.quantize`) returns the model as an
  instance of a subclass of its own class. Every method call of that model runs
  inside ``flax.linen.intercept_methods``; the interceptor gives each supported
  layer that a rule selects its own ``param`` (the layer's injection point for
  parameters), which passes the parameters the rule names through a
  :class:`Quantizer` child on their way to the layer's computation. The layer's
  code is not rewritten, no ``lax`` op is patched, and the parameter layout is
  the model's own plus a sibling per quantized parameter::

      params/fc1/kernel                   float weights (the latent P)
      params/fc1/kernel_quant/log_scale   QuantScale(log s, config)

  It works under ``jax.jit``, ``jax.grad``, ``nn.scan``/``nn.vmap`` (the scale
  is stacked like the kernel) and for layers called more than once.
* :func:`quantized` makes a quantized subclass of one layer class, for models
  that build their quantized layers by hand.

Scale initialisation (:func:`lqjax.quant.init_scale`): free bit widths start
from ``init_bits`` bits over each group's range; fixed bit widths use LSQ's
``2 mean|P| / sqrt(Qp)``.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any, Callable, Mapping, Optional, Type

import flax.linen as nn
import jax
import jax.numpy as jnp

from lqjax import inputs as inputs_lib, integer, qconfig, quant, rules as rules_lib, tree

#: Layers whose parameters a rule may quantize (subclasses included).
LINEN_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvTranspose, nn.Embed, nn.Einsum)
#: Layers that always stay float, even under a rule that names their parameters.
FLOAT_LAYERS = (nn.BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


class Quantizer(nn.Module):
  """Nested quantizer: owns ``log_scale`` and returns Q(P).

  Attributes:
    config: the :class:`lqjax.qconfig.QuantConfig` of this parameter.
    layout: the parameter's input and output axes (:class:`lqjax.qconfig.Layout`);
      None: the default (last axis out, the one before it in).
  """

  config: qconfig.QuantConfig
  layout: Optional[qconfig.Layout] = None
  # the weight's partitioning, which the scale follows: (names, mesh, logical rules or
  # None, whether the names are logical), from its nn.Partitioned box
  partitioning: Optional[tuple] = None

  @nn.compact
  def __call__(self, p):
    cfg = self.config
    how = integer.stored(self.path[:-1], self.name[: -len(tree.QUANT_SUFFIX)])
    if how is not None:  # integer inference: p is the stored codes, the scale is trained
      shape = qconfig.config_scale_shape(how.shape, cfg, self.layout)
      return how.dequantize(p, self.param(tree.SCALE_NAME, lambda _rng: self._box(
          jnp.zeros(shape), how.shape)))
    shape = qconfig.config_scale_shape(p.shape, cfg, self.layout)
    log_scale = self.param(tree.SCALE_NAME, lambda _rng: self._box(
        quant.init_log_scale(p, cfg, self.layout), p.shape))
    if log_scale.shape != shape:
      raise ValueError(
          f"{self.name}: stored scale shape {log_scale.shape} does not match "
          f"granularity {cfg.granularity!r} for a parameter of shape {p.shape} ({shape})")
    return quant.quantize_param(p, log_scale, cfg)

  def _box(self, log_scale, weight_shape):
    if self.partitioning is None:
      return tree.QuantScale(log_scale, config=self.config)
    names, mesh, rules, logical = self.partitioning
    return tree.QuantScale(log_scale, names=tree.scale_names(names, weight_shape,
                                                             log_scale.shape),
                           mesh=mesh, config=self.config, logical=logical, rules=rules)


#: Variable collection in which :func:`calibrate` receives the input quantizers' new values.
CALIBRATION = "lqjax_calibration"


class InputQuantizer(nn.Module):
  """A layer's input quantizer (:mod:`lqjax.inputs`): owns ``log_scale`` and ``zero_point``
  (initialised from the input it first sees) and returns Q(x)."""

  config: qconfig.QuantConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    log_scale = self.param(tree.SCALE_NAME, lambda _rng: inputs_lib.init_params(x, cfg)[0])
    zero = self.param(tree.ZERO_NAME, lambda _rng: inputs_lib.init_params(x, cfg)[1])
    if inputs_lib.is_calibrating() and not self.is_initializing():
      log_scale, zero = inputs_lib.init_params(x, cfg)
      if not self.is_mutable_collection(CALIBRATION):
        raise ValueError("input quantizers calibrate under lqjax.calibrate(model, variables, "
                         "batch), which makes the collection they write to mutable")
      self.put_variable(CALIBRATION, tree.SCALE_NAME, log_scale)
      self.put_variable(CALIBRATION, tree.ZERO_NAME, zero)
    return inputs_lib.fake_quant(x, log_scale, zero, cfg)


def calibrate(model: nn.Module, variables, *args, **kwargs):
  """`variables` with each input quantizer's s and z set from the batch in `args`
  (:func:`lqjax.inputs.init_params`); `args` and `kwargs` are ``model.apply``'s."""
  from flax import traverse_util
  mutable = kwargs.pop("mutable", [])
  mutable = [mutable] if isinstance(mutable, str) else list(mutable or [])
  with inputs_lib.calibrating():
    _, new = model.apply(variables, *args, mutable=mutable + [CALIBRATION], **kwargs)
  found = traverse_util.flatten_dict(dict(new.get(CALIBRATION, {})))
  if not found:
    raise ValueError("lqjax.calibrate: the model has no input quantizer (give a Rule inputs=)")
  params = traverse_util.flatten_dict(dict(variables["params"]))
  params.update(found)
  out = dict(variables)
  out["params"] = traverse_util.unflatten_dict(params)
  return out


def _count(x) -> int:
  return len(x) if isinstance(x, (tuple, list)) else 1


def layout(module: nn.Module, name: str, ndim: int) -> qconfig.Layout:
  """The input and output axes of `module`'s parameter `name` (see :mod:`lqjax.qconfig`)."""
  if isinstance(module, nn.DenseGeneral):
    n_out = _count(module.features)
    if name == "kernel":
      return qconfig.Layout.of(ndim, _count(module.axis), n_out)
    return qconfig.Layout.of(ndim, 0, n_out)
  if isinstance(module, nn.Embed) and name == "embedding":
    return qconfig.Layout((1,), (0,))
  return qconfig.Layout.default(ndim)


def _quantize_param(module: nn.Module, name: str, value, cfg: qconfig.QuantConfig, path: str):
  how = integer.stored(module.path, name)
  lay = layout(module, name, len(how.shape) if how is not None else value.ndim)
  try:
    qconfig.config_scale_shape(how.shape if how is not None else value.shape, cfg, lay)
  except ValueError as e:
    raise rules_lib.tensor_error(f"{path}/{name}" if path else name, e) from None
  box = module.scope.get_variable("params", name) if module.scope is not None else None
  part = None
  if isinstance(box, nn.Partitioned):
    logical = isinstance(box, nn.LogicallyPartitioned)
    part = (tuple(box.names), box.mesh, box.rules if logical else None, logical)
  return Quantizer(cfg, lay, part, name=name + tree.QUANT_SUFFIX, parent=module)(value)


def quantized(layer_cls: Type[nn.Module]) -> Type[nn.Module]:
  """Returns a subclass of `layer_cls` that quantizes chosen parameters.

  The subclass takes one extra attribute, ``quant``: a mapping from parameter
  name (``"kernel"``, ``"bias"``, ``"embedding"``, ...) to a
  :class:`~lqjax.qconfig.QuantConfig`; parameters not named stay float.
  :func:`lqjax.quantize` does the same for a whole model without naming classes.

  Example::

    QDense = quantized(nn.Dense)
    layer = QDense(10, quant={"kernel": QuantConfig(granularity="row")})
  """

  class _Quantized(layer_cls):
    quant: Optional[Mapping[str, qconfig.QuantConfig]] = None

    def param(self, name: str, init_fn: Callable[..., Any], *init_args, **kwargs):
      value = super().param(name, init_fn, *init_args, **kwargs)
      cfg = (self.quant or {}).get(name)
      if cfg is None:
        return value
      return _quantize_param(self, name, value, cfg, rules_lib.join_path(self.path))

  _Quantized.__name__ = "Quantized" + layer_cls.__name__
  _Quantized.__qualname__ = _Quantized.__name__
  return _Quantized


# ------------------------------------------------------------ rules on a whole model

_ACTIVE = threading.local()


class _Interceptor:
  """Installs a quantizing ``param`` on each module a rule selects, once per instance."""

  def __init__(self, rules):
    self.matcher = rules_lib.Matcher(rules)

  def __call__(self, next_fun, args, kwargs, context):
    mod = context.module
    if isinstance(mod, (Quantizer, InputQuantizer)):
      return next_fun(*args, **kwargs)
    if "_lqjax_param" not in mod.__dict__:
      self._install(mod)
    icfg = mod.__dict__.get("_lqjax_inputs")
    if icfg is not None and context.method_name == "__call__":
      min_rows = integer.route_rows()
      if min_rows is not None and args:
        y = integer.integer_layer(mod, args[0], icfg, min_rows)
        if y is not None:
          return y
      quantizer = InputQuantizer(icfg, name=tree.INPUT_QUANT, parent=mod)
      if args:
        args = (quantizer(args[0]),) + tuple(args[1:])
      elif "inputs" in kwargs:
        kwargs = dict(kwargs, inputs=quantizer(kwargs["inputs"]))
    return next_fun(*args, **kwargs)

  def _install(self, mod):
    path = rules_lib.join_path(mod.path)
    rule = self.matcher.match(path)
    cfgs = rule.configs() if rule is not None else {}
    object.__setattr__(mod, "_lqjax_param", True)
    if rule is not None and rule.inputs is not None and _takes_inputs(mod):
      object.__setattr__(mod, "_lqjax_inputs", rule.inputs)
      self.matcher.saw_inputs(path)
    if not cfgs:
      return
    keep_float = isinstance(mod, FLOAT_LAYERS)
    own_param = type(mod).param
    matcher = self.matcher

    def param(name, init_fn, *init_args, **kwargs):
      if integer.stored(mod.path, name) is not None:  # codes, whose shape is their own
        value = mod.scope.get_variable("params", name)
      else:
        value = own_param(mod, name, init_fn, *init_args, **kwargs)
      matcher.saw_param(path, name)
      cfg = cfgs.get(name)
      if cfg is None or keep_float:
        return value
      if not rules_lib.supports(mod, cfg, LINEN_LAYERS):
        own = type(mod).__bases__[-1] if isinstance(mod, _QuantizedModel) else type(mod)
        raise rules_lib.unsupported(path, own, name, LINEN_LAYERS)
      return _quantize_param(mod, name, value, cfg, path)

    object.__setattr__(mod, "param", param)


def _takes_inputs(mod) -> bool:
  """Whether a rule's ``inputs`` quantize `mod`'s input: a layer with a kernel (not Embed,
  whose input is token ids, nor a norm layer) or a registered one."""
  return (isinstance(mod, LINEN_LAYERS) and not isinstance(mod, nn.Embed)) or \
      isinstance(mod, tuple(rules_lib.REGISTERED))


class _QuantizedModel:
  """Mixin of the class :func:`quantize` makes: its method calls run under the rules."""

  _lqjax_rules: tuple = ()

  def _call_wrapped_method(self, fun, args, kwargs):
    if getattr(_ACTIVE, "depth", 0):  # a nested call of the model's own methods
      return super()._call_wrapped_method(fun, args, kwargs)
    interceptor = _Interceptor(self._lqjax_rules)
    _ACTIVE.depth = 1
    try:
      with nn.intercept_methods(interceptor):
        out = super()._call_wrapped_method(fun, args, kwargs)
    finally:
      _ACTIVE.depth = 0
    if self.scope is not None and self.is_initializing():
      interceptor.matcher.check()
    return out


@functools.lru_cache(maxsize=None)
def _quantized_class(cls, rules):
  return type("Quantized" + cls.__name__, (_QuantizedModel, cls),
              {"_lqjax_rules": rules, "__module__": cls.__module__})


def quantize(model: nn.Module, rules) -> nn.Module:
  """Linen half of :func:`lqjax.quantize` (see there)."""
  if isinstance(model, _QuantizedModel):
    raise rules_lib.QuantizeError(f"lqjax.quantize: this {type(model).__name__} is quantized "
                                  f"already; quantize the float model once, with all its rules")
  if model.scope is not None:
    raise rules_lib.QuantizeError("lqjax.quantize takes an unbound Linen module (before "
                                  "init/apply/bind)")
  cls = _quantized_class(type(model), tuple(rules))
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.init and f.name != "parent"}
  return cls(**fields)


def is_quantized(model) -> bool:
  return isinstance(model, _QuantizedModel)


QuantDense = quantized(nn.Dense)
QuantConv = quantized(nn.Conv)
QuantEmbed = quantized(nn.Embed)


def integer_inference(model, variables, min_rows: int, apply_kwargs, packed: bool = True):
  """Linen half of :func:`lqjax.integer_inference` (see :mod:`lqjax.integer`)."""
  if not isinstance(model, _QuantizedModel):
    raise TypeError("lqjax.integer_inference takes a Linen or NNX model made by "
                    f"lqjax.quantize (got {type(model).__name__})")
  held, plan = integer.prepare(variables, packed)

  def run(held, x):
    with integer.route(plan, min_rows):
      return model.apply(held, x, **apply_kwargs)

  return integer.checked(run, held)

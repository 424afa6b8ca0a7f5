"""NNX: quantization of an unchanged ``flax.nnx`` model by rules.

:func:`quantize` (through :func:`lqjax.quantize`) copies the model
(``nnx.clone``) and, for every supported layer that a rule selects:

* gives each selected parameter ``kernel`` a sibling :class:`Quantizer` module
  ``kernel_quant`` that owns ``log_scale``, a :class:`ScaleParam` (an
  ``nnx.Param`` subclass whose metadata ``config`` is the tensor's recipe);
* turns the parameter's Variable into a :class:`QuantizedParam` (also an
  ``nnx.Param``), which reads as Q(P) while its layer runs and as the latent P
  everywhere else (``nnx.state``, optimizers, checkpoints);
* makes the layer an instance of a subclass of its own class whose public
  methods (``__call__``, ``attend``) compute Q(P) once per call before running
  the layer's own code.

Nothing is mutated while the model runs, so the model works under
``nnx.jit``, ``nnx.grad``, ``nnx.scan`` and under plain ``jax.jit`` of a function
that closes over it. The state layout is the model's own plus a sibling per
quantized parameter (``fc1/kernel``, ``fc1/kernel_quant/log_scale``), as in
Linen.

Layers stacked by ``nnx.vmap`` (for ``nnx.scan`` over layers) may be quantized
from outside, after the stack is built: a parameter with more leading axes than
its layer declares (a Linear kernel of shape (layers, in, out)) is a stack, and
its scales keep the stack's axes under every granularity, so that ``nnx.scan``
slices each layer's scales with its weights. Quantizing inside the vmapped
constructor works too and gives the same scales.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import jax
import jax.numpy as jnp
from flax import nnx

from lqjax import inputs as inputs_lib, integer, qconfig, quant, rules as rules_lib, tree

#: Layers whose parameters a rule may quantize (subclasses included).
NNX_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.ConvTranspose, nnx.Embed, nnx.Einsum)
#: Layers that always stay float.
FLOAT_LAYERS = (nnx.BatchNorm, nnx.LayerNorm, nnx.GroupNorm, nnx.RMSNorm)
#: Methods of a quantized layer that read its quantized parameters.
_METHODS = ("__call__", "attend")


class CodeSum(nnx.Variable):
  """sum_in W_q per output of a layer that integer inference runs (:mod:`lqjax.integer`)."""


def _stored(layer) -> dict:
  return dict(getattr(layer, "_lqjax_stored", ()))


def _integer_call(layer, x, quantizer):
  """The layer's output by the integer route, or None (:func:`lqjax.integer.takes_route`)."""
  integer.check_input(f"of type {type(layer).__name__}", x)
  how = _stored(layer).get("kernel")
  if how is None:
    return None
  log_w = layer.kernel_quant.log_scale[...]
  if not integer.takes_route(layer, x, quantizer.config, how, log_w, integer.route_rows()):
    return None
  bias = getattr(layer, "bias", None)
  if isinstance(bias, nnx.Variable):
    b_how = _stored(layer).get("bias")
    bias = bias.get_value() if b_how is None else b_how.dequantize(
        bias.get_value(), layer.bias_quant.log_scale[...])
  else:
    bias = None
  return integer.compute(layer, x, quantizer.config, how.codes(layer.kernel.get_value()),
                         log_w, quantizer.log_scale[...], quantizer.zero_point[...],
                         layer.kernel_code_sum[...], bias)


class ScaleParam(nnx.Param):
  """A log scale; its metadata ``config`` is its tensor's :class:`~lqjax.qconfig.QuantConfig`."""


_LOCAL = threading.local()


def _active() -> dict:
  if not hasattr(_LOCAL, "values"):
    _LOCAL.values = {}
  return _LOCAL.values


class QuantizedParam(nnx.Param):
  """A parameter that reads as its quantized value Q(P) while its layer runs."""

  def get_value(self, **kwargs):
    q = _active().get(id(self))
    if q is None:
      return super().get_value(**kwargs)
    index = kwargs.get("index", ...)
    return q if index is ... else q[index]


class Quantizer(nnx.Module):
  """Owns ``log_scale`` (a :class:`ScaleParam`) and maps P -> Q(P).

  `sharding`: the weight's sharding metadata (``out_sharding``, ``mesh``,
  ``sharding_rules``); the scale gets the weight's axis names on the axes it keeps
  whole and None on those it reduces (:func:`lqjax.tree.scale_names`)."""

  def __init__(self, p, config: qconfig.QuantConfig, layout: qconfig.Layout | None = None,
               sharding: dict | None = None):
    self.config = config
    value = quant.init_log_scale(p, config, layout)
    meta = {}
    names = tree.scale_names((sharding or {}).get("out_sharding"), p.shape, value.shape)
    if names is not None:
      meta = {k: v for k, v in sharding.items() if v is not None}
      meta["out_sharding"] = names
    self.log_scale = ScaleParam(value, config=config, **meta)

  def __call__(self, p):
    return quant.quantize_param(p, self.log_scale[...], self.config)


class InputQuantizer(nnx.Module):
  """A layer's input quantizer (:mod:`lqjax.inputs`): owns ``log_scale`` and ``zero_point``
  (``nnx.Param``; one per layer of a stack, `stack` its shape) and returns Q(x). They start
  over the range [-1, 1]; :func:`lqjax.calibrate` sets them from data."""

  def __init__(self, config: qconfig.QuantConfig, stack: tuple = ()):
    self.config = config
    log_scale, zero = inputs_lib.init_params(jnp.zeros(()), config)
    self.log_scale = nnx.Param(jnp.broadcast_to(log_scale, stack))
    self.zero_point = nnx.Param(jnp.broadcast_to(zero, stack))

  def __call__(self, x):
    if inputs_lib.is_calibrating():
      log_scale, zero = inputs_lib.init_params(x, self.config)
      self.log_scale[...] = log_scale
      self.zero_point[...] = zero
    return inputs_lib.fake_quant(x, self.log_scale[...], self.zero_point[...], self.config)


def calibrate(model: nnx.Module, *args, **kwargs) -> nnx.Module:
  """Runs `model` on a batch with every input quantizer setting its s and z from the
  input it sees (:func:`lqjax.inputs.init_params`); returns `model`, changed in place."""
  if not isinstance(model, nnx.Module):
    raise TypeError(f"lqjax.calibrate takes a flax.linen or flax.nnx Module, got "
                    f"{type(model).__name__}")
  if not any(isinstance(m, InputQuantizer) for _, m in nnx.iter_graph(model)):
    raise ValueError("lqjax.calibrate: the model has no input quantizer (give a Rule inputs=)")
  with inputs_lib.calibrating():
    model(*args, **kwargs)
  return model


def is_quantized_layer(node) -> bool:
  """Whether `node` is a layer that :func:`quantize` made (its class is made here)."""
  return getattr(type(node), "_lqjax_quantized", False)


@contextlib.contextmanager
def _quantized_values(layer):
  active = _active()
  keys = []
  try:
    stored = _stored(layer)
    for name in layer._lqjax_names:
      var = getattr(layer, name)
      quantizer = getattr(layer, name + tree.QUANT_SUFFIX)
      if name in stored:  # integer inference: the value is the stored codes
        q = stored[name].dequantize(var.get_value(), quantizer.log_scale[...])
      else:
        q = quantizer(var.get_value())
      active[id(var)] = q
      keys.append(id(var))
    yield
  finally:
    for k in keys:
      active.pop(k, None)


def _wrap(fn):
  @functools.wraps(fn)
  def method(self, *args, **kwargs):
    quantizer = getattr(self, tree.INPUT_QUANT, None)
    if fn.__name__ == "__call__" and isinstance(quantizer, InputQuantizer):
      x = args[0] if args else kwargs.get("inputs")
      if integer.route_rows() is not None and x is not None:
        y = _integer_call(self, x, quantizer)
        if y is not None:
          return y
      if args:
        args = (quantizer(args[0]),) + tuple(args[1:])
      elif "inputs" in kwargs:
        kwargs = dict(kwargs, inputs=quantizer(kwargs["inputs"]))
    with _quantized_values(self):
      return fn(self, *args, **kwargs)
  return method


@functools.lru_cache(maxsize=None)
def _quantized_class(cls):
  ns = {name: _wrap(getattr(cls, name)) for name in _METHODS if hasattr(cls, name)}
  ns.update(__module__=cls.__module__, _lqjax_quantized=True)
  return type("Quantized" + cls.__name__, (cls,), ns)


def _declared(layer, name: str):
  """(input axes, output axes) that `layer` declares for its parameter `name`, or None."""
  if isinstance(layer, nnx.LinearGeneral):
    n_out = len(layer.out_features)
    n_in = len(layer.batch_axis) + len(layer.in_features)
    return (n_in, n_out) if name == "kernel" else (0, len(layer.batch_axis) + n_out)
  if isinstance(layer, nnx.Embed) and name == "embedding":
    return "embed"
  if isinstance(layer, (nnx.Linear, nnx.Conv, nnx.ConvTranspose)):
    if name == "bias":
      return (0, 1)
    return (len(getattr(layer, "kernel_size", ())) + 1, 1)  # spatial axes count as inputs
  if isinstance(layer, nnx.Einsum):
    shape = layer.kernel_shape if name == "kernel" else (layer.bias_shape or ())
    return (max(len(shape) - 1, 0), min(len(shape), 1))
  return None


def layout(layer, name: str, ndim: int) -> qconfig.Layout:
  """The input, output and stack axes of `layer`'s parameter `name` (see
  :mod:`lqjax.qconfig`): leading axes beyond what the layer declares are a stack's
  (``nnx.vmap``)."""
  d = _declared(layer, name)
  if d is None:
    return qconfig.Layout.default(ndim)
  if d == "embed":
    st = ndim - 2
    return qconfig.Layout((st + 1,), (st,), tuple(range(st)))
  n_in, n_out = d
  stacked = ndim - n_in - n_out
  if stacked < 0:
    return qconfig.Layout.default(ndim)
  if isinstance(layer, nnx.LinearGeneral):
    # its own batch axes lead, like a stack's: both keep their scales
    return qconfig.Layout.of(ndim, len(layer.in_features) if name == "kernel" else 0, n_out)
  base = qconfig.Layout.default(ndim - stacked)
  shift = lambda axes: tuple(a + stacked for a in axes)  # noqa: E731
  return qconfig.Layout(shift(base.inputs), shift(base.outputs), tuple(range(stacked)))


def _quantize_layer(layer, cfgs: dict, path: str, inputs=None):
  names = []
  for name, cfg in cfgs.items():
    var = getattr(layer, name, None)
    if not isinstance(var, nnx.Param):
      continue
    value = var.get_value()
    lay = layout(layer, name, value.ndim)
    try:
      qconfig.config_scale_shape(value.shape, cfg, lay)
    except ValueError as e:
      raise rules_lib.tensor_error(f"{path}/{name}" if path else name, e) from None
    meta = var.get_metadata()
    sharding = {k: meta.get(k) for k in ("out_sharding", "mesh", "sharding_rules")}
    try:
      quantizer = Quantizer(value, cfg, lay, sharding)
    except ValueError as e:
      if "mesh" not in str(e):
        raise
      raise rules_lib.QuantizeError(
          f"lqjax.quantize: {path}/{name} is partitioned as {tuple(meta['out_sharding'])} and "
          f"its scale follows it: quantize the model inside the mesh it was made in "
          f"(with jax.set_mesh(mesh): ...)") from None
    setattr(layer, name, QuantizedParam(value, **{k: v for k, v in meta.items()
                                                  if k != "on_get_value"}))
    setattr(layer, name + tree.QUANT_SUFFIX, quantizer)
    names.append(name)
  if inputs is not None:
    kernel = getattr(layer, "kernel", None)
    stack = ()
    if isinstance(kernel, nnx.Param):
      value = kernel.get_value()
      stack = tuple(value.shape[a] for a in layout(layer, "kernel", value.ndim).stacked)
    setattr(layer, tree.INPUT_QUANT, InputQuantizer(inputs, stack))
  if names or inputs is not None:
    layer.__class__ = _quantized_class(type(layer))
    layer._lqjax_names = tuple(names)


def _takes_inputs(mod) -> bool:
  """Whether a rule's ``inputs`` quantize `mod`'s input (a layer with a kernel, not Embed)."""
  return (isinstance(mod, NNX_LAYERS) and not isinstance(mod, nnx.Embed)) or \
      isinstance(mod, tuple(rules_lib.REGISTERED))


def quantize(model: nnx.Module, rules) -> nnx.Module:
  """NNX half of :func:`lqjax.quantize` (see there)."""
  for path, node in nnx.iter_graph(model):
    if is_quantized_layer(node) or isinstance(node, (Quantizer, InputQuantizer)):
      where = rules_lib.join_path(path) or "the model"
      raise rules_lib.QuantizeError(f"lqjax.quantize: {where} is quantized already; quantize "
                                    f"the float model once, with all its rules")
  model = nnx.clone(model)
  matcher = rules_lib.Matcher(rules)
  modules = [(rules_lib.join_path(p), m) for p, m in nnx.iter_graph(model)
             if isinstance(m, nnx.Module)]
  for path, mod in modules:
    rule = matcher.match(path)
    for name, value in vars(mod).items():
      if isinstance(value, nnx.Param):
        matcher.saw_param(path, name)
    cfgs = rule.configs() if rule is not None else {}
    inputs = rule.inputs if rule is not None and _takes_inputs(mod) else None
    if inputs is not None and not isinstance(mod, FLOAT_LAYERS):
      matcher.saw_inputs(path)
    if (not cfgs and inputs is None) or isinstance(mod, FLOAT_LAYERS):
      continue
    for name, cfg in cfgs.items():
      if isinstance(vars(mod).get(name), nnx.Param) and \
          not rules_lib.supports(mod, cfg, NNX_LAYERS):
        raise rules_lib.unsupported(path, type(mod), name, NNX_LAYERS)
    _quantize_layer(mod, cfgs, path, inputs)
  matcher.check()
  return model


def integer_inference(model: nnx.Module, min_rows: int, kwargs, packed: bool = True):
  """NNX half of :func:`lqjax.integer_inference`: a copy of `model` holds the codes, each
  quantized layer its :class:`lqjax.integer.Stored` and :class:`CodeSum`."""
  model = nnx.clone(model)
  tensors = tree.quantized_tensors(model)
  if not tensors:
    raise ValueError("lqjax.integer_inference: the model has no quantized tensor (quantize "
                     "it with lqjax.quantize)")
  def stacked(t):  # layers stacked by nnx.vmap: each keeps its own codes (nnx.scan slices)
    return len(layout(_child(model, t.path[:-1]), t.path[-1], t.p.ndim).stacked)

  layers = {}
  for t, codes, value, how in integer.stored_tensors(tensors, packed, stacked):
    layer = _child(model, t.path[:-1])
    getattr(layer, t.path[-1]).set_value(jnp.asarray(value))
    layers.setdefault(id(layer), (layer, {}))[1][t.path[-1]] = how
    if t.path[-1] == "kernel":
      layer.kernel_code_sum = CodeSum(jnp.asarray(integer.code_sum(codes, stacked(t))))
  for layer, stored in layers.values():
    layer._lqjax_stored = tuple(sorted(stored.items()))
  graphdef, state = nnx.split(model)

  def run(state, x):
    with integer.route(None, min_rows):
      return nnx.merge(graphdef, state)(x, **kwargs)

  return integer.checked(run, state)


def _child(node, path):
  for key in path:
    node = node[int(key)] if key.isdigit() and not hasattr(node, key) else getattr(node, key)
  return node

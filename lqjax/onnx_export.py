"""ONNX export of any quantized model, with integer initializers and ``DequantizeLinear``.

:func:`export_onnx` traces ``fn(variables, x)`` with ``jax2onnx`` (which reads
the JAX program, so any Linen or NNX model works) with every array of
`variables` as a graph input and the quantizers switched off
(:func:`lqjax.quant.passthrough`). It then replaces each such input by an
initializer:

* a quantized tensor: its integer codes (ONNX INT2 or UINT2, four a byte, or INT4 or
  UINT4, two a byte, where they fit, else int8, int16, int32; INT2 needs opset 25,
  :data:`OPSET`: with an older onnx, INT4) followed by ``DequantizeLinear`` with the
  tensor's own scales:

  - one scale per tensor: a scalar scale;
  - one scale per slice of a single axis (``row``/``channel``/``column``): a 1-D
    per-axis scale with ``axis`` set;
  - blocks along one axis (``block``): a blocked ``DequantizeLinear`` (``axis`` and
    ``block_size``, opset 21);
  - anything else (``element``, ``spatial``, several kept axes): ``DequantizeLinear``
    with scale 1 followed by a ``Mul`` with the full float scale tensor.

  A ``midrise`` tensor's levels s * (q + 1/2) are stored as the odd integers 2q + 1
  with scales s / 2: the same values, exactly.

* any other array (biases left float, batch statistics): a float initializer.

* an input quantizer (:mod:`lqjax.inputs`, rounding ``round``, at most 8 bits):
  ``Sub(x, z)``, ``QuantizeLinear`` to int8 (a ``Clip`` below 8 bits),
  ``DequantizeLinear``, ``Add(z)``; the float offset z of LSQ+ is not an integer zero
  point, hence the Sub/Add. :func:`build_integer` exports the integer function instead,
  its Dense layers as ``MatMulInteger``.

No initializer is left that no node reads, and no node that no output needs.

The weights enter the graph in the model's own layout; the layer's own
transposes (jax2onnx emits them) follow. Codes and scales are computed as the
packed file computes them (:func:`lqjax.quant.tensor_codes`), so the
graph's weights are the reloaded model's, bit for bit. Needs the optional extra
``lqjax[export]`` (onnx, onnxruntime, jax2onnx).

The program is traced to JAX primitives first (``jax.make_jaxpr``, the batch
axis symbolic) and jax2onnx lowers those: its own Flax-level plugins are never
reached, so the graph is the model's computation exactly as JAX runs it.
"""

from __future__ import annotations

import contextlib
import re
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lqjax import fileio, inputs as inputs_lib, integer, qconfig, quant, tree

OPSET = 25  # INT2/UINT2 since 25, INT4/UINT4 since 21


def _opset() -> int:
  """:data:`OPSET`, or the newest the installed onnx knows (at least 23) if older."""
  import onnx
  return min(OPSET, max(23, onnx.defs.onnx_opset_version()))


class ExportError(RuntimeError):
  """The ONNX converter failed on a program (one line: versions and the converter's reason)."""


def _int_dtype(codes: np.ndarray):
  """The narrowest integer type that holds every code: ONNX's INT2 (-2..1) or UINT2
  (0..3), four codes a byte, INT4 (-8..7) or UINT4 (0..15), two a byte, else int8,
  int16, int32."""
  import ml_dtypes
  lo, hi = (int(codes.min()), int(codes.max())) if codes.size else (0, 0)
  narrow = [(ml_dtypes.int4, (-8, 7)), (ml_dtypes.uint4, (0, 15))]
  if _opset() >= 25 and hasattr(ml_dtypes, "int2"):
    narrow = [(ml_dtypes.int2, (-2, 1)), (ml_dtypes.uint2, (0, 3))] + narrow
  for dt, (tlo, thi) in narrow:
    if tlo <= lo and hi <= thi:
      return dt
  for dt in (np.int8, np.int16, np.int32):
    info = np.iinfo(dt)
    if info.min <= lo and hi <= info.max:
      return dt
  raise ValueError("codes exceed int32")


def _dequant_nodes(helper, numpy_helper, name, codes, scale):
  """(initializers, nodes) that compute tensor `name` from integer codes and scales."""
  blocked = [i for i, (d, e) in enumerate(zip(codes.shape, scale.shape)) if e not in (1, d)]
  if len(blocked) == 1:  # blocks along one axis: a blocked DequantizeLinear (opset 21)
    a = blocked[0]
    full = tuple(e if i == a else d for i, (d, e) in enumerate(zip(codes.shape, scale.shape)))
    q = numpy_helper.from_array(codes.astype(_int_dtype(codes)), name + "_codes")
    s = numpy_helper.from_array(
        np.ascontiguousarray(np.broadcast_to(scale, full), np.float32), name + "_scale")
    return [q, s], [helper.make_node("DequantizeLinear", [q.name, s.name], [name], axis=a,
                                     block_size=codes.shape[a] // scale.shape[a])]
  if qconfig.is_blocked(codes.shape, scale.shape):  # codes in the grouped view, then reshaped
    vshape, vs = qconfig.grouped_shapes(codes.shape, scale.shape)
    q = numpy_helper.from_array(codes.reshape(vshape).astype(_int_dtype(codes)), name + "_codes")
    one = numpy_helper.from_array(np.float32(1.0), name + "_one")
    s = numpy_helper.from_array(scale.reshape(vs).astype(np.float32), name + "_scale")
    shape = numpy_helper.from_array(np.asarray(codes.shape, np.int64), name + "_shape")
    return [q, one, s, shape], [
        helper.make_node("DequantizeLinear", [q.name, one.name], [name + "_int"]),
        helper.make_node("Mul", [name + "_int", s.name], [name + "_grouped"]),
        helper.make_node("Reshape", [name + "_grouped", shape.name], [name])]
  q = numpy_helper.from_array(codes.astype(_int_dtype(codes)), name + "_codes")
  kept = [i for i, d in enumerate(scale.shape) if d != 1]
  if not kept:
    s = numpy_helper.from_array(np.float32(scale.reshape(())), name + "_scale")
    return [q, s], [helper.make_node("DequantizeLinear", [q.name, s.name], [name])]
  if len(kept) == 1:
    s = numpy_helper.from_array(scale.reshape(-1).astype(np.float32), name + "_scale")
    return [q, s], [helper.make_node("DequantizeLinear", [q.name, s.name], [name],
                                     axis=kept[0])]
  one = numpy_helper.from_array(np.float32(1.0), name + "_one")
  s = numpy_helper.from_array(scale.astype(np.float32), name + "_scale")
  return [q, one, s], [
      helper.make_node("DequantizeLinear", [q.name, one.name], [name + "_int"]),
      helper.make_node("Mul", [name + "_int", s.name], [name])]


def _primitives(jaxpr):
  """The names of a jaxpr's primitives, those of its inner jaxprs (scan, cond, pjit) too."""
  for eqn in jaxpr.eqns:
    yield eqn.primitive.name
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _primitives(inner)


def _refuse_random(jaxpr):
  """One line for a program that draws random numbers, which an ONNX graph cannot."""
  drawn = sorted({n for n in _primitives(jaxpr)
                  if n.startswith("random_") or n.startswith("threefry")})
  if drawn:
    raise ExportError(
        f"the program uses the random-number primitive(s) {', '.join(drawn)}, which ONNX "
        f"cannot express; a Linen nn.RNN splits a key for its initial carry when it is "
        f"given none: pass initial_carry= (e.g. the cell's initialize_carry(key, x[:, 0]."
        f"shape) made outside, or zeros) to the RNN call, and keep dropout deterministic")


def _pool_2d(prim, x, params):
  """An NHWC ``reduce_window`` over H, W as one over the last two axes of (N*C, H, W).

  jax2onnx lowers ``reduce_window_max`` as a ``MaxPool`` whose spatial axes are all
  the operand's axes; onnxruntime pools at most three, so a 4-D NHWC window is
  refused. The same windows over (N*C, H, W) give the same values.
  """
  n, h, w, c = x.shape
  y = jnp.transpose(x, (0, 3, 1, 2)).reshape((-1, h, w))
  pad = tuple(params["padding"])
  sub = lambda k: (1,) + tuple(params[k][1:3])
  out = prim.bind(y, window_dimensions=sub("window_dimensions"),
                  window_strides=sub("window_strides"), padding=((0, 0),) + pad[1:3],
                  base_dilation=sub("base_dilation"), window_dilation=sub("window_dilation"))
  return jnp.transpose(out.reshape((n, c) + out.shape[1:]), (0, 2, 3, 1))


def _is_nhwc_pool(eqn) -> bool:
  p = eqn.params
  if eqn.primitive.name != "reduce_window_max" or len(eqn.invars[0].aval.shape) != 4:
    return False
  return all(tuple(p[k])[i] == 1 for k in ("window_dimensions", "window_strides",
                                           "base_dilation", "window_dilation")
             for i in (0, 3)) and tuple(p["padding"][0]) == (0, 0) \
      and tuple(p["padding"][3]) == (0, 0)


def _replay(jaxpr, consts, *args):
  """Evaluates `jaxpr` primitive by primitive (as ``jax.core.eval_jaxpr``), with
  NHWC max pooling rewritten by :func:`_pool_2d`."""
  from jax.extend.core import Literal
  env = {}
  read = lambda v: v.val if isinstance(v, Literal) else env[v]
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if _is_nhwc_pool(eqn):
      ans = _pool_2d(eqn.primitive, invals[0], eqn.params)
    else:
      ans = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    if eqn.primitive.multiple_results:
      env.update(zip(eqn.outvars, ans))
    else:
      env[eqn.outvars[0]] = ans
  return [read(v) for v in jaxpr.outvars]


@contextlib.contextmanager
def _module_attributes_restored(prefixes=("jax", "flax", "numpy")):
  """Restores every attribute of the loaded ``jax``/``flax``/``numpy`` modules on exit.

  jax2onnx 0.17 patches library functions while it converts and leaves some of
  them patched afterwards (``jax.numpy.cumsum`` then refuses an axis argument in
  the rest of the process). The conversion runs inside this guard.
  """
  mods = [m for name, m in list(sys.modules.items())
          if m is not None and name.split(".")[0] in prefixes]
  saved = [(m, dict(vars(m))) for m in mods]
  try:
    yield
  finally:
    for m, attrs in saved:
      current = vars(m)
      for k, v in attrs.items():
        if current.get(k, _MISSING) is not v:
          setattr(m, k, v)


_MISSING = object()


def build(fn: Callable[[Any, Any], Any], variables, example_input, *,
          dynamic_batch: bool = True, model_name: str = "lqjax_model", weights: str = "int"):
  """Returns an ``onnx.ModelProto`` of ``fn(variables, x)`` (see the module docstring).

  Args:
    fn: ``fn(variables, x) -> output``, e.g. ``lambda v, x: model.apply(v, x)``.
    variables: the trained tree (Linen variables, ``nnx.State``); quantized
      tensors carry their recipes.
    example_input: an array (or ``jax.ShapeDtypeStruct``) with the input's
      shape and dtype.
    dynamic_batch: make the input's first axis symbolic (``N``).
    weights: ``"int"`` (default): each quantized tensor as its integer codes and
      ``DequantizeLinear``, the small file. ``"float"``: the same dequantized values as
      float32 initializers, a file the size of the float model's; onnxruntime runs the
      dequantization of ``"int"`` on every call, which costs most at small batches
      (docs/PERFORMANCE.md, "onnxruntime on the exported integer-weight graphs").
  """
  if weights not in ("int", "float"):
    raise ValueError(f"weights must be 'int' or 'float', got {weights!r}")
  from onnx import helper, numpy_helper
  _register_plugins()

  variables = jax.device_get(variables)
  qt = {t.path: t for t in tree.quantized_tensors(variables)}
  replaced = {}
  for t in qt.values():
    cfg = t.config
    codes, scale = quant.tensor_codes(t.p, t.log_scale, cfg)
    values = np.asarray(quant.dequantize_as(jnp.asarray(codes), t.log_scale, cfg.grid))
    if cfg.offset:  # s * (q + 1/2) = (s / 2) * (2q + 1): integer codes again, and exact
      codes, scale = 2 * codes.astype(np.int64) + 1, scale / np.float32(2)
    replaced[t.path] = (codes, scale, values)
  inputs, rebuild = _graph_inputs(variables, {p: r[2] for p, r in replaced.items()})

  def traced(x, *arrs):
    with quant.passthrough(), inputs_lib.qdq_hook(_qdq):
      return fn(rebuild(arrs), x)

  paths, arrays = [p for p, _ in inputs], [a for _, a in inputs]
  names = ["input"] + ["w_" + "_".join(p) for p in paths]
  model = _convert(traced, example_input, arrays, names, dynamic_batch, model_name)
  inits, nodes = [], []
  for name, path, arr in zip(names[1:], paths, arrays):
    if path in replaced and weights == "int":
      i, n = _dequant_nodes(helper, numpy_helper, name, replaced[path][0], replaced[path][1])
      inits += i
      nodes += n
    else:  # (a log scale's initializer is unused once dequantized: pruned below)
      inits.append(numpy_helper.from_array(arr, name))
  return _finish(model, inits, nodes)


def build_integer(int_fn, example_input, *, dynamic_batch: bool = True,
                  model_name: str = "lqjax_integer_model"):
  """Returns an ``onnx.ModelProto`` of an integer function
  (``lqjax.integer_inference(model, variables, packed=False)``): its Dense/Linear layers with
  quantized inputs as onnxruntime's integer product.

  Each such layer is ``Sub(x, z)``, ``QuantizeLinear`` to uint8 codes with zero point
  2^(b-1) (a ``Clip`` below 8 bits), ``MatMulInteger`` with the layer's int8 weight codes
  (int32 sums, exact), then the epilogue ``s s_w acc + z s_w sum(W_q) + b`` in float, the
  integer function's own. Convolutions take the float path: the fake-quantized input and the
  kernel dequantized from its codes (onnxruntime's ConvInteger with int8 weights was 3x to
  5x slower than its float Conv, docs/PERFORMANCE.md). Codes that fit INT4/INT2 are stored so
  and cast to int8 where the graph starts (onnxruntime folds the cast when it loads).
  Inputs quantized with ``rounding="floor"`` take the float path (``QuantizeLinear``
  rounds half to even). A stack run by ``nnx.scan`` is one ONNX ``Loop``, each layer's
  input scale a tensor the loop slices.
  """
  run = getattr(int_fn, "run", None)
  if run is None:
    raise TypeError("build_integer takes the function of lqjax.integer_inference(...)")
  from onnx import helper, numpy_helper
  _register_plugins()
  inputs, rebuild = _graph_inputs(jax.device_get(int_fn.variables), {})
  for path, arr in inputs:
    if arr.dtype == np.uint8:
      raise ValueError("build_integer: the function holds packed codes; make it with "
                       "lqjax.integer_inference(..., packed=False)")

  def traced(x, *arrs):
    with integer.dot_hook(_int_matmul), inputs_lib.qdq_hook(_qdq):
      return run(rebuild(arrs), x)

  names = ["input"] + ["w_" + "_".join(p) for p, _ in inputs]
  model = _convert(traced, example_input, [a for _, a in inputs], names, dynamic_batch,
                   model_name)
  inits, nodes = [], []
  for name, (_, arr) in zip(names[1:], inputs):
    narrow = np.dtype(_int_dtype(arr)) if np.issubdtype(arr.dtype, np.integer) else arr.dtype
    if narrow != arr.dtype:  # int8 codes that fit INT4 or INT2
      inits.append(numpy_helper.from_array(arr.astype(narrow), name + "_codes"))
      nodes.append(helper.make_node("Cast", [name + "_codes"], [name],
                                    to=helper.np_dtype_to_tensor_dtype(arr.dtype)))
    else:
      inits.append(numpy_helper.from_array(arr, name))
  return _finish(model, inits, nodes)


def _graph_inputs(variables, values):
  """([(path, array)] of the graph's inputs, ``rebuild(arrays)`` -> the tree): every array
  leaf of `variables` (`values` replacing some) except the input quantizers' scales and
  offsets, which stay constants of the trace so that :func:`_qdq` and :func:`_int_matmul`
  can write them into the graph as QuantizeLinear's attributes."""
  leaves, treedef = tree.leaves(variables)
  fixed = {path for path, _ in leaves if tree.INPUT_QUANT in path}
  inputs = [(path, np.asarray(values[path] if path in values else tree.leaf_array(leaf)))
            for path, leaf in leaves if path not in fixed]

  def rebuild(arrs):
    it = iter(arrs)
    vals = [np.asarray(tree.leaf_array(leaf)) if path in fixed else next(it)
            for path, leaf in leaves]
    return jax.tree_util.tree_unflatten(
        treedef, [tree.with_array(leaf, a) for (_, leaf), a in zip(leaves, vals)])
  return inputs, rebuild


def _constant_scale(log_scale, zero):
  """(s, z) as Python floats when both are constants of the trace, else None."""
  with jax.ensure_compile_time_eval():
    s = quant.scale_from_log(jnp.asarray(log_scale)).astype(np.float32)
    z = jnp.asarray(zero, np.float32)
  if isinstance(s, jax.core.Tracer) or isinstance(z, jax.core.Tracer) or np.size(s) != 1 \
      or np.size(z) != 1:
    return None
  return float(np.asarray(s).reshape(())), float(np.asarray(z).reshape(()))


def _qdq(x, log_scale, zero, cfg):
  """An input quantizer as QuantizeLinear/DequantizeLinear (:data:`_QDQ`), or None (the float
  ops) for ``rounding="floor"``, widths over 8 bits or a scale that is not a constant."""
  sz = _constant_scale(log_scale, zero)
  if sz is None or cfg.rounding != "round" or cfg.bits > 8:
    return None
  return _QDQ.bind(x, scale=sz[0], zero=sz[1], bits=int(cfg.bits))


def _int_matmul(x, log_scale, zero, icfg, codes_w):
  """The int32 product of `x`'s input codes and the weight codes, as one primitive that the
  ONNX graph spells QuantizeLinear + MatMulInteger (:func:`build_integer`). A scale that is
  not a constant of the trace (one layer's slice of a stack run by ``nnx.scan``) is an
  operand, a tensor of the graph."""
  sz = _constant_scale(log_scale, zero)
  if sz is not None:
    return _INT_MATMUL.bind(x, codes_w, scale=sz[0], zero=sz[1], bits=int(icfg.bits))
  if np.size(log_scale) != 1 or np.size(zero) != 1:
    raise ExportError("build_integer: an input quantizer with more than one scale has no "
                      "MatMulInteger form (QuantizeLinear takes one scale per tensor here)")
  s = quant.scale_from_log(jnp.asarray(log_scale)).astype(jnp.float32).reshape(())
  z = jnp.asarray(zero, jnp.float32).reshape(())
  return _INT_MATMUL_AT.bind(x, codes_w, s, z, bits=int(icfg.bits))


def _int_matmul_reference(x, w, *, scale, zero, bits):
  """What :data:`_INT_MATMUL` computes, in JAX (as lqjax.integer's own route)."""
  return _int_matmul_at_reference(x, w, np.float32(scale), np.float32(zero), bits=bits)


def _int_matmul_at_reference(x, w, scale, zero, *, bits):
  """What :data:`_INT_MATMUL_AT` computes: :data:`_INT_MATMUL` with the scale and offset as
  operands."""
  q = inputs_lib.codes_at(x, scale, zero, bits).astype(jnp.int8)
  return lax.dot_general(q, w, (((q.ndim - 1,), (0,)), ((), ())),
                         preferred_element_type=jnp.int32)


def _qdq_reference(x, *, scale, zero, bits):
  """What :data:`_QDQ` computes, in JAX: s * clip(round((x - z) / s), qn, qp) + z."""
  s, z = np.float32(scale), np.float32(zero)
  return inputs_lib.codes_at(x, s, z, bits).astype(x.dtype) * s + z


def _primitive(name, reference, abstract):
  from jax.extend.core import Primitive
  from jax.interpreters import mlir
  p = Primitive(name)
  p.def_impl(reference)
  p.def_abstract_eval(abstract)
  mlir.register_lowering(p, mlir.lower_fun(reference, multiple_results=False))
  return p


def _int_matmul_abstract(x, w, *_, **__):
  return jax.core.ShapedArray(tuple(x.shape[:-1]) + (w.shape[-1],), jnp.int32)


_INT_MATMUL = _primitive("lqjax_int_matmul", _int_matmul_reference, _int_matmul_abstract)
_INT_MATMUL_AT = _primitive("lqjax_int_matmul_at", _int_matmul_at_reference,
                            _int_matmul_abstract)
_QDQ = _primitive("lqjax_qdq", _qdq_reference,
                  lambda x, **_: jax.core.ShapedArray(x.shape, x.dtype))
_PLUGINS = []


def _register_plugins():
  """Registers the jax2onnx lowerings of :data:`_INT_MATMUL` and :data:`_QDQ` (once)."""
  if _PLUGINS:
    return
  import onnx_ir as ir
  from jax2onnx.plugins._ir_shapes import _ensure_value_metadata, _stamp_type_and_shape
  from jax2onnx.plugins.plugin_system import PrimitiveLeafPlugin, register_primitive

  def codes(ctx, eqn, unsigned):
    """(x's b-bit codes: int8, or uint8 with zero point 128; the scale, zero-point and z
    initializers; a function that types a new value)."""
    b = ctx.builder
    x = ctx.get_value_for_var(eqn.invars[0], name_hint=ctx.fresh_name("lq_x"))
    shape = tuple(eqn.invars[0].aval.shape)
    qn, qp = quant.code_range(eqn.params["bits"])
    mid, dtype = (128, np.uint8) if unsigned else (0, np.int8)
    kind = ir.DataType.UINT8 if unsigned else ir.DataType.INT8
    const = lambda hint, v: b.add_initializer_from_scalar(ctx.fresh_name(hint), v)

    def typed(v, dt=ir.DataType.FLOAT, shp=shape):
      v.type = ir.TensorType(dt)
      _stamp_type_and_shape(v, shp)
      _ensure_value_metadata(ctx, v)
      return v

    zp = const("lq_zp", dtype(mid))
    if "scale" in eqn.params:  # constants: initializers
      s = const("lq_s", np.float32(eqn.params["scale"]))
      z = const("lq_z", np.float32(eqn.params["zero"]))
    else:  # operands (a scanned layer's slice): values of the graph
      s, z = (ctx.get_value_for_var(v, name_hint=ctx.fresh_name(h))
              for v, h in zip(eqn.invars[2:4], ("lq_s", "lq_z")))
    shifted = typed(b.Sub(x, z, _outputs=[ctx.fresh_name("lq_shift")]))
    q = typed(b.QuantizeLinear(shifted, s, zp, _outputs=[ctx.fresh_name("lq_q")]), kind)
    if eqn.params["bits"] < 8:
      q = typed(b.Clip(q, const("lq_lo", dtype(mid + qn)), const("lq_hi", dtype(mid + qp)),
                       _outputs=[ctx.fresh_name("lq_clip")]), kind)
    return q, s, zp, z, typed

  def bind(ctx, eqn, make):
    out = ctx.get_value_for_var(eqn.outvars[0], name_hint=ctx.fresh_name("lq_out"))
    name = out.name if getattr(out, "producer", lambda: None)() is None \
        else ctx.fresh_name("lq_out")
    ctx.bind_value_for_var(eqn.outvars[0], make(name))

  @register_primitive(jaxpr_primitive=_INT_MATMUL.name, context="lqjax",
                      component="int_matmul", since="0", testcases=[])
  class IntMatmul(PrimitiveLeafPlugin):
    def lower(self, ctx, eqn):
      q, _, zp, _, typed = codes(ctx, eqn, unsigned=True)
      w = ctx.get_value_for_var(eqn.invars[1], name_hint=ctx.fresh_name("lq_w"))
      bind(ctx, eqn, lambda name: typed(ctx.builder.MatMulInteger(q, w, zp, _outputs=[name]),
                                        ir.DataType.INT32, tuple(eqn.outvars[0].aval.shape)))

  @register_primitive(jaxpr_primitive=_INT_MATMUL_AT.name, context="lqjax",
                      component="int_matmul_at", since="0", testcases=[])
  class IntMatmulAt(IntMatmul):
    pass

  @register_primitive(jaxpr_primitive=_QDQ.name, context="lqjax", component="qdq",
                      since="0", testcases=[])
  class Qdq(PrimitiveLeafPlugin):
    def lower(self, ctx, eqn):
      b = ctx.builder
      q, s, zp, z, typed = codes(ctx, eqn, unsigned=False)
      d = typed(b.DequantizeLinear(q, s, zp, _outputs=[ctx.fresh_name("lq_dq")]))
      bind(ctx, eqn, lambda name: typed(b.Add(d, z, _outputs=[name])))

  _PLUGINS.extend([IntMatmul, IntMatmulAt, Qdq])


def _finish(model, inits, nodes):
  """`model` with its weight inputs replaced by `inits` and `nodes`, pruned and checked."""
  import onnx
  g = model.graph
  keep_inputs = [i for i in g.input if i.name == "input"]
  del g.input[:]
  g.input.extend(keep_inputs)
  old_nodes = list(g.node)
  del g.node[:]
  g.node.extend(nodes + old_nodes)
  g.initializer.extend(inits)
  model = _without_unused(model)
  onnx.checker.check_model(model)
  return model


def _convert(traced, example_input, arrays, names, dynamic_batch, model_name):
  """jax2onnx's model of ``traced(x, *arrays)`` (inputs named `names`), traced to
  primitives first and replayed (see the module docstring)."""
  from jax2onnx import to_onnx
  x_shape = tuple(np.shape(example_input))
  x_dtype = getattr(example_input, "dtype", None) or np.asarray(example_input).dtype
  if dynamic_batch:
    x_shape = (jax.export.symbolic_shape("N")[0],) + x_shape[1:]
  specs = [jax.ShapeDtypeStruct(x_shape, x_dtype)] + [
      jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]
  # Trace to primitives here, outside jax2onnx: its Flax-level plugins (active while it
  # traces) mislabel NCHW/NHWC around residual additions (ResNet blocks), while its
  # lowering of lax primitives is exact. The replayed program is the model's own.
  closed = jax.make_jaxpr(traced)(*specs)
  _refuse_random(closed.jaxpr)
  n_out = len(closed.out_avals)

  def replay(*args):
    out = _replay(closed.jaxpr, closed.consts, *args)
    return out[0] if n_out == 1 else tuple(out)

  import logging
  ir_log = logging.getLogger("onnx_ir")
  level = ir_log.level
  ir_log.setLevel(logging.ERROR)  # its serializer warns about shape constants it skips
  try:
    with _module_attributes_restored():
      model = to_onnx(replay, specs, model_name=model_name, opset=_opset(), input_names=names)
  except Exception as e:  # the converter's own failure, not the model's
    from importlib import metadata
    missing = re.search(r"No plugins registered for primitive '([^']+)'", str(e))
    if missing:
      raise ExportError(f"jax2onnx {metadata.version('jax2onnx')} has no ONNX conversion for "
                        f"the JAX primitive {missing.group(1)!r} that the program uses; "
                        f"compute it outside the exported function or write the model "
                        f"without it") from e
    raise ExportError(f"jax2onnx {metadata.version('jax2onnx')} could not convert the "
                      f"program on jax {jax.__version__} ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else ''}); the tested versions "
                      f"are in lqjax's constraints.txt") from e
  finally:
    ir_log.setLevel(level)
  return model


def _without_unused(model):
  """`model` less the nodes that no output needs and the initializers no node reads
  (jax2onnx leaves constants of folded shapes; log scales are read by none): onnxruntime
  would drop each with a warning."""
  import onnx_ir as ir
  from onnx_ir.passes.common import RemoveUnusedNodesPass
  m = ir.serde.deserialize_model(model)
  RemoveUnusedNodesPass()(m)
  return ir.serde.serialize_model(m)


def export_onnx(path, fn: Callable[[Any, Any], Any], variables, example_input, **kwargs) -> int:
  """Writes the ONNX model of ``fn(variables, x)`` to `path` atomically; returns its size.

  See :func:`build` for the arguments.
  """
  return fileio.write_bytes_atomic(path, to_bytes(fn, variables, example_input, **kwargs))


def to_bytes(fn: Callable[[Any, Any], Any], variables, example_input, **kwargs) -> bytes:
  """The ONNX file of ``fn(variables, x)`` in memory, checked by :func:`check_loads`."""
  blob = build(fn, variables, example_input, **kwargs).SerializeToString()
  check_loads(blob, example_input)
  return blob


def check_loads(blob: bytes, example_input) -> None:
  """Loads `blob` in onnxruntime (when it is installed) and runs it once on `example_input`.

  jax2onnx can emit a graph that onnxruntime does not run (an op it lacks, a type it
  refuses): such a file is refused here, before anything is written.

  Raises:
    ExportError: onnxruntime refused the graph (one line with its reason).
  """
  try:
    import onnxruntime  # noqa: F401
  except ImportError:
    return
  x = np.asarray(jax.device_get(example_input)) if not isinstance(
      example_input, jax.ShapeDtypeStruct) else np.zeros(example_input.shape, example_input.dtype)
  try:
    run_onnx(blob, x)
  except Exception as e:  # onnxruntime raises its own exception types
    reason = " ".join(str(e).split())[:300]
    raise ExportError(f"onnxruntime cannot run the exported graph ({type(e).__name__}: "
                      f"{reason}); nothing was written") from None


def run_onnx(path_or_bytes, x: np.ndarray, batch_size: int = 1000,
             optimization: str = "basic") -> np.ndarray:
  """Outputs from onnxruntime for inputs `x`, in batches along the first axis.

  ``optimization="basic"`` (default) keeps onnxruntime's graph rewrites to the
  exact ones: at the extended level it fuses DequantizeLinear -> MatMul into an
  integer-weight kernel whose float numerics differ (logits moved by ~0.1 on a
  trained LeNet-300-100, same argmax there). Pass ``"all"`` to measure that.
  """
  sess = session(path_or_bytes, optimization)
  name = sess.get_inputs()[0].name
  return np.concatenate([sess.run(None, {name: x[i:i + batch_size]})[0]
                         for i in range(0, x.shape[0], batch_size)])


def session(path_or_bytes, optimization: str = "basic"):
  """An onnxruntime CPU session of a file or its bytes, with graph optimisations at
  ``"none"``, ``"basic"`` or ``"all"`` (see :func:`run_onnx`), warnings off."""
  import onnxruntime as ort
  src = path_or_bytes if isinstance(path_or_bytes, (bytes, bytearray)) else str(path_or_bytes)
  so = ort.SessionOptions()
  so.graph_optimization_level = {
      "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
      "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
      "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
  so.log_severity_level = 3
  return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])

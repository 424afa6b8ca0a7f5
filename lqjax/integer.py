"""Integer inference: a quantized Linen model run from its integer codes.

``fn = lqjax.integer_inference(model, variables)`` (Linen) or
``lqjax.integer_inference(module)`` (NNX) returns a jitted function of the input
(``fn(x)``; the model's ``apply`` or call keyword arguments given once to
``integer_inference``). The variables may be ``lqjax.load``'s: the packed file's codes
become the device arrays. NNX layers stacked by ``nnx.vmap`` and run by ``nnx.scan`` hold
each layer's codes packed on their own, so that the scan slices one layer's; Linen's
``nn.scan`` is refused (one line) when the function first runs.

**On the device** every quantized tensor is its integer codes, never a float32 copy:

* a kernel's codes in [-2, 1] are packed four to a byte, codes in [-8, 7] two to a byte
  (per-group widths included: the widest group decides; in planes, :func:`pack`), and
  unpacked to int8 inside the jitted function; vectors (biases) are a byte a code;
* other codes that fit int8 are int8; wider codes (a learned width above 8 bits) are
  int16, dequantized inside the function (the wider path).

Float leaves (norm layers, float layers, the scales and offsets) stay as they are; each
integer layer adds one float32 vector per output (the offset term below).

**The compute**, chosen per layer when the function is traced:

* ``nn.Dense``, and ``nn.DenseGeneral`` that sums over its input's trailing axes with no
  batch axes (attention projections; NNX: ``Linear``, ``LinearGeneral``), and ``Einsum``
  whose equation is such a layer's (:func:`einsum_contracted`), with an input
  quantizer (a Rule's ``inputs``, at most 8 bits), int8 codes or packed int4, and one
  weight scale per output or per tensor (a DenseGeneral's kernel as one matrix, its
  input axes by its output axes): the input's codes
  ``q = clip(round((x - z) / s))`` as int8, ``lax.dot_general`` int8 x int8 -> int32,
  and the epilogue ``s s_w acc + z s_w sum_in(W_q) + b``, which is the fake-quantized
  layer's value up to float rounding;
* ``nn.Conv`` likewise with ``lax.conv_general_dilated`` on int8 (the offset term counts
  the taps that fall on padding), where the input has at least :data:`MIN_CONV_CHANNELS`
  channels: below that XLA:CPU's integer convolution was slower than float32's
  (``benchmarks/bench_intdot.py``);
* rows (the input's elements over its last axis: a Dense layer's batch, a convolution's
  batch times its positions) below ``min_rows`` take the float path (by default none do);
  a dot with fewer than :data:`PAD_ROWS` rows (batch 1) is padded to that many, since
  XLA:CPU's one-row integer product is a slow matrix-vector loop (:func:`padded_dot`);
* every other quantized layer (and the cases above when they do not apply): the float
  path, the layer's own computation on the fake-quantized input and weights dequantized
  from the codes inside the function.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lqjax import inputs as inputs_lib, quant, tree

#: Input channels from which a convolution takes the integer route (bench_intdot: XLA:CPU's
#: int8 3x3 convolution was 0.13x float at 16 channels, 1.8x at 32, 1.6x at 64 on the AMD
#: EPYC, 0.14x, 3.5x and 3.4x on the AMX Xeon; 16 channels padded with zeros to 32, 0.55x
#: and 0.74x).
MIN_CONV_CHANNELS = 32
#: Rows of a dot below which the float path is taken (``integer_inference(min_rows=)``); by
#: default none, since the float path converts the whole kernel to float on every call.
MIN_ROWS = 1
#: A dot with fewer rows is padded to this many: XLA:CPU lowers a one-row int8 product as a
#: matrix-vector loop (a product whose output has rank <= 1), which was 0.1x-0.7x of
#: float32's, and a few rows reach its matrix kernel (bench_intdot: ``dyn_i8_pad``).
PAD_ROWS = 4
_DENSE = (nn.Dense,)
_GENERAL = (nn.DenseGeneral,)
_EINSUM = (nn.Einsum,)
_CONV = (nn.Conv,)
try:  # NNX's layers take the same route
  from flax import nnx as _nnx
  _DENSE, _CONV = _DENSE + (_nnx.Linear,), _CONV + (_nnx.Conv,)
  _GENERAL, _EINSUM = _GENERAL + (_nnx.LinearGeneral,), _EINSUM + (_nnx.Einsum,)
except ImportError:  # pragma: no cover
  pass
#: The collection that holds each integer layer's offset vector.
COLLECTION = "lqjax_integer"
_SUM = "kernel_code_sum"


# ---------------------------------------------------------------- packed codes

def pack(codes, bits: int) -> np.ndarray:
  """Signed `bits`-bit codes (2 or 4) -> uint8, 8 / bits a byte, in planes: the flattened
  codes (the tail padded with zeros) are cut into 8 / bits contiguous runs, and byte j
  holds element j of run i in its bits [i b, (i + 1) b). Unpacking is then shifts and one
  concatenation of contiguous runs, which XLA vectorises (fields interleaved within each
  byte were a gather; ``benchmarks/bench_intdot.py``'s ``i4_i8`` times this unpacking)."""
  per = 8 // bits
  flat = np.asarray(codes, np.int64).reshape(-1)
  flat = np.concatenate([flat, np.zeros((-flat.size) % per, np.int64)])
  u = (flat & ((1 << bits) - 1)).astype(np.uint8).reshape(per, -1)
  out = np.zeros(u.shape[1], np.uint8)
  for i in range(per):
    out |= (u[i] << (i * bits)).astype(np.uint8)
  return out


def unpack(packed, shape, bits: int) -> jax.Array:
  """Inverse of :func:`pack` inside jit: int8 codes of `shape`."""
  p = packed.astype(jnp.int8)
  per = 8 // bits
  # shift each field to the top of the byte, then an arithmetic shift sign-extends it
  fields = [jnp.left_shift(p, 8 - bits * (i + 1)) >> (8 - bits) for i in range(per)]
  n = int(np.prod(shape))
  return jnp.concatenate(fields)[:n].reshape(shape)


@dataclasses.dataclass(frozen=True)
class Stored:
  """How one quantized tensor is held on the device."""

  kind: str                   # "int2x4", "int4x2" (packed), "int8" or "int16"
  shape: Tuple[int, ...]
  grid: str

  def codes(self, value) -> jax.Array:
    held = (-(-int(np.prod(self.shape)) * _PACKED[self.kind] // 8),) if self.kind in _PACKED \
        else self.shape
    if tuple(value.shape) != held:  # a stack's codes not sliced one layer at a time
      raise ValueError(f"lqjax.integer_inference: one layer's codes are held as {held}, but "
                       f"{tuple(value.shape)} arrived: NNX layers stacked by nnx.vmap run "
                       f"one layer a step (nnx.scan); Linen's nn.scan is not supported")
    if self.kind in _PACKED:
      return unpack(value, self.shape, _PACKED[self.kind])
    return value

  def dequantize(self, value, log_scale) -> jax.Array:
    return quant.dequantize_as(self.codes(value), log_scale, self.grid)


_PACKED = {"int2x4": 2, "int4x2": 4}  # narrowest first
_PLAN: contextvars.ContextVar = contextvars.ContextVar("lqjax_integer_plan", default=None)
_ROWS: contextvars.ContextVar = contextvars.ContextVar("lqjax_integer_rows", default=None)
_DOT: contextvars.ContextVar = contextvars.ContextVar("lqjax_integer_dot", default=None)


@contextlib.contextmanager
def dot_hook(fn):
  """While set, an integer Dense/Linear layer's int32 product is ``fn(x, log_scale, zero,
  icfg, codes_w)`` (the ONNX export's MatMulInteger), at any batch, and convolutions take
  the float path (:func:`takes_route`)."""
  token = _DOT.set(fn)
  try:
    yield
  finally:
    _DOT.reset(token)


@contextlib.contextmanager
def route(plan, min_rows: int):
  """While set (at trace time), quantized layers read their stored codes (`plan`: Linen's
  ``{path: Stored}``, None for NNX, whose layers carry theirs) and layers with input
  quantizers take the integer route where :func:`takes_route` says so."""
  tokens = _PLAN.set(plan), _ROWS.set(min_rows)
  try:
    yield
  finally:
    _PLAN.reset(tokens[0])
    _ROWS.reset(tokens[1])


def route_rows() -> Optional[int]:
  """``min_rows`` of the integer route in force, or None outside one."""
  return _ROWS.get()


def stored(module_path: Tuple[str, ...], name: str) -> Optional[Stored]:
  """The :class:`Stored` of parameter `name` of the module at `module_path` while an
  integer function traces; None outside one, or for a float parameter."""
  plan = _PLAN.get()
  return None if plan is None else plan.get(tuple(module_path) + (name,))


def _store(codes: np.ndarray, grid: str, packed: bool = True, stacked: int = 0):
  """(the array held, its Stored) of `codes`; the `stacked` leading axes (a stack of layers
  run by a scan) are kept, each layer packed on its own, so that a scan's slice is one
  layer's held codes. Vectors (biases) are held a byte a code, never packed: a packed one
  is unpacked element by element inside the epilogue that reads it, on every call, which
  cost LeNet-300-100's integer function more than its dots; and they are small."""
  lo, hi = int(codes.min(initial=0)), int(codes.max(initial=0))
  lead, shape = codes.shape[:stacked], codes.shape[stacked:]
  for kind, bits in (_PACKED.items() if packed and len(shape) >= 2 else ()):
    if -(1 << (bits - 1)) <= lo and hi < (1 << (bits - 1)):
      layers = [pack(c, bits) for c in codes.reshape((-1,) + shape)]
      return np.stack(layers).reshape(lead + layers[0].shape), Stored(kind, shape, grid)
  if -128 <= lo and hi <= 127:
    return codes.astype(np.int8), Stored("int8", shape, grid)
  if -32768 <= lo and hi <= 32767:
    return codes.astype(np.int16), Stored("int16", shape, grid)
  raise ValueError(f"codes in [{lo}, {hi}] need more than 16 bits")


def prepare(variables, packed: bool = True
            ) -> Tuple[Dict[str, Any], Dict[Tuple[str, ...], Stored]]:
  """(variables with each quantized tensor replaced by its stored codes, on the device; the
  plan).
  `packed`: codes of at most 4 (2) bits two (four) a byte, else one byte each.

  Raises ValueError (one line) for a tree with no quantized tensor."""
  tensors = tree.quantized_tensors(variables)
  if not tensors:
    raise ValueError("lqjax.integer_inference: the variables have no quantized tensor "
                     "(quantize the model with lqjax.quantize)")
  arrays, plan, sums = {}, {}, {}
  for t, codes, value, how in stored_tensors(tensors, packed):
    arrays[t.path] = value
    plan[t.path[1:]] = how  # without the collection's name
    if t.path[-1] == "kernel":
      sums[t.path[1:-1]] = code_sum(codes)
  out = dict(tree.replace_arrays(variables, arrays))
  from flax import traverse_util
  out[COLLECTION] = traverse_util.unflatten_dict({k + (_SUM,): v for k, v in sums.items()})
  # on the device once: numpy leaves would be copied to it on every call
  return jax.device_put(out), plan


def stored_tensors(tensors, packed: bool = True, stacked=lambda t: 0):
  """(tensor, its int codes, the array held, its Stored) of each quantized tensor;
  `stacked(t)`: how many leading axes of `t` stack layers (see :func:`_store`)."""
  for t in tensors:
    codes, _ = quant.tensor_codes(t.p, t.log_scale, t.config)
    try:
      value, how = _store(codes, t.config.grid, packed, stacked(t))
    except ValueError as e:
      raise ValueError(f"lqjax.integer_inference: {t.name}: {e}") from None
    yield t, codes, value, how


def code_sum(codes, stacked: int = 0) -> np.ndarray:
  """sum_in W_q per output (the last axis) as float32, per layer of the `stacked` leading
  axes."""
  lead = codes.shape[:stacked]
  return codes.reshape(lead + (-1, codes.shape[-1])).sum(stacked).astype(np.float32)


def device_bytes(variables) -> int:
  """Bytes of every array leaf of `variables` (what the device holds)."""
  return sum(int(np.asarray(a).nbytes) for a in jax.tree_util.tree_leaves(tree.unbox(variables)))


# ---------------------------------------------------------------- the integer layers

def _rows(x, contracted: int = 1) -> int:
  return int(np.prod(x.shape[:x.ndim - contracted]))


def _per_output(log_scale, contracted: int = 1) -> bool:
  """Whether a kernel scale is one per output (or per tensor): constant over the
  `contracted` leading (input) axes, so it leaves the sum."""
  return all(d == 1 for d in log_scale.shape[:contracted])


def contracted_axes(mod, x) -> Optional[int]:
  """How many trailing axes of `x` a dense layer sums over (its kernel's leading axes): 1
  for Dense/Linear; DenseGeneral/LinearGeneral's ``axis`` when those are the trailing
  axes and it has no batch axes (an attention projection: (in) -> (heads, dim), or
  (heads, dim) -> (out)); None for any other layer."""
  if isinstance(mod, _DENSE):
    return 1
  if isinstance(mod, _EINSUM):
    return einsum_contracted(getattr(mod, "einsum_str", None), x.ndim)
  if not isinstance(mod, _GENERAL) or getattr(mod, "batch_dims", ()) \
      or getattr(mod, "batch_axis", None):
    return None
  axis = mod.axis if isinstance(mod.axis, (tuple, list)) else (mod.axis,)
  n = len(axis)
  if sorted(a % x.ndim for a in axis) != list(range(x.ndim - n, x.ndim)):
    return None
  return n


def einsum_contracted(einsum_str: Optional[str], ndim: int) -> Optional[int]:
  """How many trailing axes of the input an Einsum layer's ``einsum_str`` sums over, when it
  is a dense layer in disguise: ``"...d,dhk->...hk"`` or ``"btd,dk->btk"``, the kernel's
  leading indices being the input's trailing ones in order, the output the input's other
  indices followed by the kernel's others, and no index shared by all three (a batch
  axis); None for any other equation, or one given only at call time."""
  if not einsum_str:
    return None
  eq = einsum_str.replace(" ", "")
  m = re.fullmatch(r"((?:\.\.\.)?[a-zA-Z]*),([a-zA-Z]+)->((?:\.\.\.)?[a-zA-Z]*)", eq)
  if m is None:
    return None
  lhs, rhs, out = m.groups()
  letters = lhs.replace("...", "")
  if len(set(letters)) != len(letters) or len(set(rhs)) != len(rhs):
    return None
  n = len([c for c in rhs if c in letters])
  if n == 0 or not lhs.endswith(rhs[:n]) or out != lhs[:len(lhs) - n] + rhs[n:]:
    return None
  if "..." not in lhs and len(lhs) != ndim:
    return None
  return n


def _bias(mod, params):
  if "bias" not in params:
    return None
  how = stored(mod.path, "bias")
  b = params["bias"]
  if how is None:
    return b
  return how.dequantize(b, tree.unbox(params["bias" + tree.QUANT_SUFFIX][tree.SCALE_NAME]))


def check_input(where: str, x) -> None:
  """One line for a non-float input to a layer whose input the model quantizes: the input
  quantizer's grid is over real values, so integer data (e.g. raw uint8 pixels) would be
  read at the wrong scale."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"lqjax.integer_inference: layer {where} quantizes its input, which "
                     f"came as {x.dtype}; pass the batch as float32, scaled as in training")


def checked(run, held, name: str = "lqjax.integer_inference"):
  """``fn(x) = run(held, x)`` (jitted) that, for each new shape and dtype of `x`, traces the
  program abstractly first (``jax.eval_shape``, no compute) and turns a batch it does not fit
  into one line: the wrong shape or dtype, or variables that lack the activation scales the
  model's rules ask for."""
  jitted = jax.jit(run)
  seen = set()

  def fn(x):
    x = x if isinstance(x, jax.Array) else np.asarray(x)
    key = (tuple(x.shape), str(x.dtype))
    if key not in seen:
      try:
        jax.eval_shape(jitted, held, x)
      except Exception as e:  # flax's and lax's own errors, several lines each
        first = (str(e).strip().splitlines() or [""])[0]
        if tree.INPUT_QUANT in first:
          scope = re.search(r'scope "([^"]+)"', first)
          where = f" for {scope.group(1).strip('/')}" if scope else ""
          raise ValueError(f"{name}: the variables have no activation scales{where}; the "
                           f"model's rules quantize inputs (Rule inputs=): pass the "
                           f"variables of a model trained or calibrated with them "
                           f"(lqjax.calibrate)") from None
        if isinstance(e, ValueError) and first.startswith(name):
          raise ValueError(first) from None
        if "/scan(" in first:  # a Linen scope inside nn.scan
          raise ValueError(f"{name}: Linen layers stacked by nn.scan are not supported; "
                           f"write the stack as NNX layers (nnx.vmap, run by nnx.scan), "
                           f"or run the fake-quantized model") from None
        raise ValueError(f"{name}: a batch of shape {key[0]} and dtype {key[1]} does not fit "
                         f"the model ({type(e).__name__}: {first[:200]})") from None
      seen.add(key)
    return jitted(held, x)

  fn.variables = held
  fn.run = run  # the program itself, for the ONNX export (lqjax.onnx_export.build_integer)
  return fn


def takes_route(mod, x, icfg, how: Optional[Stored], log_w, min_rows: int) -> bool:
  """Whether a layer's call takes the integer route (see the module docstring)."""
  contracted = contracted_axes(mod, x)
  dense = contracted is not None
  if not (dense or isinstance(mod, _CONV)) or icfg.bits > 8:
    return False
  if how is None or how.kind == "int16" or how.grid != "midtread" \
      or not _per_output(log_w, contracted or log_w.ndim - 1):
    return False
  if _DOT.get() is not None:  # the ONNX export: dots only, at any batch
    return dense and icfg.rounding == "round"
  if _rows(x, contracted or 1) < min_rows:
    return False
  return dense or _conv_route(mod, x, how.shape) is not None


def compute(mod, x, icfg, codes_w, log_w, in_log_scale, in_zero, code_sum, bias):
  """A Dense/Linear or Conv layer's output from the int8 codes of its input and weights:
  ``s s_w acc + z s_w sum(W_q) + b`` (:func:`takes_route` said it applies)."""
  s_in = quant.scale_from_log(in_log_scale)
  hook = _DOT.get()
  contracted = contracted_axes(mod, x)
  out_shape = None
  s_w = quant.scale_from_log(log_w)
  if contracted is not None:  # one scale per output element (an Einsum's may omit axes)
    s_w = jnp.broadcast_to(s_w, (1,) * contracted + codes_w.shape[contracted:])
  s_w = s_w.reshape(-1)
  if contracted is not None:
    if contracted > 1 or codes_w.ndim > 2:  # DenseGeneral: one (K, N) matrix of its kernel
      out_shape = x.shape[:x.ndim - contracted] + codes_w.shape[contracted:]
      codes_w = codes_w.reshape(int(np.prod(codes_w.shape[:contracted])), -1)
      x = x.reshape(x.shape[:x.ndim - contracted] + (codes_w.shape[0],))
      code_sum = jnp.sum(codes_w.astype(jnp.int32), axis=0).astype(jnp.float32)
      bias = None if bias is None else bias.reshape(-1)
    if hook is not None:  # the ONNX export's integer product
      acc = hook(x, in_log_scale, in_zero, icfg, codes_w)
    else:
      q = inputs_lib.codes(x, in_log_scale, in_zero, icfg).astype(jnp.int8)
      acc = padded_dot(q, codes_w)
    offset = in_zero * s_w * code_sum
  else:
    q = inputs_lib.codes(x, in_log_scale, in_zero, icfg).astype(jnp.int8)
    conv = _conv_route(mod, x, codes_w.shape)
    acc = conv(q, codes_w, jnp.int32)
    if _padded(mod):  # taps on padding see 0, not z: count the ones that do not, with the
      # kernel summed over each group's input channels (one ones-channel a group)
      groups = mod.feature_group_count
      ones = jnp.ones((1,) + x.shape[1:-1] + (groups,), jnp.float32)
      summed = jnp.sum(codes_w.astype(jnp.float32), axis=-2, keepdims=True)
      offset = in_zero * s_w * conv(ones, summed, jnp.float32)
    else:
      offset = in_zero * s_w * code_sum
  shift = offset if bias is None else offset + bias  # constants, folded before the batch
  y = acc.astype(jnp.float32) * (s_in * s_w) + shift
  if out_shape is not None:
    y = y.reshape(out_shape)
  return y.astype(getattr(mod, "dtype", None) or jnp.float32)


def padded_dot(q, codes_w) -> jax.Array:
  """``q @ codes_w`` as int8 x int8 -> int32 over `q`'s last axis, its rows (the other axes)
  padded with zeros to :data:`PAD_ROWS` when there are fewer, and the padding dropped."""
  rows = _rows(q)
  if rows >= PAD_ROWS:
    return lax.dot_general(q, codes_w, (((q.ndim - 1,), (0,)), ((), ())),
                           preferred_element_type=jnp.int32)
  flat = jnp.pad(q.reshape(rows, q.shape[-1]), ((0, PAD_ROWS - rows), (0, 0)))
  acc = lax.dot_general(flat, codes_w, (((1,), (0,)), ((), ())),
                        preferred_element_type=jnp.int32)
  acc = lax.optimization_barrier(acc)  # else XLA slices the operand, not the product
  return acc[:rows].reshape(q.shape[:-1] + codes_w.shape[1:])


def integer_layer(mod, x, icfg, min_rows: int):
  """A Linen layer's output by the integer route, or None where the float path applies."""
  check_input("/".join(mod.path) or type(mod).__name__, x)
  how = stored(mod.path, "kernel")
  variables = mod.variables
  params = variables.get("params", {})
  if how is None or tree.INPUT_QUANT not in params:
    return None
  log_w = tree.unbox(params["kernel" + tree.QUANT_SUFFIX][tree.SCALE_NAME])
  if not takes_route(mod, x, icfg, how, log_w, min_rows):
    return None
  iq = params[tree.INPUT_QUANT]
  return compute(mod, x, icfg, how.codes(params["kernel"]), log_w, iq[tree.SCALE_NAME],
                 iq[tree.ZERO_NAME], variables[COLLECTION][_SUM], _bias(mod, params))


def _padded(mod) -> bool:
  pad = _padding(mod.padding, len(mod.kernel_size))
  return pad != "VALID" and (pad == "SAME" or any(p != (0, 0) for p in pad))


def _padding(pad, nd):
  """The layer's padding as lax takes it ('SAME', 'VALID' or pairs), or None."""
  if isinstance(pad, str):
    return pad.upper() if pad.upper() in ("SAME", "VALID") else None  # CIRCULAR, CAUSAL
  if isinstance(pad, int):
    return ((pad, pad),) * nd
  pad = tuple(pad)
  if len(pad) != nd:
    return None
  return tuple((p, p) if isinstance(p, int) else tuple(p) for p in pad)


def _conv_route(mod, x, kernel_shape):
  """A function (lhs, rhs, result type) -> the layer's convolution, or None (float path)."""
  nd = len(kernel_shape) - 2
  pad = _padding(mod.padding, nd)
  if pad is None:
    return None
  if x.ndim != nd + 2 or x.shape[-1] < MIN_CONV_CHANNELS or getattr(mod, "mask", None) is not None:
    return None
  def tup(v):
    return (1,) * nd if v is None else ((v,) * nd if isinstance(v, int) else tuple(v))
  spec = ("NHWC"[:1] + "HWDXYZ"[:nd] + "C", "HWDXYZ"[:nd] + "IO", "N" + "HWDXYZ"[:nd] + "C")
  def conv(lhs, rhs, out):
    return lax.conv_general_dilated(
        lhs, rhs, tup(mod.strides), pad,
        lhs_dilation=tup(mod.input_dilation), rhs_dilation=tup(mod.kernel_dilation),
        dimension_numbers=spec, feature_group_count=mod.feature_group_count,
        preferred_element_type=out)
  return conv

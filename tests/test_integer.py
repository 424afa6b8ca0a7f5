"""Integer inference (lqjax.integer_inference): packed codes, the integer route's agreement
with the fake-quantized model, what the device holds, and the routes taken."""

import re

import flax.linen as nn
from flax import nnx
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lqjax
from lqjax import integer

A8 = lqjax.QuantConfig(rule="lsq", bits=8, rounding="round")


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([2, 4]), st.data())
def test_pack_unpack_roundtrip(bits, data):
  shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=7))
  lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
  codes = data.draw(hnp.arrays(np.int8, shape, elements=st.integers(lo, hi)))
  packed = integer.pack(codes, bits)
  assert packed.dtype == np.uint8 and packed.size == -(-codes.size * bits // 8)
  np.testing.assert_array_equal(jax.jit(lambda p: integer.unpack(p, shape, bits))(packed), codes)


def test_pack_lays_codes_out_in_planes():
  """Byte j holds element j of each contiguous run of the flattened codes (hand-derived):
  4 bits, runs [1, -1] and [2, -2] -> 0x21, 0xEF; 2 bits, runs [1], [-1], [-2], [0] ->
  0b00_10_11_01."""
  np.testing.assert_array_equal(integer.pack(np.array([1, -1, 2, -2]), 4), [0x21, 0xEF])
  np.testing.assert_array_equal(integer.pack(np.array([1, -1, -2, 0]), 2), [0b00101101])
  # 5 codes at 4 bits: the runs are [a, b, c] and [d, e, 0 (padding)]
  np.testing.assert_array_equal(integer.pack(np.array([1, 2, 3, 4, 5]), 4),
                                [0x41, 0x52, 0x03])


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(8, (3, 3), padding="SAME", name="c0")(x))    # 3 channels: float path
    x = nn.relu(nn.Conv(40, (3, 3), padding="SAME", name="c1")(x))   # 8 channels: float path
    x = nn.relu(nn.Conv(24, (3, 3), padding="SAME", name="c2")(x))   # 40: integer, padded
    x = nn.relu(nn.Conv(16, (3, 3), padding="VALID", strides=2, name="c3")(x))  # 24: float
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(32, name="fc1")(x))
    return nn.Dense(10, name="fc2")(x)


def _model(bits, rules_extra=(), granularity="row"):
  model = lqjax.quantize(Net(), list(rules_extra) + [lqjax.Rule(
      ".*", lqjax.QuantConfig(rule="lsq", bits=bits, granularity=granularity),
      bias=lqjax.QuantConfig(rule="lsq", bits=8), inputs=A8)])
  x = jax.random.normal(jax.random.key(0), (32, 12, 12, 3))
  v = model.init(jax.random.key(1), x[:1])
  # train-like weights: spread the input scales' offsets away from zero
  return model, lqjax.calibrate(model, v, x), x


def _ops(fn, x):
  """(int32 dots, int32 convs) in the function's program for input `x`."""
  text = str(jax.make_jaxpr(fn)(x))
  return (len(re.findall(r":i32\[[^\]]*\] = dot_general", text)),
          len(re.findall(r":i32\[[^\]]*\] = conv_general_dilated", text)))


@pytest.mark.parametrize("bits,kind", [(2, "int2x4"), (4, "int4x2"), (8, "int8")])
def test_integer_route_agrees_with_fake_quant(bits, kind):
  model, v, x = _model(bits)
  ref = model.apply(v, x)
  fn = lqjax.integer_inference(model, v, min_rows=1)
  got = fn(x)
  np.testing.assert_allclose(got, ref, atol=2e-5 * float(jnp.max(jnp.abs(ref))) + 1e-6)
  held = lqjax.tree.unbox(fn.variables["params"])
  # on the device already: host arrays would be copied to it on every call
  assert all(isinstance(a, jax.Array) for a in jax.tree_util.tree_leaves(fn.variables))
  for name in ("c0", "c1", "c2", "c3", "fc1", "fc2"):  # integer codes only, packed below 8 bits
    k = held[name]["kernel"]
    assert k.dtype == (np.uint8 if bits < 8 else np.int8), (name, k.dtype)
    assert held[name]["bias"].dtype in (np.uint8, np.int8)
  assert set(integer.prepare(v)[1].values()) >= {integer.Stored(kind, (3, 3, 3, 8), "midtread")}
  # the route: integer dots for both Dense layers, an integer conv for c2 (>= 32 channels)
  dots, convs = _ops(fn, x)
  assert (dots, convs) == (2, 1)


def test_a_batch_of_one_pads_its_dots_and_column_scales_take_the_float_path():
  model, v, x = _model(4)
  fn = lqjax.integer_inference(model, v)  # min_rows 1: every dot takes the integer route
  np.testing.assert_allclose(fn(x[:1]), model.apply(v, x[:1]), atol=1e-4)
  assert _ops(fn, x[:1]) == (2, 1)
  # the one row padded to PAD_ROWS, the padding's products dropped
  def dots(rows, n):
    text = str(jax.make_jaxpr(fn)(x[:n]))
    return len(re.findall(rf":i32\[{rows},\d+\] = dot_general", text))
  assert dots(integer.PAD_ROWS, 1) == 2
  assert dots(integer.PAD_ROWS + 1, integer.PAD_ROWS + 1) == 2  # enough rows: none added
  # below min_rows the dots take the float path; the conv's rows are its 144 output positions
  fn = lqjax.integer_inference(model, v, min_rows=16)
  np.testing.assert_allclose(fn(x[:1]), model.apply(v, x[:1]), atol=1e-4)
  assert _ops(fn, x[:1]) == (0, 1)
  col = lqjax.Rule("fc1", lqjax.QuantConfig(rule="lsq", bits=4, granularity="column"),
                   inputs=A8)
  model, v, x = _model(4, [col])
  fn = lqjax.integer_inference(model, v, min_rows=1)
  np.testing.assert_allclose(fn(x), model.apply(v, x), atol=1e-4)


def test_wide_codes_fall_back_to_int16_and_agree():
  free = lqjax.Rule("fc1", lqjax.QuantConfig(rule="ratio", init_bits=12), inputs=A8)
  model, v, x = _model(4, [free])
  fn = lqjax.integer_inference(model, v, min_rows=1)
  assert lqjax.tree.unbox(fn.variables["params"])["fc1"]["kernel"].dtype == np.int16
  np.testing.assert_allclose(fn(x), model.apply(v, x), atol=1e-4)


def test_from_the_packed_file_and_device_bytes(tmp_path):
  model, v, x = _model(2)
  lqjax.save(tmp_path / "m.lqz", v)
  loaded = lqjax.load(tmp_path / "m.lqz", v)
  fn = lqjax.integer_inference(model, loaded)
  ref = model.apply(v, x)
  np.testing.assert_allclose(fn(x), ref, atol=2e-5 * float(jnp.max(jnp.abs(ref))))
  # at 2 bits the device holds less than the float model's quarter, near the file
  fp32 = sum(a.nbytes for a in jax.tree_util.tree_leaves(lqjax.tree.unbox(v)))
  held = integer.device_bytes(fn.variables)
  assert held < fp32 / 8
  assert held <= 1.1 * (tmp_path / "m.lqz").stat().st_size


def test_bad_input_is_one_line():
  with pytest.raises(ValueError, match="no quantized tensor") as e:
    plain = lqjax.quantize(Net(), lqjax.Rule(".*", config=None, inputs=A8))
    lqjax.integer_inference(plain, plain.init(jax.random.key(0), jnp.zeros((1, 12, 12, 3))))
  assert "\n" not in str(e.value)
  with pytest.raises(TypeError, match="made by lqjax.quantize"):
    lqjax.integer_inference(Net(), {})


def test_a_batch_or_variables_that_do_not_fit_are_one_line():
  model, v, x = _model(4)
  fn = lqjax.integer_inference(model, v)
  for bad, needle in [(x[..., :2], r"shape \(32, 12, 12, 2\) and dtype float32 does not fit"),
                      (x.astype(jnp.int32), "layer c0 quantizes its input, which came as int32")]:
    with pytest.raises(ValueError, match=needle) as e:
      fn(bad)
    assert "\n" not in str(e.value)
  assert fn(x).shape == (32, 10)
  # variables without the activation scales that the rules ask for
  weights_only = lqjax.quantize(Net(), lqjax.Rule(".*", lqjax.QuantConfig(rule="lsq", bits=4)))
  with pytest.raises(ValueError, match="no activation scales for c0/input_quant") as e:
    lqjax.integer_inference(model, weights_only.init(jax.random.key(1), x[:1]))(x)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_an_inputs_rule_on_layers_without_inputs_is_refused(framework):
  if framework == "linen":
    class Lm(nn.Module):
      @nn.compact
      def __call__(self, t):
        return nn.Dense(4, name="head")(nn.Embed(10, 8, name="tok")(t))
    make = lambda rules: lqjax.quantize(Lm(), rules).init(
        jax.random.key(0), jnp.zeros((2, 3), jnp.int32))
  else:
    class Lm(nnx.Module):
      def __init__(self, rngs):
        self.tok, self.head = nnx.Embed(10, 8, rngs=rngs), nnx.Linear(8, 4, rngs=rngs)

      def __call__(self, t):
        return self.head(self.tok(t))
    make = lambda rules: lqjax.quantize(Lm(nnx.Rngs(0)), rules)
  w4 = lqjax.QuantConfig(rule="lsq", bits=4)
  with pytest.raises(lqjax.QuantizeError, match="has inputs=, but none of its modules") as e:
    make([lqjax.Rule("tok", w4, inputs=A8)])
  assert "\n" not in str(e.value)
  make([lqjax.Rule("tok", w4), lqjax.Rule("head", w4, inputs=A8)])  # the working way


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.c0 = nnx.Conv(3, 40, (3, 3), padding="SAME", rngs=rngs)    # 3 channels: float path
    self.c1 = nnx.Conv(40, 16, (3, 3), padding="SAME", rngs=rngs)   # 40: integer, padded
    self.fc1 = nnx.Linear(12 * 12 * 16, 32, rngs=rngs)
    self.fc2 = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.c1(nnx.relu(self.c0(x))))
    return self.fc2(nnx.relu(self.fc1(x.reshape((x.shape[0], -1)))))


def test_nnx_module_runs_from_its_codes():
  model = lqjax.quantize(NnxNet(nnx.Rngs(0)), lqjax.Rule(
      ".*", lqjax.QuantConfig(rule="lsq", bits=4, granularity="row"),
      bias=lqjax.QuantConfig(rule="lsq", bits=8), inputs=A8))
  x = jax.random.normal(jax.random.key(0), (32, 12, 12, 3))
  lqjax.calibrate(model, x)
  ref = model(x)
  fn = lqjax.integer_inference(model, min_rows=1)
  np.testing.assert_allclose(fn(x), ref, atol=2e-5 * float(jnp.max(jnp.abs(ref))))
  assert _ops(fn, x) == (2, 1)
  assert fn.variables["fc1"]["kernel"].get_value().dtype == np.uint8  # packed int4
  np.testing.assert_array_equal(model(x), ref)  # the module itself is left as it was
  with pytest.raises(TypeError, match="takes no variables"):
    lqjax.integer_inference(model, {})


def test_nnx_integer_function_as_onnx():
  """An NNX module's integer function exports like a Linen one: its two Linear layers as
  MatMulInteger, onnxruntime within float rounding of the module."""
  pytest.importorskip("onnxruntime")
  from lqjax import onnx_export
  model = lqjax.quantize(NnxNet(nnx.Rngs(0)), lqjax.Rule(
      ".*", lqjax.QuantConfig(rule="lsq", bits=4, granularity="row"),
      bias=lqjax.QuantConfig(rule="lsq", bits=8), inputs=A8))
  x = jax.random.normal(jax.random.key(0), (32, 12, 12, 3))
  lqjax.calibrate(model, x)
  ref = np.asarray(model(x))
  graph = onnx_export.build_integer(lqjax.integer_inference(model, packed=False), x[:1])
  ops = [n.op_type for n in graph.graph.node]
  assert ops.count("MatMulInteger") == 2 and "Round" not in ops
  _agrees(onnx_export.run_onnx(graph.SerializeToString(), np.asarray(x)), ref,
          2e-5 * float(np.max(np.abs(ref))))


class AttnNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(x, x)
    return nn.Dense(5, name="head")(x.mean(1))


class NnxAttnNet(nnx.Module):
  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=16, decode=False, rngs=rngs)
    self.head = nnx.Linear(16, 5, rngs=rngs)

  def __call__(self, x):
    return self.head((x + self.attn(x)).mean(1))


def _w4a8(framework, linen_net, nnx_net, x):
  """(model, Linen variables or None, its fake-quantized output on `x`, its integer function
  at any batch) of `linen_net()` or `nnx_net(rngs)` with LSQ 4-bit rows and 8-bit inputs
  calibrated on `x`."""
  rule = lqjax.Rule(".*", lqjax.QuantConfig(rule="lsq", bits=4, granularity="row"), inputs=A8)
  if framework == "linen":
    model = lqjax.quantize(linen_net(), rule)
    v = lqjax.calibrate(model, model.init(jax.random.key(1), x[:1]), x)
    return model, v, model.apply(v, x), lqjax.integer_inference(model, v, min_rows=1)
  model = lqjax.quantize(nnx_net(nnx.Rngs(0)), rule)
  lqjax.calibrate(model, x)
  return model, None, model(x), lqjax.integer_inference(model, min_rows=1)


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_attention_projections_take_the_integer_route(framework):
  """DenseGeneral/LinearGeneral: q/k/v ((in) -> (heads, dim)) and out ((heads, dim) -> (out))
  as int8 x int8 -> int32 dots with the kernel as one matrix, scales per output (row keeps
  the heads axis); within float rounding of the fake-quantized model; the ONNX export of
  the Linen function has a MatMulInteger for each."""
  x = jax.random.normal(jax.random.key(0), (32, 6, 16))
  model, v, ref, fn = _w4a8(framework, AttnNet, NnxAttnNet, x)
  if framework == "linen":
    assert lqjax.tree.unbox(v["params"]["attn"]["query"]["kernel_quant"]["log_scale"]).shape \
        == (1, 2, 8)
  tol = 2e-5 * float(jnp.max(jnp.abs(ref)))
  np.testing.assert_allclose(fn(x), ref, atol=tol)
  assert _ops(fn, x) == (5, 0)  # query, key, value, out, head
  if framework == "linen" and _has_onnxruntime():
    from lqjax import onnx_export
    graph = onnx_export.build_integer(lqjax.integer_inference(model, v, packed=False), x[:1])
    assert [n.op_type for n in graph.graph.node].count("MatMulInteger") == 5
    _agrees(onnx_export.run_onnx(graph.SerializeToString(), np.asarray(x)), np.asarray(ref),
            tol)


@pytest.mark.parametrize("eq,ndim,want", [
    ("...d,dhk->...hk", 3, 1), ("...hk,hkd->...d", 4, 2), ("btd,dk->btk", 3, 1),
    ("btd, dk -> btk", 3, 1), ("d,dk->k", 1, 1),
    ("...hd,hdk->...hk", 4, None),   # h is a batch axis (in the input, kernel and output)
    ("...dh,hdk->...k", 4, None),    # summed axes not in the input's trailing order
    ("...d,dk->...kd", 3, None),     # the output is not the input's others then the kernel's
    ("btd,dk->btk", 4, None),        # the equation does not fit the input
    ("...d,dk,ke->...e", 3, None), ("...,k->...k", 2, None), (None, 3, None)])
def test_einsum_equations_that_are_dense_layers(eq, ndim, want):
  assert integer.einsum_contracted(eq, ndim) == want


class EinsumNet(nn.Module):
  @nn.compact
  def __call__(self, x):                                          # (B, T, 16)
    q = nn.Einsum((16, 2, 8), "...d,dhk->...hk", name="q")(x)      # (B, T, 2, 8)
    y = nn.Einsum((2, 8, 16), "...hk,hkd->...d", name="o")(q)      # (B, T, 16)
    g = nn.Einsum((2, 8, 4), "...hd,hdk->...hk", name="g")(q)      # a batch axis: float
    return nn.Einsum((16, 5), "btd,dk->btk", name="head")(y) + g.sum((-1, -2))[..., None]


class NnxEinsumNet(nnx.Module):
  def __init__(self, rngs):
    self.q = nnx.Einsum("...d,dhk->...hk", (16, 2, 8), (2, 8), rngs=rngs)
    self.o = nnx.Einsum("...hk,hkd->...d", (2, 8, 16), (16,), rngs=rngs)
    self.g = nnx.Einsum("...hd,hdk->...hk", (2, 8, 4), None, rngs=rngs)
    self.head = nnx.Einsum("btd,dk->btk", (16, 5), (5,), rngs=rngs)

  def __call__(self, x):
    q = self.q(x)
    return self.head(self.o(q)) + self.g(q).sum((-1, -2))[..., None]


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_einsum_layers_that_are_dense_take_the_integer_route(framework):
  """Einsum layers whose equation is a dense layer's (the kernel's leading indices are the
  input's trailing ones) take the int8 dot with the kernel as one matrix; a scale that
  omits an output axis (the Einsum default keeps the last one) is broadcast over it; an
  equation with a batch axis stays on the float path; within float rounding."""
  x = jax.random.normal(jax.random.key(0), (32, 6, 16))
  model, v, ref, fn = _w4a8(framework, EinsumNet, NnxEinsumNet, x)
  tol = 2e-5 * float(jnp.max(jnp.abs(ref)))
  np.testing.assert_allclose(fn(x), ref, atol=tol)
  assert _ops(fn, x) == (3, 0)  # q, o, head; g's equation has a batch axis
  if framework == "linen" and _has_onnxruntime():
    from lqjax import onnx_export
    graph = onnx_export.build_integer(lqjax.integer_inference(model, v, packed=False), x[:1])
    assert [n.op_type for n in graph.graph.node].count("MatMulInteger") == 3
    _agrees(onnx_export.run_onnx(graph.SerializeToString(), np.asarray(x)), np.asarray(ref),
            tol)


def _has_onnxruntime() -> bool:
  try:
    import onnxruntime  # noqa: F401
  except ImportError:
    return False
  return True


def _scanned_stack():
  """(three NNX Linear layers stacked by nnx.vmap, a module running them by nnx.scan, its
  input), W4A8 and calibrated."""
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return nnx.Linear(6, 6, rngs=nnx.Rngs(key))

  stack = lqjax.quantize(make(jax.random.split(jax.random.key(0), 3)),
                         lqjax.Rule(".*", lqjax.QuantConfig(rule="lsq", bits=4), inputs=A8))

  class Run(nnx.Module):
    def __init__(self, stack):
      self.stack = stack

    def __call__(self, x):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def body(x, layer):
        return nnx.relu(layer(x))
      return body(x, self.stack)

  model = Run(stack)
  x = jax.random.normal(jax.random.key(1), (32, 6))
  lqjax.calibrate(model, x)
  return stack, model, x


def test_nnx_stack_run_by_scan_takes_the_integer_route():
  """Layers stacked by nnx.vmap and run by nnx.scan: each layer's codes are packed on
  their own (the scan slices one layer's bytes) with one offset vector a layer; the scan's
  body holds the int8 dot; the stack called whole (not by a scan) is refused in one line."""
  stack, model, x = _scanned_stack()
  ref = model(x)
  fn = lqjax.integer_inference(model, min_rows=1)
  np.testing.assert_allclose(fn(x), ref, atol=2e-5 * float(jnp.max(jnp.abs(ref))) + 1e-6)
  assert _ops(fn, x) == (1, 0)
  held = fn.variables["stack"]
  assert held["kernel"].get_value().shape == (3, 18)  # 36 int4 codes a layer, 2 a byte
  assert held["kernel_code_sum"].get_value().shape == (3, 6)
  whole = lqjax.integer_inference(stack, min_rows=1)  # vmapped layers called as one
  with pytest.raises(ValueError, match="lqjax.integer_inference: ") as e:
    whole(jnp.ones((3, 32, 6)))
  assert "\n" not in str(e.value)


@pytest.mark.skipif(not _has_onnxruntime(), reason="needs the export extra")
def test_onnx_of_a_scanned_stack_takes_each_layers_scale_as_a_tensor():
  """The integer function of a stack run by nnx.scan as ONNX: one Loop whose body quantizes
  its input with that layer's scale (a tensor the loop slices, not a constant) and runs
  MatMulInteger; onnxruntime within float rounding of the JAX integer function."""
  from lqjax import onnx_export
  _, model, x = _scanned_stack()
  fn = lqjax.integer_inference(model, packed=False)
  graph = onnx_export.build_integer(fn, x[:1])

  def ops(g):
    out = [n.op_type for n in g.node]
    for n in g.node:
      for a in n.attribute:
        out += ops(a.g) if a.HasField("g") else []
    return out
  top, every = [n.op_type for n in graph.graph.node], ops(graph.graph)
  assert "MatMulInteger" not in top and every.count("MatMulInteger") == 1  # in the body
  assert top.count("Loop") + top.count("Scan") == 1
  ref = np.asarray(fn(x))
  _agrees(onnx_export.run_onnx(graph.SerializeToString(), np.asarray(x)), ref,
          2e-5 * float(np.max(np.abs(ref))) + 1e-6)


def test_linen_scan_is_refused_in_one_line():
  class Body(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.relu(nn.Dense(6, name="fc")(x)), None

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.scan(Body, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3)(name="stack")(x, None)[0]

  model = lqjax.quantize(Stack(), lqjax.Rule(".*", lqjax.QuantConfig(rule="lsq", bits=4)))
  x = jnp.ones((4, 6))
  fn = lqjax.integer_inference(model, model.init(jax.random.key(0), x))
  with pytest.raises(ValueError, match="Linen layers stacked by nn.scan are not supported") as e:
    fn(x)
  assert "\n" not in str(e.value)


def _agrees(got, ref, tol):
  """Within float rounding on at least 30 of 32 examples; elsewhere an input that lands on
  a rounding tie (within float error) may take the neighbouring code in onnxruntime's
  QuantizeLinear, which moves the logits by one step, never more."""
  close = np.all(np.abs(got - ref) <= tol, axis=1)
  assert close.sum() >= len(close) - 2, np.abs(got - ref).max()
  assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


@pytest.mark.parametrize("w_bits,a_bits", [(4, 8), (8, 4)])
def test_onnx_of_the_integer_function_and_qdq_inputs(w_bits, a_bits):
  """The integer function as ONNX: its Dense layers as QuantizeLinear + MatMulInteger, every
  other quantized input as QuantizeLinear/DequantizeLinear; onnxruntime agrees with the
  fake-quantized model within float rounding. The plain export gets the same QDQ pairs."""
  pytest.importorskip("onnxruntime")
  from lqjax import onnx_export
  a = lqjax.QuantConfig(rule="lsq", bits=a_bits, rounding="round")
  model = lqjax.quantize(Net(), lqjax.Rule(
      ".*", lqjax.QuantConfig(rule="lsq", bits=w_bits, granularity="row"),
      bias=lqjax.QuantConfig(rule="lsq", bits=8), inputs=a))
  x = jax.random.normal(jax.random.key(0), (32, 12, 12, 3))
  v = lqjax.calibrate(model, model.init(jax.random.key(1), x[:1]), x)
  ref = np.asarray(model.apply(v, x))
  tol = 2e-5 * float(np.max(np.abs(ref)))
  graph = onnx_export.build_integer(lqjax.integer_inference(model, v, packed=False), x[:1])
  ops = [n.op_type for n in graph.graph.node]
  assert ops.count("MatMulInteger") == 2 and ops.count("QuantizeLinear") == 6
  assert "Round" not in ops  # no input is quantized by float ops
  _agrees(onnx_export.run_onnx(graph.SerializeToString(), np.asarray(x)), ref, tol)
  plain = onnx_export.build(lambda v, x: model.apply(v, x), v, x[:1])
  ops = [n.op_type for n in plain.graph.node]
  assert ops.count("QuantizeLinear") == 6 and "Round" not in ops and "MatMulInteger" not in ops
  _agrees(onnx_export.run_onnx(plain.SerializeToString(), np.asarray(x)), ref, tol)
  if w_bits <= 4:  # kernels packed two a byte: refused, with what to do
    with pytest.raises(ValueError, match="packed=False"):
      onnx_export.build_integer(lqjax.integer_inference(model, v), x[:1])
  else:  # int8 kernels, and biases are never packed: nothing to refuse
    onnx_export.build_integer(lqjax.integer_inference(model, v), x[:1])

"""Integer inference (lqjax.integer_inference): packed codes, the integer route's agreement
with the fake-quantized model, what the device holds, and the routes taken."""

import re

import flax.linen as nn
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
  for name in ("c0", "c1", "c2", "c3", "fc1", "fc2"):  # integer codes only, packed below 8 bits
    k = held[name]["kernel"]
    assert k.dtype == (np.uint8 if bits < 8 else np.int8), (name, k.dtype)
    assert held[name]["bias"].dtype in (np.uint8, np.int8)
  assert set(integer.prepare(v)[1].values()) >= {integer.Stored(kind, (3, 3, 3, 8), "midtread")}
  # the route: integer dots for both Dense layers, an integer conv for c2 (>= 32 channels)
  dots, convs = _ops(fn, x)
  assert (dots, convs) == (2, 1)


def test_small_batches_and_column_scales_take_the_float_path():
  model, v, x = _model(4)
  fn = lqjax.integer_inference(model, v)  # min_rows 16
  np.testing.assert_allclose(fn(x[:1]), model.apply(v, x[:1]), atol=1e-4)
  # the dots have 1 row: float path; the conv's rows are its 144 output positions
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

"""Quantizer numerics and gradients against hand-derived references."""

import math

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from lqjax import qconfig, quant

jax.config.update("jax_default_matmul_precision", "highest")

RULES = qconfig.RULES
ROUNDINGS = qconfig.ROUNDINGS


def _x(shape=(5, 4), seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


class ForwardTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(rule=RULES, rounding=ROUNDINGS, bits=(None, 2, 4))
  def test_fake_quant_is_scale_times_codes(self, rule, rounding, bits):
    x = _x()
    s = jnp.full((1, 4), 0.3)
    fq = self.variant(lambda x, s: quant.fake_quant(
        x, s, rule=rule, threshold=0.1, rounding=rounding, bits=bits))
    codes = self.variant(lambda x, s: quant.quantize_codes(
        x, s, rounding=rounding, bits=bits))(x, s)
    chex.assert_type(codes, jnp.int32)
    np.testing.assert_allclose(fq(x, s), s * codes, rtol=0, atol=1e-7)
    ref = (np.floor if rounding == "floor" else np.round)(np.asarray(x) / 0.3)
    if bits is not None:
      ref = np.clip(ref, -2 ** (bits - 1), 2 ** (bits - 1) - 1)
    np.testing.assert_array_equal(codes, ref.astype(np.int32))

  def test_floor_error_bounds(self):
    x = _x((100,))
    s = jnp.array(0.17)
    err = x - quant.fake_quant(x, s, rule="fixed", rounding="floor")
    self.assertTrue(np.all(err >= 0))
    self.assertTrue(np.all(err < 0.17))
    err = x - quant.fake_quant(x, s, rule="fixed", rounding="round")
    self.assertTrue(np.all(np.abs(err) <= 0.17 / 2 + 1e-7))

  def test_bits_clip(self):
    x = jnp.array([-10.0, -2.2, -0.4, 0.0, 0.7, 1.9, 10.0])
    codes = quant.quantize_codes(x, jnp.array(1.0), rounding="floor", bits=2)
    np.testing.assert_array_equal(codes, [-2, -2, -1, 0, 0, 1, 1])
    codes = quant.quantize_codes(x, jnp.array(1.0), rounding="round", bits=3)
    np.testing.assert_array_equal(codes, [-4, -2, 0, 0, 1, 2, 3])

  def test_invalid_options(self):
    x = _x()
    with self.assertRaisesRegex(ValueError, "unknown rule"):
      quant.fake_quant(x, 1.0, rule="nope")
    with self.assertRaisesRegex(ValueError, "unknown rounding"):
      quant.fake_quant(x, 1.0, rule="fixed", rounding="ceil")
    with self.assertRaisesRegex(ValueError, "threshold"):
      quant.fake_quant(x, 1.0, rule="ratio", threshold=-1.0)
    with self.assertRaisesRegex(ValueError, "bits"):
      quant.fake_quant(x, 1.0, rule="fixed", bits=0)

  def test_scale_from_log_always_positive_finite(self):
    ls = jnp.array([-1e30, -1e4, -50.0, 0.0, 50.0, 1e4, 1e30, jnp.inf, -jnp.inf, jnp.nan])
    s = quant.scale_from_log(ls)
    self.assertTrue(np.all(np.isfinite(s)) and np.all(s > 0))
    codes = quant.quantize_codes(_x((10,)), s)
    self.assertTrue(np.all(np.isfinite(np.asarray(codes, np.float64))))

  @parameterized.parameters(None, 3)
  def test_init_scale(self, bits):
    x = jnp.array([[1.0, -4.0], [3.0, 0.0], [-1.0, 2.0]])
    s = quant.init_scale(x, "row", bits=bits, init_bits=8)
    self.assertEqual(s.shape, (1, 2))
    if bits is None:
      np.testing.assert_allclose(s, [[4.0 / 255, 6.0 / 255]], rtol=1e-6)
    else:
      np.testing.assert_allclose(s, [[2 * (5 / 3) / math.sqrt(3), 2 * 2 / math.sqrt(3)]],
                                 rtol=1e-6)
    zero = quant.init_scale(jnp.zeros((4,)), "tensor", init_bits=8)
    np.testing.assert_allclose(zero, [1.0 / 255], rtol=1e-6)


_shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5)


@st.composite
def _x_and_scale(draw):
  shape = draw(_shapes)
  x = draw(hnp.arrays(np.float32, shape, elements=st.floats(-100, 100, width=32)))
  gran = draw(st.sampled_from(["tensor", "row", "element"] + (["column"] if len(shape) >= 2 else [])
                              + (["spatial"] if len(shape) >= 3 else [])))
  sshape = qconfig.scale_shape(shape, gran)
  s = draw(hnp.arrays(np.float32, sshape, elements=st.floats(0.0009765625, 10.0, width=32)))
  return x, s, gran


class PropertyTest(absltest.TestCase):

  @settings(max_examples=60, deadline=None)
  @given(_x_and_scale(), st.sampled_from(ROUNDINGS), st.sampled_from([None, 1, 3, 8]))
  def test_invariants(self, xs, rounding, bits):
    x, s, _ = xs
    x, s = jnp.asarray(x), jnp.asarray(s)
    codes = quant.quantize_codes(x, s, rounding=rounding, bits=bits)
    q = quant.fake_quant(x, s, rule="fixed", rounding=rounding, bits=bits)
    # Integers, and Q = s * codes.
    np.testing.assert_array_equal(np.asarray(q), np.asarray(s * codes.astype(jnp.float32)))
    # Idempotence: Q(Q(x)) = Q(x).
    q2 = quant.fake_quant(q, s, rule="fixed", rounding=rounding, bits=bits)
    np.testing.assert_array_equal(np.asarray(q2), np.asarray(q))
    if bits is None:
      err = np.asarray(x - q, np.float64)
      bound = np.broadcast_to(np.asarray(s, np.float64), err.shape)
      tol = 1e-5 * np.maximum(1.0, np.abs(np.asarray(x)))
      if rounding == "floor":
        self.assertTrue(np.all(np.abs(err) < bound + tol))
      else:
        self.assertTrue(np.all(np.abs(err) <= bound / 2 + tol))
    else:
      self.assertTrue(np.all(codes >= -2 ** (bits - 1)) and np.all(codes <= 2 ** (bits - 1) - 1))

  @settings(max_examples=60, deadline=None)
  @given(_x_and_scale(), st.data())
  def test_product_reduction_is_the_plain_sum(self, xs, data):
    """The LSQ gradient's reduction (a matrix-vector product on CPU for leading or
    trailing reduced axes) sums exactly what ``_reduce_to`` sums, to its shape."""
    x, _, gran = xs
    if x.ndim >= 3:  # also channel (leading axes reduced) and kept axes (0, 2) (mixed)
      gran = data.draw(st.sampled_from([gran, "channel", (0, 2)]))
    sshape = qconfig.scale_shape(x.shape, gran)
    a, b = jnp.asarray(x), jnp.asarray(np.cos(x))
    got = quant._reduce_product_to(a, b, sshape)
    self.assertEqual(got.shape, tuple(sshape))
    want = np.sum(np.asarray(x, np.float64) * np.cos(np.asarray(x, np.float64)),
                  axis=qconfig.shared_axes(x.shape, sshape), keepdims=True)
    np.testing.assert_allclose(got, want.reshape(sshape), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(got, quant._reduce_to(a * b, sshape), rtol=1e-5, atol=1e-3)

  @settings(max_examples=40, deadline=None)
  @given(_x_and_scale(), st.sampled_from(RULES))
  def test_scale_cotangent_shape(self, xs, rule):
    x, s, _ = xs
    g = jax.grad(lambda s: jnp.sum(quant.fake_quant(
        jnp.asarray(x), s, rule=rule, threshold=0.5) ** 2))(jnp.asarray(s))
    self.assertEqual(g.shape, s.shape)
    self.assertTrue(np.all(np.isfinite(g)))


class GranularityTest(parameterized.TestCase):

  @parameterized.parameters(
      ((3, 4), "tensor", (1, 1)), ((3, 4), "row", (1, 4)), ((3, 4), "channel", (1, 4)),
      ((3, 4), "column", (3, 1)), ((3, 4), "element", (3, 4)),
      ((2, 2, 3, 4), "tensor", (1, 1, 1, 1)), ((2, 2, 3, 4), "channel", (1, 1, 1, 4)),
      ((2, 2, 3, 4), "row", (1, 1, 1, 4)), ((2, 2, 3, 4), "column", (1, 1, 3, 1)),
      ((2, 2, 3, 4), "spatial", (2, 2, 1, 1)), ((2, 2, 3, 4), "element", (2, 2, 3, 4)),
      ((4,), "tensor", (1,)), ((4,), "row", (4,)), ((4,), "channel", (4,)),
      ((4,), "element", (4,)), ((2, 2, 3, 4), (0, -1), (2, 1, 1, 4)),
  )
  def test_scale_shape(self, shape, gran, expected):
    self.assertEqual(qconfig.scale_shape(shape, gran), expected)

  @parameterized.parameters(((4,), "column"), ((3, 4), "spatial"), ((3, 4), "diagonal"),
                            ((3, 4), (2,)), ((3, 4), (0, 0)))
  def test_bad_granularity(self, shape, gran):
    with self.assertRaises(ValueError):
      qconfig.scale_shape(shape, gran)

  def test_parse(self):
    self.assertEqual(qconfig.parse_granularity("row"), "row")
    self.assertEqual(qconfig.parse_granularity("0,1"), (0, 1))
    with self.assertRaisesRegex(ValueError, "unknown granularity"):
      qconfig.parse_granularity("rows")

  def test_config_validation(self):
    with self.assertRaisesRegex(ValueError, "threshold"):
      qconfig.QuantConfig(threshold=-0.1)
    with self.assertRaisesRegex(ValueError, "granularity"):
      qconfig.QuantConfig(granularity="bogus")
    with self.assertRaisesRegex(ValueError, "rule"):
      qconfig.QuantConfig(rule="bogus")


def _lsq_reference(x, s, w, qn, qp, rounding, offset=0.0):
  """Numpy LSQ scale gradient, per tensor, after PyTorch's learnable fake-quant
  reference (zero point 0): clip test on the rounded code, dQ/ds = q - x/s
  inside, the bound outside, times dY, summed, times 1/sqrt(N * max(Qp, 1)).

  With `offset` o (the midrise grid, o = 1/2) the code is rounded from x/s - o and
  the levels are q + o: dQ/ds = q + o - x/s inside, qn + o or qp + o outside."""
  x = np.asarray(x, np.float64)
  w = np.asarray(w, np.float64)
  v = x / s
  q = np.round(v - offset) if rounding == "round" else np.floor(v - offset)
  small, big = q < qn, q > qp
  d = np.where(small, qn + offset, np.where(big, qp + offset, np.clip(q, qn, qp) + offset - v))
  gx = w * (~small & ~big)
  return gx, np.sum(d * w) / math.sqrt(x.size * max(qp, 1))


class GradientTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(rule=RULES, rounding=ROUNDINGS)
  def test_ste(self, rule, rounding):
    x, w = _x((6, 3)), _x((6, 3), seed=1)
    gx = self.variant(jax.grad(lambda x: jnp.sum(w * quant.fake_quant(
        x, jnp.full((1, 3), 0.25), rule=rule, threshold=0.3, rounding=rounding))))(x)
    np.testing.assert_array_equal(gx, w)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(rounding=ROUNDINGS, bits=(2, 3))
  def test_clipped_ste_and_lsq_against_reference(self, rounding, bits):
    x = jnp.asarray(np.linspace(-3, 3, 25), jnp.float32)
    w = jnp.asarray(np.random.default_rng(3).normal(size=25), jnp.float32)
    s = jnp.array(0.6)
    f = self.variant(jax.grad(
        lambda x, s: jnp.sum(w * quant.fake_quant(x, s, rule="lsq", rounding=rounding, bits=bits)),
        argnums=(0, 1)))
    gx, gs = f(x, s)
    qn, qp = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    ref_gx, ref_gs = _lsq_reference(x, 0.6, w, qn, qp, rounding)
    np.testing.assert_allclose(gx, ref_gx, atol=1e-7)
    np.testing.assert_allclose(gs, ref_gs, rtol=1e-5)

  def test_lsq_per_channel_and_grad_factor(self):
    # Per-column scales: each group is reduced separately with N = rows.
    x, w = _x((8, 2), seed=4), _x((8, 2), seed=5)
    s = jnp.array([[0.3, 0.7]])
    gs = jax.grad(lambda s: jnp.sum(w * quant.fake_quant(
        x, s, rule="lsq", rounding="round", bits=4)))(s)
    for j in range(2):
      _, ref = _lsq_reference(x[:, j], float(s[0, j]), w[:, j], -8, 7, "round")
      np.testing.assert_allclose(gs[0, j], ref, rtol=1e-5)
    # The 1/sqrt(N*Qp) factor, N=8, Qp=7, on lqjax's gradient: no code of column 0 clips,
    # so times sqrt(56) it is the plain sum of dL/dQ * (q - x/s) by hand.
    v = np.asarray(x[:, 0], np.float64) / 0.3
    self.assertTrue(np.all(np.abs(np.round(v)) <= 7))
    hand = float(np.sum(np.asarray(w[:, 0], np.float64) * (np.round(v) - v)))
    self.assertAlmostEqual(float(gs[0, 0]) * math.sqrt(8 * 7), hand, places=4)

  def test_fixed_has_no_scale_gradient(self):
    gs = jax.grad(lambda s: jnp.sum(quant.fake_quant(_x(), s, rule="fixed") ** 2))(jnp.ones((1, 4)))
    np.testing.assert_array_equal(gs, np.zeros((1, 4)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_ratio_rule_exact(self):
    # Kernel (3, 2), row granularity: group j is column j of the stored array.
    x = jnp.array([[3.0, 1.0], [4.0, 0.0], [0.0, 0.0]])
    w = jnp.array([[0.6, 0.05], [0.8, 0.0], [0.0, 0.0]])  # dL/dQ
    # Group 0: r = ||(0.6, 0.8)|| / ||(3, 4)|| = 1/5 = 0.2 >= lambda: no growth.
    # Group 1: r = 0.05 / 1 = 0.05 < lambda = 0.1: g = tanh(0.1 - 0.05).
    log_s = jnp.log(jnp.array([[0.5, 0.5]]))

    def loss(log_s):
      return jnp.sum(w * quant.fake_quant(x, quant.scale_from_log(log_s), rule="ratio",
                                          threshold=0.1))

    g_log = self.variant(jax.grad(loss))(log_s)
    np.testing.assert_allclose(g_log, [[0.0, -math.tanh(0.05)]], rtol=1e-6)
    # In scale space: -g / s.
    g_s = self.variant(jax.grad(lambda s: jnp.sum(w * quant.fake_quant(
        x, s, rule="ratio", threshold=0.1))))(jnp.array([[0.5, 0.5]]))
    np.testing.assert_allclose(g_s, [[0.0, -math.tanh(0.05) / 0.5]], rtol=1e-6)
    growth, r = quant.ratio_growth(w, x, (1, 2), 0.1)
    np.testing.assert_allclose(r, [[0.2, 0.05]], rtol=1e-6)
    np.testing.assert_allclose(growth, [[0.0, math.tanh(0.05)]], rtol=1e-6)

  def test_relax_threshold_makes_grid_finer(self):
    x = jnp.array([[3.0, 1.0], [4.0, 0.0]])
    w = jnp.array([[6.0, 0.05], [8.0, 0.0]])  # r = 2.0 and 0.05
    g_log = jax.grad(lambda ls: jnp.sum(w * quant.fake_quant(
        x, quant.scale_from_log(ls), rule="ratio", threshold=0.1, relax_threshold=1.5)))(
            jnp.zeros((1, 2)))
    # Group 0: r = 2 > 1.5, g = -tanh(0.5): the log-scale gradient is +tanh(0.5) (s shrinks).
    np.testing.assert_allclose(g_log, [[math.tanh(0.5), -math.tanh(0.05)]], rtol=1e-6)
    with self.assertRaisesRegex(ValueError, "relax_threshold"):
      quant.fake_quant(x, 1.0, rule="ratio", threshold=0.5, relax_threshold=0.1)

  def test_ratio_element_granularity_is_thesis_ratio(self):
    x = jnp.array([2.0, -4.0, 1.0])
    w = jnp.array([0.1, 0.2, 3.0])
    growth, r = quant.ratio_growth(w, x, (3,), 1.0)
    np.testing.assert_allclose(r, np.abs(w) / np.abs(x), rtol=1e-6)
    np.testing.assert_allclose(growth, [math.tanh(0.95), math.tanh(0.95), 0.0], rtol=1e-6)

  def test_ratio_lsq_is_sum(self):
    x, w = _x((6, 3), seed=7), _x((6, 3), seed=8)
    s = jnp.full((1, 3), 0.4)

    def g(rule):
      return jax.grad(lambda s: jnp.sum(w * quant.fake_quant(
          x, s, rule=rule, threshold=2.0, lsq_weight=0.5)))(s)

    np.testing.assert_allclose(g("ratio_lsq"), g("ratio") + 0.5 * g("lsq"), rtol=1e-5)

  def test_threshold_zero_means_no_scale_gradient(self):
    gs = jax.grad(lambda s: jnp.sum(quant.fake_quant(_x(), s, rule="ratio", threshold=0.0)))(
        jnp.ones((1, 4)))
    np.testing.assert_array_equal(gs, np.zeros((1, 4)))

  @parameterized.parameters("tensor", "row", "column", "element", ((0,),))
  def test_cotangent_shapes_per_granularity(self, gran):
    for shape in [(6, 5), (3, 3, 2, 4)]:
      if gran == "spatial" and len(shape) < 3:
        continue
      x = _x(shape, seed=9)
      s = jnp.full(qconfig.scale_shape(shape, gran), 0.2)
      for rule in RULES:
        gs = jax.grad(lambda s: jnp.sum(quant.fake_quant(x, s, rule=rule, threshold=1.0) ** 2))(s)
        self.assertEqual(gs.shape, s.shape)

  def test_spatial_cotangent_shape(self):
    x = _x((3, 3, 2, 4))
    s = jnp.full(qconfig.scale_shape(x.shape, "spatial"), 0.2)
    gs = jax.grad(lambda s: jnp.sum(quant.fake_quant(x, s, rule="lsq") ** 2))(s)
    self.assertEqual(gs.shape, (3, 3, 1, 1))



class MidriseTest(chex.TestCase, parameterized.TestCase):
  """The midrise grid s * (q + 1/2): symmetric levels, no zero; binary at 1 bit."""

  def test_levels_by_hand(self):
    x = jnp.array([-1.0, -0.3, -0.01, 0.02, 0.4, 2.0])
    s = jnp.array(0.5)
    # x/s - 1/2 = -2.5, -1.1, -0.52, -0.46, 0.3, 3.5; rounded (half to even) -2, -1, -1, 0, 0, 4.
    codes = quant.quantize_codes(x, s, rounding="round", bits=1, grid="midrise")
    np.testing.assert_array_equal(codes, [-1, -1, -1, 0, 0, 0])
    np.testing.assert_array_equal(
        quant.fake_quant(x, s, rule="fixed", rounding="round", bits=1, grid="midrise"),
        [-0.25, -0.25, -0.25, 0.25, 0.25, 0.25])
    np.testing.assert_array_equal(
        quant.fake_quant(x, s, rule="fixed", rounding="round", bits=2, grid="midrise"),
        [-0.75, -0.25, -0.25, 0.25, 0.25, 0.75])
    # The midtread grid at 1 bit is {-s, 0}: every positive weight is pruned.
    np.testing.assert_array_equal(
        quant.fake_quant(x, s, rule="fixed", rounding="round", bits=1),
        [-0.5, -0.5, 0.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(quant.dequantize(codes, s, grid="midrise"),
                                  [-0.25, -0.25, -0.25, 0.25, 0.25, 0.25])

  def test_lsq_gradient_by_hand(self):
    x = jnp.array([-1.0, -0.3, -0.01, 0.02, 0.4, 2.0])
    w = jnp.arange(6.0)
    gx, gs = jax.grad(lambda x, s: jnp.sum(w * quant.fake_quant(
        x, s, rule="lsq", rounding="round", bits=1, grid="midrise")), argnums=(0, 1))(
            x, jnp.array(0.5))
    # dQ/ds: -1/2 (clipped below), -1 + 1/2 + 0.6, -1 + 1/2 + 0.02, 1/2 - 0.04, 1/2 - 0.8,
    # +1/2 (clipped above); against w = 0..5: 0.1 - 0.96 + 1.38 - 1.2 + 2.5 = 1.82, over
    # sqrt(N * max(Qp, 1)) = sqrt(6).
    self.assertAlmostEqual(float(gs), 1.82 / math.sqrt(6), places=5)
    np.testing.assert_array_equal(gx, [0, 1, 2, 3, 4, 0])  # clipped STE

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(rounding=ROUNDINGS, bits=(1, 2, 3))
  def test_lsq_against_reference(self, rounding, bits):
    x = jnp.asarray(np.linspace(-3, 3, 25), jnp.float32)
    w = jnp.asarray(np.random.default_rng(3).normal(size=25), jnp.float32)
    f = self.variant(jax.grad(lambda x, s: jnp.sum(w * quant.fake_quant(
        x, s, rule="lsq", rounding=rounding, bits=bits, grid="midrise")), argnums=(0, 1)))
    gx, gs = f(x, jnp.array(0.6))
    ref_gx, ref_gs = _lsq_reference(x, 0.6, w, -2 ** (bits - 1), 2 ** (bits - 1) - 1,
                                    rounding, offset=0.5)
    np.testing.assert_allclose(gx, ref_gx, atol=1e-7)
    np.testing.assert_allclose(gs, ref_gs, rtol=1e-5)

  @settings(max_examples=60, deadline=None)
  @given(_x_and_scale(), st.sampled_from(ROUNDINGS), st.sampled_from([1, 2, 4]))
  def test_invariants(self, xs, rounding, bits):
    x, s, _ = xs
    x, s = jnp.asarray(x), jnp.asarray(s)
    kw = dict(rounding=rounding, bits=bits, grid="midrise")
    codes = quant.quantize_codes(x, s, **kw)
    q = quant.fake_quant(x, s, rule="fixed", **kw)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(s * (codes.astype(jnp.float32) + 0.5)))
    np.testing.assert_array_equal(np.asarray(quant.fake_quant(q, s, rule="fixed", **kw)),
                                  np.asarray(q))  # idempotent
    self.assertTrue(np.all(codes >= -2 ** (bits - 1)) and np.all(codes <= 2 ** (bits - 1) - 1))
    # No level at zero: |Q| >= s / 2 everywhere.
    self.assertTrue(np.all(np.abs(np.asarray(q)) >= np.broadcast_to(np.asarray(s), q.shape) / 2
                           * (1 - 1e-6)))

  def test_invalid(self):
    with self.assertRaisesRegex(ValueError, "needs fixed bits"):
      quant.fake_quant(_x(), 1.0, rule="lsq", grid="midrise")
    with self.assertRaisesRegex(ValueError, "unknown grid"):
      quant.quantize_codes(_x(), 1.0, bits=2, grid="binary")
    with self.assertRaisesRegex(ValueError, "needs fixed bits"):
      qconfig.QuantConfig(grid="midrise")

  def test_config_json(self):
    self.assertNotIn("grid", qconfig.QuantConfig().to_json())  # readable where grid is unknown
    cfg = qconfig.QuantConfig(rule="lsq", bits=1, grid="midrise")
    self.assertEqual(qconfig.QuantConfig.from_json(cfg.to_json()), cfg)
    self.assertEqual(cfg.offset, 0.5)


if __name__ == "__main__":
  absltest.main()

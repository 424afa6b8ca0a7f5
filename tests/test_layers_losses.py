"""Quantizer modules, the generic layer wrapper, and the three penalties."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from lqjax import linen_quant as layers, losses, optim, qconfig, quant, tree


class LayersTest(parameterized.TestCase):

  @parameterized.parameters("tensor", "row", "column", "element")
  def test_dense_param_layout_and_forward(self, gran):
    cfg = qconfig.QuantConfig(granularity=gran, rule="lsq", bits=4)
    m = layers.QuantDense(5, quant={"kernel": cfg, "bias": qconfig.QuantConfig(granularity="tensor")})
    x = jnp.ones((2, 3))
    v = m.init(jax.random.key(0), x)
    p = tree.unbox(v["params"])
    self.assertEqual(p["kernel_quant"]["log_scale"].shape, qconfig.scale_shape((3, 5), gran))
    self.assertEqual(p["bias_quant"]["log_scale"].shape, (1,))
    s_k = quant.scale_from_log(p["kernel_quant"]["log_scale"])
    s_b = quant.scale_from_log(p["bias_quant"]["log_scale"])
    qk = s_k * quant.quantize_codes(p["kernel"], s_k, bits=4)
    qb = s_b * quant.quantize_codes(p["bias"], s_b)
    np.testing.assert_allclose(m.apply(v, x), x @ qk + qb, rtol=1e-6)

  def test_conv_spatial_and_depthwise(self):
    cfg = qconfig.QuantConfig(granularity="spatial")
    m = layers.QuantConv(4, (3, 3), feature_group_count=4, quant={"kernel": cfg})
    v = tree.unbox(m.init(jax.random.key(0), jnp.ones((1, 6, 6, 4))))
    self.assertEqual(v["params"]["kernel"].shape, (3, 3, 1, 4))
    self.assertEqual(v["params"]["kernel_quant"]["log_scale"].shape, (3, 3, 1, 1))
    self.assertNotIn("bias_quant", v["params"])

  def test_generic_wrapper_on_embed(self):
    cfg = qconfig.QuantConfig(granularity="row", rounding="round")
    m = layers.QuantEmbed(num_embeddings=6, features=3, quant={"embedding": cfg})
    ids = jnp.array([0, 5, 2])
    v = m.init(jax.random.key(1), ids)
    e = v["params"]["embedding"]
    s = quant.scale_from_log(v["params"]["embedding_quant"]["log_scale"].value)
    np.testing.assert_allclose(m.apply(v, ids), (s * quant.quantize_codes(e, s, rounding="round"))[ids])
    # Init rule: 8 bits over each group's range; a row of the table (one token) is a group.
    self.assertEqual(s.shape, (6, 1))
    np.testing.assert_allclose(s[:, 0], (e.max(1) - e.min(1)) / 255, rtol=1e-5)

  def test_unquantized_layer_unchanged(self):
    m = layers.QuantDense(3)
    x = jnp.ones((2, 4))
    v = m.init(jax.random.key(0), x)
    self.assertEqual(set(v["params"]), {"kernel", "bias"})
    np.testing.assert_allclose(m.apply(v, x), nn.Dense(3).apply(v, x))

  def test_quantized_tensors_carry_their_configs(self):
    kcfg, bcfg = qconfig.QuantConfig(rule="lsq", bits=3), qconfig.QuantConfig(granularity="row")
    m = layers.QuantDense(3, quant={"kernel": kcfg, "bias": bcfg})
    v = m.init(jax.random.key(0), jnp.ones((1, 2)))
    found = {t.path: (t.p.shape, t.log_scale.shape, t.config)
             for t in tree.quantized_tensors(v["params"])}
    self.assertEqual(found, {("kernel",): ((2, 3), (1, 1), kcfg), ("bias",): ((3,), (3,), bcfg)})

  def test_bad_granularity_raises(self):
    m = layers.QuantDense(3, quant={"bias": qconfig.QuantConfig(granularity="column")})
    with self.assertRaisesRegex(ValueError, "column"):
      m.init(jax.random.key(0), jnp.ones((1, 2)))


class PenaltiesTest(absltest.TestCase):

  def params(self):
    # One quantizer: P (2, 2), per-column scales (keep last axis) 0.5 and 2.
    return {"layer": {"kernel": jnp.array([[0.2, 3.0], [1.3, -1.0]]),
                      "kernel_quant": {"log_scale": tree.QuantScale(
                          jnp.log(jnp.array([[0.5, 2.0]])), config=qconfig.QuantConfig())}}}

  def test_inverse_scale(self):
    self.assertAlmostEqual(float(losses.inverse_scale_penalty(self.params(), 0.1)),
                           0.1 * (2.0 + 0.5) / 2, places=6)

  def test_bin_count(self):
    # bins: (1.3 - 0.2)/0.5 + 1 = 3.2, (3 - -1)/2 + 1 = 3.
    expected = 0.3 * (max(math.log2(3.2) - 1, 0) + max(math.log2(3.0) - 1, 0)) / 2
    self.assertAlmostEqual(float(losses.bin_count_penalty(self.params(), 0.3, target_bits=1)),
                           expected, places=6)

  def test_deviation_and_its_gradient(self):
    # floor codes: col 0: 0.2/0.5 -> 0, 1.3/0.5 -> 2 ; col 1: 3/2 -> 1, -1/2 -> -1.
    q = np.array([[0.0, 2.0], [1.0, -2.0]])
    p = np.array([[0.2, 3.0], [1.3, -1.0]])
    expected = 2.0 * np.mean((p - q) ** 2)
    self.assertAlmostEqual(float(losses.deviation_penalty(self.params(), 2.0)), expected, places=6)
    g = jax.grad(lambda pr: losses.deviation_penalty(pr, 2.0))(self.params())
    np.testing.assert_allclose(g["layer"]["kernel"], 2.0 * 2 * (p - q) / 4, rtol=1e-6)

  def test_sum_and_zero(self):
    total, terms = losses.quant_penalties(self.params(), inverse_scale=0.1, bin_count=0.3,
                                          deviation=2.0, target_bits=1)
    # each term by hand (the three tests above), and the total as their sum
    q = np.array([[0.0, 2.0], [1.0, -2.0]])
    p = np.array([[0.2, 3.0], [1.3, -1.0]])
    hand = {"inverse_scale": 0.1 * (2.0 + 0.5) / 2,
            "bin_count": 0.3 * (max(math.log2(3.2) - 1, 0) + max(math.log2(3.0) - 1, 0)) / 2,
            "deviation": 2.0 * np.mean((p - q) ** 2)}
    self.assertEqual(set(terms), set(hand))
    for k, v in hand.items():
      self.assertAlmostEqual(float(terms[k]), v, places=6, msg=k)
    self.assertAlmostEqual(float(total), sum(hand.values()), places=6)
    total0, _ = losses.quant_penalties(self.params())
    self.assertEqual(float(total0), 0.0)
    with self.assertRaisesRegex(ValueError, "coefficient"):
      losses.quant_penalties(self.params(), deviation=-1.0)

  def test_inverse_scale_gradient_pushes_scales_up(self):
    g = jax.grad(lambda pr: losses.inverse_scale_penalty(pr, 1.0))(self.params())
    self.assertTrue(np.all(g["layer"]["kernel_quant"]["log_scale"].value < 0))


class RatioEndToEndTest(parameterized.TestCase):
  """A tiny quantized model trained with the ratio rule: the scales of
  insensitive groups grow, sensitive ones stay; threshold 0 moves nothing."""

  def _train(self, threshold, steps=40):
    cfg = qconfig.QuantConfig(rule="ratio", threshold=threshold, granularity="row")
    model = layers.QuantDense(2, use_bias=False, quant={"kernel": cfg})
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(64,)), jnp.float32)  # unfit-able noise: gradients stay large
    params = model.init(jax.random.key(0), x)["params"]
    tx = optim.split(optax.sgd(0.05), optax.sgd(0.1))
    opt = tx.init(params)

    def loss_fn(p):
      y = model.apply({"params": p}, x)
      return jnp.mean((y[:, 0] * 10 - t) ** 2)  # output 1 does not reach the loss

    @jax.jit
    def step(p, o):
      g = jax.grad(loss_fn)(p)
      u, o = tx.update(g, o, p)
      return optax.apply_updates(p, u), o

    start = params["kernel_quant"]["log_scale"].value
    for _ in range(steps):
      params, opt = step(params, opt)
    return start, params["kernel_quant"]["log_scale"].value

  def test_insensitive_grows_sensitive_stays(self):
    start, end = self._train(threshold=0.5)
    # Output 0 is sensitive (r >> 0.5): unchanged. Output 1 has r = 0: grows by
    # lr * tanh(0.5) per step, exactly.
    self.assertEqual(float(end[0, 0]), float(start[0, 0]))
    np.testing.assert_allclose(end[0, 1] - start[0, 1], 40 * 0.1 * math.tanh(0.5), rtol=1e-4)

  def test_threshold_zero_moves_nothing(self):
    start, end = self._train(threshold=0.0)
    np.testing.assert_array_equal(start, end)


if __name__ == "__main__":
  absltest.main()

"""Learned input (activation) quantizers: numerics and LSQ+ gradients against hand-derived
references, invariants, the rules on Linen and NNX models, the file, and a real MNIST run."""

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import lqjax
from lqjax import inputs, optim

ROOT = pathlib.Path(__file__).resolve().parent.parent
LSQ4 = lqjax.QuantConfig(rule="lsq", bits=4, rounding="round")


def test_forward_matches_hand_computed_codes():
  # s = 0.5, z = 0.25, 3 bits: codes clip to [-4, 3], levels -1.75 .. 1.75
  x = jnp.array([-9.0, -1.6, -0.3, 0.25, 0.6, 1.1, 1.7, 5.0])
  cfg = lqjax.QuantConfig(rule="lsq", bits=3, rounding="round")
  q = inputs.fake_quant(x, jnp.log(0.5), jnp.array(0.25), cfg)
  codes = [-4, -4, -1, 0, 1, 2, 3, 3]  # round((x - 0.25) / 0.5), clipped
  np.testing.assert_allclose(q, 0.5 * np.array(codes) + 0.25, atol=1e-6)
  np.testing.assert_array_equal(inputs.codes(x, jnp.log(0.5), 0.25, cfg), codes)
  floor = lqjax.QuantConfig(rule="lsq", bits=3)
  np.testing.assert_array_equal(inputs.codes(x, jnp.log(0.5), 0.25, floor),
                                [-4, -4, -2, 0, 0, 1, 2, 3])


def test_lsq_plus_gradients_against_hand_derivation():
  """dQ/dx = 1 inside the range, 0 outside; dQ/ds = q - (x-z)/s inside, the clip level
  outside; dQ/dz = 0 inside, 1 outside; s and z gradients times 1/sqrt(N qp)."""
  x = jnp.array([[-9.0, -0.3, 0.6, 1.1, 5.0]])
  s, z, bits = 0.5, 0.25, 3
  cfg = lqjax.QuantConfig(rule="lsq", bits=bits, rounding="round")
  w = jnp.array([[1.0, 2.0, -1.0, 0.5, 3.0]])  # dL/dQ
  loss = lambda x, ls, z: jnp.sum(w * inputs.fake_quant(x, ls, z, cfg))  # noqa: E731
  gx, gls, gz = jax.grad(loss, argnums=(0, 1, 2))(x, jnp.log(s), jnp.array(z))
  v = (np.asarray(x) - z) / s
  raw = np.round(v)
  inside = (raw >= -4) & (raw <= 3)
  ds = np.where(inside, np.clip(raw, -4, 3) - v, np.clip(raw, -4, 3))
  dz = np.where(inside, 0.0, 1.0)
  g = 1 / math.sqrt(5 * 3)
  np.testing.assert_allclose(gx, np.asarray(w) * inside, atol=1e-6)
  np.testing.assert_allclose(gls, np.sum(np.asarray(w) * ds) * g * s, rtol=1e-5)  # d/dlog s
  np.testing.assert_allclose(gz, np.sum(np.asarray(w) * dz) * g, rtol=1e-5)
  fixed = lqjax.QuantConfig(rule="fixed", bits=bits, rounding="round")
  _, gls, gz = jax.grad(lambda x, ls, z: jnp.sum(w * inputs.fake_quant(x, ls, z, fixed)),
                        argnums=(0, 1, 2))(x, jnp.log(s), jnp.array(z))
  assert float(gls) == 0.0 and float(gz) == 0.0


@pytest.mark.parametrize("threshold,relax", [(0.5, None), (0.005, None), (0.002, 0.005)])
def test_ratio_rule_gradients_against_hand_derivation(threshold, relax):
  """The ratio rule on an input: d log s = -tanh(lambda - r) for r = B ||dL/dQ|| / ||x|| below
  lambda, 0 between lambda and lambda_hi, +tanh(r - lambda_hi) above; x and z as under LSQ+
  (z's gradient scaled by 1/sqrt(N qp)); the forward pass is LSQ's."""
  x = jnp.array([[-9.0, -0.3, 0.6, 1.1, 5.0], [0.2, -1.4, 2.2, 0.0, -0.7]])
  s, z, bits = 0.5, 0.25, 3
  cfg = lqjax.QuantConfig(rule="ratio", bits=bits, rounding="round", threshold=threshold,
                          relax_threshold=relax)
  w = jnp.array([[1.0, 2.0, -1.0, 0.5, 3.0], [0.1, -0.2, 0.3, 0.0, 0.4]]) * 0.01  # dL/dQ
  loss = lambda x, ls, z, c: jnp.sum(w * inputs.fake_quant(x, ls, z, c))  # noqa: E731
  gx, gls, gz = jax.grad(loss, argnums=(0, 1, 2))(x, jnp.log(s), jnp.array(z), cfg)
  r = 2 * np.linalg.norm(w) / np.linalg.norm(x)  # B = 2 examples
  assert 0.006 < r < 0.009, r  # the three cases: grow, still, and shrink
  want = -math.tanh(threshold - r) if r < threshold else (
      math.tanh(r - relax) if relax is not None and r > relax else 0.0)
  np.testing.assert_allclose(gls, want, rtol=1e-5, atol=1e-7)
  v = (np.asarray(x) - z) / s
  inside = (np.round(v) >= -4) & (np.round(v) <= 3)
  np.testing.assert_allclose(gx, np.asarray(w) * inside, atol=1e-7)
  np.testing.assert_allclose(gz, np.sum(np.asarray(w) * ~inside) / math.sqrt(5 * 3), rtol=1e-5)
  lsq = dataclasses.replace(cfg, rule="lsq")
  np.testing.assert_array_equal(inputs.fake_quant(x, jnp.log(s), z, cfg),
                                inputs.fake_quant(x, jnp.log(s), z, lsq))
  # r does not change with the batch: the same examples twice give the same gradient
  x2, w2 = jnp.concatenate([x, x]), jnp.concatenate([w, w]) / 2  # the mean over 4 examples
  g2 = jax.grad(lambda ls: jnp.sum(w2 * inputs.fake_quant(x2, ls, z, cfg)))(jnp.log(s))
  np.testing.assert_allclose(g2, gls, rtol=1e-5, atol=1e-7)


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float32, (4, 6), elements=st.floats(-50, 50, width=32)),
       st.floats(-4, 2), st.floats(-3, 3), st.sampled_from([2, 4, 8]))
def test_idempotent_and_error_bounded(x, log_s, z, bits):
  cfg = lqjax.QuantConfig(rule="lsq", bits=bits, rounding="round")
  x, ls, z = jnp.asarray(x), jnp.float32(log_s), jnp.float32(z)
  q = inputs.fake_quant(x, ls, z, cfg)
  np.testing.assert_allclose(inputs.fake_quant(q, ls, z, cfg), q, rtol=0, atol=1e-4)
  s = float(jnp.exp(ls))
  lo, hi = -(2 ** (bits - 1)) * s + float(z), (2 ** (bits - 1) - 1) * s + float(z)
  assert np.all((np.asarray(q) >= lo - 1e-4) & (np.asarray(q) <= hi + 1e-4))
  inside = (np.asarray(x) >= lo) & (np.asarray(x) <= hi)
  err = np.abs(np.asarray(q - x))[inside]
  assert np.all(err <= s / 2 + 1e-4 * max(1.0, s))


def test_init_picks_the_smallest_error_over_the_shrinks():
  x = jnp.asarray(np.random.default_rng(0).standard_t(3, size=4096), jnp.float32)
  cfg = lqjax.QuantConfig(rule="lsq", bits=4, rounding="round")
  ls, z = inputs.init_params(x, cfg)
  mse = lambda ls, z: float(jnp.mean((inputs.fake_quant(x, ls, z, cfg) - x) ** 2))  # noqa
  lo, hi = float(x.min()), float(x.max())
  for a in (1.0, 0.5, 0.3):  # every shrink tried is no better
    s = (hi - lo) * a / 15
    assert mse(ls, z) <= mse(jnp.log(s), lo * a + 8 * s) + 1e-7
  assert float(jnp.exp(ls)) < (hi - lo) / 15  # heavy tails: the range is shrunk
  relu = jnp.maximum(x, 0.0)  # a one-sided input: the grid starts at 0
  ls, z = inputs.init_params(relu, cfg)
  assert abs(float(z - 8 * jnp.exp(ls))) < 1e-6
  ls, z = inputs.init_params(jnp.zeros((3, 3)), cfg)  # a dummy batch: unit range
  assert np.isfinite(float(ls)) and float(jnp.exp(ls)) == pytest.approx(2 / 15)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Dense(16, name="fc1")(x))
    x = nn.Embed(5, 4, name="emb")(jnp.zeros(x.shape[:1], jnp.int32)) + nn.Dense(4, name="fc2")(x)
    return nn.Dense(3, name="fc3")(x)


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(8, 16, rngs=rngs)
    self.emb = nnx.Embed(5, 4, rngs=rngs)
    self.fc2 = nnx.Linear(16, 4, rngs=rngs)
    self.fc3 = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.fc1(x))
    x = self.emb(jnp.zeros(x.shape[:1], jnp.int32)) + self.fc2(x)
    return self.fc3(x)


def _rules():
  return [lqjax.Rule("fc1", lqjax.QuantConfig(rule="lsq", bits=4),
                     inputs=lqjax.QuantConfig(rule="lsq", bits=8, rounding="round")),
          lqjax.Rule(".*", lqjax.QuantConfig(rule="lsq", bits=4), inputs=LSQ4)]


def _batch():
  return jnp.asarray(np.random.default_rng(1).normal(size=(32, 8)), jnp.float32)


def test_linen_rule_inputs_layout_calibration_and_file(tmp_path):
  model = lqjax.quantize(MLP(), _rules())
  v = model.init(jax.random.key(0), jnp.zeros((1, 8)))
  p = v["params"]
  for layer in ("fc1", "fc2", "fc3"):
    assert set(p[layer]["input_quant"]) == {"log_scale", "zero_point"}
  assert "input_quant" not in p["emb"]  # token ids stay as they are
  # a constant dummy batch at init: the range [-1, 1] at 8 bits
  np.testing.assert_allclose(jnp.exp(p["fc1"]["input_quant"]["log_scale"]), 2 / 255, rtol=1e-6)
  x = _batch()
  v = lqjax.calibrate(model, v, x, train=False)
  ls, z = inputs.init_params(x, lqjax.QuantConfig(rule="lsq", bits=8, rounding="round"))
  np.testing.assert_allclose(v["params"]["fc1"]["input_quant"]["log_scale"], ls, rtol=1e-6)
  np.testing.assert_allclose(v["params"]["fc1"]["input_quant"]["zero_point"], z, rtol=1e-6)
  # the quantized forward pass is the layers' own on quantized inputs
  y = model.apply(v, x)
  assert len(np.unique(np.asarray(
      inputs.fake_quant(x, ls, z, lqjax.QuantConfig(rule="lsq", bits=8, rounding="round"))))) <= 256
  labels = optim.labels(v["params"])
  assert labels["fc2"]["input_quant"] == {"log_scale": "scale", "zero_point": "scale"}
  # the packed file keeps them and reloads to the same outputs
  path = tmp_path / "m.lqz"
  lqjax.save(path, v)
  np.testing.assert_array_equal(model.apply(lqjax.load(path, v), x), y)
  with pytest.raises(ValueError, match="no input quantizer"):
    plain = lqjax.quantize(MLP(), lqjax.Rule(".*", lqjax.QuantConfig(rule="lsq", bits=4)))
    lqjax.calibrate(plain, plain.init(jax.random.key(0), x), x)


def test_nnx_matches_linen_with_the_same_weights_and_scales():
  lin = lqjax.quantize(MLP(), _rules())
  v = lqjax.calibrate(lin, lin.init(jax.random.key(0), jnp.zeros((1, 8))), _batch())
  model = lqjax.quantize(NnxMLP(nnx.Rngs(0)), _rules())
  assert not hasattr(model.emb, "input_quant")
  params = lqjax.tree.unbox(v["params"])
  for name in ("fc1", "fc2", "fc3"):
    layer, p = getattr(model, name), params[name]
    layer.kernel[...] = p["kernel"]
    layer.bias[...] = p["bias"]
    layer.kernel_quant.log_scale[...] = p["kernel_quant"]["log_scale"]
  model.emb.embedding[...] = params["emb"]["embedding"]
  model.emb.embedding_quant.log_scale[...] = params["emb"]["embedding_quant"]["log_scale"]
  lqjax.calibrate(model, _batch())
  for name in ("fc1", "fc2", "fc3"):
    for k in ("log_scale", "zero_point"):
      np.testing.assert_allclose(getattr(getattr(model, name).input_quant, k)[...],
                                 params[name]["input_quant"][k], rtol=1e-5, atol=1e-6)
  # calibration saw the same inputs, so the two models agree
  np.testing.assert_allclose(model(_batch()), lin.apply(v, _batch()), atol=1e-5)
  grads = nnx.grad(lambda m: jnp.sum(m(_batch()) ** 2))(model)
  assert float(jnp.abs(grads.fc2.input_quant.zero_point[...])) > 0


def test_nnx_stack_gets_one_input_scale_per_layer():
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):  # three Linear layers stacked: kernel (3, 6, 6)
    return nnx.Linear(6, 6, rngs=nnx.Rngs(key))

  stack = lqjax.quantize(make(jax.random.split(jax.random.key(0), 3)),
                         lqjax.Rule(".*", lqjax.QuantConfig(rule="lsq", bits=4), inputs=LSQ4))

  def run(stack, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, layer):
      return nnx.relu(layer(x))
    return body(x, stack)

  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 6)), jnp.float32)
  assert stack.input_quant.log_scale[...].shape == (3,)
  with inputs.calibrating():
    run(stack, x)
  ls = stack.input_quant.log_scale[...]
  assert len(set(np.asarray(ls).tolist())) == 3  # each layer saw its own input
  ls0, _ = inputs.init_params(x, LSQ4)
  np.testing.assert_allclose(ls[0], ls0, rtol=1e-6)


@pytest.mark.parametrize("kw,needle", [
    (dict(rule="ratio_lsq", bits=8), "not available for activations"),
    (dict(rule="lsq", bits=None), "need fixed bits"),
    (dict(rule="lsq", bits=8, granularity="row"), "granularity 'tensor'"),
])
def test_bad_input_recipes_fail_in_one_line(kw, needle):
  with pytest.raises(lqjax.QuantizeError, match=needle) as e:
    lqjax.Rule(".*", inputs=lqjax.QuantConfig(**kw))
  assert "\n" not in str(e.value)


def test_act_bits_lenet5_real_mnist(real_data_dir, tmp_path):
  """LeNet-5 with 4-bit weights and 4-bit inputs (8-bit image), 1 epoch on 10k real MNIST
  images: >= 93% test accuracy (0.946 measured), and the exported file reloads to identical
  predictions."""
  wd = tmp_path / "wd"
  r = subprocess.run([sys.executable, "-m", "experiments.mnist", f"--workdir={wd}",
                      "--model=lenet5", "--epochs=1", "--limit=10000", "--rule=lsq", "--bits=4",
                      "--scale_optimizer=adam", "--scale_lr=0.001", "--act_bits=4",
                      "--progress=false", "--export"],
                     cwd=ROOT, env=dict(os.environ, LQJAX_DATA_DIR=real_data_dir),
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((wd / "results.json").read_text())
  assert res["config"]["act_bits"] == 4 and res["config"]["act_first_bits"] == 8
  assert res["test_accuracy"] >= 0.93, res["test_accuracy"]
  assert res["reload_identical_argmax"] and res["reload_max_abs_logit_diff"] == 0.0
  # the scripts that read the run's file: its input quantizers, and the integer path
  r = subprocess.run([sys.executable, "scripts/input_scales.py", str(wd)], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  layers = json.loads(r.stdout)["inputs"]
  assert sorted(layers) == ["conv1", "conv2", "fc1", "fc2"]
  assert layers["conv1"]["bits"] == 8 and layers["fc1"]["bits"] == 4
  for v in layers.values():  # the range is the grid's: 2^b - 1 steps wide
    assert math.isclose(v["range"][1] - v["range"][0], v["step"] * (2 ** v["bits"] - 1),
                        rel_tol=1e-6)
  r = subprocess.run([sys.executable, "scripts/integer_check.py", str(wd)], cwd=ROOT,
                     env=dict(os.environ, LQJAX_DATA_DIR=real_data_dir), capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  check = json.loads(r.stdout)
  assert check["integer_argmax_disagreements"] <= 5, check  # of 10,000 test images
  assert abs(check["fake_quant_test_accuracy"] - res["test_accuracy"]) <= 5e-4, check
  missing = subprocess.run([sys.executable, "scripts/input_scales.py", str(tmp_path / "no")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1

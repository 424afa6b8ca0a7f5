"""Amortised scale updates: the weights-only step, the optimizer's skip, the runner's
schedule of the two compiled steps, and the scale step size rescaled by k."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lqjax
from lqjax import optim, quant, tree

from lqlab import train

from test_train import _lenet300
from lqlab.config import TrainConfig
from lqlab.step import build_model, init_state, make_chunk_runner, make_optimizer, make_train_step

STATS = ((0.5,), (0.25,))


@pytest.mark.parametrize("rule", ["lsq", "ratio", "ratio_lsq"])
def test_a_scale_under_stop_gradient_gets_no_cotangent_and_the_same_weight_gradient(rule):
  x = jax.random.normal(jax.random.key(0), (6, 5))
  log_s = jnp.full((6, 1), -3.0)

  def loss(x, log_s, stop):
    s = quant.scale_from_log(jax.lax.stop_gradient(log_s) if stop else log_s)
    q = quant.fake_quant(x, s, rule=rule, threshold=10.0, rounding="round")
    return jnp.sum(jnp.sin(q))

  gx, gs = jax.grad(loss, argnums=(0, 1))(x, log_s, False)
  gx0, gs0 = jax.grad(loss, argnums=(0, 1))(x, log_s, True)
  assert np.any(np.asarray(gs) != 0) and np.all(np.asarray(gs0) == 0)
  np.testing.assert_array_equal(gx, gx0)
  np.testing.assert_array_equal(gx, jnp.cos(quant.fake_quant(x, quant.scale_from_log(log_s),
                                                             rule=rule, rounding="round")))


def _ops(hlo):
  return hlo.count(" dot("), hlo.count(" reduce(")


def _compiled(rule, scale_step, bits=None):
  images, labels, cfg, model = _lenet300(rule, 128, 128)
  cfg = dataclasses.replace(cfg, bits=bits)
  model = build_model(cfg, 10)
  tx = make_optimizer(cfg, 100)
  state = init_state(cfg, model, tx, images[:1].astype(jnp.float32), None)
  step = make_train_step(cfg, model, tx, STATS)
  return jax.jit(step, donate_argnums=(0,), static_argnames="scale_step").lower(
      state, (images, labels), jax.random.key(0), scale_step=scale_step).compile().as_text()


@pytest.mark.parametrize("rule", ["lsq", "ratio", "ratio_lsq"])
def test_the_weights_only_step_compiles_to_the_fixed_rules_program(rule):
  """With the scales under stop_gradient the learned rules' per-group sums (LSQ's
  products with a ones matrix, the ratio rule's norms) are not in the compiled step:
  it holds the fixed rule's matmuls and reductions, and fewer than its scale step."""
  fixed = _ops(_compiled("fixed", False))
  off, on = _ops(_compiled(rule, False)), _ops(_compiled(rule, True))
  assert off == fixed, (rule, off, fixed)
  assert on[0] + on[1] > off[0] + off[1]


def _counts(state):
  """The step counts in each half of a train state's optimizer state."""
  return {k: [int(x) for x in jax.tree_util.tree_leaves(v) if x.dtype == jnp.int32]
          for k, v in state.opt_state.inner_states.items()}


def test_split_skips_the_scales_and_their_state_on_a_weights_only_update():
  images, labels, cfg, model = _lenet300("lsq", 64, 64)
  tx = make_optimizer(cfg, 100)
  s0 = init_state(cfg, model, tx, images[:1].astype(jnp.float32), None)
  step = jax.jit(make_train_step(cfg, model, tx, STATS), static_argnames="scale_step")
  on, _ = step(s0, (images, labels), jax.random.key(0), scale_step=True)
  off, _ = step(s0, (images, labels), jax.random.key(0), scale_step=False)
  lab = jax.tree_util.tree_leaves(optim.labels(s0.params))
  moved = []
  for l, a, b, c in zip(lab, *(jax.tree_util.tree_leaves(s.params) for s in (s0, on, off))):
    if l == optim.SCALE:
      np.testing.assert_array_equal(c, a)  # not moved by a weights-only step
      moved.append(np.any(np.asarray(b) != np.asarray(a)))
    else:  # the weights' update does not depend on the scales' gradient
      np.testing.assert_allclose(c, b, rtol=1e-6, atol=1e-7)
      assert np.any(np.asarray(c) != np.asarray(a))
  assert sum(moved) >= 3  # the kernels' scales move on the scale step
  # Adam's counts (weights) move on both steps; the scales' schedule count on the scale step
  assert _counts(on) == {"scale": [1], "weight": [1, 1]}
  assert _counts(off) == {"scale": [0], "weight": [1, 1]}


def test_the_runner_updates_the_scales_on_every_kth_step():
  """scale_every=4: a chunk runner's 10 steps equal stepping by hand with scale steps at
  0, 4 and 8 (bitwise), and the scales' optimizer counts three updates."""
  images, labels, cfg, model = _lenet300("lsq", 320, 32, seed=2)
  cfg = dataclasses.replace(cfg, scale_every=4)
  tx = make_optimizer(cfg, 10)
  step_fn = make_train_step(cfg, model, tx, STATS)
  key, perm = jax.random.key(5), jax.random.permutation(jax.random.key(6), 320)
  run_chunk = make_chunk_runner(cfg, step_fn, 10, key)
  s = init_state(cfg, model, tx, images[:1].astype(jnp.float32), None)
  s, _ = run_chunk(s, perm, images, labels, 3)
  s, _ = run_chunk(s, perm, images, labels, 7)  # a chunk that starts off the grid
  ref = init_state(cfg, model, tx, images[:1].astype(jnp.float32), None)
  step = jax.jit(step_fn, static_argnames="scale_step")
  for i in range(10):
    idx = perm[i * 32:(i + 1) * 32]
    ref, _ = step(ref, (images[idx], labels[idx]), jax.random.fold_in(key, i),
                  scale_step=i % 4 == 0)
  for a, b in zip(jax.tree_util.tree_leaves(s), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_array_equal(a, b)
  assert _counts(s) == {"scale": [3], "weight": [10, 10]}


def test_the_scale_step_is_k_times_larger_and_the_schedule_counts_scale_updates():
  images, labels, cfg, model = _lenet300("ratio", 64, 64)
  moves = {}
  for k in (1, 4):
    c = dataclasses.replace(cfg, scale_every=k, scale_schedule="constant")
    tx = make_optimizer(c, 100)
    s0 = init_state(c, model, tx, images[:1].astype(jnp.float32), None)
    s1, _ = jax.jit(make_train_step(c, model, tx, STATS))(
        s0, (images, labels), jax.random.key(0))
    moves[k] = [b - a for a, b in zip(*(leaf for leaf in (
        [t.log_scale for t in tree.quantized_tensors(s.params)] for s in (s0, s1))))]
  assert any(np.any(np.asarray(m) != 0) for m in moves[1])
  for m1, m4 in zip(moves[1], moves[4]):
    np.testing.assert_allclose(m4, 4 * m1, rtol=1e-4, atol=4e-6)  # log s ~ -5: ulp 5e-7
  # cosine: the scales' lr reaches 0 after scale_decay_fraction (0.8) of the run's scale
  # updates: 100 steps at k=4 are 25 scale updates, the 20th is the last that moves
  c = dataclasses.replace(cfg, scale_every=4, epochs=1)
  tx = make_optimizer(c, 100)
  params = init_state(c, model, tx, images[:1].astype(jnp.float32), None).params
  st, ones = tx.init(params), jax.tree_util.tree_map(jnp.ones_like, params)
  sizes = []
  for _ in range(21):
    u, st = tx.update(ones, st, params, scale_step=True)
    sizes.append(max(float(jnp.max(jnp.abs(t.log_scale)))
                     for t in tree.quantized_tensors(u)))
  assert sizes[0] == pytest.approx(4 * c.scale_lr) and sizes[19] > 0 and sizes[20] == 0


def test_weights_only_optimizer_update_needs_a_python_bool():
  tx = optim.split(optax.sgd(0.1), optax.sgd(0.1))
  p = {"w": jnp.ones(2)}
  st = tx.init(p)
  with pytest.raises(TypeError, match="Python bool"):
    jax.jit(lambda f: tx.update(p, st, p, scale_step=f))(jnp.asarray(True))
  with pytest.raises(ValueError, match="every 0 steps"):
    optim.is_scale_step(3, 0)
  assert [optim.is_scale_step(i, 3) for i in range(5)] == [True, False, False, True, False]


def test_config_scale_every():
  with pytest.raises(ValueError, match="scale_every must be >= 1"):
    TrainConfig(scale_every=0)
  d = TrainConfig().to_json()
  del d["scale_every"]  # a record from before the field: every step
  assert TrainConfig.from_json(d).scale_every == 1


def test_nnx_weights_only_gradient_by_filter():
  """In NNX, differentiating the weights only (nnx.DiffState with a filter that leaves
  out lqjax's ScaleParam) is the weights-only step: no scale gradient, same weights'."""
  m = lqjax.quantize(nnx.Linear(5, 3, rngs=nnx.Rngs(0)),
                     lqjax.Rule(config=lqjax.QuantConfig(rule="lsq", bits=None, rounding="round")))
  x = jax.random.normal(jax.random.key(1), (4, 5))
  loss = lambda m: jnp.sum(m(x) ** 2)
  full = nnx.grad(loss)(m)
  scale = lqjax.ScaleParam
  weights = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.All(nnx.Param, nnx.Not(scale))))(m)
  flat_full, flat_w = dict(nnx.to_flat_state(full)), dict(nnx.to_flat_state(weights))
  assert any("log_scale" in "/".join(map(str, k)) for k in flat_full)
  assert not any("log_scale" in "/".join(map(str, k)) for k in flat_w)
  for k, v in flat_w.items():
    np.testing.assert_allclose(v[...], flat_full[k][...], rtol=1e-6)


def test_a_workdir_from_before_scale_every_holds_a_k1_run(tmp_path):
  d = TrainConfig().to_json()
  del d["scale_every"]
  (tmp_path / "config.json").write_text(__import__("json").dumps(d))
  train._check_same_run(TrainConfig(scale_every=1), tmp_path)  # the same run
  with pytest.raises(train.TrainingError, match="differs in scale_every"):
    train._check_same_run(TrainConfig(scale_every=16), tmp_path)

"""The HAWQ-v2 baseline (lqjax.sensitivity): Hutchinson traces against hand-derived Hessians,
grid errors worked by hand, the exact allocation against brute force, and the flag a
float run yields training an LSQ model at those widths (scripts/hawq_bits.py)."""

import importlib.util
import itertools
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lqjax
from lqjax import budget, sensitivity, tree

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_hutchinson_trace_of_a_diagonal_hessian_is_exact():
  """0.5 sum a_i x_i^2 + 0.5 sum b_j y_j^2: H is diagonal, so v^T H v = sum a_i for every
  Rademacher v (v_i^2 = 1): the estimate is exact from one probe."""
  a, b = jnp.array([1.0, 2.0, 3.0]), jnp.array([[0.5, 4.0], [1.5, 0.25]])

  def loss(p, batch):
    return 0.5 * jnp.sum(a * p["x"] ** 2) + 0.5 * jnp.sum(b * p["y"] ** 2) * batch

  params = {"x": jnp.ones(3), "y": jnp.zeros((2, 2))}
  tr = sensitivity.hessian_traces(loss, params, [1.0, 2.0], jax.random.key(0), samples=2)
  # batch scales the y term: traces 6.25 and 12.5, averaged over the two batches
  assert tr[("x",)] == pytest.approx(6.0) and tr[("y",)] == pytest.approx(9.375)


def test_hutchinson_trace_of_a_full_hessian_is_unbiased():
  """0.5 x^T A x with off-diagonal entries: single probes scatter, their mean is Tr(A) = 10."""
  a = jnp.array([[1.0, 0.3, -0.2, 0.1], [0.3, 2.0, 0.4, 0.0], [-0.2, 0.4, 3.0, 0.5],
                 [0.1, 0.0, 0.5, 4.0]])

  def loss(p, _):
    return 0.5 * p["x"] @ a @ p["x"]

  tr = sensitivity.hessian_traces(loss, {"x": jnp.zeros(4)}, [None], jax.random.key(1),
                                  samples=400)
  # probe variance 2 sum_{i != j} A_ij^2 = 2.2: the mean of 400 has std 0.074
  assert tr[("x",)] == pytest.approx(10.0, abs=0.3)


def test_grid_error_by_hand():
  p = np.array([0.0, 0.1, 1.0])
  # 1 bit: the grid {-s, 0} holds no positive value, so 0.1 and 1.0 both go to 0
  assert sensitivity.grid_error(p, (1,), 1) == pytest.approx(0.01 + 1.0)
  # 2 bits, codes -2..1, step c * max|p| / 2 <= 0.5: 1.0 clips to code 1 (error (1 - s)^2,
  # least at s = 0.5) and 0.1 rounds to 0 there: 0.25 + 0.01
  assert sensitivity.grid_error(p, (1,), 2) == pytest.approx(0.26)
  # values on a 3-bit grid (step 0.25, codes -4..3) are stored exactly
  assert sensitivity.grid_error(np.array([-1.0, -0.25, 0.5, 0.75]), (1,), 3) == \
      pytest.approx(0.0, abs=1e-12)
  # per-row groups: each row's error is found apart; row 2 is exact, row 1 as above
  rows = np.array([[0.0, 0.1, 1.0], [-1.0, -0.5, 0.5]]).T  # a Dense kernel [in, out]
  assert sensitivity.grid_error(rows, (1, 2), 2) == pytest.approx(0.26)
  # 1 bit midrise, levels +-c/2 for c in 0.025, 0.05, ..., 1: all three values go to +c/2;
  # the squared error is least at c/2 = 1.1/3, and the nearest c gives c/2 = 0.3625
  assert sensitivity.grid_error(p, (1,), 1, grid="midrise") == pytest.approx(
      0.3625 ** 2 + 0.2625 ** 2 + 0.6375 ** 2)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-3, 3, allow_nan=False), min_size=1, max_size=40),
       st.integers(1, 7))
def test_grid_error_never_grows_with_bits(values, bits):
  """At one clipping fraction the b-bit grid is a subset of the (b+1)-bit grid (step halved),
  so round-to-nearest error cannot grow; code 0 bounds it by sum p^2."""
  p = np.asarray(values)
  e_b, e_b1 = (sensitivity.grid_error(p, (1,), b) for b in (bits, bits + 1))
  assert e_b1 <= e_b + 1e-12 and e_b <= np.sum(p * p) + 1e-12


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_pareto_choice_matches_brute_force(data):
  layers = data.draw(st.integers(1, 4))
  k = data.draw(st.integers(1, 4))
  sizes = [data.draw(st.lists(st.integers(1, 20), min_size=k, max_size=k)) for _ in range(layers)]
  costs = [data.draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=k, max_size=k))
           for _ in range(layers)]
  limit = data.draw(st.integers(0, 80))
  best = None
  for ch in itertools.product(range(k), repeat=layers):
    size = sum(sizes[i][c] for i, c in enumerate(ch))
    cost = sum(costs[i][c] for i, c in enumerate(ch))
    if size <= limit and (best is None or cost < best - 1e-9):
      best = cost
  got = sensitivity.pareto_choice(sizes, costs, limit)
  if best is None:
    assert got is None
  else:
    choices, size, cost = got
    assert size <= limit and cost == pytest.approx(best, abs=1e-9)
    assert size == sum(sizes[i][c] for i, c in enumerate(choices))


class _TwoLayers(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(64, use_bias=False, name="b")(nn.Dense(64, use_bias=False, name="a")(x))


def _two_layer_params():
  m = lqjax.quantize(_TwoLayers(), lqjax.Rule(config=lqjax.QuantConfig(
      rule="lsq", bits=8, granularity="tensor")))
  params = m.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
  w = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
  return tree.replace_arrays(params, {("a", "kernel"): w, ("b", "kernel"): w})


def test_allocation_gives_the_sensitive_layer_more_bits_within_the_budget():
  """Two identical 64x64 layers, one scale each: 3 bits each on average (72 bits of scale
  storage per layer on top). Equal traces split the bits evenly (the cost is convex in b);
  a 100x trace on layer a moves bits to it; the allocation never exceeds the budget."""
  params = _two_layer_params()
  target = 3.0 + 72 / 4096
  even, info = sensitivity.allocate(params, target, {("a", "kernel"): 1.0, ("b", "kernel"): 1.0})
  assert even == {"a": 3, "b": 3} and info["bits"] == pytest.approx(target)
  skew, info = sensitivity.allocate(params, target, {("a", "kernel"): 100.0,
                                                     ("b", "kernel"): 1.0})
  assert skew["a"] > skew["b"] and skew["a"] + skew["b"] <= 6 and info["bits"] <= target
  # every layer at 1 bit is the least: 1 + 72/4096 bits per weight
  with pytest.raises(budget.BudgetError, match="every layer at 1 bits"):
    sensitivity.allocate(params, 1.0, {("a", "kernel"): 1.0, ("b", "kernel"): 1.0})
  with pytest.raises(KeyError, match="no Hessian trace for b/kernel"):
    sensitivity.allocate(params, target, {("a", "kernel"): 1.0})


def _hawq_bits():
  spec = importlib.util.spec_from_file_location("hawq_bits", ROOT / "scripts" / "hawq_bits.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _run(*argv, timeout=900):
  env = dict(os.environ, LQJAX_DATA_DIR=os.environ.get("LQJAX_DATA_DIR",
                                                       str(ROOT.parent / "shared/datasets")))
  return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def test_hawq_widths_from_a_float_run_train_an_lsq_model(tmp_path, real_data_dir):
  """A float LeNet-300-100 (1 epoch on 2,048 MNIST images) gives a --layer_bits flag at 2 bits
  per weight; an LSQ run with it stores every layer within its width, the file within the
  budget."""
  fp = tmp_path / "fp32"
  r = _run("-m", "experiments.mnist", "--float", "--epochs=1", "--limit=2048", "--noprogress",
           "--noexport", f"--workdir={fp}")
  assert r.returncode == 0, r.stderr[-2000:]
  out = tmp_path / "alloc.json"
  r = _run("scripts/hawq_bits.py", f"--workdir={fp}", "--budget_bits=2", "--limit=2048",
           "--batches=2", "--samples=2", f"--out={out}")
  assert r.returncode == 0, r.stderr[-2000:]
  alloc = json.loads(out.read_text())
  flag = r.stdout.strip().splitlines()[-1]
  assert flag == alloc["flag"] and flag.startswith("--layer_bits=")
  assert set(alloc["widths"]) == {"fc1", "fc2", "fc3"} and alloc["bits"] <= 2.0
  q = tmp_path / "lsq"
  r = _run("-m", "experiments.mnist", "--rule=lsq", "--bits=8", flag, "--epochs=1",
           "--limit=2048", "--noprogress", f"--workdir={q}")
  assert r.returncode == 0, r.stderr[-2000:]
  rows = [r for r in lqjax.model_report(lqjax.load(q / "model.lqz")) if r.quantized]
  assert {r.path.split("/")[-2] for r in rows} >= {"fc1", "fc2", "fc3"}
  for row in rows:
    assert row.bits == alloc["widths"][row.path.split("/")[-2]], row
    assert row.bits_max <= row.bits, row
  res = json.loads((q / "results.json").read_text())
  assert res["packed_bytes"] * 8 <= 2.0 * 266_610 + 8 * 2000  # the budget plus the header


def test_hawq_script_refuses_a_quantized_run_and_bad_numbers(tmp_path):
  hawq = _hawq_bits()
  assert hawq.main(["--workdir", str(tmp_path), "--budget_bits", "nan"]) == 2
  assert hawq.main(["--workdir", str(tmp_path / "none"), "--budget_bits", "2"]) == 2


def test_hawq_widths_flag_is_checked(tmp_path):
  hawq = _hawq_bits()
  assert hawq.main(["--workdir", str(tmp_path), "--budget_bits", "2", "--widths", "0,2"]) == 2
  assert hawq.main(["--workdir", str(tmp_path), "--budget_bits", "2", "--widths", "two"]) == 2


def test_a_signed_one_bit_fc1_after_lenet5s_convolutions_starts_dead(real_data_dir):
  """The HAWQ-v2 allocation for LeNet-5 at 2 bits (fc1 at 1 bit, the rest at 8): fc1's grid
  {-s, 0} holds no positive weight and its bias none either, and the pooled conv2 outputs
  feeding it are mostly positive, so at initialisation no fc1 unit is active after the ReLU
  on real MNIST images (no gradient reaches it: the runs stay at chance). With conv2 at 1
  bit too (LSQ 1-bit, first/last at 8) the signs cancel and units are active."""
  from lqlab import data, step
  from lqlab.config import TrainConfig
  ds = data.load("mnist", real_data_dir, limit=256)
  x = data.normalize(ds.train.image[:256], ds.mean, ds.std)

  def active(**kw):
    m = step.build_model(TrainConfig(model="lenet5", rule="lsq", **kw), 10)
    v = m.init(jax.random.key(0), x[:1], train=False)
    _, st = m.apply(v, x, train=False, mutable=["intermediates"],
                    capture_intermediates=lambda mdl, _: mdl.name == "fc1")
    return float(np.mean(np.asarray(jax.tree_util.tree_leaves(st)[0]) > 0))

  assert active(bits=8, layer_bits="conv1=8,conv2=8,fc1=1,fc2=8") == 0.0
  assert active(bits=1, edge_bits=8) > 0.2

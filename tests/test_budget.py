"""Size budgets (lqjax.budget): the smallest step per bit width, the greedy projection
against hand-worked cases, its invariants, and budgeted training on real MNIST."""

import json
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
from hypothesis import given, settings
from hypothesis import strategies as st

import lqjax
from lqjax import accounting, budget, quant, tree

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _model(rows=4, cols=64, granularity="row", rounding="round", kernel=None):
  m = lqjax.quantize(nn.Dense(rows, use_bias=False), lqjax.Rule(config=lqjax.QuantConfig(
      rule="ratio", granularity=granularity, rounding=rounding)))
  v = m.init(jax.random.key(0), jnp.zeros((1, cols)))
  if kernel is not None:
    v = {"params": {**v["params"], "kernel": jnp.asarray(kernel, jnp.float32)}}
  return v["params"]


def test_min_step_is_the_smallest_whose_grid_spans_the_group():
  # [-1, 1] in 4 codes: the step 2/3 puts +-1 on +-1.5, which rounds (half to even) to +-2,
  # five codes; just above 2/3 they round to +-1: three codes, within 2 bits.
  s = budget.min_step(np.array([-1.0]), np.array([1.0]), np.array([2]), "round")
  assert s[0] == pytest.approx(2 / 3, rel=1e-3) and s[0] > 2 / 3
  assert np.round(1 / s[0]) - np.round(-1 / s[0]) + 1 <= 4
  # [0, 3] in 2^2 codes: the step 1 gives codes 0..3 exactly (four codes)
  assert budget.min_step(np.array([0.0]), np.array([3.0]), np.array([2]), "round")[0] == \
      pytest.approx(1.0, rel=1e-5)
  # 0 bits: every value rounds to code 0 (the group is pruned)
  s0 = budget.min_step(np.array([-0.3]), np.array([0.7]), np.array([0]), "round")[0]
  assert np.round(0.7 / s0) == 0 and np.round(-0.3 / s0) == 0 and s0 < 1.41


def test_projection_takes_bits_from_the_least_sensitive_group_first():
  """Two groups of 64 weights on the same range, the first's Fisher 100x the second's:
  a budget half a group's code bits lower takes them from the second group, where a
  coarser grid costs least, while the first keeps its width."""
  rng = np.random.default_rng(0)
  kernel = rng.uniform(-1, 1, (64, 2)).astype(np.float32)  # Dense kernel [in, out]; row = out
  params = _model(rows=2, cols=64, granularity="row", kernel=kernel)
  t = tree.quantized_tensors(params)[0]
  assert t.log_scale.size == 2  # one scale per output unit: two groups of 64
  fisher = jax.tree_util.tree_map(jnp.zeros_like, params)
  fisher = {**fisher, "kernel": jnp.asarray(np.stack([np.full(64, 100.0), np.full(64, 1.0)], 1))}
  def group_bits(p):
    codes = quant.tensor_codes(p["kernel"], tree.quantized_tensors(p)[0].log_scale,
                               lqjax.QuantConfig(rounding="round"))[0]
    gv = accounting.group_view(codes, (1, 2))
    return accounting.code_bits(gv.min(1), gv.max(1))

  before = group_bits(params)
  assert before[0] == before[1] >= 6  # the same range, the same grid
  target = budget.budget_bits_of(params) - 3 * 64 / 128  # three bits of one group
  out, info = budget.project(params, target, fisher)
  after = group_bits(out)
  assert info["after"] <= target + 1e-9
  assert after[0] == before[0] and after[1] == before[1] - 3, (before, after)


@settings(max_examples=25, deadline=None)
@given(hnp.arrays(np.float32, (24, 3), elements=st.floats(-4, 4, width=32)),
       st.floats(0.0, 1.0), st.sampled_from(["row", "column", "tensor"]))
def test_projection_meets_any_reachable_budget_from_below(kernel, frac, granularity):
  """After a projection the model's accounted size is at most the target and within one
  group's worth of it (a group moves one bit at a time), both ways."""
  params = _model(rows=3, cols=24, granularity=granularity, kernel=kernel)
  floor = budget.floor_bits(params)
  target = floor + frac * 10.0
  out, info = budget.project(params, target)
  rows = [r for r in accounting.model_report(out) if r.quantized]
  n = sum(r.elements for r in rows)
  accounted = (sum(r.bits_mean * r.elements for r in rows) +
               budget.OVERHEAD_BITS * sum(r.groups for r in rows)) / n
  assert info["after"] == pytest.approx(accounted)
  assert accounted <= target + 1e-9
  group = max(r.elements // r.groups for r in rows)
  axis = {"row": 0, "column": 1, "tensor": None}[granularity]  # the axis a group spans
  every_group_spread = np.all(np.ptp(kernel, axis=axis) > 0)
  if every_group_spread and target - floor < budget.MAX_BITS:
    assert accounted >= target - group / n - 1e-9 or accounted >= floor + budget.MAX_BITS - 1


def test_budget_below_the_scales_storage_is_refused():
  params = _model()
  with pytest.raises(budget.BudgetError, match="below the .* that the model's least grids take"):
    budget.project(params, 0.01)


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_floor_rounding_keeps_a_bit_per_weight_and_every_reachable_target_is_met(granularity):
  """Under floor rounding values of both signs never share a code, so a group keeps >= 1 bit:
  the floor is the scales' storage plus 1 bit per weight, every target at or above it is
  met, and any below it is refused (4 x 64 kernel: 4 row groups or 1 tensor group)."""
  params = _model(granularity=granularity, rounding="floor")
  groups = 4 if granularity == "row" else 1
  floor = budget.floor_bits(params)
  assert floor == pytest.approx((groups * budget.OVERHEAD_BITS + 256) / 256)
  for extra in (0.0, 0.25, 1.0):
    out, info = budget.project(params, floor + extra)
    assert info["after"] <= floor + extra + 1e-9
    assert budget.budget_bits_of(out) == pytest.approx(info["after"])
  with pytest.raises(budget.BudgetError, match="below the"):
    budget.project(params, floor - 0.01)


def _run(*flags, timeout=900):
  env = dict(os.environ, LQJAX_DATA_DIR=os.environ.get("LQJAX_DATA_DIR",
                                                       str(ROOT.parent / "shared/datasets")))
  return subprocess.run([sys.executable, "-m", "experiments.mnist", *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("flags,needle", [
    (["--budget_bits=2", "--budget_bytes=10000"], "budget_bits or budget_bytes, not both"),
    # LeNet-300-100, per-unit kernel scales and per-tensor bias scales: 410 + 3 groups of
    # 72 bits over 266,610 weights = 0.1115 bits per weight
    (["--budget_bits=0.01"], "is below the 0.112 bits per weight that the model's least grids"),
    # under floor rounding every weight keeps at least 1 bit: 1.112 is the least
    (["--budget_bits=0.5", "--rounding=floor"], "is below the 1.11"),
    (["--budget_bytes=1000"], "is below the"),
    (["--budget_bits=2", "--rule=fixed", "--bits=4"], "needs learned free-bit scales"),
    (["--budget_bits=2", "--rule=lsq", "--bits=2"], "needs learned free-bit scales"),
    (["--budget_bits=nan"], "budget_bits must be a finite number > 0"),
    (["--budget_bits=2", "--float"], "needs a quantized model"),
])
def test_bad_budgets_fail_before_compute_with_one_line(tmp_path, flags, needle):
  wd = tmp_path / "run"
  r = _run(f"--workdir={wd}", "--noprogress", "--epochs=1", *flags)
  assert r.returncode == 2, r.stderr[-2000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and needle in errors[0], r.stderr[-2000:]
  assert not (wd / "checkpoints").exists()


@pytest.mark.parametrize("flag,value", [("budget_bits", 2.0), ("budget_bytes", 60000)])
def test_budgeted_mnist_run_lands_on_its_budget(tmp_path, flag, value):
  """LeNet-300-100 on 12,000 real MNIST images, 3 epochs: the run lands within 2% of its
  budget (bits per weight, or the packed file's bytes) at >= 93% test accuracy."""
  wd = tmp_path / "run"
  r = _run(f"--workdir={wd}", "--noprogress", "--epochs=3", "--limit=12000",
           f"--{flag}={value}")
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((wd / "results.json").read_text())
  if flag == "budget_bits":
    assert abs(res["budget_bits"] - value) <= 0.02 * value, res["budget_bits"]
  else:
    assert abs(res["packed_bytes"] - value) <= 0.02 * value, res["packed_bytes"]
  assert res["test_accuracy"] >= 0.93, res["test_accuracy"]
  rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
  assert all("budget" in r for r in rows) and "grids frozen" in rows[-2]["budget"]


def test_projection_of_an_nnx_module_state():
  from flax import nnx
  m = lqjax.quantize(nnx.Linear(64, 8, rngs=nnx.Rngs(0)),
                     lqjax.Rule(config=lqjax.QuantConfig(granularity="row")))
  # the kernel's 8 groups of 64 weights (biases stay float): 8 x 72 bits over 512 weights,
  # and under floor rounding at least 1 bit per weight
  assert budget.floor_bits(m) == pytest.approx(8 * 72 / 512 + 1)
  new, info = budget.project(nnx.state(m, nnx.Param), 3.0)
  nnx.update(m, new)
  assert info["after"] == pytest.approx(budget.budget_bits_of(m)) and info["after"] <= 3.0


def test_budget_schedule_falls_cubically_then_holds():
  sched = budget.Schedule(target_bits=2.0, phase_epochs=8)
  # epoch 4 of 8: 2 + (8 - 2) * (1 - 4/8)^3 = 2.75, coarsening only
  assert sched.budget(4, 8.0) == (pytest.approx(2.75), True)
  assert sched.budget(8, 8.0) == (2.0, False)  # exact, both ways
  assert sched.budget(10, 8.0) == (2.0, False)
  for bad in (dict(target_bits=0.0, phase_epochs=8), dict(target_bits=2.0, phase_epochs=0),
              dict(target_bits=float("nan"), phase_epochs=8)):
    with pytest.raises(budget.BudgetError):
      budget.Schedule(**bad)


def test_budget_schedule_in_an_own_loop_lands_on_the_target_and_freezes_the_scales():
  """The library piece alone (no lqlab): three epochs of a 3-epoch phase on a Dense layer
  whose scales an optimizer would move; the last projects exactly and freezes them."""
  import optax
  params = _model(rows=8, cols=64, granularity="row")
  tx = lqjax.optim.split(optax.adam(1e-3), optax.sgd(0.02))
  opt_state = tx.init(params)
  sched = budget.Schedule(target_bits=3.0, phase_epochs=3)
  state = sched.init(params)
  assert state.start_bits == pytest.approx(budget.budget_bits_of(params)) and state.start_bits > 3.5
  calls = []
  for epoch in (1, 2, 3):
    params, opt_state, info = sched.update(state, epoch, params, opt_state,
                                           lambda: calls.append(epoch))
    assert info["after"] <= info["budget"] + 1e-9 and info["freeze"] == (epoch == 3)
  assert calls == [1, 2, 3] and info["budget"] == 3.0
  assert float(lqjax.optim.scale_mult(opt_state)) == 0.0
  # after the phase an epoch on target does nothing (and computes no Fisher)
  out, opt2, info = sched.update(state, 4, params, opt_state, lambda: calls.append(4))
  assert info is None and calls == [1, 2, 3] and out is params


def test_pruned_groups_share_one_step_and_round_to_zero():
  rng = np.random.default_rng(3)
  params = _model(rows=16, cols=32, kernel=rng.normal(0, 1, (32, 16)).astype(np.float32))
  out, info = budget.project(params, budget.floor_bits(params) + 0.5)  # most groups pruned
  t = tree.quantized_tensors(out)[0]
  log_s = np.asarray(t.log_scale).reshape(-1)
  codes = accounting.group_view(quant.tensor_codes(t.p, t.log_scale, lqjax.QuantConfig(rounding="round"))[0], (1, 16))
  pruned = np.all(codes == 0, axis=1)
  assert 8 <= pruned.sum() < 16
  assert np.all(log_s[pruned] == budget.PRUNED_LOG_SCALE)
  q = np.asarray(quant.fake_quant(t.p, quant.scale_from_log(t.log_scale), rounding="round"))
  assert np.all(q[:, pruned] == 0)


@pytest.mark.parametrize("module", ["experiments.mnist", "experiments.fashion_mnist",
                                    "experiments.cifar10", "experiments.imagenette"])
def test_every_entry_point_lands_on_its_budget(tiny_data, tmp_path, module):
  """Each dataset's default model (LeNet-300-100, LeNet-5, ResNet-20, the Imagenette ResNet)
  on tiny random data, 2 epochs: the run ends within 2% of a 2-bit budget, and its packed
  file holds what the budget counts."""
  wd = tmp_path / "wd"
  r = subprocess.run([sys.executable, "-m", module, f"--workdir={wd}", "--epochs=2",
                      "--batch_size=32", "--noprogress", "--budget_bits=2"], cwd=ROOT,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((wd / "results.json").read_text())
  assert abs(res["budget_bits"] - 2.0) <= 0.04, res["budget_bits"]
  variables = lqjax.load(wd / "model.lqz")
  assert budget.budget_bits_of(variables.get("params", variables)) == \
      pytest.approx(res["budget_bits"])

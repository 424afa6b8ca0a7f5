"""Post-training min-max quantization (lqlab.ptq)."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqjax import quant

from lqlab import ptq
from lqlab.config import TrainConfig
from lqlab.step import build_model


def test_importing_ptq_defines_no_flags():
  from absl import flags
  from experiments import common  # defines --granularity, --bits, ...
  assert "granularity" in flags.FLAGS and common.FLAGS is flags.FLAGS
  assert "from_run" not in flags.FLAGS  # ptq's flags exist only when it runs as a program


def test_minmax_scale_hand_values():
  # Dense kernel (in=2, out=3), per output row: max|P| of each column / (2^(4-1) - 1) = / 7.
  p = jnp.array([[0.7, -1.4, 0.0], [-0.35, 0.2, 0.0]])
  got = np.exp(np.asarray(ptq.minmax_log_scale(p, "row", 4)))
  np.testing.assert_allclose(got, [[0.1, 0.2, 1.0]], rtol=1e-6)  # all-zero column: scale 1
  # The largest weight of each group lands on the last code, +-(2^(b-1) - 1).
  codes = quant.quantize_codes(p, jnp.asarray(got), rounding="round", bits=4)
  np.testing.assert_array_equal(codes, [[7, -7, 0], [-4, 1, 0]])
  got_t = np.exp(np.asarray(ptq.minmax_log_scale(p, "tensor", 2)))
  np.testing.assert_allclose(got_t, [[1.4]], rtol=1e-6)


def test_minmax_params_copies_weights_and_sets_every_scale():
  fcfg = TrainConfig(dataset="mnist", model="lenet5", float_model=True)
  qcfg = TrainConfig(dataset="mnist", model="lenet5", rule="fixed", bits=8,
                           granularity="channel", quantize_bias=False)
  x = jnp.zeros((1, 28, 28, 1))
  fparams = build_model(fcfg, 10).init(jax.random.key(1), x)["params"]
  template = build_model(qcfg, 10).init(jax.random.key(2), x)["params"]
  out = ptq.minmax_params(fparams, template, "channel", 8)
  for layer, p in fparams.items():
    np.testing.assert_array_equal(out[layer]["kernel"], p["kernel"])
    np.testing.assert_array_equal(out[layer]["bias"], p["bias"])
    amax = np.max(np.abs(np.asarray(p["kernel"])).reshape(-1, p["kernel"].shape[-1]), axis=0)
    np.testing.assert_allclose(np.exp(out[layer]["kernel_quant"]["log_scale"].value).ravel(),
                               amax / 127, rtol=1e-5)
  with pytest.raises(ValueError, match="has no parameter"):
    ptq.minmax_params({"conv1": fparams["conv1"]}, template, "channel", 8)


def _run(args, env_dir):
  env = {"LQJAX_DATA_DIR": str(env_dir), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)


def test_ptq_cli_end_to_end(tmp_path, tiny_data, cache):
  float_dir = tmp_path / "fp32_s0"
  r = _run(["-m", "experiments.mnist", "--float", "--epochs=1", "--noprogress",
            f"--workdir={float_dir}"], tiny_data)
  assert r.returncode == 0, r.stderr
  out = tmp_path / "ptq8_s0"
  r = _run(["-m", "lqlab.ptq", f"--from_run={tmp_path}/fp32_s{{seed}}", "--seed=0", "--bits=8",
            f"--workdir={out}"], tiny_data)
  assert r.returncode == 0, r.stderr
  res = json.loads((out / "results.json").read_text())
  fres = json.loads((float_dir / "results.json").read_text())
  assert res["scheme"] == "ptq" and res["rule"] == "fixed"
  # 8-bit kernels: every group spans 255 codes (or fewer), and the file is ~4x smaller.
  assert 7.5 < res["avg_bits"] <= 8.0
  assert res["packed_bytes"] < fres["fp32_bytes"] / 3.5
  assert res["reload_identical_argmax"]
  assert abs(res["test_accuracy"] - fres["test_accuracy"]) <= 0.04
  # W8A8: the inputs' ranges calibrated on the first training batch; the integer path
  # on the reloaded file agrees with it on the whole test split
  out_a8 = tmp_path / "ptq8a8_s0"
  r = _run(["-m", "lqlab.ptq", f"--from_run={float_dir}", "--bits=8", "--act_bits=8",
            f"--workdir={out_a8}"], tiny_data)
  assert r.returncode == 0, r.stderr
  res_a8 = json.loads((out_a8 / "results.json").read_text())
  assert res_a8["config"]["act_bits"] == 8 and res_a8["integer_identical_argmax"]
  assert abs(res_a8["test_accuracy"] - fres["test_accuracy"]) <= 0.04
  # Bad input: a quantized run as the source, and 1 bit, end in one line.
  r = _run(["-m", "lqlab.ptq", f"--from_run={out}", "--bits=4", f"--workdir={tmp_path}/x"],
           tiny_data)
  assert r.returncode == 2 and "not a float run" in r.stderr and r.stderr.count("\n") == 1
  r = _run(["-m", "lqlab.ptq", f"--from_run={float_dir}", "--bits=1", f"--workdir={tmp_path}/y"],
           tiny_data)
  assert r.returncode == 2 and "bits must be >= 2" in r.stderr

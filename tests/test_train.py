"""The training loop: smoke runs, bad input, resume, data parallelism, NaN guard,
and the end-to-end run on real MNIST."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax

from lqjax import compress, optim, qconfig, tree

from lqlab import step as step_lib
from lqlab import train
from lqlab.config import TrainConfig
from lqlab.step import TrainState, build_model, init_state, make_chunk_runner, make_optimizer, make_train_step

ROOT = pathlib.Path(__file__).resolve().parent.parent
REQUIRED = {"dataset", "model", "scheme", "rule", "threshold", "granularity", "seed", "epochs",
            "val_accuracy", "test_accuracy", "fp32_bytes", "quantized_bits_per_layer", "avg_bits",
            "train_seconds", "config"}


def _run(module, *flags, env=None, timeout=600):
  e = dict(os.environ, **(env or {}))
  return subprocess.run([sys.executable, "-m", module, *flags], cwd=ROOT, env=e,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("module,extra,threshold", [
    ("experiments.mnist", ["--rule=lsq", "--bits=4"], 0.15),  # per-dataset default
    ("experiments.fashion_mnist", ["--granularity=spatial", "--rule=ratio_lsq"], 0.2),
    ("experiments.cifar10", ["--float", "--threshold=0.3"], 0.3),
    ("experiments.imagenette", ["--inverse_scale=0.01", "--deviation=0.1", "--bin_count=0.01"], 0.2),
    ("experiments.vit", ["--granularity=block", "--block_size=32", "--rule=lsq", "--bits=4",
                         "--noexport"], 0.2),
])
def test_entry_point_smoke(tiny_data, tmp_path, module, extra, threshold):
  wd = tmp_path / "wd"
  r = _run(module, f"--workdir={wd}", "--epochs=1", "--batch_size=32", "--progress=false",
           *extra)
  assert r.returncode == 0, r.stderr[-2000:]
  res = json.loads((wd / "results.json").read_text())
  assert REQUIRED <= set(res)
  assert res["threshold"] == threshold
  rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
  assert len(rows) == 1
  assert {"epoch", "train_loss", "val_accuracy", "avg_bits", "seconds"} <= set(rows[0])


@pytest.mark.parametrize("flag,needle", [
    ("--threshold=-1", "threshold"), ("--granularity=diagonal", "granularity"),
    ("--rule=magic", "rule"), ("--lr=-0.1", "lr"), ("--rounding=ceil", "rounding"),
    ("--workdir=/nonexistent/parent/wd", "parent"), ("--model=vgg", "model"),
    ("--scale_stop_restore=weights", "scale_stop_restore"),
])
def test_bad_flags_fail_fast(tiny_data, flag, needle):
  t0 = time.time()
  r = _run("experiments.mnist", flag, "--progress=false")
  assert r.returncode != 0
  err = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
  assert len(err) == 1 and needle in err[0], r.stderr[-1000:]
  assert time.time() - t0 < 60


@pytest.mark.parametrize("kw,needle", [
    (dict(scale_decay_fraction=0.0), "scale_decay_fraction"), (dict(scale_stop="loss"), "scale_stop"),
    (dict(scale_schedule="step"), "scale_schedule"), (dict(relax_threshold=0.01), "relax_threshold"),
    (dict(epochs=0), "epochs"), (dict(deviation=-1.0), "deviation"),
    (dict(scale_stop_restore="weights"), "scale_stop_restore")])
def test_config_validation(kw, needle):
  with pytest.raises(ValueError, match=needle):
    TrainConfig(**kw)


def _brake_state(params, best):
  tx = optim.split(optax.sgd(0.1), optax.sgd(0.1))
  return TrainState(jnp.zeros((), jnp.int32), params, {}, tx.init(params), best)


def _brake_params(kernel, log_scale):
  return {"fc": {"kernel": jnp.full((2, 2), kernel), "kernel_quant": {
      "log_scale": tree.QuantScale(jnp.full((1, 2), log_scale), config=qconfig.QuantConfig())}}}


def test_validation_brake_rolls_back_and_halves():
  cfg = TrainConfig(scale_stop="val")
  state = _brake_state(_brake_params(1.0, 0.0), _brake_params(1.0, -1.0))
  meta = {"best_val": 0.98, "best_epoch": 3, "brakes": 0, "frozen_at": None}
  mult = lambda s: float(optim.scale_mult(s.opt_state))
  # Within tolerance: nothing happens.
  s2, m2, ev = train._scale_stop(cfg, state, meta, 0.979, 4)
  assert ev is None and mult(s2) == 1.0
  # A drop: scales roll back to the best epoch's, weights stay, the step halves.
  s3, m3, ev = train._scale_stop(cfg, state, meta, 0.97, 4)
  assert "rolled back to epoch 3" in ev and mult(s3) == 0.5
  np.testing.assert_array_equal(s3.params["fc"]["kernel_quant"]["log_scale"].value, -1.0)
  np.testing.assert_array_equal(s3.params["fc"]["kernel"], 1.0)
  # An improvement becomes the new best.
  s4, m4, ev = train._scale_stop(cfg, state, meta, 0.99, 4)
  assert ev is None and m4["best_epoch"] == 4 and m4["best_val"] == 0.99
  # After MAX_BRAKES the scales freeze.
  m5 = dict(meta, brakes=train.MAX_BRAKES - 1)
  s5, m5, _ = train._scale_stop(cfg, state, m5, 0.9, 5)
  assert mult(s5) == 0.0 and m5["frozen_at"] == 5


def test_validation_brake_can_restore_the_weights_too():
  cfg = TrainConfig(scale_stop="val", scale_stop_restore="all")
  best = _brake_params(2.0, -1.0)
  state = _brake_state(_brake_params(1.0, 0.0), best)
  meta = {"best_val": 0.98, "best_epoch": 3, "brakes": 0, "frozen_at": None}
  s, _, ev = train._scale_stop(cfg, state, meta, 0.97, 4)
  assert "parameters rolled back to epoch 3" in ev and float(optim.scale_mult(s.opt_state)) == 0.5
  np.testing.assert_array_equal(s.params["fc"]["kernel"], 2.0)
  np.testing.assert_array_equal(s.params["fc"]["kernel_quant"]["log_scale"].value, -1.0)
  # the restored arrays are copies: the next best epoch's snapshot cannot alias them
  assert s.params["fc"]["kernel"] is not best["fc"]["kernel"]


def test_missing_dataset_fails_with_one_line(tmp_path):
  r = _run("experiments.cifar10", f"--workdir={tmp_path / 'wd'}", "--progress=false",
           env={"LQJAX_DATA_DIR": str(tmp_path / "none"), "LQJAX_CACHE_DIR": str(tmp_path / "c"),
                "TFDS_DATA_DIR": str(tmp_path / "tfds")})
  assert r.returncode != 0
  assert "error: dataset 'cifar10' not found" in r.stderr


def _cfg(**kw):
  base = dict(dataset="mnist", model="lenet300", epochs=2, batch_size=30, chunk_steps=2,
              rule="ratio", rounding="round", threshold=0.5)
  base.update(kw)
  return TrainConfig(**base)


def _params(workdir):
  _, _, state, _, _ = train.restore(workdir)
  return jax.device_get(state.params)


def test_interrupt_and_resume_matches_uninterrupted(tiny_data, tmp_path, monkeypatch):
  cfg = _cfg()
  ref = train.train_and_evaluate(cfg, tmp_path / "a", progress=False)

  class FlagAfterTwoChunks(train._SignalFlag):
    calls = 0

    @property
    def hit(self):
      FlagAfterTwoChunks.calls += 1
      return "SIGTERM" if FlagAfterTwoChunks.calls >= 2 else None

    @hit.setter
    def hit(self, v):
      pass

  monkeypatch.setattr(train, "_SignalFlag", FlagAfterTwoChunks)
  with pytest.raises(train.Interrupted, match="resume"):
    train.train_and_evaluate(cfg, tmp_path / "b", progress=False)
  monkeypatch.undo()
  monkeypatch.setenv("LQJAX_DATA_DIR", str(tiny_data))
  got = train.train_and_evaluate(cfg, tmp_path / "b", progress=False)
  assert got["test_accuracy"] == ref["test_accuracy"]
  assert got["val_accuracy"] == ref["val_accuracy"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, _params(tmp_path / "a"),
                         _params(tmp_path / "b"))
  assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 2


def test_sigterm_kill_then_resume(tiny_data, tmp_path):
  wd = tmp_path / "wd"
  args = [f"--workdir={wd}", "--epochs=30", "--batch_size=10", "--progress=false",
          "--rounding=round"]
  p = subprocess.Popen([sys.executable, "-m", "experiments.mnist", *args], cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not (wd / "metrics.jsonl").exists() and time.time() < deadline and p.poll() is None:
    time.sleep(0.2)
  p.send_signal(signal.SIGTERM)
  _, err = p.communicate(timeout=300)
  assert p.returncode == 130, err[-2000:]
  assert "re-run the same command to resume" in err
  done = len((wd / "metrics.jsonl").read_text().splitlines())
  assert 1 <= done < 30
  r = _run("experiments.mnist", *args)
  assert r.returncode == 0, r.stderr[-2000:]
  rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [x["epoch"] for x in rows] == list(range(1, 31))


def test_config_mismatch_in_workdir(tiny_data, tmp_path):
  train.train_and_evaluate(_cfg(epochs=1), tmp_path / "a", progress=False)
  with pytest.raises(train.TrainingError, match="another config"):
    train.train_and_evaluate(_cfg(epochs=1, threshold=0.9), tmp_path / "a", progress=False)
  # A config field added after a run was made reads as its default: the run resumes.
  cfg_file = tmp_path / "a" / "config.json"
  old = json.loads(cfg_file.read_text())
  del old["scale_stop_restore"]
  cfg_file.write_text(json.dumps(old))
  assert train.train_and_evaluate(_cfg(epochs=1), tmp_path / "a", progress=False)["epochs"] == 1


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tiny_data, tmp_path):
  cfg = _cfg(epochs=3, optimizer="sgd", lr=1e12)
  with pytest.raises(train.TrainingError, match=r"at step \d+"):
    train.train_and_evaluate(cfg, tmp_path / "a", progress=False)
  assert not (tmp_path / "a" / "results.json").exists()


def test_deterministic(tiny_data, tmp_path):
  a = train.train_and_evaluate(_cfg(epochs=1), tmp_path / "a", progress=False)
  b = train.train_and_evaluate(_cfg(epochs=1), tmp_path / "b", progress=False)
  assert a["val_accuracy"] == b["val_accuracy"] and a["avg_bits"] == b["avg_bits"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, _params(tmp_path / "a"),
                         _params(tmp_path / "b"))


def test_data_parallel_matches_single_device(tiny_data, tmp_path):
  code = ("import sys, json, jax, numpy as np; from lqlab import train;"
          "from lqlab.config import TrainConfig;"
          "cfg = TrainConfig(dataset='mnist', model='lenet5', epochs=1, batch_size=40,"
          " rule='lsq', bits=4, granularity='channel', rounding='round', chunk_steps=4);"
          "r = train.train_and_evaluate(cfg, sys.argv[1], progress=False);"
          "_, _, s, _, _ = train.restore(sys.argv[1]);"
          "np.save(sys.argv[1] + '/k.npy', np.asarray(s.params['fc2']['kernel']));"
          "print(json.dumps({'devices': r['devices'], 'loss': r['test_loss']}))")
  outs = {}
  for n in (1, 8):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    wd = str(tmp_path / f"d{n}")
    r = subprocess.run([sys.executable, "-c", code, wd], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    outs[n] = json.loads(r.stdout.strip().splitlines()[-1])
    outs[n]["k"] = np.load(wd + "/k.npy")
  assert outs[1]["devices"] == 1 and outs[8]["devices"] == 8
  np.testing.assert_allclose(outs[8]["loss"], outs[1]["loss"], rtol=1e-3)
  np.testing.assert_allclose(outs[8]["k"], outs[1]["k"], atol=1e-4)


def test_mnist_end_to_end_real_data(real_data_dir, tmp_path):
  """LeNet-300-100, ratio rule, 2 epochs on real MNIST: >= 96% test accuracy, complete
  results, and an exported file that reloads to identical predictions."""
  wd = tmp_path / "wd"
  r = _run("experiments.mnist", f"--workdir={wd}", "--epochs=2", "--rule=ratio",
           "--progress=false", "--export", env={"LQJAX_DATA_DIR": real_data_dir})
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((wd / "results.json").read_text())
  assert REQUIRED <= set(res)
  assert res["test_accuracy"] >= 0.96, res["test_accuracy"]
  assert res["avg_bits"] < 8
  assert set(res["quantized_bits_per_layer"]) == {f"fc{i}/{k}" for i in (1, 2, 3)
                                                  for k in ("kernel", "bias")}
  # The exported file: real bytes, identical predictions.
  assert res["packed_bytes"] == (wd / "model.lqz").stat().st_size
  assert res["reload_identical_argmax"] and res["reload_test_accuracy"] == res["test_accuracy"]
  assert res["reload_max_abs_logit_diff"] < 1e-4
  assert res["compression_ratio"] > 3.5
  assert res["entropy_coded_bytes"] < res["packed_bytes"]
  blob = (wd / "model.lqz").read_bytes()
  header_bytes = len(blob) - res["packed_bytes_accounted"]
  hlen = compress._PREFIX.unpack_from(blob)[3]
  assert header_bytes == compress._PREFIX.size + hlen + 32


def _lenet300(rule, n, batch_size, seed=0, granularity="row"):
  """Random MNIST-shaped data and a LeNet-300-100 with `rule` (row scales by default;
  4 bits for lsq)."""
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8))
  labels = jnp.asarray(rng.integers(0, 10, n, dtype=np.int32))
  cfg = TrainConfig(dataset="mnist", model="lenet300", batch_size=batch_size,
                          optimizer="adam", rule=rule, granularity=granularity, rounding="round",
                          bits=4 if rule == "lsq" else None)
  return images, labels, cfg, build_model(cfg, 10)


@pytest.mark.parametrize("rule", ["lsq", "ratio"])
def test_weight_after_scale_ordering_changes_no_value(rule, monkeypatch):
  """lqjax.optim.apply_updates only orders the update (it lets XLA drop the copy of each
  quantized weight): 20 steps with and without it give bitwise equal parameters."""
  images, labels, cfg, model = _lenet300(rule, 256, 64)
  tx = make_optimizer(cfg, 100)
  calls = []
  real = tree.replace_arrays
  monkeypatch.setattr(tree, "replace_arrays", lambda *a: calls.append(1) or real(*a))
  out = []
  for order in (True, False):
    step = jax.jit(make_train_step(cfg, model, tx, ((0.5,), (0.25,)),
                                         order_after_scales=order))
    s = init_state(cfg, model, tx, images[:1].astype(jnp.float32), None)
    for i in range(20):
      sl = slice((i % 4) * 64, (i % 4 + 1) * 64)
      s, _ = step(s, (images[sl], labels[sl]), jax.random.fold_in(jax.random.key(0), i))
    out.append(jax.tree_util.tree_leaves(jax.device_get(s.params)))
  assert len(calls) == 1 and len(out[0]) == len(out[1]) > 6  # traced once: ordered only
  for a, b in zip(*out):
    np.testing.assert_array_equal(a, b)


def test_chunk_runner_prefetch_trains_on_the_permuted_batches():
  """make_chunk_runner gathers each step's batch one call ahead: two chunks of it
  give bitwise the parameters of stepping through perm's batches one by one."""
  images, labels, cfg, model = _lenet300("lsq", 256, 32, seed=1)
  tx = make_optimizer(cfg, 8)
  step_fn = make_train_step(cfg, model, tx, ((0.5,), (0.25,)))
  key = jax.random.key(3)
  perm = jax.random.permutation(jax.random.key(4), 256)
  run_chunk = make_chunk_runner(cfg, step_fn, 8, key)
  s = init_state(cfg, model, tx, images[:1].astype(jnp.float32), None)
  s, m1 = run_chunk(s, perm, images, labels, 3)
  s, m2 = run_chunk(s, perm, images, labels, 5)  # to the epoch's end
  ref = init_state(cfg, model, tx, images[:1].astype(jnp.float32), None)
  step = jax.jit(step_fn, static_argnames="scale_step")
  losses = []
  for i in range(8):
    idx = perm[i * 32:(i + 1) * 32]
    ref, m = step(ref, (images[idx], labels[idx]), jax.random.fold_in(key, i),
                  scale_step=step_lib.scale_step_at(cfg, i))  # every 16th step (default)
    losses.append(float(m["loss"]))
  assert int(s.step) == 8 and m1["loss"].shape == (3,) and m2["loss"].shape == (5,)
  np.testing.assert_array_equal(np.concatenate([m1["loss"], m2["loss"]]), losses)
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(s.params)),
                  jax.tree_util.tree_leaves(jax.device_get(ref.params))):
    np.testing.assert_array_equal(a, b)


def _compiled_step_hlo(rule, granularity="row"):
  """The compiled, donated LeNet-300-100 train step of `rule` (batch 128), as HLO text."""
  images, labels, cfg, model = _lenet300(rule, 128, 128, granularity=granularity)
  tx = make_optimizer(cfg, 100)
  state = init_state(cfg, model, tx, images[:1].astype(jnp.float32), None)
  step = make_train_step(cfg, model, tx, ((0.5,), (0.25,)))
  return jax.jit(step, donate_argnums=(0,)).lower(
      state, (images, labels), jax.random.key(0)).compile().as_text()


@pytest.mark.perf
@pytest.mark.parametrize("rule", ["lsq", "ratio"])
def test_compiled_step_copies_no_quantized_weight(rule):
  """The donated step updates each weight in place; neither rule's scale gradient may
  read the old weight where XLA must copy it first (lsq: optim.apply_updates orders the
  update; ratio: ||P|| is taken in the forward pass)."""
  hlo = _compiled_step_hlo(rule)
  entry = hlo[hlo.index("ENTRY"):]
  copied = re.findall(r"= (f32\[[\d,]+\])\S* copy\(", entry)
  for shape in ("f32[784,300]", "f32[300,100]", "f32[100,10]"):  # the three kernels
    assert shape not in copied, (rule, copied)


def _loop_fused_dots(hlo: str) -> list:
  """Names of the loop fusions (kind=kLoop) of a compiled module whose body has a dot."""
  bodies = dict(re.findall(r"^%(\S+) .*?\{\n(.*?)\n\}", hlo, re.M | re.S))
  loops = re.findall(r"%(\S+) = \S+ fusion\(.*?kind=kLoop, calls=%([\w.-]+)", hlo)
  return [name for name, body in loops if " dot(" in bodies.get(body, "")]


@pytest.mark.perf
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_compiled_lsq_step_sums_its_scale_gradients_with_the_library_product(granularity):
  """On CPU the LSQ gradient's sum over each kernel's rows (all of it, for tensor
  scales) is a product with a ones matrix (quant._reduce_to_mv), which XLA:CPU may not
  fold into a naive loop with the per-element terms, as it does for a matrix-vector
  product, nor turn into a windowed tree reduction, as it does for a plain full sum."""
  hlo = _compiled_step_hlo("lsq", granularity)
  assert hlo.count(" dot(") >= 9, "the forward and backward matmuls and the three sums"
  assert _loop_fused_dots(hlo) == []


def _kernel_sized_fusions(rule):
  hlo = _compiled_step_hlo(rule)
  entry = hlo[hlo.index("ENTRY"):]
  return len(re.findall(r"= f32\[784,300\]\S* fusion\(", entry))


@pytest.mark.perf
def test_compiled_ratio_step_writes_no_kernel_sized_array_more_than_fixed():
  """The ratio rule's sums (||P||^2 in the forward pass, ||dL/dP||^2 in the backward)
  read the first kernel where it already is: its compiled step writes as many
  784x300 arrays as the fixed rule's (the fake-quantized kernel, Adam's two moments
  and the update), none of them a square of the gradient merged with Adam's."""
  fixed = _kernel_sized_fusions("fixed")
  assert fixed == 4
  assert _kernel_sized_fusions("ratio") == fixed


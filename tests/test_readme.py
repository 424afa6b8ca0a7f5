"""The README: its Python blocks run as written (so they cannot rot), and what they claim
holds: the packed file has the size the report states, and the reloaded model's forward
pass is the trained one's, bit for bit."""

import pathlib
import re

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)


def test_readme_is_short_with_its_two_commands_and_the_own_model_example_first():
  lines = TEXT.splitlines()
  assert len(lines) <= 150
  bash = re.findall(r"```bash\n(.*?)```", TEXT, re.S)
  assert "pip install -e" in bash[0] and "pytest" in bash[1]
  first_python = next(i for i, line in enumerate(lines) if line.startswith("```python"))
  assert first_python < 40 and "lqjax.budget.Schedule" in BLOCKS[0]
  assert len(BLOCKS) >= 3 and "nnx" in BLOCKS[1] and "nnx.merge" in BLOCKS[2]
  assert len(BLOCKS[2].strip().splitlines()) == 2  # ONNX of an NNX model in two lines


def _run(blocks, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  ns = {"__name__": "__readme__"}
  for i in blocks:  # a block after the NNX one continues it
    exec(compile(BLOCKS[i], f"README block {i}", "exec"), ns)
  return ns, capsys.readouterr().out


def test_linen_block_file_is_the_reported_size_and_reloads_to_the_same_model(
    tmp_path, monkeypatch, capsys):
  import lqjax
  ns, out = _run([0], tmp_path, monkeypatch, capsys)
  stated = int(re.search(r"packed file \(lqjax.save\): (\d+) bytes", out).group(1))
  assert (tmp_path / "mlp.lqz").stat().st_size == stated
  trained = ns["params"]  # the block reloads into `params`; compare with a fresh reload
  again = lqjax.load(tmp_path / "mlp.lqz", trained)
  f = jax.jit(lambda p, x: ns["model"].apply({"params": p}, x))
  x = jax.random.normal(jax.random.key(7), (64, 784))
  np.testing.assert_array_equal(f(trained, x), f(again, x))
  # the budget was met: the model's bits, scale storage included, at most 2 per weight
  assert lqjax.budget.budget_bits_of(trained) <= 2.0 + 1e-9


def test_nnx_block_reloads_in_place_and_exports_onnx(tmp_path, monkeypatch, capsys):
  pytest.importorskip("jax2onnx")
  pytest.importorskip("onnxruntime")
  import lqjax
  from flax import nnx
  from lqjax import onnx_export
  ns, _ = _run([1, 2], tmp_path, monkeypatch, capsys)
  model, x = ns["model"], np.asarray(jax.random.normal(jax.random.key(3), (5, 784)))
  fresh = lqjax.quantize(ns["Net"](nnx.Rngs(1)), lqjax.Rule(config=lqjax.QuantConfig(
      granularity="row")))
  lqjax.load(tmp_path / "net.lqz", fresh)
  np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(model(x)))
  np.testing.assert_allclose(onnx_export.run_onnx(tmp_path / "net.onnx", x),
                             np.asarray(model(x)), rtol=1e-5, atol=1e-5)

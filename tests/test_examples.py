"""The examples run end to end on real data (short), with their model files free of lqjax."""

import os
import pathlib
import subprocess
import sys

import pytest

from conftest import data_dir

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script", ["nnx_mnist_cnn.py", "linen_resnet_imagenette.py",
                                    "nnx_gpt_stack.py", "nnx_sharded_gpt.py"])
def test_model_classes_do_not_import_lqjax(script):
  src = (ROOT / "examples" / script).read_text()
  model_part = src[src.index("\nclass "):src.index("\nRULES = ")]
  assert "lqjax" not in model_part


@pytest.mark.slow
def test_nnx_example_trains_saves_reloads_and_exports(tmp_path):
  d = data_dir()
  r = subprocess.run([sys.executable, "examples/nnx_mnist_cnn.py", "--epochs", "1", "--out",
                      str(tmp_path)], cwd=ROOT, env=dict(os.environ, LQJAX_DATA_DIR=d),
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  last = [l for l in r.stdout.splitlines() if l.startswith("test accuracy")][-1]
  acc = float(last.split()[2].rstrip(";"))
  assert acc > 0.97 and "reloaded predictions identical: True" in last
  assert (tmp_path / "cnn.lqz").is_file()


@pytest.mark.slow
def test_gpt_stack_example_quantized_from_outside(tmp_path):
  """The scanned GPT, quantized after its stack is built: per-head scales with the layer
  axis, 150 steps below 2.9 nats per character (unigram 3.35), an identical reload."""
  d = data_dir("tinyshakespeare/input.txt")
  r = subprocess.run([sys.executable, "examples/nnx_gpt_stack.py", "--steps", "150", "--out",
                      str(tmp_path)],
                     cwd=ROOT, env=dict(os.environ, LQJAX_DATA_DIR=d), capture_output=True,
                     text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "attention query scales: (2, 1, 4, 1)" in r.stdout
  last = r.stdout.strip().splitlines()[-1]
  assert float(last.split()[2]) < 2.9 and last.endswith("reloaded logits identical: True")
  assert (tmp_path / "gpt.lqz").is_file()


@pytest.mark.slow
def test_sharded_gpt_example_on_8_host_devices(tmp_path):
  """The GPT on a 2 x 4 mesh: row scales sharded as their column-sharded kernels, replicated
  for row-sharded ones; 60 steps below 3.0 nats per character (uniform 4.17); the reload
  placed as the model is, with identical logits."""
  d = data_dir("tinyshakespeare/input.txt")
  env = dict(os.environ, LQJAX_DATA_DIR=d)
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, "examples/nnx_sharded_gpt.py", "--steps", "60", "--out",
                      str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert ("fc kernel P(None, 'model'), its row scale P(None, 'model'); proj kernel "
          "P('model', None), its row scale P(None, None)") in r.stdout
  last = r.stdout.strip().splitlines()[-1]
  val = float(last.split("val loss ")[1].split()[0])
  assert val < 3.0, last
  assert "placed as P(None, 'model')" in last and last.endswith("logits identical: True")

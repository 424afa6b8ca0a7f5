"""An NNX CNN on MNIST, written the way users write theirs, quantized by lqjax from outside.

  LQJAX_DATA_DIR=../shared/datasets python examples/nnx_mnist_cnn.py [--epochs 2]

The model file below has no lqjax import. The script quantizes it with one rule
(first and last layers fixed 8-bit, the rest learn their widths with the ratio
rule), trains it with a plain ``nnx.Optimizer`` loop over
``lqjax.optim.split``, prints the per-layer report, saves the packed file,
reloads it into a fresh model and checks the predictions, and exports ONNX when
``lqjax[export]`` is installed.

It prints each epoch's test accuracy and average bits, the packed file's size and ratio
against FP32, whether the reloaded predictions are identical, and the ONNX file's size and
accuracy. Two epochs leave the learned widths near their 8-bit start: the ratio rule
coarsens at the scale learning rate per step, and the training loop's MNIST recipe
(``python -m experiments.mnist``, 10 epochs) goes much further (docs/RESULTS.md).
"""

import argparse
import os
import pathlib
import tempfile
import time

import numpy as np
import optax
from flax import nnx

import lqjax


class CNN(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (5, 5), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (5, 5), rngs=rngs)
    self.fc1 = nnx.Linear(7 * 7 * 32, 128, rngs=rngs)
    self.head = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
    x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
    x = nnx.relu(self.fc1(x.reshape((x.shape[0], -1))))
    return self.head(x)


RULES = [lqjax.Rule("conv1|head", lqjax.QuantConfig(rule="fixed", bits=8, rounding="round")),
         lqjax.Rule(".*", lqjax.QuantConfig(rule="ratio", threshold=0.2, granularity="row",
                                            rounding="round"))]


def load_mnist(data_dir):
  out = {}
  for split in ("train", "test"):
    with np.load(pathlib.Path(data_dir) / "mnist" / f"{split}.npz") as z:
      out[split] = (z["image"].astype(np.float32) / 255.0, z["label"].astype(np.int32))
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--epochs", type=int, default=2)
  ap.add_argument("--data_dir", default=os.environ.get("LQJAX_DATA_DIR"))
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  if not args.data_dir:
    raise SystemExit("error: give --data_dir or set LQJAX_DATA_DIR")
  data = load_mnist(args.data_dir)
  (xtr, ytr), (xte, yte) = data["train"], data["test"]
  model = lqjax.quantize(CNN(nnx.Rngs(0)), RULES)
  steps = args.epochs * (len(xtr) // 128)
  opt = nnx.Optimizer(model, lqjax.optim.split(
      optax.adam(optax.cosine_decay_schedule(1e-3, steps)),
      optax.sgd(optax.cosine_decay_schedule(0.02, int(0.8 * steps)))), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, y):
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  predict = nnx.jit(lambda m, x: m(x).argmax(-1))
  accuracy = lambda m: float(np.mean(np.concatenate(
      [np.asarray(predict(m, xte[i:i + 1000])) for i in range(0, len(xte), 1000)]) == yte))
  t0 = time.time()
  rng = np.random.default_rng(0)
  for epoch in range(args.epochs):
    perm = rng.permutation(len(xtr))
    for i in range(0, len(perm) - 127, 128):
      idx = perm[i:i + 128]
      step(model, opt, xtr[idx], ytr[idx])
    print(f"epoch {epoch + 1}: test accuracy {accuracy(model):.4f} "
          f"average bits {float(lqjax.average_bits(model)[0]):.2f}", flush=True)
  seconds = time.time() - t0
  print(lqjax.report(model))
  out = pathlib.Path(args.out or tempfile.mkdtemp()) / "cnn.lqz"
  size = lqjax.save(out, model)
  fp32 = lqjax.summarize(lqjax.model_report(model))["fp32_bytes"]
  fresh = lqjax.load(out, lqjax.quantize(CNN(nnx.Rngs(1)), RULES))
  same = all(np.array_equal(np.asarray(predict(model, xte[i:i + 1000])),
                            np.asarray(predict(fresh, xte[i:i + 1000])))
             for i in range(0, len(xte), 1000))
  print(f"test accuracy {accuracy(model):.4f}; {out}: {size} bytes, {fp32 / size:.1f}x smaller "
        f"than FP32 ({fp32} bytes); reloaded predictions identical: {same}; "
        f"{seconds:.0f} s of training")
  try:
    onnx_path = out.with_suffix(".onnx")
    graphdef, state = nnx.split(model)
    lqjax.export_onnx(onnx_path, lambda s, x: nnx.merge(graphdef, s)(x), state, xte[:1])
    from lqjax import onnx_export
    o = onnx_export.run_onnx(onnx_path, xte).argmax(-1)
    print(f"{onnx_path}: {onnx_path.stat().st_size} bytes, test accuracy {np.mean(o == yte):.4f}")
  except ImportError:
    print("ONNX skipped: install lqjax[export]")
  except RuntimeError as e:  # lqjax.onnx_export.ExportError: the converter's versions
    print(f"ONNX skipped: {e}")


if __name__ == "__main__":
  main()

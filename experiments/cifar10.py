"""CIFAR-10: ResNet-20, learned quantization, random crop + flip.

Default command::

  python -m experiments.cifar10

(ResNet-20, rule ratio, threshold 0.2, per-channel kernel scales, SGD momentum
0.9 with lr 0.1 cosine, weight decay 5e-4, batch 128, 10 epochs: a reduced CPU
schedule; use --epochs=160 on a GPU/TPU).

Measured on the 2-core CPU: the default command plus --export
(runs/default_commands/cifar10_default_s0): test accuracy 0.8408 (val 0.8524),
2.75 average bits, packed file 127,952 B (8.6x smaller than FP32; zstd variant
102,731 B, 10.7x), the reloaded file and the ONNX model give the same argmax on
all 10,000 test images. Training took 5278 s (88 min) while other runs shared
the two cores; alone an epoch takes about 340 s (a step is ~1 s, mostly
XLA:CPU's convolution backward), so about an hour. The validation brake fired
once (epoch 6). Regenerate with ``python scripts/sweep.py --config
sweeps/default_full.json``.
"""

from experiments import common
from lqlab.config import TrainConfig


def get_config():
  """The experiment's config; flags override its fields."""
  return TrainConfig(dataset="cifar10", model="resnet20", epochs=10, batch_size=128,
                           optimizer="sgd", lr=0.1, weight_decay=5e-4)


if __name__ == "__main__":
  common.main(get_config)

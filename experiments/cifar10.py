"""CIFAR-10: ResNet-20, learned quantization, random crop + flip.

Default command::

  python -m experiments.cifar10

(ResNet-20, rule ratio, threshold 0.2, per-channel kernel scales, SGD momentum
0.9 with lr 0.1 cosine, weight decay 5e-4, batch 128, 10 epochs: a reduced CPU
schedule; use --epochs=160 on a GPU/TPU).

Measured on the 2-core CPU: one ResNet-20 epoch takes about 340 s (a step is
~1 s, mostly XLA:CPU's convolution backward), so the 10-epoch default takes
about an hour here and was not run to the end. ``python -m
experiments.cifar10 --epochs=2 --export`` (runs/default_commands/cifar10_epochs2_s0):
test accuracy 0.6758, 7.21 average bits, packed file 3.9x smaller than FP32,
683 s of training.
"""

from experiments import common

DEFAULTS = common.Defaults(model="resnet20", epochs=10, batch_size=128, optimizer="sgd",
                           lr=0.1, weight_decay=5e-4)

if __name__ == "__main__":
  common.main("cifar10", DEFAULTS)

"""CIFAR-10: ResNet-20, learned quantization, random crop + flip.

Default command::

  python -m experiments.cifar10

(ResNet-20, rule ratio, threshold 0.2, per-channel kernel scales, SGD momentum
0.9 with lr 0.1 cosine, weight decay 5e-4, batch 128, 10 epochs: a reduced CPU
schedule; use --epochs=160 on a GPU/TPU). Measured accuracy and CPU time: see
the README's table.
"""

from experiments import common

DEFAULTS = common.Defaults(model="resnet20", epochs=10, batch_size=128, optimizer="sgd",
                           lr=0.1, weight_decay=5e-4)

if __name__ == "__main__":
  common.main("cifar10", DEFAULTS)

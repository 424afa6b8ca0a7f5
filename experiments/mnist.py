"""MNIST: LeNet-300-100 (default) or LeNet-5, learned quantization.

Default command::

  python -m experiments.mnist

(LeNet-300-100, rule ratio, threshold 0.2, per-row kernel scales, 5 epochs,
Adam 1e-3, batch 128). Measured on the 2-core CPU: see the README's table.
"""

from experiments import common

DEFAULTS = common.Defaults(model="lenet300", epochs=5, batch_size=128, optimizer="adam",
                           lr=1e-3, weight_decay=0.0)

if __name__ == "__main__":
  common.main("mnist", DEFAULTS)

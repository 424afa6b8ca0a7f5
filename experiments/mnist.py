"""MNIST: LeNet-300-100 (default) or LeNet-5, learned quantization.

Default command::

  python -m experiments.mnist

(LeNet-300-100, the stable ratio variant: rule ratio, threshold 0.2, per-row
kernel scales, round-to-nearest, scale lr 0.02 cosine-annealed with the
validation brake; 10 epochs, Adam 1e-3, batch 128). Its measured accuracy, bits
and CPU time are in docs/RESULTS.md (sweep ``default_commands``).
"""

from experiments import common

DEFAULTS = common.Defaults(model="lenet300", epochs=10, batch_size=128, optimizer="adam",
                           lr=1e-3, weight_decay=0.0)

if __name__ == "__main__":
  common.main("mnist", DEFAULTS)

"""MNIST: LeNet-300-100 (default) or LeNet-5, learned quantization.

Default command::

  python -m experiments.mnist

(LeNet-300-100, the stable ratio variant: rule ratio, threshold 0.2, per-row
kernel scales, round-to-nearest, scale lr 0.02 cosine-annealed with the
validation brake; 10 epochs, Adam 1e-3, batch 128).

Measured on the 2-core CPU (runs/baselines_mnist_lenet300/stable_ratio_s{0,1,2},
the default command plus --export and --seed): test accuracy 0.9811 +- 0.0024,
1.99 +- 0.28 average bits, packed file 15.0x smaller than FP32, 21 s of training
(about 35 s wall with start-up and evaluation). FP32 with the same recipe:
0.9828 +- 0.0004. Regenerate with ``python scripts/sweep.py --config
sweeps/baselines_lenet300.json`` and ``python scripts/report.py``.
"""

from experiments import common

DEFAULTS = common.Defaults(model="lenet300", epochs=10, batch_size=128, optimizer="adam",
                           lr=1e-3, weight_decay=0.0, threshold=0.15)

if __name__ == "__main__":
  common.main("mnist", DEFAULTS)

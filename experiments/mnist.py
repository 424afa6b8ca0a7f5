"""MNIST: LeNet-300-100 (default) or LeNet-5, learned quantization.

Default command::

  python -m experiments.mnist

(LeNet-300-100, the stable ratio variant: rule ratio, threshold 0.15 (chosen on
the validation split, sweeps/tune_default_lenet300.json), per-row kernel scales,
round-to-nearest, scale lr 0.02 cosine-annealed to 0 at 80% of the run, with the
validation brake, the scales updated every 16 steps; 10 epochs, Adam 1e-3, batch 128).

Measured on the 2-core CPU, seeds 0-2 of the default command
(results/scale_every_mnist_lenet300, variant k16): test accuracy 0.9826 +- 0.0007
at 3.16 +- 0.04 average bits, packed file 110,329-113,025 B (9.4-9.7x smaller than
FP32), zstd variant 86,816-89,663 B, 18-27 s of training (sharing the CPU with other
runs). With the scales updated every step (variant k1, the recipe of the runs below):
0.9830 +- 0.0003 at 3.17 +- 0.02 bits. Seeds 0-2 of that recipe in
runs/baselines_mnist_lenet300/stable_ratio_s{0,1,2}: 0.9831 +- 0.0004 at 3.18 +- 0.02
bits, 9.6x; FP32 with the same recipe: 0.9828 +- 0.0004. ``--threshold=0.2`` trades
accuracy for size: 0.9811 +- 0.0024 at 1.99 bits (15.0x). Regenerate with ``python
scripts/sweep.py --config sweeps/scale_every_mnist_lenet300.json`` (and
``sweeps/baselines_lenet300.json``) and ``python scripts/report.py``.
"""

from experiments import common
from lqlab.config import TrainConfig


def get_config():
  """The experiment's config; flags override its fields."""
  return TrainConfig(dataset="mnist", model="lenet300", epochs=10, batch_size=128,
                           optimizer="adam", lr=1e-3, weight_decay=0.0, threshold=0.15)


if __name__ == "__main__":
  common.main(get_config)

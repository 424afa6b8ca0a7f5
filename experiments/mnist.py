"""MNIST: LeNet-300-100 (default) or LeNet-5, learned quantization.

Default command::

  python -m experiments.mnist

(LeNet-300-100, the stable ratio variant: rule ratio, threshold 0.15 (chosen on
the validation split, sweeps/tune_default_lenet300.json), per-row kernel scales,
round-to-nearest, scale lr 0.02 cosine-annealed to 0 at 80% of the run, with the
validation brake; 10 epochs, Adam 1e-3, batch 128).

Measured on the 2-core CPU: the default command plus --export
(runs/default_commands/mnist_default_s0): test accuracy 0.9829, val 0.9808,
3.20 average bits, packed file 112,145 B (9.5x smaller than FP32), zstd variant
87,397 B, 23 s of training (37 s wall with start-up, evaluation and export,
sharing the CPU with another run). Seeds 0-2
(runs/baselines_mnist_lenet300/stable_ratio_s{0,1,2}): 0.9831 +- 0.0004 at
3.18 +- 0.02 bits, 9.6x; FP32 with the same recipe: 0.9828 +- 0.0004.
``--threshold=0.2`` trades accuracy for size: 0.9811 +- 0.0024 at 1.99 bits
(15.0x). Regenerate with ``python scripts/sweep.py --config
sweeps/baselines_lenet300.json`` and ``python scripts/report.py``.
"""

from experiments import common


def get_config():
  """The experiment's config; flags override its fields."""
  from lqlab import train
  return train.TrainConfig(dataset="mnist", model="lenet300", epochs=10, batch_size=128,
                           optimizer="adam", lr=1e-3, weight_decay=0.0, threshold=0.15)


if __name__ == "__main__":
  common.main(get_config)

"""Fashion-MNIST: LeNet-5 (default) or LeNet-300-100, learned quantization.

Default command::

  python -m experiments.fashion_mnist

The data comes from a folder with fashion_mnist/{train,test}.npz; convert the
Debian package's IDX files once with
``python scripts/import_dataset.py /usr/share/datasets/fashion-mnist $LQJAX_DATA_DIR/fashion_mnist``
(or point --data_dir at a folder whose fashion_mnist/ holds the IDX files: they
are imported into the cache on first use). LeNet-5, the stable ratio variant,
5 epochs, Adam 1e-3, batch 128.

Measured on the 2-core CPU (runs/default_commands/fashion_mnist_default_s0, the
default command plus --export): test accuracy 0.9073, 5.09 average bits, packed
file 6.1x smaller than FP32, 224 s of training (one LeNet-5 step is about 95 ms
on this CPU). Regenerate with ``python scripts/sweep.py --config
sweeps/default_fashion.json``.
"""

from experiments import common
from lqlab.config import TrainConfig


def get_config():
  """The experiment's config; flags override its fields."""
  return TrainConfig(dataset="fashion_mnist", model="lenet5", epochs=5, batch_size=128,
                           optimizer="adam", lr=1e-3, weight_decay=0.0)


if __name__ == "__main__":
  common.main(get_config)

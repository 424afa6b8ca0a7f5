"""CIFAR-10: a small Vision Transformer with learned quantization, random crop + flip.

Default command::

  python -m experiments.vit

(lqlab.transformers.ViT: 4x4 patches, width 128, 4 pre-norm blocks of 4 heads, MLP 256,
a class token; every matrix quantized, attention projections included, with the
learned rule per row; Adam 1e-3 cosine, weight decay 0, batch 128, 10 epochs: a
schedule that fits about an hour of a 2-core CPU). Small ViTs trained from scratch on
CIFAR-10 need long schedules and heavy augmentation (ViT-Lite-7/4 reaches 91.4% after
200 epochs, Hassani et al., 2021); this schedule is not that and claims no such figure.
"""

from experiments import common
from lqlab.config import TrainConfig


def get_config():
  """The experiment's config; flags override its fields."""
  return TrainConfig(dataset="cifar10", model="vit", epochs=10, batch_size=128,
                     optimizer="adam", lr=1e-3, weight_decay=0.0)


if __name__ == "__main__":
  common.main(get_config)

"""Models: LeNet-300-100, LeNet-5, ResNet-20 and a small ImageNet-style ResNet.

Plain Linen models, written the way users write theirs (``nn.Dense``,
``nn.Conv``, no lqjax import): the training loop quantizes them with
``lqjax.quantize(model, rules)``. :data:`MODEL_SPECS` maps a name to its
:class:`ModelSpec` (builder, edge and Dense layers); a new model is one new entry.

LeNet-5 here is the Caffe variant used by Deep Compression (Han et al., 2016):
conv 20 5x5 - pool - conv 50 5x5 - pool - fc 500 - fc 10 (431K parameters),
so its compression figures compare with theirs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from lqlab import transformers


class LeNet300100(nn.Module):
  """MLP 784-300-100-10 (LeCun et al., 1998)."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(300, name="fc1")(x))
    x = nn.relu(nn.Dense(100, name="fc2")(x))
    return nn.Dense(self.num_classes, name="fc3")(x)


class LeNet5(nn.Module):
  """LeNet-5, Caffe variant (20-50-500)."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(20, (5, 5), padding="VALID", name="conv1")(x)
    x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(50, (5, 5), padding="VALID", name="conv2")(x)
    x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(500, name="fc1")(x))
    return nn.Dense(self.num_classes, name="fc2")(x)


class BasicBlock(nn.Module):
  features: int
  strides: int

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
    y = nn.Conv(self.features, (3, 3), strides=self.strides, padding="SAME",
                         use_bias=False, name="conv1")(x)
    y = nn.relu(norm("bn1")(y))
    y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, name="conv2")(y)
    y = norm("bn2")(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = nn.Conv(self.features, (1, 1), strides=self.strides, use_bias=False,
                           name="proj")(x)
      x = norm("proj_bn")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Pre-activation-free ResNet with basic blocks (He et al., 2016).

  ``ResNet(stages=(3, 3, 3), widths=(16, 32, 64))`` is ResNet-20 for CIFAR.
  """

  stages: Sequence[int] = (3, 3, 3)
  widths: Sequence[int] = (16, 32, 64)
  stem_strides: int = 1
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.widths[0], (3, 3), strides=self.stem_strides, padding="SAME",
                         use_bias=False, name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_bn")(x))
    for i, (n, w) in enumerate(zip(self.stages, self.widths)):
      for j in range(n):
        x = BasicBlock(w, 2 if (j == 0 and i > 0) else 1,
                       name=f"stage{i + 1}_block{j + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything the application knows of one model: a new model is one new entry."""

  build: Callable[[int], nn.Module]  # num_classes -> the float Linen model
  # Its first and last layer (module paths): the layers the literature keeps at 8 bits
  # when it quantizes the rest to fewer.
  edge_layers: Tuple[str, str]
  # Its Dense layers (a regular expression over module paths): a `spatial` kernel config
  # quantizes them per tensor.
  dense_layers: str = r"fc\d+|head"


MODEL_SPECS: Dict[str, ModelSpec] = {
    "lenet300": ModelSpec(lambda n: LeNet300100(n), ("fc1", "fc3")),
    "lenet5": ModelSpec(lambda n: LeNet5(n), ("conv1", "fc2")),
    "resnet20": ModelSpec(lambda n: ResNet((3, 3, 3), (16, 32, 64), 1, n), ("stem", "head")),
    # Imagenette at 64x64: stride-2 stem, 4 stages.
    "resnet_small": ModelSpec(lambda n: ResNet((1, 1, 1, 1), (32, 64, 128, 256), 2, n),
                              ("stem", "head")),
    # CIFAR-10 ViT sized for an hour of a 2-core CPU (lqlab.transformers.ViT): patch 4,
    # width 128, 4 blocks of 4 heads, MLP 256.
    "vit": ModelSpec(lambda n: transformers.ViT(n, patch=4, width=128, depth=4, heads=4,
                                                mlp=256),
                     ("patch_embed", "head"), dense_layers=r"head|.*/(fc\d+|attn/\w+)"),
}
MODELS = tuple(MODEL_SPECS)


def make_model(name: str, num_classes: int) -> nn.Module:
  """The float model `name` (see :data:`MODEL_SPECS`)."""
  if name not in MODEL_SPECS:
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
  return MODEL_SPECS[name].build(num_classes)

"""Models: LeNet-300-100, LeNet-5, ResNet-20 and a small ImageNet-style ResNet.

Every model takes a :class:`LayerFactory`, so the same definition runs in float
(``LayerFactory()``) or quantized (``LayerFactory(kernel=cfg, bias=cfg2)``)
with any rule and granularity. All Dense and Conv layers (first and last
included) go through the factory; batch norm stays float.

LeNet-5 here is the Caffe variant used by Deep Compression (Han et al., 2016):
conv 20 5x5 - pool - conv 50 5x5 - pool - fc 500 - fc 10 (431K parameters),
so its compression figures compare with theirs.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from lqjax import layers, types


@dataclasses.dataclass(frozen=True)
class LayerFactory:
  """Makes Dense and Conv layers, float or quantized.

  Attributes:
    kernel: quantization of kernels; None keeps them float.
    bias: quantization of biases; None keeps them float.

  ``spatial`` granularity needs a conv kernel: Dense kernels under a ``spatial``
  kernel config are quantized per tensor instead.
  """

  kernel: Optional[types.QuantConfig] = None
  bias: Optional[types.QuantConfig] = None

  def _quant(self, is_dense: bool) -> dict:
    kernel = self.kernel
    if is_dense and kernel is not None and kernel.granularity == "spatial":
      kernel = dataclasses.replace(kernel, granularity="tensor")
    return layers.layer_quant(kernel, self.bias)

  def dense(self, features: int, **kwargs) -> nn.Module:
    if self.kernel is None and self.bias is None:
      return nn.Dense(features, **kwargs)
    return layers.QuantDense(features, quant=self._quant(True), **kwargs)

  def conv(self, features: int, kernel_size: Sequence[int], **kwargs) -> nn.Module:
    if self.kernel is None and self.bias is None:
      return nn.Conv(features, tuple(kernel_size), **kwargs)
    return layers.QuantConv(features, tuple(kernel_size), quant=self._quant(False), **kwargs)


class LeNet300100(nn.Module):
  """MLP 784-300-100-10 (LeCun et al., 1998)."""

  num_classes: int = 10
  layers: LayerFactory = LayerFactory()

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(self.layers.dense(300, name="fc1")(x))
    x = nn.relu(self.layers.dense(100, name="fc2")(x))
    return self.layers.dense(self.num_classes, name="fc3")(x)


class LeNet5(nn.Module):
  """LeNet-5, Caffe variant (20-50-500)."""

  num_classes: int = 10
  layers: LayerFactory = LayerFactory()

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = self.layers.conv(20, (5, 5), padding="VALID", name="conv1")(x)
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = self.layers.conv(50, (5, 5), padding="VALID", name="conv2")(x)
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(self.layers.dense(500, name="fc1")(x))
    return self.layers.dense(self.num_classes, name="fc2")(x)


class BasicBlock(nn.Module):
  features: int
  strides: int
  layers: LayerFactory

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
    y = self.layers.conv(self.features, (3, 3), strides=self.strides, padding="SAME",
                         use_bias=False, name="conv1")(x)
    y = nn.relu(norm("bn1")(y))
    y = self.layers.conv(self.features, (3, 3), padding="SAME", use_bias=False, name="conv2")(y)
    y = norm("bn2")(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = self.layers.conv(self.features, (1, 1), strides=self.strides, use_bias=False,
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
  layers: LayerFactory = LayerFactory()

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = self.layers.conv(self.widths[0], (3, 3), strides=self.stem_strides, padding="SAME",
                         use_bias=False, name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_bn")(x))
    for i, (n, w) in enumerate(zip(self.stages, self.widths)):
      for j in range(n):
        x = BasicBlock(w, 2 if (j == 0 and i > 0) else 1, self.layers,
                       name=f"stage{i + 1}_block{j + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return self.layers.dense(self.num_classes, name="head")(x)


MODELS = ("lenet300", "lenet5", "resnet20", "resnet_small")


def make_model(name: str, num_classes: int, factory: LayerFactory) -> nn.Module:
  """Builds a model by name; see :data:`MODELS`."""
  if name == "lenet300":
    return LeNet300100(num_classes, factory)
  if name == "lenet5":
    return LeNet5(num_classes, factory)
  if name == "resnet20":
    return ResNet((3, 3, 3), (16, 32, 64), 1, num_classes, factory)
  if name == "resnet_small":  # Imagenette at 64x64: stride-2 stem, 4 stages.
    return ResNet((1, 1, 1, 1), (32, 64, 128, 256), 2, num_classes, factory)
  raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")

"""Imagenette at 64x64: a small ResNet, learned quantization, random crop + flip.

Default command::

  python -m experiments.imagenette

(resnet_small, rule ratio, threshold 0.2, per-channel kernel scales, SGD
momentum 0.9 with lr 0.05 cosine, weight decay 5e-4, batch 64, 10 epochs). The
data is read from imagenette/{train,test}.npz in the data folder, or imported
once from an image-folder tree imagenette_64/ there.

Measured on the 2-core CPU: the default command plus --export
(runs/default_commands/imagenette_default_s0): test accuracy 0.7697 (val
0.7624), 6.46 average bits, packed file 1,035,783 B (4.8x smaller than FP32;
zstd variant 936,363 B, 5.3x); the reloaded file and the ONNX model give the
same argmax on all 3925 test images. Training took 1677 s (28 min) while other
runs shared the two cores (about 95 s per epoch alone, so about 16 minutes).
The validation brake fired at epochs 6, 9 and 10. Regenerate with ``python
scripts/sweep.py --config sweeps/default_imagenette_full.json``.
"""

from experiments import common
from lqlab.config import TrainConfig


def get_config():
  """The experiment's config; flags override its fields."""
  return TrainConfig(dataset="imagenette", model="resnet_small", epochs=10, batch_size=64,
                           optimizer="sgd", lr=0.05, weight_decay=5e-4)


if __name__ == "__main__":
  common.main(get_config)

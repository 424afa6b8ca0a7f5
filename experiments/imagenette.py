"""Imagenette at 64x64: a small ResNet, learned quantization, random crop + flip.

Default command::

  python -m experiments.imagenette

(resnet_small, rule ratio, threshold 0.2, per-channel kernel scales, SGD
momentum 0.9 with lr 0.05 cosine, weight decay 5e-4, batch 64, 10 epochs). The
data is read from imagenette/{train,test}.npz in the data folder, or imported
once from an image-folder tree imagenette_64/ there. Measured accuracy and CPU
time: see the README's table.
"""

from experiments import common

DEFAULTS = common.Defaults(model="resnet_small", epochs=10, batch_size=64, optimizer="sgd",
                           lr=0.05, weight_decay=5e-4)

if __name__ == "__main__":
  common.main("imagenette", DEFAULTS)

"""Imagenette at 64x64: a small ResNet, learned quantization, random crop + flip.

Default command::

  python -m experiments.imagenette

(resnet_small, rule ratio, threshold 0.2, per-channel kernel scales, SGD
momentum 0.9 with lr 0.05 cosine, weight decay 5e-4, batch 64, 10 epochs). The
data is read from imagenette/{train,test}.npz in the data folder, or imported
once from an image-folder tree imagenette_64/ there.

Measured on the 2-core CPU: an epoch takes about 95 s, so the 10-epoch default
takes about 16 minutes here and was not run to the end. ``python -m
experiments.imagenette --epochs=3 --export``
(runs/default_commands/imagenette_epochs3_s0): test accuracy 0.6838, 8.01
average bits (three epochs are too few for the scales to outgrow the weights'
growth), packed file 3.9x smaller than FP32, 283 s of training; the reloaded
file and the ONNX model give the same argmax on all 3925 test images.
"""

from experiments import common

DEFAULTS = common.Defaults(model="resnet_small", epochs=10, batch_size=64, optimizer="sgd",
                           lr=0.05, weight_decay=5e-4)

if __name__ == "__main__":
  common.main("imagenette", DEFAULTS)

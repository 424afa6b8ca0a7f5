"""Converts dataset files you already have into lqjax's npz format.

  python scripts/import_dataset.py SRC OUT [--image_size=64]

SRC holds MNIST-format IDX files (MNIST, Fashion-MNIST), CIFAR-10 python
batches, or an image-folder tree {train,test}/<class>/<image>; OUT receives
train.npz and test.npz. Example (Fashion-MNIST from Debian's
dataset-fashion-mnist package)::

  python scripts/import_dataset.py /usr/share/datasets/fashion-mnist \
      $LQJAX_DATA_DIR/fashion_mnist
"""

import argparse
import sys

import numpy as np


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
  ap.add_argument("src")
  ap.add_argument("out")
  ap.add_argument("--image_size", type=int, default=None,
                  help="resize (shorter side) and center-crop image folders to this size")
  args = ap.parse_args(argv)
  from lqlab import importers
  try:
    fmt = importers.import_dataset(args.src, args.out, image_size=args.image_size)
  except (importers.DatasetImportError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for split in ("train", "test"):
    with np.load(f"{args.out}/{split}.npz") as z:
      print(f"{split}: {z['image'].shape} {z['image'].dtype}, {len(np.unique(z['label']))} classes")
  print(f"imported {fmt} from {args.src} into {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

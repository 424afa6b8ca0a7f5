"""Converters from standard distribution files to lqjax's npz format.

Formats (``detect`` tells which a folder holds):

* ``idx``: MNIST-format files ``train-images-idx3-ubyte[.gz]``,
  ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-...``, ``t10k-labels-...``
  (MNIST, Fashion-MNIST, KMNIST).
* ``cifar``: CIFAR-10 python batches ``data_batch_1..5`` and ``test_batch``
  (optionally inside ``cifar-10-batches-py/``).
* ``folder``: an image-folder tree ``{train,test|val}/<class>/<image>``; the class
  order is ``classes.txt`` (first column) when present, else sorted folder names.

Output: ``<out>/train.npz`` and ``<out>/test.npz`` with ``image`` (uint8 NHWC),
``label`` (uint8/int) and ``classes``, written atomically.
"""

from __future__ import annotations

import gzip
import pathlib
import pickle
import struct
from typing import Optional

import numpy as np

from lqlab import files

_IDX = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


class DatasetImportError(ValueError):
  """A source folder that cannot be converted."""


def _find(src: pathlib.Path, stem: str) -> Optional[pathlib.Path]:
  for cand in (src / stem, src / (stem + ".gz")):
    if cand.is_file():
      return cand
  return None


def detect(src: pathlib.Path) -> Optional[str]:
  src = pathlib.Path(src)
  if all(_find(src, s) for pair in _IDX.values() for s in pair):
    return "idx"
  if (src / "data_batch_1").is_file() or (src / "cifar-10-batches-py" / "data_batch_1").is_file():
    return "cifar"
  if (src / "train").is_dir() and ((src / "test").is_dir() or (src / "val").is_dir()):
    return "folder"
  return None


def read_idx(path: pathlib.Path) -> np.ndarray:
  """Reads one IDX file (optionally gzipped) into a numpy array."""
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
    raise DatasetImportError(f"{path}: not an unsigned-byte IDX file")
  ndim = raw[3]
  dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
  body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(dims)):
    raise DatasetImportError(f"{path}: header says {dims} but holds {body.size} bytes")
  return body.reshape(dims)


def _import_idx(src):
  out = {}
  for split, (img, lab) in _IDX.items():
    x = read_idx(_find(src, img))
    y = read_idx(_find(src, lab))
    out[split] = (x[..., None] if x.ndim == 3 else x, y)
  return out, None


def _import_cifar(src):
  if (src / "cifar-10-batches-py").is_dir():
    src = src / "cifar-10-batches-py"

  def load(files):
    xs, ys = [], []
    for f in files:
      with open(src / f, "rb") as fh:
        d = pickle.load(fh, encoding="bytes")
      xs.append(np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
      ys.append(np.asarray(d[b"labels"], np.uint8))
    return np.concatenate(xs), np.concatenate(ys)

  classes = None
  if (src / "batches.meta").is_file():
    with open(src / "batches.meta", "rb") as fh:
      classes = [c.decode() for c in pickle.load(fh, encoding="bytes")[b"label_names"]]
  return {"train": load([f"data_batch_{i}" for i in range(1, 6)]),
          "test": load(["test_batch"])}, classes


def resize_center_crop(img: np.ndarray, size: int) -> np.ndarray:
  """Resizes (bicubic) so the shorter side is `size`, then center-crops size x size."""
  from PIL import Image
  im = Image.fromarray(img).convert("RGB")
  w, h = im.size
  if (w, h) != (size, size):
    r = size / min(w, h)
    im = im.resize((max(size, round(w * r)), max(size, round(h * r))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
  return np.asarray(im, np.uint8)


def _import_folder(src, image_size):
  from PIL import Image
  if (src / "classes.txt").is_file():
    classes = [line.split()[0] for line in (src / "classes.txt").read_text().splitlines()
               if line.strip()]
  else:
    classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
  index = {c: i for i, c in enumerate(classes)}
  out = {}
  for split, folder in (("train", "train"), ("test", "test" if (src / "test").is_dir() else "val")):
    xs, ys = [], []
    for cdir in sorted(p for p in (src / folder).iterdir() if p.is_dir()):
      if cdir.name not in index:
        raise DatasetImportError(f"{cdir}: class {cdir.name!r} is not in the training classes")
      for f in sorted(cdir.iterdir()):
        if f.suffix.lower() not in _IMAGE_SUFFIXES:
          continue
        with Image.open(f) as im:
          arr = np.asarray(im.convert("RGB"), np.uint8)
        if image_size is not None:
          arr = resize_center_crop(arr, image_size)
        xs.append(arr)
        ys.append(index[cdir.name])
    if not xs:
      raise DatasetImportError(f"{src / folder}: no images found")
    shapes = {x.shape for x in xs}
    if len(shapes) != 1:
      raise DatasetImportError(f"{src / folder}: images differ in size {sorted(shapes)[:3]}; "
                         f"pass image_size to resize")
    out[split] = (np.stack(xs), np.asarray(ys, np.uint8))
  return out, classes


def import_dataset(src, out, *, image_size: Optional[int] = None, fmt: Optional[str] = None):
  """Converts the dataset files in `src` into ``out/{train,test}.npz``.

  Returns the format that was read.
  """
  src, out = pathlib.Path(src), pathlib.Path(out)
  fmt = fmt or detect(src)
  if fmt == "idx":
    arrays, classes = _import_idx(src)
  elif fmt == "cifar":
    arrays, classes = _import_cifar(src)
  elif fmt == "folder":
    arrays, classes = _import_folder(src, image_size)
  else:
    raise DatasetImportError(f"{src}: no IDX files, CIFAR-10 python batches or train/ + test/ "
                       f"image folders found")
  for split, (image, label) in arrays.items():
    extra = {"classes": np.asarray(classes)} if classes else {}
    files.write_npz_atomic(out / f"{split}.npz", image=image, label=label, **extra)
  return fmt

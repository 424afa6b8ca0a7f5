"""Datasets as device arrays, with on-device shuffling and augmentation.

Where a dataset is looked for, in order:

1. ``<data_dir>/<name>/{train,test}.npz`` where data_dir is the ``data_dir``
   argument (the ``--data_dir`` flag), else ``$LQJAX_DATA_DIR``. Each npz holds
   ``image`` (uint8, NHWC) and ``label`` (integers).
2. The same layout under the per-user cache (``$LQJAX_CACHE_DIR``, else
   ``~/.cache/lqjax``), where imported and tfds-fetched datasets are written.
3. An importable source in data_dir that :mod:`lqlab.importers` understands:
   an image-folder tree ``<name>/{train,test}/<class>/*`` or, for imagenette,
   ``imagenette_64/``; MNIST-format IDX files in ``<name>/``. It is converted
   once into the cache.
4. ``tensorflow_datasets.data_source`` (no TensorFlow needed), cached as npz. It reads
   ``$TFDS_DATA_DIR``, else ``<cache>/tfds``, quietly, and downloads only when
   ``LQJAX_TFDS_DOWNLOAD=1`` (into that folder): nothing is written outside the cache
   unless asked.

Training data a classifier cannot learn from is refused when it is loaded, naming the
file: an empty split, constant images (std 0) and fewer than 2 classes.

If none works, :class:`DatasetNotFoundError` says where it looked and how to
provide the data.

The validation split is carved from the training data with a fixed seed
(:data:`VAL_SEED`), independent of the training seed, so every run tunes on the
same held-out examples; the test split is only for final reports.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lqlab import files

IMAGENETTE_SIZE = 64


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Everything the application knows of one dataset: a new dataset is one new entry."""

  image_shape: Tuple[int, int, int]  # (H, W, C) the models expect
  tfds_name: str  # its tensorflow_datasets name
  tfds_test_split: str = "test"  # the tfds split lqlab calls test
  augmented: bool = False  # random crop + horizontal flip while training
  aliases: Tuple[str, ...] = ()  # other folder names under data_dir with an importable copy
  resize: Optional[int] = None  # imported images are resized and center-cropped to this


DATASET_SPECS = {
    "mnist": DatasetSpec((28, 28, 1), "mnist"),
    "fashion_mnist": DatasetSpec((28, 28, 1), "fashion_mnist"),
    "cifar10": DatasetSpec((32, 32, 3), "cifar10", augmented=True),
    "imagenette": DatasetSpec((IMAGENETTE_SIZE, IMAGENETTE_SIZE, 3), "imagenette/160px",
                              "validation", augmented=True, aliases=("imagenette_64",),
                              resize=IMAGENETTE_SIZE),
}
DATASETS = tuple(DATASET_SPECS)


def image_shape(name: str) -> Tuple[int, int, int]:
  """(H, W, C) of dataset `name`'s images."""
  return DATASET_SPECS[name].image_shape


VAL_SEED = 20261127
VAL_FRACTION = 0.1


class DatasetNotFoundError(RuntimeError):
  """Raised when a dataset is neither found locally nor fetchable."""


@dataclasses.dataclass(frozen=True)
class Split:
  """One split on the device: uint8 images (N, H, W, C) and int32 labels (N,).

  `n` counts the examples where the arrays are padded past them (a split sharded over
  devices that do not divide it); None: every row."""

  image: jax.Array
  label: jax.Array
  n: Optional[int] = None

  def __len__(self):
    return int(self.label.shape[0]) if self.n is None else self.n


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  train: Split
  val: Split
  test: Split
  num_classes: int
  mean: tuple  # per-channel mean of the training images, in [0, 1]
  std: tuple


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("LQJAX_CACHE_DIR", "~/.cache/lqjax")).expanduser()


def resolve_data_dir(data_dir: Optional[str]) -> Optional[pathlib.Path]:
  d = data_dir or os.environ.get("LQJAX_DATA_DIR")
  return pathlib.Path(d).expanduser() if d else None


def _read_npz(path: pathlib.Path):
  """(image, label) of one npz file; one-line DatasetNotFoundError naming it on any fault."""
  import zipfile
  try:
    with np.load(path, allow_pickle=False) as z:
      missing = [k for k in ("image", "label") if k not in z.files]
      if missing:
        raise DatasetNotFoundError(f"{path}: no {' or '.join(repr(k) for k in missing)} array "
                                   f"(it holds {', '.join(z.files) or 'nothing'}); expected uint8 "
                                   f"'image' [N,H,W,C] and integer 'label' [N]")
      classes = z["classes"] if "classes" in z.files else None
      return z["image"], z["label"], classes
  except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
    reason = "not an npz (zip) file" if isinstance(e, (ValueError, zipfile.BadZipFile)) \
        else (getattr(e, "strerror", None) or str(e) or type(e).__name__)
    raise DatasetNotFoundError(f"{path}: {reason}; re-create it with "
                               f"scripts/import_dataset.py") from None


def _check_split(path, image, label):
  if image.dtype != np.uint8 or image.ndim != 4 or label.shape != image.shape[:1]:
    raise DatasetNotFoundError(
        f"{path}: expected uint8 'image' [N,H,W,C] and 'label' [N], got "
        f"{image.dtype} {image.shape} and {label.shape}")
  if not np.issubdtype(label.dtype, np.integer):
    if not (np.issubdtype(label.dtype, np.floating) and np.all(np.floor(label) == label)):
      raise DatasetNotFoundError(f"{path}: labels must be whole numbers, got {label.dtype} "
                                 f"values such as {label.reshape(-1)[:3].tolist()}")
  if label.size and label.min() < 0:
    raise DatasetNotFoundError(f"{path}: labels must be >= 0, found {int(label.min())}")
  if not label.size:
    raise DatasetNotFoundError(f"{path}: the split is empty (0 examples)")


def check_learnable(source, train_image, train_label):
  """Refuses training data a classifier cannot learn from: constant images (their std is 0,
  and standardising divides by it) and fewer than 2 classes."""
  std = (train_image.reshape(-1, train_image.shape[-1]).astype(np.float64) / 255.0).std(0)
  if not np.all(std > 0):
    c = int(np.argmin(std))
    raise DatasetNotFoundError(f"{source}: every training image has the same value in channel "
                               f"{c} (its std is 0); a model cannot learn from constant inputs")
  classes = np.unique(train_label)
  if classes.size < 2:
    raise DatasetNotFoundError(f"{source}: the training labels hold {classes.size} class "
                               f"({', '.join(map(str, classes.tolist()))}); a classifier needs "
                               f"at least 2")


def _read_npz_dir(d: pathlib.Path):
  out = {}
  for split in ("train", "test"):
    path = d / f"{split}.npz"
    image, label, classes = _read_npz(path)
    _check_split(path, image, label)
    out[split] = (image, label.astype(np.int32))
    if classes is not None:
      out["num_classes"] = len(classes)
  out["source"] = d / "train.npz"
  if out["train"][0].shape[1:] != out["test"][0].shape[1:]:
    raise DatasetNotFoundError(
        f"{d}: train images are {list(out['train'][0].shape[1:])} but test images are "
        f"{list(out['test'][0].shape[1:])}")
  return out


def _has_npz(d: pathlib.Path) -> bool:
  return (d / "train.npz").is_file() and (d / "test.npz").is_file()


def _quiet_tfds():
  """tfds with its logging off (its lines would come before lqjax's one line)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import logging as pylogging

  from absl import logging
  logging.set_verbosity(logging.ERROR)
  import tensorflow_datasets as tfds  # heavy import, only on this path
  pylogging.getLogger("tensorflow_datasets").setLevel(pylogging.ERROR)
  return tfds


def _from_tfds(name: str, dest: pathlib.Path):
  """Reads `name` through tfds: from ``$TFDS_DATA_DIR`` when set, else from the cache's
  ``tfds/`` folder; it downloads (into that folder) only with ``LQJAX_TFDS_DOWNLOAD=1``."""
  tfds = _quiet_tfds()
  tfds_dir = os.environ.get("TFDS_DATA_DIR") or str(cache_dir() / "tfds")
  download = os.environ.get("LQJAX_TFDS_DOWNLOAD") == "1"
  out = {}
  spec = DATASET_SPECS[name]
  for split, tfds_split in (("train", "train"), ("test", spec.tfds_test_split)):
    src = tfds.data_source(spec.tfds_name, split=tfds_split, data_dir=tfds_dir,
                           download=download)
    images, labels = [], []
    for ex in src:
      img = np.asarray(ex["image"])
      if spec.resize:
        from lqlab import importers
        img = importers.resize_center_crop(img, spec.resize)
      images.append(img if img.ndim == 3 else img[..., None])
      labels.append(int(ex["label"]))
    out[split] = (np.stack(images).astype(np.uint8), np.asarray(labels, np.int32))
  for split, (image, label) in out.items():
    files.write_npz_atomic(dest / f"{split}.npz", image=image, label=label)
  out["source"] = f"tfds {spec.tfds_name}"
  return out


def load_arrays(name: str, data_dir: Optional[str] = None):
  """Host arrays {"train": (image, label), "test": (image, label)} for `name`."""
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
  ddir = resolve_data_dir(data_dir)
  looked = []
  if ddir is not None:
    looked.append(str(ddir / name))
    if _has_npz(ddir / name):
      return _read_npz_dir(ddir / name)
  cached = cache_dir() / name
  looked.append(str(cached))
  if _has_npz(cached):
    return _read_npz_dir(cached)
  if ddir is not None:
    from lqlab import importers
    for cand in (name,) + DATASET_SPECS[name].aliases:
      src = ddir / cand
      if src.is_dir() and importers.detect(src) is not None:
        importers.import_dataset(src, cached, image_size=DATASET_SPECS[name].resize)
        return _read_npz_dir(cached)
  try:
    return _from_tfds(name, cached)
  except Exception as e:  # tfds raises many kinds: not installed, no network, not prepared
    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
  raise DatasetNotFoundError(
      f"dataset {name!r} not found: looked for train.npz/test.npz in {', '.join(looked)}"
      f"{' and importable files in ' + str(ddir) if ddir else ''}; tfds failed ({reason}). "
      f"Set --data_dir or LQJAX_DATA_DIR to a folder with {name}/train.npz and test.npz, "
      f"or convert files you have with scripts/import_dataset.py")


def split_train_val(image: np.ndarray, label: np.ndarray, fraction: float = VAL_FRACTION):
  """Fixed-seed split of the training data into (train, val)."""
  perm = np.random.default_rng(VAL_SEED).permutation(len(label))
  n_val = int(round(fraction * len(label)))
  val, tr = perm[:n_val], perm[n_val:]
  return (image[tr], label[tr]), (image[val], label[val])


def load(name: str, data_dir: Optional[str] = None, *, limit: Optional[int] = None,
         sharding=None, place_train=None) -> Dataset:
  """Loads `name` onto the device (replicated over `sharding`'s devices).

  Args:
    name: one of :data:`DATASETS`.
    data_dir: overrides ``$LQJAX_DATA_DIR``.
    limit: keep only the first `limit` examples of each split (smoke tests).
    sharding: where the arrays live; default: the default device.
    place_train: ``fn(host array) -> device array`` for the training split's arrays
      instead of `sharding` (each process's shard of a multi-process run); the arrays
      may be padded past the examples (``len(split)`` counts the examples).
  """
  arrays = load_arrays(name, data_dir)
  shape = tuple(arrays["train"][0].shape[1:])
  if shape != image_shape(name):
    raise DatasetNotFoundError(f"dataset {name!r} has images of shape {list(shape)}; its models "
                               f"expect {list(image_shape(name))}")
  (tr_x, tr_y), (va_x, va_y) = split_train_val(*arrays["train"])
  te_x, te_y = arrays["test"]
  if limit is not None:
    tr_x, tr_y, va_x, va_y, te_x, te_y = (a[:limit] for a in (tr_x, tr_y, va_x, va_y, te_x, te_y))
  check_learnable(arrays.get("source", name), tr_x, tr_y)
  flat = tr_x.reshape(-1, tr_x.shape[-1]).astype(np.float64) / 255.0
  mean, std = tuple(flat.mean(0).tolist()), tuple(flat.std(0).tolist())
  num_classes = int(max(tr_y.max(), te_y.max())) + 1
  named = arrays.get("num_classes")
  if named is not None:
    if num_classes > named:
      raise DatasetNotFoundError(f"dataset {name!r}: a label is {num_classes - 1} but the files "
                                 f"name only {named} classes")
    num_classes = named

  def put(x):
    return jax.device_put(x, sharding) if sharding is not None else jnp.asarray(x)

  train = Split(put(tr_x), put(tr_y)) if place_train is None else \
      Split(place_train(tr_x), place_train(tr_y), n=len(tr_y))
  return Dataset(name, train, Split(put(va_x), put(va_y)),
                 Split(put(te_x), put(te_y)), num_classes, mean, std)


def on_host(ds: Dataset) -> Dataset:
  """`ds`'s validation and test splits as host numpy arrays, and no training examples:
  for the work one process does alone in a multi-process run (its export), where those
  replicated splits are read without a collective."""

  def host(sp):
    return Split(np.asarray(sp.image.addressable_data(0)), np.asarray(sp.label.addressable_data(0)))

  empty = Split(np.zeros((0,) + tuple(ds.train.image.shape[1:]), np.uint8), np.zeros(0, np.int32))
  return dataclasses.replace(ds, train=empty, val=host(ds.val), test=host(ds.test))


def normalize(images: jax.Array, mean, std) -> jax.Array:
  """uint8 -> float32, per-channel standardised."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def random_crop_flip(rng: jax.Array, images: jax.Array, pad: int = 4) -> jax.Array:
  """Random crop after zero padding by `pad`, and random horizontal flip (in jit)."""
  n, h, w, _ = images.shape
  k1, k2, k3 = jax.random.split(rng, 3)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = jax.random.randint(k1, (n,), 0, 2 * pad + 1)
  dx = jax.random.randint(k2, (n,), 0, 2 * pad + 1)
  crop = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (h, w, im.shape[-1])))
  out = crop(padded, dy, dx)
  flip = jax.random.bernoulli(k3, 0.5, (n,))
  return jnp.where(flip[:, None, None, None], out[:, :, ::-1, :], out)


def epoch_permutation(rng: jax.Array, epoch, n: int) -> jax.Array:
  """The shuffle order of one epoch: a function of (rng, epoch) only."""
  return jax.random.permutation(jax.random.fold_in(rng, epoch), n)

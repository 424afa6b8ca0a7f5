"""Dataset loading, importers, on-device augmentation."""

import gzip
import pathlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqlab import data, importers


def test_load_local_npz_and_val_split(tiny_data):
  ds = data.load("mnist")
  assert len(ds.train) == 180 and len(ds.val) == 20 and len(ds.test) == 50
  assert ds.train.image.dtype == jnp.uint8 and ds.train.image.shape[1:] == (28, 28, 1)
  assert ds.num_classes == 10
  # The split is fixed: same examples every time, disjoint.
  ds2 = data.load("mnist")
  np.testing.assert_array_equal(ds.val.image, ds2.val.image)


def test_missing_dataset_message(tmp_path, monkeypatch):
  monkeypatch.setenv("LQJAX_DATA_DIR", str(tmp_path / "nowhere"))
  monkeypatch.setenv("LQJAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  with pytest.raises(data.DatasetNotFoundError) as e:
    data.load_arrays("cifar10")
  msg = str(e.value)
  assert "nowhere" in msg and "LQJAX_DATA_DIR" in msg and "\n" not in msg


def test_unknown_dataset():
  with pytest.raises(ValueError, match="unknown dataset"):
    data.load_arrays("svhn")


def test_tfds_path_with_mock_data(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds
  monkeypatch.setenv("LQJAX_DATA_DIR", str(tmp_path / "empty"))
  monkeypatch.setenv("LQJAX_CACHE_DIR", str(tmp_path / "cache"))
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    arrays = data.load_arrays("mnist")
  assert arrays["train"][0].shape == (12, 28, 28, 1)
  assert arrays["train"][0].dtype == np.uint8
  # Cached in the npz format: a second load needs no tfds.
  assert (tmp_path / "cache" / "mnist" / "train.npz").is_file()
  again = data.load_arrays("mnist")
  np.testing.assert_array_equal(again["test"][0], arrays["test"][0])


def _write_idx(path, arr):
  header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_importer_roundtrip(tmp_path):
  rng = np.random.default_rng(1)
  src = tmp_path / "idx"
  src.mkdir()
  x = rng.integers(0, 256, (7, 28, 28))
  y = rng.integers(0, 10, 7)
  for pre in ("train", "t10k"):
    _write_idx(src / f"{pre}-images-idx3-ubyte.gz", x)
    _write_idx(src / f"{pre}-labels-idx1-ubyte.gz", y)
  assert importers.import_dataset(src, tmp_path / "out") == "idx"
  with np.load(tmp_path / "out" / "train.npz") as z:
    np.testing.assert_array_equal(z["image"][..., 0], x)
    np.testing.assert_array_equal(z["label"], y)


def test_cifar_importer(tmp_path):
  import pickle
  src = tmp_path / "cifar-10-batches-py"
  src.mkdir()
  rng = np.random.default_rng(2)
  first = None
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    d = {b"data": rng.integers(0, 256, (3, 3072)).astype(np.uint8), b"labels": [1, 2, 3]}
    first = first or d
    with open(src / name, "wb") as f:
      pickle.dump(d, f)
  importers.import_dataset(tmp_path, tmp_path / "out")
  with np.load(tmp_path / "out" / "train.npz") as z:
    assert z["image"].shape == (15, 32, 32, 3)
    # Channel-first rows -> HWC: pixel (0, 0) of image 0 is bytes 0, 1024, 2048.
    np.testing.assert_array_equal(z["image"][0, 0, 0], first[b"data"][0, [0, 1024, 2048]])


FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_import_real_fashion_mnist(tmp_path, monkeypatch):
  out = tmp_path / "data" / "fashion_mnist"
  assert importers.import_dataset(FASHION, out) == "idx"
  monkeypatch.setenv("LQJAX_DATA_DIR", str(tmp_path / "data"))
  arrays = data.load_arrays("fashion_mnist")
  assert arrays["train"][0].shape == (60000, 28, 28, 1)
  assert arrays["test"][0].shape == (10000, 28, 28, 1)
  assert np.bincount(arrays["test"][1]).tolist() == [1000] * 10


def test_import_real_imagenette_folder(real_data_dir, tmp_path, monkeypatch):
  src = pathlib.Path(real_data_dir) / "imagenette_64"
  if not src.is_dir():
    pytest.skip("imagenette_64 not in the data folder")
  # The loader finds the image folder under its alias and imports it into the cache.
  monkeypatch.setenv("LQJAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setenv("LQJAX_DATA_DIR", real_data_dir)
  arrays = data.load_arrays("imagenette")
  assert arrays["train"][0].shape == (9469, 64, 64, 3)
  assert arrays["test"][0].shape == (3925, 64, 64, 3)
  assert sorted(np.unique(arrays["train"][1]).tolist()) == list(range(10))
  assert (tmp_path / "cache" / "imagenette" / "test.npz").is_file()


def test_import_script_bad_source(tmp_path, capsys):
  import runpy
  import sys
  sys_argv = sys.argv
  sys.argv = ["import_dataset.py", str(tmp_path), str(tmp_path / "out")]
  try:
    with pytest.raises(SystemExit) as e:
      runpy.run_path(str(pathlib.Path(__file__).parent.parent / "scripts" / "import_dataset.py"),
                     run_name="__main__")
  finally:
    sys.argv = sys_argv
  assert e.value.code == 2
  assert "error:" in capsys.readouterr().err


def test_random_crop_flip_properties():
  imgs = jnp.arange(2 * 8 * 8 * 1, dtype=jnp.uint8).reshape(2, 8, 8, 1)
  out = data.random_crop_flip(jax.random.key(0), imgs, pad=2)
  assert out.shape == imgs.shape and out.dtype == imgs.dtype
  # pad=0 leaves only flips: each image equals itself or its mirror.
  out0 = data.random_crop_flip(jax.random.key(1), imgs, pad=0)
  for a, b in zip(out0, imgs):
    assert bool(jnp.all(a == b)) or bool(jnp.all(a == b[:, ::-1]))


def test_epoch_permutation_deterministic():
  k = jax.random.key(3)
  p1, p2 = data.epoch_permutation(k, 4, 100), data.epoch_permutation(k, 4, 100)
  np.testing.assert_array_equal(p1, p2)
  assert sorted(np.asarray(p1).tolist()) == list(range(100))
  assert not np.array_equal(p1, data.epoch_permutation(k, 5, 100))

import os
import pathlib

import pytest


def data_dir(needs: str = "mnist/train.npz"):
  """LQJAX_DATA_DIR when it holds `needs`; with LQJAX_REQUIRE_DATA=1 (CI) a missing folder
  fails instead of skipping."""
  d = os.environ.get("LQJAX_DATA_DIR")
  if d and (pathlib.Path(d) / needs).is_file():
    return d
  if os.environ.get("LQJAX_REQUIRE_DATA") == "1":
    pytest.fail(f"LQJAX_REQUIRE_DATA=1 but LQJAX_DATA_DIR={d!r} has no {needs}")
  pytest.skip("real data not available (set LQJAX_DATA_DIR)")


@pytest.fixture
def real_data_dir():
  return data_dir()


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """An empty per-user cache, so tests never touch ~/.cache."""
  c = tmp_path / "cache"
  monkeypatch.setenv("LQJAX_CACHE_DIR", str(c))
  return c


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
  """A folder with tiny random mnist/cifar10/imagenette npz datasets; LQJAX_DATA_DIR points at it."""
  import numpy as np
  d = tmp_path / "data"
  rng = np.random.default_rng(0)
  for name, shape in (("mnist", (28, 28, 1)), ("fashion_mnist", (28, 28, 1)),
                      ("cifar10", (32, 32, 3)), ("imagenette", (64, 64, 3))):
    (d / name).mkdir(parents=True)
    for split, n in (("train", 200), ("test", 50)):
      np.savez_compressed(d / name / f"{split}.npz",
                          image=rng.integers(0, 256, (n,) + shape, dtype=np.uint8),
                          label=(np.arange(n) % 10).astype(np.uint8))
  monkeypatch.setenv("LQJAX_DATA_DIR", str(d))
  monkeypatch.setenv("LQJAX_CACHE_DIR", str(tmp_path / "cache"))
  return d

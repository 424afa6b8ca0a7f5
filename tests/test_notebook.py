"""The Colab notebook executes on CPU with tiny settings, so it cannot rot."""

import pathlib

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NB = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "colab.ipynb"


def test_colab_notebook_runs(tiny_data, tmp_path, monkeypatch):
  monkeypatch.setenv("LQJAX_NB_EPOCHS", "1")
  monkeypatch.setenv("LQJAX_NB_LIMIT", "100")
  monkeypatch.setenv("LQJAX_NB_BATCH", "16")
  monkeypatch.setenv("LQJAX_NB_WORKDIR", str(tmp_path))
  nb = nbformat.read(NB, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
  assert "test_accuracy" in outputs and "cpu" in outputs
  assert (tmp_path / "cifar10_resnet20" / "results.json").is_file()

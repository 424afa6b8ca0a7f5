"""The Colab notebook executes on CPU with tiny settings, so it cannot rot."""

import json
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
  outputs = [o for c in nb.cells for o in c.get("outputs", [])]
  text = "".join(o.get("text", "") for o in outputs)
  results = json.loads((tmp_path / "cifar10_resnet20" / "results.json").read_text())
  # the printed summary is the run's record, and the metrics plot was drawn
  for k in ("test_accuracy", "avg_bits", "train_seconds", "devices"):
    assert f"{k!r}: {results[k]!r}" in text, (k, text[-2000:])
  assert results["epochs"] == 1 and results["config"]["limit"] == 100
  assert any("image/png" in o.get("data", {}) for o in outputs)

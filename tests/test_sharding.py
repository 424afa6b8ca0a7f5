"""Scales follow their weights' sharding (Linen nn.with_partitioning and logical rules, NNX
sharding metadata with a vmapped stack), on 8 host devices in a process of their own
(tests/_sharding_worker.py): meshes 2 x 4 (data x model) and 8 x 1."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _checks(api):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  r = subprocess.run([sys.executable, str(ROOT / "tests" / "_sharding_worker.py"), api],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
  return {(row["check"], tuple(row.get("mesh", ()))): row for row in rows}


def _agree(row):
  """Sharded against the same values replicated on one device: the loss and every gradient
  (LSQ's scale sums, the ratio rule's norms) within float tolerance, the accounting and the
  packed file's bytes identical, and a reload placed as the model is."""
  assert row["loss_diff"] < 1e-5 and row["grad_diff"] < 1e-5, row
  assert row["bits"] == row["ref_bits"] and row["same_bytes"], row
  assert row["loaded_equal"] and row["loaded_spec"] == row["scale_spec"], row


def test_linen_scales_follow_partitioning():
  c = _checks("linen")
  # fc1 kernel ("data", "model"), row scale (1, 32): the kept output axis keeps "model";
  # fc2 ("model", None) with block-8 scales (4, 16): blocks are unsharded; head: none
  assert c[("linen_specs", ())]["fc1"] == [None, "model"]
  assert c[("linen_specs", ())]["fc2"] == [None, None]
  assert c[("linen_specs", ())]["head"] == []
  for mesh in ((2, 4), (8, 1)):
    row = c[("linen_agreement", mesh)]
    _agree(row)
    assert row["scale_spec"] == [None, "model"]
    assert row["placed_spec"] == ["data", "model"]  # load(shardings=...) without a target
  # logical names ("embed", "mlp") under rules embed->data, mlp->model
  assert c[("linen_logical", ())] == {"check": "linen_logical", "fc1": [None, "mlp"],
                                      "mesh_spec": [None, "model"]}


def test_nnx_scales_follow_sharding_metadata_of_a_stack():
  c = _checks("nnx")
  for mesh in ((2, 4), (8, 1)):
    row = c[("nnx_agreement", mesh)]
    _agree(row)
    # stacked kernels (layers, in, out): fc ("data", "model"), proj ("model", "data");
    # their row scales (layers, 1, out) keep the stack axis and the output axis's name
    assert row["fc"] == [None, None, "model"] and row["proj"] == [None, None, "data"]
    assert row["scale_spec"] == [None, None, "model"]
  err = c[("nnx_outside_mesh", ())]["error"]
  assert err is not None and "\n" not in err and "inside the mesh it was made in" in err


if __name__ == "__main__":  # pragma: no cover
  sys.exit(pytest.main([__file__, "-q"]))

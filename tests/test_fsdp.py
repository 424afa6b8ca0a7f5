"""FSDP over a data x fsdp mesh of host devices (benchmarks/bench_fsdp.py, tiny settings):
the train state's bytes per device and the compiled step's argument bytes fall as 1/n,
and every step's loss equals the data-parallel run's within float tolerance."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_fsdp_divides_the_state_and_keeps_the_losses(tiny_data, tmp_path):
  out = tmp_path / "fsdp.json"
  env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="")
  env.pop("XLA_FLAGS")
  r = subprocess.run([sys.executable, "benchmarks/run.py", "fsdp", "--devices=4",
                      "--dataset=mnist", "--model=lenet300", "--batch_size=16", "--limit=200",
                      "--steps=6", f"--out={out}"], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = {row["fsdp"]: row for row in json.loads(out.read_text())["rows"]}
  assert sorted(rows) == [1, 2, 4]
  for n in (2, 4):
    # LeNet-300-100's kernels and biases all divide by 4 but the last bias (10) and the
    # per-tensor scales, which stay replicated
    assert 0.95 * n <= rows[n]["state_bytes_ratio"] <= n, rows[n]
    arg = rows[1]["argument_bytes_per_device"] / rows[n]["argument_bytes_per_device"]
    assert 0.9 * n <= arg <= n, (n, arg)
    assert rows[n]["max_rel_loss_diff"] < 1e-5, rows[n]
    assert rows[n]["sharded_leaves"] > 0
  assert rows[1]["sharded_leaves"] == 0

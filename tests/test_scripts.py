"""The sweep driver's expansion and the report generator, on a fabricated runs folder,
and the shipped sweep configs against their entry points' flags."""

import functools
import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lqlab.results import cli, plots, records, sections

ROOT = pathlib.Path(__file__).resolve().parent.parent


@functools.cache
def _load(name):
  """The script or benchmark `name` as a module, loaded once (its absl flags are global)."""
  folder = "benchmarks" if name.startswith("bench") else "scripts"
  if str(ROOT / folder) not in sys.path:  # the benchmarks import benchmarks/bench.py
    sys.path.insert(0, str(ROOT / folder))
  spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_sweep_expand_and_argv():
  sweep = _load("sweep")
  cfg = {"variants": {"a": {"rule": "lsq"}, "b": {"float": True}},
         "grid": {"threshold": [0.1, 0.2]}, "base": {"epochs": 2, "progress": False},
         "seeds": [0, 1]}
  runs = list(sweep.expand(cfg))
  assert len(runs) == 2 * 2 * 2
  names = [n for n, _ in runs]
  assert "a_threshold0.1_s0" in names and "b_threshold0.2_s1" in names
  flags = dict(runs[0][1])
  assert flags["epochs"] == 2 and flags["rule"] == "lsq" and flags["seed"] == 0
  cfg["variants"]["a"] = {"rule": "lsq", "seeds": [0, 1, 2, 3]}  # its own seeds
  runs = dict(sweep.expand(cfg))
  assert len(runs) == 2 * 4 + 2 * 2 and "a_threshold0.2_s3" in runs and "b_threshold0.2_s3" not in runs
  assert "seeds" not in runs["a_threshold0.2_s3"] and runs["a_threshold0.2_s3"]["seed"] == 3
  argv = sweep.to_argv({"float": True, "progress": False, "lr": 0.1})
  assert argv == ["--float", "--noprogress", "--lr=0.1"]


def test_report_tables(tmp_path):
  sweep_dir = tmp_path / "results" / "demo"
  rows = []
  for seed, acc, bits in ((0, 0.9, 2.0), (1, 0.8, 4.0)):
    run = sweep_dir / f"v_s{seed}"
    run.mkdir(parents=True)
    metrics = [{"epoch": e, "avg_bits": b, "val_accuracy": a}
               for e, b, a in ((1, 8.0, 0.5), (2, 4.0, 0.7), (3, bits, acc), (4, bits, acc))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    rows.append({"run": run.name, "epochs": 4, "test_accuracy": acc, "avg_bits": bits,
                 "packed_bytes": 100, "compression_ratio": 10.0, "entropy_coded_ratio": 20.0,
                 "train_seconds": 5.0, "command": f"python -m x --seed={seed}"})
  (sweep_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = tmp_path / "R.md"
  assert cli.main(["--results_dir", str(tmp_path / "results"), "--out", str(out)]) == 0
  text = out.read_text()
  assert "| v | 2 | 4 | 0.8500 ± 0.0707 | 3.00 ± 1.41 |" in text
  # Convergence: last 20% of 4 epochs is one epoch: no change; final == best.
  assert "| v_s0 | 4 | 0.0% | 0.9000 | 0.9000 | +0.00 |" in text
  assert "`python -m x --seed=0`" in text


def _row(run, sweep, acc, ratio, scheme="scale-rule", rule="lsq", ecr=None, threshold=0.2,
         bits=None, lr=1e-3):
  return {"run": run, "sweep": sweep, "dataset": "mnist", "model": "lenet300", "epochs": 10,
          "test_accuracy": acc, "val_accuracy": acc, "avg_bits": bits or 32 / ratio,
          "compression_ratio": ratio, "entropy_coded_ratio": ecr or ratio, "packed_bytes": 1,
          "train_seconds": 1.0, "scheme": scheme, "rule": rule, "threshold": threshold,
          "config": {"rule": rule, "scale_stop": "val" if rule == "ratio" else None, "lr": lr},
          "quantized_bits_per_layer": {"fc1/kernel": 2.0, "fc1/bias": 9.0, "conv1/kernel": 4.0}}


def test_report_summary_targets_and_threshold_ranges(tmp_path):
  rows = [_row("fp32_s0", "base", 0.980, 1.0, scheme="float", rule=None),
          _row("fp32_s1", "base", 0.982, 1.0, scheme="float", rule=None),
          _row("lsq_s0", "base", 0.979, 15.0),        # 0.2 points below FP32's 0.981: counts
          _row("big_s0", "base", 0.970, 30.0, ecr=45.0),  # 1.1 points below: does not
          _row("ratio_s0", "threshold_x", 0.9785, 12.0, rule="ratio", ecr=41.0, threshold=0.3),
          _row("combo_s0", "combo", 0.980, 12.0, scheme="penalty", rule="ratio"),
          _row("qwix_s0", "peers", 0.981, None, scheme="qwix", rule="qwix_int4", bits=4)]
  rows[-1].update(compression_ratio=None, packed_bytes=None, nominal_bytes=7,
                  compression_ratio_nominal=8.0)
  text = "\n".join(sections.dataset_summary(rows, tmp_path / "plots"))
  assert "| qwix QAT | peers / qwix | 1 | 0.9810 | 4.00 | 7 \\* | 8.0 |" in text
  assert "| stable ratio | threshold_x / ratio |" in text
  assert "| ratio + penalty (A+B) | combo / combo | 1 | 0.9800 |" in text
  assert (tmp_path / "plots" / "pareto_mnist_lenet300_e10.png").stat().st_size > 1000
  targets = "\n".join(sections.targets_section(rows))
  # Packed 16x within 0.3 points: lsq at 15x is the best -> 93.8%; entropy-coded 40x:
  # ratio at 41x is 0.25 points below 0.981 -> reached; the 45x run is too inaccurate.
  assert "| base / lsq | 10 | 0.9790 (0.9810) | 15.00x | 93.8% of the target |" in targets
  assert "| threshold_x / ratio | 10 | 0.9785 (0.9810) | 41.00x | reached |" in targets
  assert "no FP32 run on any schedule yet" in targets  # lenet5, resnet20
  vs = "\n".join(sections.versus_lsq_section(rows))
  # lsq at 15x: ratio_s0 (12x) is more than 5% larger, so no candidate.
  assert "| mnist / lenet300 | 10 | 0.001 | base / lsq | 0.9790 | 15.0x | - |" in vs
  # a small, accurate ratio run trained with another weights' lr is no candidate
  rows.append(_row("ratio3_s0", "threshold_x", 0.9850, 15.0, rule="ratio", threshold=0.4,
                   lr=3e-3))
  rows.append(_row("ratio2_s0", "threshold_x", 0.9795, 14.5, rule="ratio", threshold=0.4))
  # the candidate is chosen on validation: a better test accuracy with a worse
  # validation accuracy is not picked
  rows.append({**_row("ratio4_s0", "threshold_x", 0.9900, 15.0, rule="ratio", threshold=0.5),
               "val_accuracy": 0.9700})
  vs = "\n".join(sections.versus_lsq_section(rows))
  assert "| threshold_x / ratio2 | 0.9795 | 14.5x | +0.05 | ratio wins |" in vs
  del rows[-3:]
  lam = "\n".join(sections.threshold_section(rows))
  assert "| 0.3 | 1 | 0.9785 | 0.9785 | 2.67 | 2.00 | 4.00 |" in lam


def test_qwix_nominal_bytes_hand_value():
  import numpy as np
  qwix_ref = _load("qwix_reference")
  params = {"fc": {"kernel": np.zeros((6, 4)), "bias": np.zeros(4)},
            "conv": {"kernel": np.zeros((3, 3, 2, 5))}}
  # fc: 24 weights * 4 bits = 12 B + 4 scales * 4 B; bias 16 B; conv: 90 * 4 bits = 45 B + 20 B.
  assert qwix_ref.nominal_bytes(params, 4) == 12 + 16 + 16 + 45 + 20


def test_qwix_static_range_is_the_running_mean_of_the_absmax_kept_in_batch_stats():
  import flax.linen as nn
  qwix = pytest.importorskip("qwix")
  qwix_ref = _load("qwix_reference")

  class Dense(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(3, use_bias=False)(x)  # qwix tells weights from inputs by shape

  rule = qwix.QtRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=jnp.int8,
                     act_static_scale=True)
  model = qwix.quantize_model(Dense(), qwix_ref.static_provider([rule]))
  x1, x2 = jnp.array([[1.0, -2.0], [0.5, 0.25]]), jnp.array([[4.0, 0.0], [0.0, -1.0]])
  v = model.init(jax.random.key(0), x1)
  assert set(v) == {"params", "batch_stats"}  # nothing in a collection the loop drops
  for x in (x1, x2):  # two training steps
    _, new = model.apply(v, x, train=True, mutable=["batch_stats"])
    v = {**v, **new}
  (stat,) = v["batch_stats"]["Dense_0"].values()
  leaves = {k: float(np.asarray(a).ravel()[0]) for k, a in stat.items()}
  # Per example absmax, meaned over the batch: x1 (2 + 0.5) / 2, x2 (4 + 1) / 2; summed.
  assert leaves == {"count": 2.0, "sum_of_absmax": 3.75}
  # Evaluation (not mutable) uses the mean 1.875 and leaves it alone; qwix's int8 grid
  # is absmax / 128 with codes in [-128, 127]: 3 clips to 127 steps, 0.5 -> 34 steps.
  v["params"] = {"Dense_0": {"kernel": jnp.eye(2, 3)}}
  y = model.apply(v, jnp.array([[3.0, 0.5]]))
  np.testing.assert_allclose(np.asarray(y), [[127 * 1.875 / 128, 34 * 1.875 / 128, 0]],
                             rtol=1e-4)  # qwix rounds its scale slightly (1.5e-5)


def test_qwix_reference_runs_on_tiny_data(tmp_path, tiny_data, cache):
  import subprocess
  import sys
  env = {"LQJAX_DATA_DIR": str(tiny_data), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
  wd = tmp_path / "int8_s0"
  r = subprocess.run([sys.executable, "-m", "scripts.qwix_reference", "--bits=8", "--epochs=1",
                      "--noprogress", "--qwix_act=dynamic", f"--workdir={wd}"],
                     capture_output=True, text=True, env=env, cwd=ROOT)
  assert r.returncode == 0, r.stderr
  res = json.loads((wd / "results.json").read_text())
  assert res["scheme"] == "qwix" and res["rule"] == "qwix_int8" and res["avg_bits"] == 8
  assert res["qwix_act"] == "dynamic"
  r = subprocess.run([sys.executable, "-m", "scripts.qwix_reference", "--bits=8", "--epochs=1",
                      "--noprogress", "--qwix_act=static", f"--workdir={tmp_path}/s"],
                     capture_output=True, text=True, env=env, cwd=ROOT)
  assert r.returncode == 0, r.stderr
  static = json.loads((tmp_path / "s" / "results.json").read_text())
  assert static["qwix_act"] == "static" and 0 <= static["test_accuracy"] <= 1
  r = subprocess.run([sys.executable, "-m", "scripts.qwix_reference", "--bits=8",
                      "--qwix_act=stat", f"--workdir={tmp_path}/t"], capture_output=True,
                     text=True, env=env, cwd=ROOT)
  assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--qwix_act 'stat'" in r.stderr
  assert res["fp32_bytes"] / 4.2 < res["nominal_bytes"] < res["fp32_bytes"] / 3.5
  r = subprocess.run([sys.executable, "-m", "scripts.qwix_reference", "--bits=3",
                      f"--workdir={tmp_path}/x"], capture_output=True, text=True, env=env, cwd=ROOT)
  assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--bits must be one of" in r.stderr


def test_report_tuning_picks_fewest_bits_above_the_val_bar():
  sweep = "tune_default_lenet300"
  rows = [_row("a_s0", sweep, 0.985, 8.0), _row("a_s1", sweep, 0.983, 8.0),    # 4 bits, ok
          _row("b_s0", sweep, 0.981, 16.0), _row("b_s1", sweep, 0.978, 16.0),  # 2 bits, 0.9795
          _row("c_s0", sweep, 0.990, 4.0)]                                     # 8 bits, ok
  text = "\n".join(sections.tuning_section(rows))
  assert "Chosen: **a**" in text and "| b | 2 | 0.9795 ± 0.0021 | 2.00 ± 0.00 |  |" in text


def test_bench_round_robin_interleaves_and_ratios_pair_rounds():
  bench = _load("bench")
  calls = []
  times = bench.round_robin([lambda: calls.append("a"), lambda: calls.append("b")], 3,
                            lambda _: None)
  assert calls == ["a", "b"] * 3
  assert [len(t) for t in times] == [3, 3]
  # per-round ratios 2, 4, 1 -> median 2 (not 7/3, the ratio of the medians)
  assert bench.median_ratio([2.0, 8.0, 1.0], [1.0, 2.0, 1.0]) == 2.0


def test_bench_counts_the_kernels_of_a_compiled_step():
  import jax
  import jax.numpy as jnp
  bench = _load("bench")
  x = jnp.ones((64, 64))
  one = jax.jit(lambda x: x * 2).lower(x).compile().as_text()
  more = jax.jit(lambda x: (jnp.sum(x @ x, 0), jnp.cumsum(x, 1) @ x)).lower(x).compile().as_text()
  assert bench.count_kernels(one) == 1
  assert bench.count_kernels(more) > 2


def test_bench_bytes_accessed_counts_inputs_and_outputs():
  import jax
  import jax.numpy as jnp
  bench = _load("bench")
  x = jnp.ones((1000,), jnp.float32)
  # x * 2 reads 4000 B and writes 4000 B; a sum reads x once and writes next to nothing
  # (XLA may count a partial-sum stage, so only bounds)
  assert bench.bytes_accessed(jax.jit(lambda x: x * 2).lower(x).compile()) == 8000
  assert 4004 <= bench.bytes_accessed(jax.jit(jnp.sum).lower(x).compile()) < 6000


def test_sweep_only_takes_comma_separated_names(tmp_path, capsys):
  sweep = _load("sweep")
  cfg = tmp_path / "c.json"
  cfg.write_text(json.dumps({"name": "x", "module": "experiments.mnist", "base": {},
                             "variants": {"fp32": {"float": True}, "lsq_2bit": {"bits": 2},
                                          "ratio": {}}, "seeds": [0, 1]}))
  assert sweep.main(["--config", str(cfg), "--runs_dir", str(tmp_path), "--dry_run",
                     "--only", "fp32,lsq_"]) == 0
  listed = [l.split("--workdir=")[1] for l in capsys.readouterr().out.splitlines() if "--workdir" in l]
  assert sorted(pathlib.Path(p).name for p in listed) == [
      "fp32_s0", "fp32_s1", "lsq_2bit_s0", "lsq_2bit_s1"]


def test_sweep_record_keeps_runs_lost_from_runs_dir_and_takes_remade_ones(tmp_path):
  sweep = _load("sweep")
  runs, record = tmp_path / "runs" / "x", tmp_path / "results" / "x"
  record.mkdir(parents=True)
  old = [{"run": "a_s0", "test_accuracy": 0.5, "command": "old a"},
         {"run": "b_s0", "test_accuracy": 0.6, "command": "old b"}]
  (record / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
  for name, acc in (("a_s0", 0.7), ("c_s0", 0.8)):  # a made again, c new; b's workdir is gone
    (runs / name).mkdir(parents=True)
    (runs / name / "results.json").write_text(json.dumps({"test_accuracy": acc}))
    (runs / name / "command.txt").write_text(f"new {name}\n")
    (runs / name / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
  (runs / "d_s0").mkdir()  # unfinished: no results.json
  rows = sweep.collect(runs, record)
  got = {r["run"]: (r["test_accuracy"], r["command"]) for r in rows}
  assert got == {"a_s0": (0.7, "new a_s0"), "b_s0": (0.6, "old b"), "c_s0": (0.8, "new c_s0")}
  kept = [json.loads(x) for x in (record / "results.jsonl").read_text().splitlines()]
  assert [r["run"] for r in kept] == ["a_s0", "b_s0", "c_s0"]
  assert (record / "c_s0" / "metrics.jsonl").read_text() == json.dumps({"epoch": 1}) + "\n"
  assert not (record / "d_s0").exists()


def test_report_names_configured_sweeps_without_a_record(tmp_path):
  for name in ("a", "b", "c"):
    (tmp_path / f"{name}.json").write_text(json.dumps({"name": f"sweep_{name}"}))
  assert records.unrecorded_sweeps(tmp_path, {"sweep_b", "other"}) == ["sweep_a", "sweep_c"]


def test_compare_reports_flags_a_changed_accuracy_not_a_changed_file_size():
  cmp = _load("compare_reports")
  head = ("# Per sweep\n\n## demo\n\n| variant | seeds | epochs | test accuracy | avg bits | "
          "packed bytes | ratio | entropy-coded ratio | train s |\n"
          "|---|---|---|---|---|---|---|---|---|\n")
  conv = "\n| v_s0 | 4 | 0.0% | 0.9000 | 0.9000 | +0.00 | - |\n"
  row = "| v | 2 | 4 | 0.8500 ± 0.0707 | 3.00 ± 1.41 | {} ± 0 | 10.0 ± 0.0 | - | {} |"
  old = head + row.format(100, 5) + conv
  same = head + row.format(160, 9) + conv
  assert cmp.compare(old, same) == (2, [], [], [60.0])
  changed = old.replace("0.8500", "0.8600")
  compared, diffs, _, _ = cmp.compare(old, changed)
  assert compared == 2 and len(diffs) == 1 and "demo/v" in diffs[0]
  moved = old.replace("| v_s0 | 4 | 0.0% | 0.9000 |", "| v_s0 | 4 | 0.0% | 0.8900 |")
  assert len(cmp.compare(old, moved)[1]) == 1
  extra = old + "| v_s1 | 4 | 0.0% | 0.8000 | 0.8000 | +0.00 | - |\n"
  assert cmp.compare(old, extra)[2] == ["demo/v_s1"]
  no_file = old.replace("| 100 ± 0 |", "| - |")
  assert cmp.compare(no_file, no_file) == (2, [], [], [])


def test_report_tuning_of_fp32_picks_the_best_val_accuracy():
  sweep = "tune_lr_fp32_lenet300"
  rows = [_row("fp32_lr0.001_s0", sweep, 0.980, 1.0), _row("fp32_lr0.001_s1", sweep, 0.982, 1.0),
          _row("fp32_lr0.003_s0", sweep, 0.983, 1.0), _row("fp32_lr0.003_s1", sweep, 0.9826, 1.0)]
  text = "\n".join(sections.tuning_section(rows))
  assert "best mean validation accuracy" in text and "Chosen: **fp32_lr0.003**" in text


def test_bench_cost_line_only_for_models_over_the_limit():
  bench = _load("bench")
  rows = [{"model": "a", "rule": "float", "granularity": "-", "step_s": 2e-3,
           "step_time_ratio": 1.0, "kernels": 60},
          {"model": "a", "rule": "ratio", "granularity": "row", "step_s": 2.5e-3,
           "step_time_ratio": 1.2, "kernels": 100},
          {"model": "b", "rule": "float", "granularity": "-", "step_s": 1.0,
           "step_time_ratio": 1.0, "kernels": 700},
          {"model": "b", "rule": "lsq", "granularity": "channel", "step_s": 1.05,
           "step_time_ratio": 1.05, "kernels": 800}]
  lines = bench.cost_lines(rows)
  # (1.2 - 1) x 2 ms = 0.4 ms over 40 extra kernels = 10 us each; b is within 1.10
  assert lines == ["a: the slowest rule (ratio/row) runs 100 kernels per step against float's 60; "
                   "its extra 0.40 ms is 10 us per extra kernel."]
  rows[0]["bytes_accessed"], rows[1]["bytes_accessed"] = 16.9e6, 25.2e6
  assert bench.cost_lines(rows)[0].endswith(
      "10 us per extra kernel. It also moves 25.2 MB per step against 16.9 MB.")
  # the float control row is no rule: even when it measures slowest it is not named
  rows.insert(2, {"model": "a", "rule": "float", "granularity": bench.CONTROL, "step_s": 2.8e-3,
                  "step_time_ratio": 1.4, "kernels": 60})
  assert bench.cost_lines(rows)[0].startswith("a: the slowest rule (ratio/row) runs 100 kernels")


def test_bench_readme_names_the_control_row_as_noise_not_the_worst_ratio():
  bench = _load("bench")
  row = lambda rule, gran, ratio: {"model": "lenet5", "rule": rule, "granularity": gran,
                                   "step_s": 0.001 * ratio, "step_time_ratio": ratio,
                                   "data_pipeline_ratio": 1.0, "kernels": 3, "date": "2026-01-01"}
  doc = {"machine": "x86_64, 2 cores", "backend": "cpu", "date": "2026-01-01", "jax": "0",
         "rows": [row("float", "-", 1.0), row("lsq", "channel", 1.05),
                  row("float", bench.CONTROL, 1.08)]}
  text = bench.readme_section(doc)
  assert "Worst quantized/float ratio with the scales updated every step: lenet5 1.050." in text
  assert "(rows float / repeat) comes out at lenet5 1.080 of the first: ratios" in text


def test_report_targets_name_the_closest_run_when_none_is_within_tolerance():
  rows = [_row("fp32_s0", "b", 0.855, 1.0, scheme="float", rule=None),
          _row("q_s0", "b", 0.8408, 8.6, rule="ratio"), _row("p_s0", "b", 0.80, 12.0, rule="ratio")]
  for r in rows:
    r.update(dataset="cifar10", model="resnet20")
  text = "\n".join(sections.targets_section(rows))
  assert "| b / q | 10 | 0.8408 (0.8550) | 8.60x | none within the tolerance: the most accurate " \
         "is 1.42 points below FP32 |" in text


def test_report_targets_say_where_the_named_run_was_made():
  rows = [_row("fp32_s0", "b", 0.855, 1.0, scheme="float", rule=None),
          _row("q_s0", "b", 0.850, 7.6, rule="ratio")]
  rows[1]["platform"] = "gpu"
  for r in rows:
    r.update(dataset="cifar10", model="resnet20")
  assert "| b / q (made on gpu) | 10 | 0.8500 (0.8550) | 7.60x |" in "\n".join(
      sections.targets_section(rows))


def test_shipped_sweep_configs_name_only_real_flags():
  """Every flag a shipped sweep passes is one its entry point defines (a typo would
  otherwise surface hours into a sweep, as an absl error in one run's log)."""
  sweep = _load("sweep")
  configs = {p.name: json.loads(p.read_text()) for p in sorted((ROOT / "sweeps").glob("*.json"))}
  assert configs
  known = {}
  for module in sorted({c["module"] for c in configs.values()}):
    out = subprocess.run([sys.executable, "-m", module, "--helpfull"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300).stdout
    known[module] = set(re.findall(r"^\s+--(?:\[no\])?(\w+):", out, re.M))
    assert {"seed", "workdir"} <= known[module], module
  for name, cfg in configs.items():
    for run, flags in sweep.expand(cfg):
      unknown = set(flags) - known[cfg["module"]]
      assert not unknown, f"{name} / {run}: {cfg['module']} has no flag(s) {sorted(unknown)}"


def test_bench_renders_a_gpu_json_into_its_own_readme_markers(tmp_path):
  bench = _load("bench")
  readme = tmp_path / "README.md"
  readme.write_text("<!-- bench:begin -->\nCPU\n<!-- bench:end -->\n"
                    "<!-- bench-gpu:begin -->\n<!-- bench-gpu:end -->\n")
  row = {"model": "lenet5", "rule": "float", "granularity": "-", "step_s": 0.001,
         "step_time_ratio": 1.0, "data_pipeline_ratio": 1.0, "kernels": 3, "date": "2026-01-01"}
  doc = {"machine": "x86_64, 16 cores", "backend": "gpu", "device_kind": "NVIDIA H200",
         "date": "2026-01-01", "jax": "0.0", "rows": [row, {**row, "rule": "ratio",
                                                            "step_time_ratio": 1.05}]}
  js = tmp_path / "bench_gpu.json"
  js.write_text(json.dumps(doc))
  assert bench.main(["--from_json", str(js), "--readme", str(readme)]) == 0
  text = readme.read_text()
  assert "CPU\n<!-- bench:end -->" in text  # the CPU section is left alone
  gpu = text.split("<!-- bench-gpu:begin -->")[1]
  assert "NVIDIA H200" in gpu and "| lenet5 | ratio | - | every step | 1.00 | 1.050 | 3 |" in gpu
  assert "bench_gpu.sh" in gpu
  assert bench.main(["--from_json", str(js)]) == 2  # nowhere to render
  assert bench.main(["--from_json", str(tmp_path / "missing.json"), "--readme", str(readme)]) == 2
  readme.write_text("no markers\n")
  assert bench.main(["--from_json", str(js), "--readme", str(readme)]) == 2


def test_report_splits_train_time_by_platform_and_names_off_cpu_runs():
  cpu = [{"sweep": "s", "run": f"v_s{i}", "train_seconds": t} for i, t in ((0, 200), (1, 220))]
  assert records.train_time(cpu) == "210 ± 14"  # runs without a platform field: the CPU
  assert sections.off_cpu_runs(cpu) == []
  mixed = cpu + [{"sweep": "s", "run": "v_s2", "train_seconds": 13, "platform": "gpu"}]
  assert records.train_time(mixed) == "210 ± 14 (cpu, 2 runs); 13 (gpu, 1 run)"
  line = sections.off_cpu_runs(mixed)
  assert line[0].startswith("Made on a GPU") and "s / v_s2" in line[0] and "v_s0" not in line[0]


def test_bench_ordering_runs_and_rejects_bad_windows(capsys):
  mod = _load("bench_ordering")
  assert mod.main(["--windows", "1"]) == 0
  out = capsys.readouterr().out
  assert "lsq, ordered" in out and "ratio, weights copied" in out
  assert mod.main(["--windows", "0"]) == 2
  assert capsys.readouterr().err.strip() == "error: --windows must be >= 1, got 0"


def test_bench_reduce_runs_and_rejects_bad_windows(capsys):
  mod = _load("bench_reduce")
  assert mod.main(["--windows", "1"]) == 0  # also checks ones-matrix product == plain sum per shape
  out = capsys.readouterr().out
  assert out.count("new/plain") == len(mod.SHAPES)
  assert mod.main(["--windows", "0"]) == 2
  assert capsys.readouterr().err.strip() == "error: --windows must be >= 1, got 0"


def test_bench_prefetch_rotates_rounds_and_rejects_bad_windows(capsys):
  mod = _load("bench_prefetch")
  calls = []
  fns = [lambda: calls.append("a"), lambda: calls.append("b"), lambda: calls.append("c")]
  times = _load("bench").round_robin(fns, 3, lambda _: None, rotate=True)
  assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
  assert [len(t) for t in times] == [3, 3, 3]
  assert mod.main(["--windows", "0"]) == 2
  assert capsys.readouterr().err.strip() == "error: --windows must be >= 1, got 0"


def test_bench_rejects_bad_windows_before_measuring(capsys):
  assert _load("bench").main(["--windows", "0", "--out", "/nonexistent/bench.json"]) == 2
  assert capsys.readouterr().err.strip() == "error: --windows must be >= 1, got 0"


@pytest.mark.perf
def test_bench_cost_runs_its_ladder_writes_json_and_readme_and_rejects_bad_windows(
    capsys, tmp_path):
  mod = _load("bench_cost")
  assert mod.median_diff([3.0, 1.0, 5.0], [1.0, 1.0, 1.0]) == 2.0
  fake_quant = mod.quant.fake_quant
  readme = tmp_path / "README.md"
  readme.write_text("intro\n<!-- bench-cost:begin -->\nold\n<!-- bench-cost:end -->\nrest\n")
  out_json = tmp_path / "bench_cost.json"
  assert mod.main(["--windows", "1", "--out", str(out_json), "--readme", str(readme)]) == 0
  out = capsys.readouterr().out
  assert out.count("quantized/float") == len(mod.LADDER)
  assert "adds" in out and "lsq, ones-vector sum" in out and "floor: one pass" in out
  # the ones-vector and floor rungs leave quant as they found it
  assert mod.quant._MV_ROWS == 2 and mod.quant.fake_quant is fake_quant
  doc = json.loads(out_json.read_text())
  assert [r["name"] for r in doc["rows"]] == [rung[0] for rung in mod.LADDER]
  by_name = {r["name"]: r for r in doc["rows"]}
  assert by_name["float"]["step_time_ratio"] == 1.0 and by_name["float"]["adds_s"] is None
  # the floors compile what they claim: one pass fewer kernels than the quantizer
  # (no rounding), the sum one more reduction than the pass (and 1 MB more read)
  assert by_name["floor: one pass"]["kernels"] < by_name["kernels fake-quantized"]["kernels"]
  assert by_name["floor: + one sum of dL/dP per group"]["bytes_accessed"] > \
      by_name["floor: one pass"]["bytes_accessed"] + 0.9e6
  text = readme.read_text()
  assert text.startswith("intro\n<!-- bench-cost:begin -->\nMeasured by `python benchmarks/bench_cost.py")
  assert "old" not in text and text.endswith("<!-- bench-cost:end -->\nrest\n")
  assert text.count("\n| ") == len(mod.LADDER) + 1  # header and one row per rung
  assert mod.main(["--windows", "0"]) == 2
  assert capsys.readouterr().err.strip() == "error: --windows must be >= 1, got 0"


def test_floor_quantizer_is_the_identity_with_a_straight_through_gradient():
  """bench_cost's floors change no value: P * (s/s) == P, dL/dP passes unchanged,
  and the scale cotangent is zero with or without the sum."""
  mod = _load("bench_cost")
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)
  s = jnp.full((1, 4), 0.3, jnp.float32)
  for with_sum in (False, True):
    fq = mod._floor_quantizer(with_sum)
    np.testing.assert_array_equal(fq(x, s), x)
    gx, gs = jax.grad(lambda x, s: jnp.sum(3.0 * fq(x, s)), (0, 1))(x, s)
    np.testing.assert_array_equal(gx, jnp.full_like(x, 3.0))
    assert gs.shape == s.shape and not np.any(gs)


def test_benchmarks_have_one_entry_point_with_subcommands():
  run = lambda *a: subprocess.run([sys.executable, "benchmarks/run.py", *a], cwd=ROOT,
                                  capture_output=True, text=True, timeout=300)
  r = run()
  assert r.returncode == 2 and r.stderr.strip().startswith("error: expected a subcommand")
  r = run("cost", "--windows", "0")
  assert r.returncode == 2 and "--windows must be >= 1" in r.stderr
  r = run("step", "--help")
  assert r.returncode == 0 and "--windows" in r.stdout


def test_report_headline_scale_every_agreement_and_frontier_verdicts(tmp_path):
  rows = [_row("fp32_s0", "base", 0.980, 1.0, scheme="float", rule=None),
          _row("lsq_s0", "base", 0.978, 15.0, ecr=20.0),   # 0.2 points below: within 0.3
          _row("big_s0", "base", 0.972, 30.0, ecr=45.0)]   # 0.8 below: within 1 only
  head = "\n".join(sections.headline_section(rows))
  assert "up to 30.0x (packed file) on mnist" in head
  assert "| mnist | 0.3 points | 15.0x | [base / lsq](#base) (lenet300, 10 epochs, 1 seed, " \
         "0.9780 vs FP32 0.9800) | 20.0x |" in head
  assert "| mnist | 1 point | 30.0x | [base / big](#base)" in head

  def k_run(k, seed, acc, bits):
    r = _row(f"{'k' + str(k)}_s{seed}", "scale_every_x", acc, 10.0, rule="ratio", bits=bits)
    r["config"]["scale_every"] = k
    return r
  # k=1: 0.980 +- 0.001; k=4 mean 0.9795 (0.05 points off, spreads 0.1 + 0.1: agrees);
  # k=16 mean 0.976 (0.4 points off: does not); bits all 3.0 +- 0.1 except k=16's 3.5
  ks = [k_run(1, 0, 0.979, 2.9), k_run(1, 1, 0.980, 3.0), k_run(1, 2, 0.981, 3.1),
        k_run(4, 0, 0.9785, 2.9), k_run(4, 1, 0.9795, 3.0), k_run(4, 2, 0.9805, 3.1),
        k_run(16, 0, 0.975, 3.4), k_run(16, 1, 0.976, 3.5), k_run(16, 2, 0.977, 3.6)]
  text = "\n".join(sections.scale_every_section(ks))
  assert "| mnist / lenet300 | 10 | default | 4 | 3 | 0.9795 ± 0.0010 | 3.00 ± 0.10 | yes, yes |" \
      in text
  assert "| 16 | 3 | 0.9760 ± 0.0010 | 3.50 ± 0.10 | no, no |" in text

  def f_run(var, seed, acc, size, budget=None, rule="lsq"):
    r = _row(f"{var}_s{seed}", "frontier_x", acc, 10.0, rule=rule)
    r.update(packed_bytes=size)
    if budget:
      r["config"]["budget_bits"], r["budget_bits"] = budget, budget * (1 + 0.001 * seed)
    return r
  fr = [f_run("lsq2", s, a, 1000) for s, a in enumerate((0.900, 0.902, 0.904))] + \
       [f_run("budget2", s, a, 990, 2.0, "ratio") for s, a in enumerate((0.910, 0.911, 0.912))] + \
       [f_run("budget1", s, a, 500, 1.0, "ratio") for s, a in enumerate((0.84, 0.89, 0.94))]
  fp32 = _row("fp32_s0", "other", 0.915, 1.0, scheme="float", rule=None)
  text = "\n".join(sections.frontier_section(fr + [fp32], tmp_path / "plots"))
  # budget2: 0.4 points below FP32's 0.915; +0.90 points over lsq2 (mean 0.902), spreads
  # 0.2 + 0.1 points: beyond
  assert "| budget2 | lenet300, 10 | budgeted ratio | 3 | 0.9110 ± 0.0010 | -0.40 |" in text
  assert "| 0.20% | +0.90 vs lsq2 (beyond spread 0.30) |" in text
  assert "| 0.20% | -1.20 vs lsq2 (within spread 5.20) |" in text
  # a HAWQ-v2 baseline (fixed per-layer widths, LSQ) and an 8-bit first/last one are named as
  # such; the budgeted run is set against the best of them with a file at least as large:
  # hawq (mean 0.914, 995 bytes) over lsq2, 0.30 points above budget2, spreads 0.1 + 0.1
  hq = [f_run("hawq2", s, a, 995) for s, a in enumerate((0.913, 0.914, 0.915))]
  for r in hq:
    r["config"]["layer_bits"] = "fc1=1,fc2=8"
  edge = f_run("edge", 0, 0.5, 2000)
  edge["config"]["edge_bits"] = 8
  assert [records.family(r) for r in (hq[0], edge)] == ["LSQ, HAWQ-v2 widths",
                                                      "LSQ, first/last 8-bit"]
  binary = f_run("binary", 0, 0.5, 2000)
  binary["config"].update(grid="midrise", edge_bits=8)
  assert records.family(binary) == "LSQ midrise, first/last 8-bit"
  binary["config"].pop("edge_bits")
  assert records.family(binary) == "LSQ midrise"
  text = "\n".join(sections.frontier_section(fr + hq + [edge, fp32], tmp_path / "plots"))
  # nearest larger baseline for budget2 is hawq2 (995 bytes), the best larger one too
  assert "| 0.20% | -0.30 vs hawq2 (beyond spread 0.20) | -0.30 vs hawq2 (beyond spread 0.20) " \
         "| none |" in text
  # a smaller, more accurate baseline is named; budget1's nearest larger file is hawq2's,
  # lsq2 (the worst of the larger ones) is named by neither column
  tiny = f_run("tiny", 0, 0.95, 400)
  text = "\n".join(sections.frontier_section(fr + hq + [edge, tiny, fp32], tmp_path / "plots"))
  assert "| 0.20% | -2.40 vs hawq2 (within spread 5.10) | -2.40 vs hawq2 (within spread 5.10) " \
         "| tiny |" in text
  one = [f_run("one", 0, 0.90, 995, 2.0, "ratio")]  # 1 seed: no spread to compare with
  assert "| -0.20 vs lsq2 (1 seed: no spread) |" in "\n".join(
      sections.frontier_section(one + fr[:3], tmp_path / "plots"))
  summary = "\n".join(sections.frontier_summary(fr + hq + [edge, tiny, fp32]))
  assert "| 2 | 3 | 0.9110 ± 0.0010 | 990 | -0.30 vs hawq2 (beyond spread 0.20) | -0.30 vs " \
         "hawq2 (beyond spread 0.20) | tiny |" in summary


def test_bench_derives_each_k_from_the_scale_and_weights_only_steps():
  """A row "every k steps (derived)" is the median over rounds of
  (t_scale + (k-1) t_weights_only) / (k t_float), from the rows measured side by side."""
  bench = _load("bench")
  # rounds: scale step 2.0, 2.4, 1.6 s; weights-only 1.0, 1.2, 0.8; float 1.0, 1.0, 0.8.
  # k=4: (2.0 + 3)/4 = 1.25, (2.4 + 3.6)/4 = 1.5, (1.6 + 2.4)/4 = 1.0; ratios 1.25, 1.5, 1.25
  step_s, ratio = bench.every_k([2.0, 2.4, 1.6], [1.0, 1.2, 0.8], [1.0, 1.0, 0.8], 4)
  assert step_s == pytest.approx(1.25) and ratio == pytest.approx(1.25)
  assert bench.every_k([2.0], [1.0], [1.0], 1) == (2.0, 2.0)
  doc = {"machine": "x86_64, 2 cores", "backend": "cpu", "date": "2026-01-01", "jax": "0",
         "rows": [
             {"model": "m", "rule": "float", "granularity": "-", "step_s": 1.0,
              "step_time_ratio": 1.0, "data_pipeline_ratio": 1.0, "kernels": 3},
             {"model": "m", "rule": "lsq", "granularity": "row", "scale_every": 1,
              "step_s": 1.4, "step_time_ratio": 1.4, "data_pipeline_ratio": 1.0, "kernels": 5},
             {"model": "m", "rule": "lsq", "granularity": "row", "scale_every": "weights-only",
              "step_s": 1.0, "step_time_ratio": 1.0, "data_pipeline_ratio": 1.0, "kernels": 4},
             {"model": "m", "rule": "lsq", "granularity": "row", "scale_every": 4,
              "derived": True, "step_s": 1.1, "step_time_ratio": 1.1}]}
  text = bench.readme_section(doc)
  assert "| m | lsq | row | every 4 steps (derived) | 1100.00 | 1.100 | - | - |" in text
  assert "| m | lsq | row | never (weights-only step) |" in text
  assert "updated every step: m 1.400." in text and "updated every 4 steps: m 1.100." in text


def test_sweep_skips_runs_already_in_the_record_unless_rerun(tmp_path, capsys):
  sweep = _load("sweep")
  cfg = tmp_path / "c.json"
  cfg.write_text(json.dumps({"name": "x", "module": "experiments.mnist", "base": {},
                             "variants": {"v": {}}, "seeds": [0, 1]}))
  record = tmp_path / "results" / "x"
  record.mkdir(parents=True)
  (record / "results.jsonl").write_text(json.dumps({"run": "v_s0", "test_accuracy": 0.5}) + "\n")
  common = ["--config", str(cfg), "--runs_dir", str(tmp_path / "runs"),
            "--results_dir", str(tmp_path / "results"), "--dry_run"]

  def listed(extra):
    assert sweep.main(common + extra) == 0
    out = capsys.readouterr().out
    return sorted(pathlib.Path(l.split("--workdir=")[1]).name for l in out.splitlines()
                  if "--workdir" in l)

  assert listed([]) == ["v_s1"]  # a new machine's empty runs/ does not remake v_s0
  assert listed(["--rerun"]) == ["v_s0", "v_s1"]


def test_sweep_record_merges_from_concurrent_drivers_lose_no_row(tmp_path):
  import threading
  sweep = _load("sweep")
  record = tmp_path / "results" / "x"
  dirs = []
  for i in range(8):
    run = tmp_path / f"runs{i}" / f"v_s{i}"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"test_accuracy": i / 10}))
    dirs.append(run.parent)
  threads = [threading.Thread(target=sweep.collect, args=(d, record)) for d in dirs]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  kept = [json.loads(x)["run"] for x in (record / "results.jsonl").read_text().splitlines()]
  assert kept == [f"v_s{i}" for i in range(8)]


def test_sweep_jobs_runs_in_parallel_and_records_every_run(tmp_path, monkeypatch, capsys):
  sweep = _load("sweep")
  (tmp_path / "fake_exp.py").write_text(
      "import json, pathlib, sys, time\n"
      "a = dict(x[2:].split('=', 1) for x in sys.argv[1:] if '=' in x)\n"
      "wd = pathlib.Path(a['workdir'])\n"
      "(wd / 'span').write_text(f'{time.time()} ')\n"
      "time.sleep(2.0)\n"
      "if a['seed'] == '3': sys.exit('error: seed 3 fails')\n"
      "(wd / 'span').write_text((wd / 'span').read_text() + f'{time.time()}')\n"
      "(wd / 'results.json').write_text(json.dumps({'seed': int(a['seed'])}))\n"
      "print('one line') if a['seed'] == '2' else print('done\\nok')\n")
  monkeypatch.setenv("PYTHONPATH", str(tmp_path))
  cfg = tmp_path / "c.json"
  cfg.write_text(json.dumps({"name": "x", "module": "fake_exp", "base": {},
                             "variants": {"v": {}}, "seeds": [0, 1, 2, 3]}))
  rc = sweep.main(["--config", str(cfg), "--runs_dir", str(tmp_path / "runs"),
                   "--results_dir", str(tmp_path / "results"), "--jobs", "2"])
  out = capsys.readouterr().out
  assert rc == 1 and "v_s3 failed (1): error: seed 3 fails" in out
  assert "  v_s0: done [" in out and "  v_s2: one line [" in out  # the summary line
  rows = [json.loads(x) for x in (tmp_path / "results/x/results.jsonl").read_text().splitlines()]
  assert [(r["run"], r["seed"]) for r in rows] == [("v_s0", 0), ("v_s1", 1), ("v_s2", 2)]
  spans = [tuple(map(float, (tmp_path / f"runs/x/v_s{i}/span").read_text().split()))
           for i in range(3)]
  assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]  # the first two overlapped
  assert sweep.main(["--config", str(cfg), "--jobs", "0"]) == 2


def test_dataset_parts_round_trip_and_refuse_a_missing_or_changed_part(tmp_path, capsys):
  parts = _load("dataset_parts")
  src = tmp_path / "src"
  src.mkdir()
  rng = np.random.default_rng(0)
  blobs = {"train.npz": rng.bytes(5000), "test.npz": rng.bytes(1000), "empty": b""}
  for name, blob in blobs.items():
    (src / name).write_bytes(blob)
  max_mib = 2048 / 2**20  # 2048-byte parts
  assert parts.main(["split", str(src), str(tmp_path / "p"), "--max_mib", str(max_mib)]) == 0
  manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
  assert [len(manifest["files"][n]["parts"]) for n in ("train.npz", "test.npz", "empty")] == [3, 1, 1]
  assert max(p.stat().st_size for p in (tmp_path / "p").glob("*.part*")) == 2048
  assert parts.main(["join", str(tmp_path / "p"), str(tmp_path / "out")]) == 0
  assert {n: (tmp_path / "out" / n).read_bytes() for n in blobs} == blobs
  capsys.readouterr()

  (tmp_path / "p" / "train.npz.part01").rename(tmp_path / "held")
  assert parts.main(["join", str(tmp_path / "p"), "--check"]) == 1
  assert capsys.readouterr().out.strip() == "missing: train.npz.part01"
  assert parts.main(["join", str(tmp_path / "p"), str(tmp_path / "out2")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "1 part(s) missing" in err and "train.npz.part01" in err
  changed = bytearray((tmp_path / "held").read_bytes())
  changed[7] ^= 1
  (tmp_path / "p" / "train.npz.part01").write_bytes(bytes(changed))
  assert parts.main(["join", str(tmp_path / "p"), str(tmp_path / "out2")]) == 2
  assert "train.npz.part01 differs from the manifest" in capsys.readouterr().err
  assert not (tmp_path / "out2" / "train.npz").exists()
  assert parts.main(["split", str(src), str(tmp_path / "q"), "--max_mib", "0"]) == 2
  assert parts.main(["join", str(tmp_path / "nothing"), str(tmp_path / "o")]) == 2


def test_report_schedule_length_pairs_a_long_run_with_its_recipe_on_shorter_schedules(tmp_path):

  def run(name, sweep, acc, epochs, avg, **cfg):
    r = _row(name, sweep, acc, 32 / avg, bits=avg,
             scheme="float" if cfg.get("float_model") else "scale-rule")
    r["epochs"] = epochs
    r["config"].update(epochs=epochs, seed=0, scale_every=16 if sweep.startswith("long_") else 1,
                       **{"float_model": False, "bits": None, **cfg})
    return r

  rows = [run("fp32_s0", "long_x", 0.99, 30, 32, float_model=True),
          run("q_s0", "long_x", 0.985, 30, 2.0, bits=2),
          run("fp32_s0", "base", 0.98, 10, 32, float_model=True),
          run("q_s0", "base", 0.97, 10, 2.0, bits=2),
          run("q_s1", "base", 0.96, 10, 2.0, bits=2),
          run("q3_s0", "base", 0.95, 10, 3.0, bits=3),  # another recipe: not paired
          run("r_s0", "long_x", 0.97, 30, 4.0, rule="ratio", scale_stop="auto"),
          run("r_s0", "old", 0.96, 10, 6.0, rule="ratio", scale_stop="val"),  # "auto" resolved
          run("b_s0", "long_x", 0.97, 30, 2.0, rule="ratio", scale_stop="auto", budget_bits=2.0)]
  metrics = tmp_path / "long_x" / "q_s0" / "metrics.jsonl"
  metrics.parent.mkdir(parents=True)
  metrics.write_text("".join(json.dumps({"avg_bits": b, "val_accuracy": 0.9}) + "\n"
                             for b in [4.0] * 7 + [2.5, 2.0, 2.0]))
  text = "\n".join(sections.schedules_section(rows, tmp_path))
  # 10 epochs, 2 seeds: 0.965 vs FP32 0.98 at 10 epochs; 30 epochs: bits moved 2.5 -> 2.0
  assert "| mnist / lenet300 | q | 10 | base / q | 2 | 0.9650 ± 0.0071 | -1.50 | 2.00 ± 0.00 |" in text
  assert "| mnist / lenet300 | q | 30 | long_x / q | 1 | 0.9850 | -0.50 | 2.00 | 20.0% |" in text
  assert "base / q3" not in text
  assert "| mnist / lenet300 | r | 10 | old / r | 1 | 0.9600 |" in text
  assert "| b | 10 | old / r |" not in text  # a record without budget_bits has none
  assert "| mnist / lenet300 | fp32 | 10 | base / fp32 | 1 | 0.9800 | +0.00 |" in text
  assert "DoReFa" not in text  # no published figure for this model
  for r in rows:
    r.update(dataset="cifar10", model="resnet20")
  text = "\n".join(sections.schedules_section(rows, tmp_path))
  # 30 epochs: FP32 0.99 is 2.13 points below 92.13; the 2-bit run 0.985 against 91.05
  assert ("| cifar10 / resnet20 | 30 | 0.9900 | +6.87 | DoReFa-Net, 2-bit weights, float "
          "activations (Zhou et al. 2016): 0.9105 at 2 bits | long_x / q: 0.9850 | +7.45 |") in text
  assert "| cifar10 / resnet20 | 10 | 0.9800 | +5.87 |" in text and "base / q: 0.9650 |" in text


def _fake_experiment(tmp_path, monkeypatch):
  """A module that takes the sweep's flags and writes results.json in its --workdir."""
  (tmp_path / "fake_exp.py").write_text(
      "import json, pathlib, sys\n"
      "a = dict(x[2:].split('=', 1) for x in sys.argv[1:] if '=' in x)\n"
      "wd = pathlib.Path(a['workdir'])\n"
      "(wd / 'results.json').write_text(json.dumps({'seed': int(a['seed'])}))\n"
      "print('done\\nok')\n")
  monkeypatch.setenv("PYTHONPATH", str(tmp_path))


def test_sweep_refuses_a_recorded_run_whose_flags_changed_and_names_them(tmp_path, capsys):
  sweep = _load("sweep")
  cfg = tmp_path / "c.json"
  cfg.write_text(json.dumps({"name": "x", "module": "experiments.mnist",
                             "base": {"epochs": 2, "scale_every": 1}, "variants": {"v": {}},
                             "seeds": [0, 1]}))
  record = tmp_path / "results" / "x"
  record.mkdir(parents=True)
  rows = [  # v_s0 ran with epochs 1; v_s1 left scale_every out when its default was 1
      {"run": "v_s0", "command": "python -m experiments.mnist --epochs=1 --scale_every=1 "
                                 "--seed=0 --workdir=/elsewhere/v_s0", "config": {"epochs": 1}},
      {"run": "v_s1", "command": "python -m experiments.mnist --epochs=2 --seed=1 "
                                 "--workdir=/elsewhere/v_s1",
       "config": {"epochs": 2, "scale_every": 1}}]
  (record / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  common = ["--config", str(cfg), "--runs_dir", str(tmp_path / "runs"),
            "--results_dir", str(tmp_path / "results"), "--dry_run"]
  assert sweep.main(common) == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
  assert len(err) == 1 and "v_s0 (epochs)" in err[0] and "v_s1" not in err[0], err
  assert sweep.main(common + ["--rerun"]) == 0


def test_sweep_and_report_name_a_damaged_record_line(tmp_path, capsys):
  sweep = _load("sweep")
  cfg = tmp_path / "c.json"
  cfg.write_text(json.dumps({"name": "x", "module": "experiments.mnist", "base": {},
                             "variants": {"v": {}}, "seeds": [0]}))
  record = tmp_path / "results" / "x"
  record.mkdir(parents=True)
  f = record / "results.jsonl"
  f.write_text(json.dumps({"run": "v_s0"}) + "\n<<<<<<< HEAD\n" + json.dumps({"run": "v_s1"})
               + "\n")
  assert sweep.main(["--config", str(cfg), "--runs_dir", str(tmp_path / "runs"),
                     "--results_dir", str(tmp_path / "results"), "--dry_run"]) == 2
  assert cli.main(["--results_dir", str(tmp_path / "results"),
                      "--out", str(tmp_path / "R.md")]) == 2
  err = capsys.readouterr().err.splitlines()
  want = f"error: {f}:2: a git conflict marker: resolve the merge"
  assert err.count(want) == 2 and len([l for l in err if l.startswith("error:")]) == 2, err
  assert not (tmp_path / "R.md").exists()


def test_sweep_resolves_a_relative_runs_dir_from_where_it_is_called(tmp_path, monkeypatch,
                                                                    capsys):
  sweep = _load("sweep")
  _fake_experiment(tmp_path, monkeypatch)
  cfg = tmp_path / "c.json"
  cfg.write_text(json.dumps({"name": "x", "module": "fake_exp", "base": {},
                             "variants": {"v": {}}, "seeds": [0]}))
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  assert sweep.main(["--config", str(cfg), "--runs_dir", "runs", "--results_dir", "res"]) == 0
  assert (elsewhere / "runs/x/v_s0/results.json").is_file()
  assert json.loads((elsewhere / "res/x/results.jsonl").read_text())["seed"] == 0


def test_sweep_says_running_elsewhere_for_a_run_another_driver_holds(tmp_path, monkeypatch,
                                                                     capsys):
  from lqlab import files
  sweep = _load("sweep")
  _fake_experiment(tmp_path, monkeypatch)
  cfg = tmp_path / "c.json"
  cfg.write_text(json.dumps({"name": "x", "module": "fake_exp", "base": {},
                             "variants": {"v": {}}, "seeds": [0, 1]}))
  held = tmp_path / "runs/x/v_s0"
  held.mkdir(parents=True)
  args = ["--config", str(cfg), "--runs_dir", str(tmp_path / "runs"),
          "--results_dir", str(tmp_path / "results")]
  lock = files.lock_dir(held)
  try:
    assert sweep.main(args) == 0
  finally:
    lock.close()
  out = capsys.readouterr().out
  assert "v_s0: running elsewhere" in out and "failed" not in out.replace("0 failed", "")
  assert not (held / "results.json").exists() and (tmp_path / "runs/x/v_s1/results.json").exists()


ABSOLUTE = re.compile(r"(?<![\w.])/(?:work|root|home|tmp|mnt|content|Users)/")


def test_the_record_and_the_report_name_no_machine_path(tmp_path):
  """Runs recorded from absolute workdirs come out as runs/<sweep>/<run>, in the record
  (sweep.portable, applied at every collect) and in the report; the committed record,
  RESULTS.md and the README hold no absolute path."""
  sweep = _load("sweep")
  runs, record = tmp_path / "runs" / "x", tmp_path / "results" / "x"
  (runs / "v_s0").mkdir(parents=True)
  (runs / "v_s0" / "results.json").write_text(json.dumps({
      "test_accuracy": 0.9, "workdir": str(runs / "v_s0"),
      "packed_file": str(runs / "v_s0" / "model.lqz"), "dataset": "mnist", "model": "lenet300",
      "epochs": 1, "avg_bits": 3.0, "config": {"rule": "ratio"}}))
  (runs / "v_s0" / "command.txt").write_text(
      f"python -m lqjax.ptq --bits=4 --workdir={runs / 'v_s0'}\n")
  row = sweep.collect(runs, record)[0]
  assert row["workdir"] == "runs/x/v_s0" and row["packed_file"] == "runs/x/v_s0/model.lqz"
  assert row["command"] == "python -m lqjax.ptq --bits=4 --workdir=runs/x/v_s0"
  assert records.command_today(row["command"]) == "python -m lqlab.ptq --bits=4 --workdir=runs/x/v_s0"
  for f in [*ROOT.glob("results/*/results.jsonl"), ROOT / "docs/RESULTS.md", ROOT / "README.md"]:
    hits = ABSOLUTE.findall(f.read_text())
    assert not hits, (f, hits[:3])
  assert "-m lqjax.ptq" not in (ROOT / "docs/RESULTS.md").read_text()


def test_frontier_plot_is_readable(tmp_path, monkeypatch):
  """One line per scheme through its sizes, FP32 dashed, a log x-axis labelled in ratios,
  the y-axis zoomed to the competitive range and the collapsed run named in a note."""
  figs = []
  monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig) or path)

  def run(var, seed, acc, ratio, rule="lsq", scheme="scale-rule"):
    return {"sweep": "s", "run": f"{var}_s{seed}", "test_accuracy": acc, "scheme": scheme,
            "compression_ratio": ratio, "config": {"rule": rule, "bits": 2}}

  variants = {}
  for var, accs, ratio, rule, scheme in (
      ("fp32", (0.91, 0.912), 1.0, "ratio", "float"), ("lsq_2bit", (0.905, 0.903), 15.0, "lsq", "scale-rule"),
      ("lsq_3bit", (0.908, 0.909), 10.0, "lsq", "scale-rule"),
      ("lsq_1bit", (0.70, 0.74), 28.0, "lsq", "scale-rule")):
    variants[("s", var)] = [run(var, i, a, ratio, rule, scheme) for i, a in enumerate(accs)]
  assert plots.frontier_plot("s", variants, tmp_path, "t", "p.png") == tmp_path / "p.png"
  (fig,) = figs
  ax = fig.axes[0]
  assert ax.get_xscale() == "log" and ax.get_title() == "t"
  assert all(t.get_text().endswith("x") for t in ax.get_xticklabels() if t.get_text())
  lo, hi = ax.get_ylim()
  assert 0.911 - 0.03 <= lo < 0.903 and hi > 0.911
  dashed = [l for l in ax.get_lines() if l.get_linestyle() == "--"]
  assert len(dashed) == 1 and dashed[0].get_ydata()[0] == pytest.approx(0.911)  # its mean
  lsq = [c for c in ax.containers if c.get_label() == "LSQ"]
  assert len(lsq) == 1 and list(lsq[0].lines[0].get_xdata()) == [10.0, 15.0]  # through sizes
  assert lsq[0].lines[0].get_linestyle() == "-"
  assert any("lsq_1bit 0.720 at 28.0x" in t.get_text() for t in fig.texts)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_bench_intdot_int4_dot_is_exact_and_the_patch_conv_is_the_conv(d):
  intdot = _load("bench_intdot")
  k, n = 2 * d.draw(st.integers(1, 6)), d.draw(st.integers(1, 5))
  codes = np.array(d.draw(st.lists(st.integers(-8, 7), min_size=k * n, max_size=k * n)),
                   np.int64).reshape(k, n)
  x8 = np.random.default_rng(k * n).integers(-128, 128, (3, k), dtype=np.int8)
  got = intdot._i4_i8(jnp.asarray(x8), jnp.asarray(intdot.integer.pack(codes, 4)))
  np.testing.assert_array_equal(np.asarray(got), x8.astype(np.int64) @ codes)
  rng = np.random.default_rng(d.draw(st.integers(0, 100)))
  x = rng.integers(-128, 128, (2, 5, 4, 3), dtype=np.int8)
  w = rng.integers(-128, 128, (3, 3, 3, 2), dtype=np.int8)
  want = np.zeros((2, 5, 4, 2), np.int64)  # the 3x3 SAME convolution by hand
  xp = np.pad(x.astype(np.int64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  for i in range(3):
    for j in range(3):
      want += np.einsum("bhwc,co->bhwo", xp[:, i:i + 5, j:j + 4], w[i, j].astype(np.int64))
  np.testing.assert_array_equal(np.asarray(intdot.conv_patches_i8(x, w)), want)
  np.testing.assert_array_equal(np.asarray(intdot.conv_int8(x, w)), want)
  np.testing.assert_array_equal(np.asarray(intdot.conv_int8_pad32(x, w)), want)


def test_bench_intdot_refuses_bad_flags_and_renders_its_json(tmp_path):
  intdot = _load("bench_intdot")
  assert intdot.main(["--windows", "2"]) == 2
  assert intdot.main(["--only", "dot,fft"]) == 2
  rows = [{"op": "dot", "shape": "8x8", "batch": 1, "variant": v, "seconds": 1e-3,
           "vs_float": r} for v, r in (("float32", 1.0), ("int8", 2.5), ("i4_i8", 0.5))]
  doc = {"date": "2026-12-04", "machine": "x", "jax": "0", "cpu_flags": ["avx2"],
         "windows": 3, "rows": rows}
  js, md = tmp_path / "b.json", tmp_path / "P.md"
  js.write_text(json.dumps(doc))
  md.write_text("a\n<!-- bench-intdot:begin -->\nold\n<!-- bench-intdot:end -->\nz\n")
  assert intdot.main(["--from_json", str(js), "--readme", str(md)]) == 0
  text = md.read_text()
  assert "| 8x8 | 1 | 1.000 | 2.50x | - | - | - | 0.50x |" in text and "old" not in text
  assert "CPU flags: avx2" in text
  assert intdot.main(["--from_json", str(tmp_path / "none.json"), "--readme", str(md)]) == 2
  # another CPU's results: their own section, and the line names the outputs that made them
  md.write_text(text + "<!-- bench-intdot-amx:begin -->\n<!-- bench-intdot-amx:end -->\n")
  doc["output_args"] = "--out docs/amx.json --section bench-intdot-amx"
  js.write_text(json.dumps(doc))
  assert intdot.main(["--from_json", str(js), "--readme", str(md),
                      "--section", "bench-intdot-amx"]) == 0
  amx = md.read_text().split("<!-- bench-intdot-amx:begin -->")[1]
  assert "run.py intdot --out docs/amx.json --section bench-intdot-amx --readme" in amx
  assert md.read_text().split("<!-- bench-intdot-amx:begin -->")[0] == text  # left alone
  assert intdot.main(["--from_json", str(js), "--readme", str(md), "--section", "nope"]) == 2


def test_codec_sizes_writes_the_three_forms_of_one_model(tmp_path):
  import flax.linen as nn
  import lqjax
  from lqjax import compress
  codec_sizes = _load("codec_sizes")
  m = lqjax.quantize(nn.Dense(64), lqjax.Rule(config=lqjax.QuantConfig(rule="lsq", bits=2)))
  params = m.init(jax.random.key(0), jnp.ones((1, 128)))["params"]
  path = tmp_path / "m.lqz"
  lqjax.save(path, params, {"why": "test"})
  r = codec_sizes.sizes(path)
  assert r["fixed"]["bytes"] == path.stat().st_size
  assert r["zstd"]["bytes"] <= r["zstd_v2"]["bytes"]
  assert r["zstd"]["header_bytes"] < r["zstd_v2"]["header_bytes"]
  assert set(r["forms"]) == {"kernel"}
  header, tree = compress.read(path)
  v2 = codec_sizes.version2_zstd(tree, header["meta"])
  assert len(v2) == r["zstd_v2"]["bytes"] and compress._PREFIX.unpack_from(v2)[1] == 2
  want, got = compress.read_codes(path.read_bytes()), compress.read_codes(v2)  # v2 reads
  assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
  h2, _ = compress.parse(v2)
  assert h2["meta"] == {"why": "test"} and all("zstd_bytes" not in t for t in h2["tensors"])
  assert codec_sizes.main([str(tmp_path / "missing.lqz")]) == 2


def test_bench_onnx_float_twin_computes_the_quantized_model_and_renders(tmp_path):
  pytest.importorskip("onnxruntime")
  pytest.importorskip("jax2onnx")
  bo = _load("bench_onnx")
  from lqjax import onnx_export
  qb, fb = bo.graphs("lenet300", 2)
  assert len(qb) * 8 < len(fb)  # 2-bit codes four a byte against float32 weights
  x = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
  np.testing.assert_allclose(onnx_export.run_onnx(qb, x), onnx_export.run_onnx(fb, x),
                             rtol=1e-5, atol=1e-5)
  assert bo.main(["--windows", "2"]) == 2
  row = {"model": "lenet300", "bits": 2, "level": "all", "batch": 1, "int_bytes": 10,
         "float_bytes": 80, "int_ms": 2.0, "float_ms": 0.5, "float_over_int": 0.25,
         "max_abs_logit_diff": 1e-6}
  text = bo.render({"date": "d", "machine": "m", "jax": "j", "windows": 3, "rows": [row]})
  assert "| lenet300 | 2 | 10 / 80 | all | 1 | 2.000 | 0.500 | 0.25 | 1.0e-06 |" in text


def test_bench_ortint_one_node_graphs_are_exact_and_render():
  pytest.importorskip("onnxruntime")
  bo = _load("bench_ortint")
  rng = np.random.default_rng(0)
  x, w = bo._codes(rng, np.uint8, (3, 40)), bo._codes(rng, np.int8, (40, 7))
  np.testing.assert_array_equal(bo._one_node("MatMulInteger", x, w)(x),
                                x.astype(np.int64) @ w.astype(np.int64))
  assert bo.main(["--windows", "2"]) == 2
  rows = [{"op": "MatMulInteger", "shape": "1x2x3", "variant": "float32", "seconds": 2e-3,
           "vs_float": 1.0, "exact": None},
          {"op": "MatMulInteger", "shape": "1x2x3", "variant": "uint8xint8", "seconds": 1e-3,
           "vs_float": 2.0, "exact": True}]
  text = bo.render({"date": "d", "machine": "m", "jax": "j", "windows": 3, "rows": rows})
  assert "| MatMulInteger | 1x2x3 | 2.000 | uint8xint8 | 2.00x | yes |" in text


def test_report_quantized_inputs_table_and_targets():
  fp32 = [_row(f"fp32_s{i}", "base", 0.990, 1.0, scheme="float", rule=None) for i in range(2)]
  act = []
  for name, w, a, acc in (("w8a8", 8, 8, 0.9875), ("w4a4", 4, 4, 0.9790)):
    for i in range(2):
      r = _row(f"{name}_s{i}", "acts", acc, 5.0, bits=w)
      r["config"].update(bits=w, act_bits=a, act_first_bits=8)
      act.append(r)
  act[0].update(integer_argmax_disagreements=1, integer_max_abs_logit_diff=0.02,
                integer_device_bytes=100)
  qwix = _row("qwix_a8dyn_bits8_s0", "acts_qwix", 0.989, None, scheme="qwix", rule="qwix_int8",
              bits=8)
  qwix.update(qwix_act="dynamic", nominal_bytes=7, compression_ratio=None)
  text = "\n".join(sections.activations_section(fp32 + act + [qwix]))
  # W8A8 0.25 points below FP32: within 0.3; W4A4 1.1 below: not within 1
  assert "| acts / w8a8 | 8 | 8 (8) | 2 | 0.9875 ± 0.0000 | -0.25 | 1 ± 0 | within 0.3: met | " \
         "1, 0.020 (1) | 100 |" in text
  assert "| acts / w4a4 | 4 | 4 (8) | 2 | 0.9790 ± 0.0000 | -1.10 | 1 ± 0 | within 1: not met |" \
         in text
  assert "| acts_qwix / qwix_a8dyn_bits8 | 8 | 8 dynamic (8) | 1 | 0.9890 | -0.10 |" in text
  assert records.family(act[0]) == "LSQ, A8" and records.family(qwix) == "qwix QAT, A8 dynamic"
  assert sections.activations_section(fp32) == []


def test_bench_integer_mlp_agrees_and_its_section_names_the_command(tmp_path):
  """The GPT MLP's three functions: the integer one within float rounding of the
  fake-quantized one (as the benchmark records it) and holding about an eighth of the
  float32 bytes at W4; its table goes in the section named, and the line gives the
  command with the models and outputs that made it."""
  bi = _load("bench_integer")
  fns, ort, packed, diff = bi.mlp_functions("W4A8")
  assert set(fns) == {"float32", "fake_quant", "integer"}
  x = bi.batch_of("gpt_mlp", 4, 1)
  ref = fns["fake_quant"][0](x)
  assert diff < 0.05 and float(jnp.max(jnp.abs(fns["integer"][0](x) - ref))) < 0.05
  if bi._has_onnxruntime():  # the NNX module's float and integer graphs in onnxruntime
    assert set(ort) == {"ort_float32", "ort_integer"} and ort["ort_integer"][2] < 0.05
    np.testing.assert_allclose(ort["ort_float32"][0](x), fns["float32"][0](x), atol=1e-4)
    assert float(np.max(np.abs(ort["ort_integer"][0](x) - np.asarray(ref)))) < 0.05
    assert ort["ort_integer"][1] < ort["ort_float32"][1] / 2  # int4 weights: a smaller graph
  held = bi.integer.device_bytes(fns["integer"][1])
  assert held < bi.integer.device_bytes(fns["float32"][1]) / 6 and held < 1.3 * packed
  rows = [{"model": "gpt_mlp", "setting": "W4A8", "batch": 256, "variant": v, "seconds": 1e-3,
           "vs_float": r, "device_bytes": 10, "packed_bytes": 8,
           "max_abs_logit_diff_integer_vs_fake": 1e-3}
          for v, r in (("float32", 1.0), ("fake_quant", 0.9), ("integer", 1.7))]
  doc = {"date": "2026-12-05", "machine": "x", "jax": "0", "cpu_flags": ["amx_int8"],
         "windows": 3, "rows": rows,
         "output_args": "--models gpt_mlp --out o.json --section bench-integer-mlp"}
  js, md = tmp_path / "b.json", tmp_path / "P.md"
  js.write_text(json.dumps(doc))
  md.write_text("<!-- bench-integer-mlp:begin -->\n<!-- bench-integer-mlp:end -->\n")
  assert bi.main(["--from_json", str(js), "--readme", str(md),
                  "--section", "bench-integer-mlp"]) == 0
  text = md.read_text()
  assert "run.py integer --models gpt_mlp --out o.json --section bench-integer-mlp" in text
  assert "| gpt_mlp | W4A8 | 256 | 1.000 | 0.90x | 1.70x |" in text

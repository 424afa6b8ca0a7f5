"""The sweeps' record as rows: reading it, naming a run's scheme and recipe, and the small
statistics every section uses. The figures a report compares against (targets, published
results, tuning bars) are data, in ``constants.json`` beside this file."""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import re
import statistics
import types

from lqlab.config import TrainConfig
from lqlab.files import read_jsonl
from typing import Optional


_CONSTANTS = json.loads((pathlib.Path(__file__).parent / "constants.json").read_text())
# The size targets: (dataset, model, size field, target ratio, max points below FP32, what).
TARGETS = [tuple(t["target"]) for t in _CONSTANTS["targets"]]
# Published figures a schedule is measured against: (dataset, model) -> [(what, quantized
# accuracy, its average weight bits, FP32 accuracy of the same paper)].
PUBLISHED = {(p["dataset"], p["model"]): [tuple(f) for f in p["figures"]]
             for p in _CONSTANTS["published"]}
# Tuning sweeps and their selection rule (validation only; test accuracy plays no part): a
# bar means the most compressed variant whose mean validation accuracy reaches it; None the
# variant with the best mean validation accuracy.
TUNING_BARS = _CONSTANTS["tuning_bars"]
# Modules that moved since runs were recorded: a recorded command names the old one.
MOVED_MODULES = _CONSTANTS["moved_modules"]
DATASET_NAMES = _CONSTANTS["dataset_names"]


def mean_std(vals, fmt="{:.4f}"):
  vals = [v for v in vals if v is not None]
  if not vals:
    return "-"
  if len(vals) == 1:
    return fmt.format(vals[0])
  return f"{fmt.format(statistics.mean(vals))} ± {fmt.format(statistics.stdev(vals))}"


def variant_of(run_name: str) -> str:
  return re.sub(r"_s\d+$", "", run_name)


def size_ratio(r):
  """fp32 bytes / packed file bytes; for a peer library that writes no file, its accounted ratio."""
  return r.get("compression_ratio") or r.get("compression_ratio_nominal")


def size_bytes(r):
  return r.get("packed_bytes") or r.get("nominal_bytes")


def command_today(cmd: str) -> str:
  """A recorded command as it runs today: the module where it lives now. (Its workdir is
  already relative to the repository: the sweep driver records rows portable.)"""
  for old, new in MOVED_MODULES.items():
    cmd = cmd.replace(f"-m {old} ", f"-m {new} ")
  return cmd


def load_rows(files):
  """Every run of every sweep, each tagged with its sweep name."""
  return [{**r, "sweep": f.parent.name} for f in files for r in read_jsonl(f)]


def convergence(run_dir: pathlib.Path):
  """(bits change over the last 20% of epochs in %, final val acc, best val acc, epochs)."""
  path = run_dir / "metrics.jsonl"
  if not path.exists():
    return None
  rows = read_jsonl(path)
  if len(rows) < 2:
    return None
  n = len(rows)
  start = rows[max(0, n - 1 - max(1, round(0.2 * n)))]
  end = rows[-1]
  change = abs(end["avg_bits"] - start["avg_bits"]) / max(start["avg_bits"], 1e-9) * 100
  return change, end["val_accuracy"], max(r["val_accuracy"] for r in rows), n


def train_time(rs):
  """Train seconds, mean +- std over the runs; split by platform where a variant's runs
  were made on more than one kind of device (a GPU run takes seconds, not minutes)."""
  by = {p: [r["train_seconds"] for r in g]
        for p, g in group_by(rs, lambda r: r.get("platform", "cpu")).items()}
  if list(by) == ["cpu"]:
    return mean_std(by["cpu"], "{:.0f}")
  return "; ".join(f"{mean_std(v, '{:.0f}')} ({p}, {len(v)} run{'s' * (len(v) > 1)})"
                   for p, v in by.items())


def accounted_mark(rs):
  return " \\*" if any(r.get("nominal_bytes") for r in rs) else ""


# Sweeps left out of the per-dataset summary: tuning runs (judged on validation only) and
# the single-seed exploration of stabilising mechanisms (their own section below).
SUMMARY_SKIP = ("tune_", "stability_candidates")


def _scale_stop(cfg) -> Optional[str]:
  """The run's validation brake as the loop resolves it (:attr:`TrainConfig.brake`, on the
  record's fields over today's defaults); None for a record that keeps no config."""
  if not cfg:
    return None
  d = {**_DEFAULTS, **cfg}
  d["budget"] = d.get("budget_bits") is not None or d.get("budget_bytes") is not None
  return TrainConfig.brake.fget(types.SimpleNamespace(**d))


def family(r) -> str:
  """The scheme a run belongs to, for tables and plot colours (", A<b>": its layers' inputs
  quantized at b bits too; ", A<b> ratio": their scales learned by the ratio rule)."""
  act = r.get("config", {}).get("act_bits")
  if r.get("qwix_act") not in (None, "none"):
    return _weight_family(r) + f", A8 {r['qwix_act']}"
  return _weight_family(r) + (f", A{act}{act_rule_mark(r)}" if act else "")


def act_rule_mark(r) -> str:
  """" ratio" for inputs learned by the ratio rule, "" for LSQ+ (a record without the field
  ran with LSQ+, the only rule of its time)."""
  return " ratio" if r.get("config", {}).get("act_rule", "lsq") == "ratio" else ""


def _weight_family(r) -> str:
  scheme = r.get("scheme")
  cfg = r.get("config", {})
  rule = r.get("rule") or cfg.get("rule")
  if scheme == "penalty" and rule == "ratio":
    return "ratio + penalty (A+B)"
  if scheme in ("float", "ptq", "qwix", "penalty"):
    return {"float": "fp32", "ptq": "ptq min-max", "qwix": "qwix QAT",
            "penalty": "penalty (scheme B)"}[scheme]
  if cfg.get("budget_bits") or cfg.get("budget_bytes"):
    return "budgeted " + (rule or "?")
  stop = _scale_stop(cfg)
  if rule == "ratio":
    return "stable ratio" if stop == "val" else "ratio (thesis)"
  # the midrise grid s*(q+1/2) (binary at 1 bit) is named; the default midtread grid is not
  grid = " midrise" if cfg.get("grid") == "midrise" else ""
  if rule == "lsq" and cfg.get("layer_bits"):
    return f"LSQ{grid}, HAWQ-v2 widths"
  if rule == "lsq" and cfg.get("edge_bits"):
    return f"LSQ{grid}, first/last " + ("8-bit" if cfg["edge_bits"] == 8 else "wider")
  return {"fixed": "fixed-bit STE", "lsq": "LSQ"}.get(rule, rule or "?") + grid


def group_by(rows, key):
  out = collections.OrderedDict()
  for r in sorted(rows, key=lambda r: (r["sweep"], r["run"])):
    out.setdefault(key(r), []).append(r)
  return out


def mean_of(vals):
  vals = [v for v in vals if v is not None]
  return statistics.mean(vals) if vals else None


def by_schedule(rows):
  """((dataset, model, epochs), {(sweep, variant): runs}) over the non-tuning runs."""
  rows = [r for r in rows if not r["sweep"].startswith(SUMMARY_SKIP) and r.get("dataset")]
  for key, rs in group_by(rows, lambda r: (r["dataset"], r["model"], r["epochs"])).items():
    yield key, group_by(rs, lambda r: (r["sweep"], variant_of(r["run"])))


def variant_stats(vs):
  """Means over one variant's seeds (test and val accuracy, size ratio), its family and lr."""
  return types.SimpleNamespace(
      acc=mean_of([r["test_accuracy"] for r in vs]), val=mean_of([r["val_accuracy"] for r in vs]),
      ratio=mean_of([size_ratio(r) for r in vs]), family=family(vs[0]),
      lr=vs[0].get("config", {}).get("lr"))


def fp32_reference(rows) -> dict:
  """{(dataset, model, epochs): the most accurate FP32 variant's mean test accuracy}."""
  ref = {}
  for key, variants in by_schedule(rows):
    accs = [mean_of([r["test_accuracy"] for r in vs]) for vs in variants.values()
            if family(vs[0]) == "fp32"]
    if accs:
      ref[key] = max(accs)
  return ref


# Config fields that do not change a run's recipe (how long, which seed, where, how often
# the scales step: k does not move the result beyond the seeds' spread, docs/RESULTS.md).
SCHEDULE_FREE = ("epochs", "seed", "workdir", "scale_every", "chunk_steps", "limit")


def recipe_of(r) -> dict:
  cfg = {k: v for k, v in r.get("config", {}).items() if k not in SCHEDULE_FREE}
  if "scale_stop" in cfg:  # "auto" as the loop resolves it (older records name it)
    cfg["scale_stop"] = _scale_stop(r.get("config", {}))
  return cfg


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def same_recipe(a: dict, b: dict) -> bool:
  """Equal on every field; a field newer than a record reads as its default."""
  return all(a.get(k, _DEFAULTS.get(k)) == b.get(k, _DEFAULTS.get(k)) for k in a.keys() | b.keys())


# Sweeps whose stable-ratio runs differ only in lambda.
THRESHOLD_SWEEPS = ("threshold_", "competitive_", "brake_restore_")


def unrecorded_sweeps(configs_dir: pathlib.Path, recorded) -> list:
  """Names of the sweeps configured in `configs_dir` that have no record."""
  names = {json.loads(f.read_text())["name"] for f in configs_dir.glob("*.json")}
  return sorted(names - set(recorded))

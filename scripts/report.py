"""Generates docs/RESULTS.md (and plots) from the collected sweep results.

  python scripts/report.py [--results_dir results] [--out docs/RESULTS.md]

Reads the sweeps' committed record, ``results/<sweep>/results.jsonl`` and each
run's ``results/<sweep>/<run>/metrics.jsonl`` (both kept by scripts/sweep.py).
For every sweep it writes a table of variants (mean
+- std over seeds of test accuracy, average bits, packed bytes and ratios,
train time) with the command of one run; a convergence table (bits change over
the last 20% of epochs, final vs best validation accuracy); and a Pareto plot
of test accuracy against compression ratio. Nothing here is typed in by hand.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import pathlib
import re
import statistics
import sys
import types
from typing import Optional

from lqlab.files import RecordError, read_jsonl
from lqlab.config import TrainConfig, reproduce_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _ms(vals, fmt="{:.4f}"):
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


DATASET_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10",
                 "imagenette": "Imagenette"}


def size_bytes(r):
  return r.get("packed_bytes") or r.get("nominal_bytes")


# Modules that moved since runs were recorded: a recorded command names the old one.
MOVED_MODULES = {"lqjax.ptq": "lqlab.ptq"}


def command_today(cmd: str) -> str:
  """A recorded command as it runs today, from the repository: the module where it lives
  now, and its workdir relative to the repository (`runs/<sweep>/<run>`), not the path of
  the machine it ran on."""
  for old, new in MOVED_MODULES.items():
    cmd = cmd.replace(f"-m {old} ", f"-m {new} ")
  return re.sub(r"--workdir=\S*?/(runs/\S+)", r"--workdir=\1", cmd)


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


def sweep_section(name, rows, results_dir, plots_dir):
  out = [f"## {name}", ""]
  by_var = collections.OrderedDict()
  for r in sorted(rows, key=lambda r: r["run"]):
    by_var.setdefault(variant_of(r["run"]), []).append(r)
  out += ["| variant | seeds | epochs | test accuracy | avg bits | packed bytes | ratio | "
          "entropy-coded ratio | train s |", "|---|---|---|---|---|---|---|---|---|"]
  for var, rs in by_var.items():
    out.append(
        f"| {var} | {len(rs)} | {rs[0]['epochs']} | {_ms([r['test_accuracy'] for r in rs])} | "
        f"{_ms([r['avg_bits'] for r in rs], '{:.2f}')} | "
        f"{_ms([size_bytes(r) for r in rs], '{:.0f}')}{_accounted(rs)} | "
        f"{_ms([size_ratio(r) for r in rs], '{:.1f}')} | "
        f"{_ms([r.get('entropy_coded_ratio') for r in rs], '{:.1f}')} | "
        f"{_train_time(rs)} |")
  if any(r.get("nominal_bytes") for r in rows):
    out += ["", "\\* accounted size (bits x weights + scales), not a written file: the peer "
            "library writes none."]
  out += ["", "Convergence (per run; validation accuracy, since the test split is only "
          "evaluated at the end):", "",
          "| run | epochs | bits change, last 20% of epochs | final val acc | best val acc | "
          "final - best (points) | scales frozen at |", "|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: r["run"]):
    c = convergence(results_dir / name / r["run"])
    if c:
      out.append(f"| {r['run']} | {c[3]} | {c[0]:.1f}% | {c[1]:.4f} | {c[2]:.4f} | "
                 f"{100 * (c[1] - c[2]):+.2f} | {r.get('scales_frozen_at_epoch') or '-'} |")
  out += ["", "Commands (one run per variant; the seed varies):", ""]
  for var, rs in by_var.items():
    if rs[0].get("command"):
      again = reproduce_flags(rs[0]["config"], rs[0]["command"]) if "config" in rs[0] else []
      out.append(f"- {var}: `{command_today(rs[0]['command'])}`" + (
          f" (today: add `{' '.join(again)}`, the default when it ran)" if again else ""))
  png = pareto_plot(name, by_var, plots_dir)
  if png:
    out += ["", f"![{name}]({png.relative_to(plots_dir.parent).as_posix()})"]
  return out + [""]


def _train_time(rs):
  """Train seconds, mean +- std over the runs; split by platform where a variant's runs
  were made on more than one kind of device (a GPU run takes seconds, not minutes)."""
  by = {p: [r["train_seconds"] for r in g]
        for p, g in _group(rs, lambda r: r.get("platform", "cpu")).items()}
  if list(by) == ["cpu"]:
    return _ms(by["cpu"], "{:.0f}")
  return "; ".join(f"{_ms(v, '{:.0f}')} ({p}, {len(v)} run{'s' * (len(v) > 1)})"
                   for p, v in by.items())


def off_cpu_runs(rows) -> list:
  """The setup's line naming the runs that were not made on the CPU, if any."""
  runs = [r for r in rows if r.get("platform", "cpu") != "cpu"]
  if not runs:
    return []
  return [f"Made on a {p.upper()} (same commands, their `platform` field "
          f"says so): {', '.join(r['sweep'] + ' / ' + r['run'] for r in g)}."
          for p, g in _group(runs, lambda r: r["platform"]).items()] + [""]


def _accounted(rs):
  return " \\*" if any(r.get("nominal_bytes") for r in rs) else ""


def pareto_plot(name, by_var, plots_dir):
  """A sweep's accuracy against packed size: one line per scheme through its variants."""
  return frontier_plot(name, {(name, v): vs for v, vs in by_var.items()}, plots_dir,
                       f"{name}: test accuracy against packed size", f"{name}.png")


def frontier_plot(name, variants, plots_dir, title, filename, span: float = 0.03):
  """Test accuracy against the packed file's ratio: one line per scheme through its
  frontier variants' sizes (mean over seeds, std bars; the scheme's dominated variants as
  faint dots), FP32 as a dashed line, a log x-axis
  labelled with the ratios, and the y-axis zoomed to the competitive range: `span` below
  FP32 (or below the best point without FP32). Points below it are listed in a note.

  Returns the PNG's path, or None when there is nothing to draw."""
  pts = []
  for vs in variants.values():
    ratio, acc = _mean([size_ratio(r) for r in vs]), _mean([r["test_accuracy"] for r in vs])
    if ratio and acc is not None:
      sd = statistics.stdev([r["test_accuracy"] for r in vs]) if len(vs) > 1 else 0.0
      pts.append((family(vs[0]), ratio, acc, sd, variant_of(vs[0]["run"])))
  fp32 = [p for p in pts if p[0] == "fp32"]
  pts = [p for p in pts if p[0] != "fp32"]
  if not pts:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib import ticker
  ref = max(p[2] for p in fp32) if fp32 else None
  top = max([p[2] for p in pts] + ([ref] if ref is not None else []))
  floor = (ref if ref is not None else top) - span
  shown = [p for p in pts if p[2] >= floor]
  off = sorted((p for p in pts if p[2] < floor), key=lambda p: p[2])
  fig, ax = plt.subplots(figsize=(9, 4.2))
  for fam in sorted({p[0] for p in shown}):
    ps = sorted((p for p in shown if p[0] == fam), key=lambda p: p[1])
    # the scheme's frontier (no variant of it both smaller and more accurate) as its line,
    # its other variants as faint dots of the same colour
    front = [p for p in ps if not any(q[1] > p[1] and q[2] > p[2] for q in ps)]
    line = ax.errorbar([p[1] for p in front], [p[2] for p in front],
                       yerr=[p[3] for p in front], fmt="-o", ms=4, lw=1.2, capsize=2, label=fam)
    rest = [p for p in ps if p not in front]
    if rest:
      ax.plot([p[1] for p in rest], [p[2] for p in rest], "o", ms=3, alpha=0.35,
              color=line[0].get_color())
  if ref is not None:
    ax.axhline(ref, ls="--", color="0.3", lw=1, label=f"FP32 ({ref:.4f})")
  ax.set_xscale("log")
  xs = [p[1] for p in shown]
  lo_x, hi_x = min(xs) / 1.15, max(xs) * 1.15
  ax.set_xlim(lo_x, hi_x)
  nice = [m * 10 ** e for e in range(-1, 4) for m in (1, 1.5, 2, 3, 4, 5, 6, 8)]
  ticks = [t for t in nice if lo_x <= t <= hi_x]
  while len(ticks) > 8:
    ticks = ticks[::2]
  ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
  ax.xaxis.set_minor_locator(ticker.NullLocator())
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
  lo = min([p[2] - p[3] for p in shown] + ([ref] if ref is not None else []))
  ax.set_ylim(max(floor, lo - 0.002), top + 0.25 * (top - max(floor, lo - 0.002)) + 0.001)
  ax.set(xlabel="compression ratio: FP32 bytes / packed file bytes (log)",
         ylabel="test accuracy (mean over seeds, std bars)", title=title)
  ax.grid(True, which="major", alpha=0.3)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
  if off:
    note = "below the chart: " + "; ".join(
        f"{p[4]} {p[2]:.3f} at {p[1]:.1f}x" for p in off[:4]) + (
        f"; and {len(off) - 4} more" if len(off) > 4 else "")
    fig.text(0.01, 0.01, note, fontsize=6.5, color="0.3")
  fig.subplots_adjust(left=0.09, right=0.68, top=0.9, bottom=0.2 if off else 0.13)
  return _save(fig, plots_dir / filename)


_WRITTEN = set()  # the plots this report wrote (others in the folder are stale)


def _save(fig, path):
  import matplotlib.pyplot as plt
  _WRITTEN.add(path.resolve())
  if not fig.subplotpars.right < 0.9:  # a plot that set its own margins keeps them
    fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ------------------------------------------------------- across sweeps

# Sweeps left out of the per-dataset summary: tuning runs (judged on validation only) and
# the single-seed exploration of stabilising mechanisms (their own section below).
SUMMARY_SKIP = ("tune_", "stability_candidates")

# The size targets: (dataset, model, size field, target ratio, max points below FP32, what).
TARGETS = [
    ("mnist", "lenet300", "compression_ratio", 16.0, 0.3, "packed file"),
    ("mnist", "lenet300", "entropy_coded_ratio", 40.0, 0.3, "entropy-coded file"),
    ("mnist", "lenet5", "entropy_coded_ratio", 39.0, 0.3, "entropy-coded file"),
    # learned pruning: Bayesian Compression (BC-GHS) reports 419x on LeNet-5-Caffe
    ("mnist", "lenet5", "entropy_coded_ratio", 200.0, 0.3, "entropy-coded file"),
    ("cifar10", "resnet20", "compression_ratio", 10.0, 1.0, "packed file"),
]


def _scale_stop(cfg) -> Optional[str]:
  """The run's validation brake as the loop resolves it (:attr:`TrainConfig.brake`, on the
  record's fields over today's defaults); None for a record that keeps no config."""
  if not cfg:
    return None
  d = {**_DEFAULTS, **cfg}
  d["budget"] = d.get("budget_bits") is not None or d.get("budget_bytes") is not None
  return TrainConfig.brake.fget(types.SimpleNamespace(**d))


def family(r) -> str:
  """The scheme a run belongs to, for tables and plot colours."""
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


def _group(rows, key):
  out = collections.OrderedDict()
  for r in sorted(rows, key=lambda r: (r["sweep"], r["run"])):
    out.setdefault(key(r), []).append(r)
  return out


def _mean(vals):
  vals = [v for v in vals if v is not None]
  return statistics.mean(vals) if vals else None


def _by_schedule(rows):
  """((dataset, model, epochs), {(sweep, variant): runs}) over the non-tuning runs."""
  rows = [r for r in rows if not r["sweep"].startswith(SUMMARY_SKIP) and r.get("dataset")]
  for key, rs in _group(rows, lambda r: (r["dataset"], r["model"], r["epochs"])).items():
    yield key, _group(rs, lambda r: (r["sweep"], variant_of(r["run"])))


def dataset_summary(rows, plots_dir):
  """One table and one Pareto plot per (dataset, model, epochs), over every sweep."""
  out = ["## Summary per dataset and model", "",
         "Every scheme run on the same model, data and schedule, gathered from all sweeps "
         "(tuning sweeps excepted); mean ± std over seeds. Ratio = FP32 bytes / bytes of the "
         "packed file written (\\*: accounted size, for a peer library that writes no file).", ""]
  for (ds, model, epochs), variants in _by_schedule(rows):
    out += [f"### {ds} / {model}, {epochs} epochs", "",
            "| scheme | sweep / variant | seeds | test accuracy | avg bits | bytes | ratio | "
            "entropy-coded ratio | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for (sweep, var), vs in sorted(variants.items(), key=lambda kv: (
        family(kv[1][0]), -(_mean([size_ratio(r) for r in kv[1]]) or 0))):
      out.append(
          f"| {family(vs[0])} | {sweep} / {var} | {len(vs)} | "
          f"{_ms([r['test_accuracy'] for r in vs])} | {_ms([r['avg_bits'] for r in vs], '{:.2f}')} | "
          f"{_ms([size_bytes(r) for r in vs], '{:.0f}')}{_accounted(vs)} | "
          f"{_ms([size_ratio(r) for r in vs], '{:.1f}')} | "
          f"{_ms([r.get('entropy_coded_ratio') for r in vs], '{:.1f}')} | "
          f"{_train_time(vs)} |")
    png = frontier_plot(f"{ds}_{model}_e{epochs}", variants, plots_dir,
                        f"{DATASET_NAMES.get(ds, ds)}, {model}, {epochs} epochs: every scheme",
                        f"pareto_{ds}_{model}_e{epochs}.png")
    if png:
      out += ["", f"![{ds} {model} {epochs} epochs]({png.relative_to(plots_dir.parent).as_posix()})"]
    out.append("")
  return out


def targets_section(rows):
  """Distance of the best variant to each target."""
  out = ["## Distance to the targets", "",
         "For each target: among variants (mean over seeds) whose test accuracy is at most the "
         "tolerance below the most accurate FP32 variant (any learning rate) of the same model and "
         "schedule, the largest mean ratio.", "",
         "| dataset / model | size | target | tolerance | best variant | epochs | accuracy "
         "(FP32) | ratio | distance |", "|---|---|---|---|---|---|---|---|---|"]
  for ds, model, field, target, tol, what in TARGETS:
    # (ratio, variant, epochs, accuracy, FP32 accuracy) of every quantized variant
    # that has an FP32 run on its schedule
    cands, fp32_any = [], False
    for (ds_, model_, epochs), variants in _by_schedule(rows):
      fp32 = [_mean([r["test_accuracy"] for r in vs]) for vs in variants.values()
              if family(vs[0]) == "fp32"]
      if (ds_, model_) != (ds, model) or not fp32:
        continue
      fp32_any = True
      for (sweep, var), vs in variants.items():
        ratio = _mean([r.get(field) for r in vs])
        if ratio and family(vs[0]) != "fp32":
          off_cpu = sorted({r.get("platform", "cpu") for r in vs} - {"cpu"})
          label = f"{sweep} / {var}" + (f" (made on {', '.join(off_cpu)})" if off_cpu else "")
          cands.append((ratio, label, epochs,
                        _mean([r["test_accuracy"] for r in vs]), max(fp32)))
    within = [c for c in cands if c[3] >= c[4] - tol / 100 - 1e-9]
    row = f"| {ds} / {model} | {what} | {target:g}x | {tol:g} points |"
    if within:
      ratio, name, epochs, acc, ref = max(within, key=lambda c: c[0])
      dist = "reached" if ratio >= target else f"{ratio / target:.1%} of the target"
    elif cands:
      ratio, name, epochs, acc, ref = max(cands, key=lambda c: c[3] - c[4])
      dist = (f"none within the tolerance: the most accurate is {100 * (ref - acc):.2f} points "
              f"below FP32")
    else:
      why = "no quantized run on an FP32 schedule" if fp32_any else "no FP32 run on any schedule yet"
      out.append(f"{row} - | - | - | - | {why} |")
      continue
    out.append(f"{row} {name} | {epochs} | {acc:.4f} ({ref:.4f}) | {ratio:.2f}x | {dist} |")
  return out + [""]


def _variant_stats(vs):
  """Means over one variant's seeds (test and val accuracy, size ratio), its family and lr."""
  return types.SimpleNamespace(
      acc=_mean([r["test_accuracy"] for r in vs]), val=_mean([r["val_accuracy"] for r in vs]),
      ratio=_mean([size_ratio(r) for r in vs]), family=family(vs[0]),
      lr=vs[0].get("config", {}).get("lr"))


def versus_lsq_section(rows):
  """The stable ratio variant against LSQ at (about) equal packed size, per model."""
  out = ["## Stable ratio vs LSQ at equal packed size", "",
         "For each LSQ variant: among the stable-ratio variants (any lambda or option) of the "
         "same model, schedule and weights' learning rate whose file is at most 5% larger (mean "
         "packed ratio >= 0.95 x LSQ's), the one with the best mean validation accuracy (chosen "
         "without looking at test). Wins when its mean test accuracy is at least LSQ's.", "",
         "| dataset / model | epochs | lr | LSQ variant | LSQ accuracy | LSQ ratio | stable ratio "
         "variant | its accuracy | its ratio | difference (points) | verdict |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
  for (ds, model, epochs), variants in _by_schedule(rows):
    stats = {k: _variant_stats(vs) for k, vs in variants.items()}
    for k, lsq in stats.items():
      if lsq.family != "LSQ" or not lsq.ratio:
        continue
      lr = lsq.lr
      head = (f"| {ds} / {model} | {epochs} | {'-' if lr is None else f'{lr:g}'} | {k[0]} / {k[1]} "
              f"| {lsq.acc:.4f} | {lsq.ratio:.1f}x |")
      cands = [(s.val, s.acc, s.ratio, kk) for kk, s in stats.items() if s.family == "stable ratio"
               and s.lr == lr and s.ratio and s.ratio >= 0.95 * lsq.ratio]
      if not cands:
        out.append(f"{head} - | - | - | - | no stable-ratio run this small |")
        continue
      _, a, q, kk = max(cands)  # best val; ties: more accurate, then smaller file
      verdict = "ratio wins" if a >= lsq.acc else "LSQ wins"
      out.append(f"{head} {kk[0]} / {kk[1]} | {a:.4f} | {q:.1f}x | {100 * (a - lsq.acc):+.2f} | "
                 f"{verdict} |")
  return out + [""]


def _agree(a, b) -> str:
  """Whether two seed sets' means differ by no more than their two spreads together."""
  if len(a) < 2 or len(b) < 2:
    return "-"
  d = abs(statistics.mean(a) - statistics.mean(b))
  return "yes" if d <= statistics.stdev(a) + statistics.stdev(b) + 1e-12 else "no"


def scale_every_section(rows):
  """Accuracy and bits with the scales updated every k steps against every step (k=1)."""
  rows = [r for r in rows if r["sweep"].startswith("scale_every_")]
  if not rows:
    return []
  out = ["## Scale updates every k steps", "",
         "The same runs with the scales updated every step (k=1) and every k steps (the "
         "others train the weights only; the scales' learning rate is multiplied by k). "
         "Mean ± std over seeds; *agrees*: the difference of means from k=1 is within the two "
         "variants' standard deviations added, for test accuracy and for average bits. Train "
         "seconds share the 2-core CPU with other runs: see docs/PERFORMANCE.md for step "
         "times measured side by side.", "",
         "| dataset / model | epochs | recipe | k | seeds | test accuracy | avg bits | "
         "agrees (accuracy, bits) | train s |", "|---|---|---|---|---|---|---|---|---|"]
  groups = _group(rows, lambda r: (r["dataset"], r["model"], r["epochs"],
                                   re.sub(r"_?k\d+$", "", variant_of(r["run"])) or "default"))
  for (ds, model, epochs, recipe), rs in groups.items():
    by_k = collections.OrderedDict(sorted(_group(rs, lambda r: r["config"].get(
        "scale_every", 1)).items()))
    base = by_k.get(1, [])
    for k, vs in by_k.items():
      acc, bits = [r["test_accuracy"] for r in vs], [r["avg_bits"] for r in vs]
      agree = "-" if k == 1 else (
          f"{_agree(acc, [r['test_accuracy'] for r in base])}, "
          f"{_agree(bits, [r['avg_bits'] for r in base])}")
      out.append(f"| {ds} / {model} | {epochs} | {recipe} | {k} | {len(vs)} | {_ms(acc)} | "
                 f"{_ms(bits, '{:.2f}')} | {agree} | {_ms([r['train_seconds'] for r in vs], '{:.0f}')} |")
  return out + [""]


def _fp32_reference(rows) -> dict:
  """{(dataset, model, epochs): the most accurate FP32 variant's mean test accuracy}."""
  ref = {}
  for key, variants in _by_schedule(rows):
    accs = [_mean([r["test_accuracy"] for r in vs]) for vs in variants.values()
            if family(vs[0]) == "fp32"]
    if accs:
      ref[key] = max(accs)
  return ref


def _frontier_stats(variants):
  """{variant: (family, test accuracies, mean packed bytes, (model, epochs))}."""
  return {var: (family(vs[0]), [r["test_accuracy"] for r in vs],
                _mean([r.get("packed_bytes") for r in vs]), (vs[0]["model"], vs[0]["epochs"]))
          for var, vs in variants.items()}


def _landing(vs) -> str:
  """The largest distance of a budgeted variant's seeds from their budget."""
  tgt = vs[0]["config"].get("budget_bits")
  return f"{max(abs(r['budget_bits'] - tgt) / tgt for r in vs):.2%}" if tgt else "-"


def _baseline(stats, var, nearest=False):
  """``(difference, spread, baseline, its accuracies)`` of budgeted variant `var` against a
  baseline of the same model and schedule whose file is at least as large: the most
  accurate one, or (`nearest`) the one with the smallest such file. None when there is
  none. The spread is the two standard deviations added (None when a side has 1 seed)."""
  _, acc, size, where = stats[var]
  base = [((sz if nearest else -statistics.mean(a)), a, v) for v, (f, a, sz, w) in stats.items()
          if not f.startswith("budgeted") and f != "fp32" and w == where and sz and size
          and sz >= size]
  if not base:
    return None
  _, a, v = min(base)
  spread = (statistics.stdev(acc) + statistics.stdev(a)) if len(acc) > 1 and len(a) > 1 else None
  return statistics.mean(acc) - statistics.mean(a), spread, v, a


def _dominators(stats, var):
  """Baselines of the same model and schedule with a smaller file and a higher mean accuracy."""
  _, acc, size, where = stats[var]
  return [v for v, (f, a, sz, w) in stats.items()
          if not f.startswith("budgeted") and f != "fp32" and w == where and sz and size
          and sz < size and statistics.mean(a) > statistics.mean(acc)]


def _versus(best) -> str:
  if best is None:
    return "-"
  d, spread, v = best[:3]
  if spread is None:
    return f"{100 * d:+.2f} vs {v} (1 seed: no spread)"
  return f"{100 * d:+.2f} vs {v} ({'beyond' if abs(d) > spread else 'within'} spread {100 * spread:.2f})"


def frontier_summary(all_rows):
  """The frontier summary: each budgeted variant against the baselines."""
  rows = [r for r in all_rows if r["sweep"].startswith("frontier_")]
  out = []
  for sweep, rs in _group(rows, lambda r: r["sweep"]).items():
    variants = _group(rs, lambda r: variant_of(r["run"]))
    stats = _frontier_stats(variants)
    for var, vs in sorted(variants.items(), key=lambda kv: -(stats[kv[0]][2] or 0)):
      fam, acc, size, (model, epochs) = stats[var]
      if not fam.startswith("budgeted"):
        continue
      out.append(f"| [{vs[0]['dataset']} / {model}](#{sweep.lower()}), "
                 f"{epochs} epochs | {vs[0]['config'].get('budget_bits'):g} | {len(vs)} | "
                 f"{_ms(acc)} | {size:,.0f} | {_versus(_baseline(stats, var, nearest=True))} | "
                 f"{_versus(_baseline(stats, var))} | "
                 f"{', '.join(_dominators(stats, var)) or 'none'} |")
  if not out:
    return []
  return ["| dataset / model | budget (bits) | seeds | budgeted accuracy | file bytes | vs the "
          "nearest larger baseline (points) | vs the best larger baseline (points) | smaller "
          "and more accurate |", "|---|---|---|---|---|---|---|---|"] + out


def frontier_section(all_rows, plots_dir):
  """Budgeted runs against the uniform-bit baselines at (about) equal packed size, and the
  budgeted runs of the pruning sweeps, each against FP32 on its schedule."""
  rows = [r for r in all_rows if r["sweep"].startswith(("frontier_", "prune_"))]
  if not rows:
    return []
  fp32 = _fp32_reference(all_rows)
  out = ["## The low-bit frontier at equal packed size", "",
         "Budgeted runs (`--budget_bits`: average bits per quantized weight, scale storage "
         "included) against LSQ with uniform bits, LSQ with the first and last layer at 8 "
         "bits, and LSQ with per-layer widths chosen by HAWQ-v2's Hessian-trace proxy for "
         "the same budget (`scripts/hawq_bits.py`; docs/METHOD.md), same model, data and "
         "schedule; each on the midtread grid s*q or, named *midrise*, on s*(q+1/2) "
         "(`--grid=midrise`: binary {-s/2, +s/2} at 1 bit, where the midtread grid is "
         "{-s, 0}). Mean ± std over seeds. *Landing*: the largest "
         "distance of a seed's size from its budget. *vs nearest / best larger baseline*: the "
         "difference in mean test accuracy from the baseline with the smallest file at least "
         "as large, and from the most accurate such baseline (points; *beyond spread* when it "
         "exceeds the two standard deviations added). *Smaller and more accurate*: baselines "
         "that beat the budgeted variant's mean accuracy with a smaller file. "
         "*vs FP32*: points from the most accurate FP32 variant of the same model and "
         "schedule in any sweep. A pruned group (every code 0) costs its scale's 9 bytes in "
         "the packed file and almost nothing in the entropy-coded one.", ""]
  for sweep, rs in _group(rows, lambda r: r["sweep"]).items():
    variants = _group(rs, lambda r: variant_of(r["run"]))
    out += [f"### {rs[0]['dataset']}, `{sweep}`", "",
            "| variant | model, epochs | scheme | seeds | test accuracy | vs FP32 | "
            "val accuracy | avg code bits | file bytes | ratio | entropy-coded ratio | landing "
            "| vs nearest larger baseline | vs best larger baseline | smaller and more accurate "
            "|", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    stats = _frontier_stats(variants)
    for var, vs in sorted(variants.items(), key=lambda kv: (stats[kv[0]][3],
                                                            -(stats[kv[0]][2] or 0))):
      fam, acc, size, where = stats[var]
      landing, versus = "-", "- | - | -"
      if fam.startswith("budgeted"):
        landing = _landing(vs)
        versus = (f"{_versus(_baseline(stats, var, nearest=True))} | "
                  f"{_versus(_baseline(stats, var))} | {', '.join(_dominators(stats, var)) or 'none'}")
      ref = fp32.get((vs[0]["dataset"], vs[0]["model"], vs[0]["epochs"]))
      gap = "-" if ref is None else f"{100 * (statistics.mean(acc) - ref):+.2f}"
      out.append(f"| {var} | {vs[0]['model']}, {vs[0]['epochs']} | {fam} | {len(vs)} | "
                 f"{_ms(acc)} | {gap} | {_ms([r['val_accuracy'] for r in vs])} | "
                 f"{_ms([r['avg_bits'] for r in vs], '{:.2f}')} | "
                 f"{_ms([r.get('packed_bytes') for r in vs], '{:.0f}')} | "
                 f"{_ms([size_ratio(r) for r in vs], '{:.1f}')} | "
                 f"{_ms([r.get('entropy_coded_ratio') for r in vs], '{:.1f}')} | {landing} | "
                 f"{versus} |")
    first = next(iter(variants.values()))[0]
    png = frontier_plot(sweep, {(sweep, v): vs for v, vs in variants.items()}, plots_dir,
                        f"{DATASET_NAMES.get(first['dataset'], first['dataset'])}, "
                        f"{first['model']}, {first['epochs']} epochs: the low-bit frontier",
                        f"pareto_{sweep}.png")
    if png:
      out += ["", f"![{sweep}]({png.relative_to(plots_dir.parent).as_posix()})"]
    out.append("")
  return out


def _headline_cells(rows) -> dict:
  """{(dataset, tolerance, ratio field): (ratio, "sweep / variant", model, epochs, accuracy,
  FP32 accuracy, seeds, where)}: the largest mean ratio within each tolerance of FP32."""
  cells = {}
  for (ds, model, epochs), variants in _by_schedule(rows):
    fp32 = [_mean([r["test_accuracy"] for r in vs]) for vs in variants.values()
            if family(vs[0]) == "fp32"]
    if not fp32:
      continue
    ref = max(fp32)
    for (sweep, var), vs in variants.items():
      if family(vs[0]) == "fp32":
        continue
      where = sorted({r.get("platform", "cpu") for r in vs} - {"cpu"})
      acc = _mean([r["test_accuracy"] for r in vs])
      for tol in (0.3, 1.0):
        if acc < ref - tol / 100 - 1e-9:
          continue
        for field in ("compression_ratio", "entropy_coded_ratio"):
          val = _mean([r.get(field) for r in vs])
          key = (ds, tol, field)
          if val and val > cells.get(key, (0,))[0]:
            cells[key] = (val, f"{sweep} / {var}", model, epochs, acc, ref, len(vs),
                          f", made on {', '.join(where)}" if where else "")
  return cells


def readme_headline(rows) -> list:
  """The README's few rows: per dataset, the largest packed and entropy-coded ratios within
  1 point of FP32 on the same schedule, each with its run and seeds."""
  cells = _headline_cells(rows)
  out = ["| dataset | packed file, within 1 point of FP32 | entropy-coded file, within 1 point |",
         "|---|---|---|"]
  for ds in sorted({k[0] for k in cells}):
    row = f"| {ds} |"
    for field in ("compression_ratio", "entropy_coded_ratio"):
      c = cells.get((ds, 1.0, field))
      row += " - |" if c is None else (
          f" **{c[0]:.1f}x**: {c[4]:.4f} vs FP32 {c[5]:.4f} ({c[2]}, {c[3]} epochs, {c[6]} "
          f"seed{'s' if c[6] > 1 else ''}{c[7]}) |")
    out.append(row)
  return out


def headline_section(rows):
  """The memory reduction at <= 0.3 and <= 1 point from FP32, per dataset, best model."""
  out = ["## Headline", ""]
  cells = _headline_cells(rows)
  if not cells:
    return []
  best = max(v[0] for (ds, tol, f), v in cells.items() if f == "compression_ratio")
  datasets = sorted({k[0] for k in cells})
  out += [f"lqjax reduces memory by up to {best:.1f}x (packed file) on "
          f"{', '.join(datasets)}, with test accuracy within 1 point of FP32 on the same "
          f"schedule. Per dataset, the largest mean ratio among variants (mean over their "
          f"seeds) within 0.3 and 1 point of the most accurate FP32 variant of the same "
          f"model and schedule:", "",
          "| dataset | within | packed ratio | variant | entropy-coded ratio | variant |",
          "|---|---|---|---|---|---|"]
  for ds in datasets:
    for tol in (0.3, 1.0):
      row = f"| {ds} | {tol:g} point{'s' if tol != 1 else ''} |"
      for field in ("compression_ratio", "entropy_coded_ratio"):
        c = cells.get((ds, tol, field))
        row += " - | - |" if c is None else (
            f" {c[0]:.1f}x | [{c[1]}](#{c[1].split(' / ')[0].lower()}) "
            f"({c[2]}, {c[3]} epochs, {c[6]} seed{'s' if c[6] > 1 else ''}{c[7]}, "
            f"{c[4]:.4f} vs FP32 {c[5]:.4f}) |")
      out.append(row)
  return out + [""]


# Published figures a schedule is measured against: (dataset, model) ->
# [(what, quantized accuracy, its average weight bits, FP32 accuracy of the same paper)].
PUBLISHED = {
    ("cifar10", "resnet20"): [
        ("DoReFa-Net, 2-bit weights, float activations (Zhou et al. 2016)", 0.9105, 2, 0.9213)],
}
# Config fields that do not change a run's recipe (how long, which seed, where, how often
# the scales step: k does not move the result beyond the seeds' spread, docs/RESULTS.md).
SCHEDULE_FREE = ("epochs", "seed", "workdir", "scale_every", "chunk_steps", "limit")


def _recipe(r) -> dict:
  cfg = {k: v for k, v in r.get("config", {}).items() if k not in SCHEDULE_FREE}
  if "scale_stop" in cfg:  # "auto" as the loop resolves it (older records name it)
    cfg["scale_stop"] = _scale_stop(r.get("config", {}))
  return cfg


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _same_recipe(a: dict, b: dict) -> bool:
  """Equal on every field; a field newer than a record reads as its default."""
  return all(a.get(k, _DEFAULTS.get(k)) == b.get(k, _DEFAULTS.get(k)) for k in a.keys() | b.keys())


def schedules_section(rows, results_dir: pathlib.Path):
  """Each variant of a ``long_`` sweep beside the same recipe on the shorter schedules of
  any other sweep (accuracy, distance to FP32 on each schedule, bits, and how much the bits
  still moved over the last 20% of epochs); then the distance to published figures."""
  fp32 = _fp32_reference(rows)
  out = _long_schedule_rows(rows, results_dir, fp32) + _published_rows(rows, fp32)
  return ["## Schedule length and published figures", ""] + out if out else []


def _long_schedule_rows(rows, results_dir, fp32):
  longs = [r for r in rows if r["sweep"].startswith("long_")]
  if not longs:
    return []
  out = ["Each variant of a long-schedule sweep (`sweeps/long_*.json`) beside the same recipe "
         "(every config field equal but the number of epochs, the seed and `scale_every`) in "
         "any sweep. *vs FP32*: points from the most accurate FP32 variant of the same model "
         "and schedule. *Bits moved*: the change of the average bits over the last 20% of "
         "epochs, mean over seeds (0 once the scales have converged or frozen).", "",
         "| dataset / model | variant | epochs | sweep / variant | seeds | test accuracy | "
         "vs FP32 | avg bits | bits moved, last 20% | ratio | entropy-coded ratio |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
  for (sweep, var), vs in _group(longs, lambda r: (r["sweep"], variant_of(r["run"]))).items():
    recipe, where = _recipe(vs[0]), (vs[0]["dataset"], vs[0]["model"])
    same = [(key, g) for key, g in _group(
        [r for r in rows if (r["dataset"], r["model"]) == where and "config" in r
         and not r["sweep"].startswith(SUMMARY_SKIP)],
        lambda r: (r["epochs"], r["sweep"], variant_of(r["run"]))).items()
        if _same_recipe(recipe, _recipe(g[0]))]
    for (epochs, sw, v), g in sorted(same):
      ref = fp32.get((*where, epochs))
      acc = [r["test_accuracy"] for r in g]
      moved = [c[0] for c in (convergence(results_dir / sw / r["run"]) for r in g) if c]
      out.append(f"| {where[0]} / {where[1]} | {var} | {epochs} | {sw} / {v} | {len(g)} | "
                 f"{_ms(acc)} | "
                 f"{'-' if ref is None else f'{100 * (statistics.mean(acc) - ref):+.2f}'} | "
                 f"{_ms([r['avg_bits'] for r in g], '{:.2f}')} | "
                 f"{f'{statistics.mean(moved):.1f}%' if moved else '-'} | "
                 f"{_ms([size_ratio(r) for r in g], '{:.1f}')} | "
                 f"{_ms([r.get('entropy_coded_ratio') for r in g], '{:.1f}')} |")
  return out + [""]


def _published_rows(rows, fp32):
  out = []
  for (ds, model), figures in PUBLISHED.items():
    for (ds_, model_, epochs), variants in _by_schedule(rows):
      ref = fp32.get((ds, model, epochs))
      if (ds_, model_) != (ds, model) or ref is None:
        continue
      for what, acc, bits, paper_fp32 in figures:
        low = [(_mean([r["test_accuracy"] for r in vs]), f"{sw} / {v}") for (sw, v), vs in
               variants.items() if family(vs[0]) != "fp32"
               and _mean([r["avg_bits"] for r in vs]) <= bits + 0.05]
        best = max(low, default=None)
        out.append(f"| {ds} / {model} | {epochs} | {ref:.4f} | {100 * (ref - paper_fp32):+.2f} "
                   f"| {what}: {acc:.4f} at {bits} bits | " + (
                       "- | - |" if best is None else
                       f"{best[1]}: {best[0]:.4f} | {100 * (best[0] - acc):+.2f} |"))
  if not out:
    return []
  return ["Distance to published figures, on each schedule that has an FP32 run here: our "
          "FP32 against the paper's FP32, and our most accurate variant at or below the "
          "paper's bits (average code bits, within 0.05) against the paper's.", "",
          "| dataset / model | epochs | our FP32 | vs the paper's FP32 (points) | published "
          "| our best at those bits | vs published (points) |",
          "|---|---|---|---|---|---|---|"] + out + [""]


def _layer_bits(r, kind):
  vals = [b for k, b in r.get("quantized_bits_per_layer", {}).items()
          if k.endswith("kernel") and (("conv" in k) == (kind == "conv"))]
  return _mean(vals)


# Sweeps whose stable-ratio runs differ only in lambda.
THRESHOLD_SWEEPS = ("threshold_", "competitive_", "brake_restore_")


def threshold_section(rows):
  """The lambda ranges: per threshold, accuracy and bits of dense and conv kernels."""
  rows = [r for r in rows if r["sweep"].startswith(THRESHOLD_SWEEPS) and
          family(r) == "stable ratio"]
  if not rows:
    return []
  out = ["## Threshold lambda: useful ranges for dense and convolutional layers", "",
         "Per sweep and lambda (mean over seeds): test accuracy, average bits of the whole model, "
         "and the mean over layers of the kernel bits of dense and of convolutional layers. "
         "Larger lambda should give fewer bits; where a larger lambda ends with more, its "
         "grids got too coarse early, validation accuracy collapsed, and the validation brake "
         "rolled the scales back to an earlier, finer epoch (the `scale_stop` events in "
         "results/<sweep>/<run>/metrics.jsonl).", ""]
  for sweep, rs in _group(rows, lambda r: r["sweep"]).items():
    out += [f"### {sweep} ({rs[0]['dataset']} / {rs[0]['model']}, {rs[0]['epochs']} epochs)", "",
            "| lambda | seeds | test accuracy | val accuracy | avg bits | dense kernel bits | "
            "conv kernel bits |", "|---|---|---|---|---|---|---|"]
    for lam, vs in sorted(_group(rs, lambda r: r["threshold"]).items()):
      dense, conv = _mean([_layer_bits(r, "dense") for r in vs]), _mean(
          [_layer_bits(r, "conv") for r in vs])
      out.append(f"| {lam:g} | {len(vs)} | {_ms([r['test_accuracy'] for r in vs])} | "
                 f"{_ms([r['val_accuracy'] for r in vs])} | {_ms([r['avg_bits'] for r in vs], '{:.2f}')} | "
                 f"{'-' if dense is None else f'{dense:.2f}'} | "
                 f"{'-' if conv is None else f'{conv:.2f}'} |")
    out.append("")
  return out


# Tuning sweeps and their selection rule (validation only; test accuracy plays no
# part): a float bar means the most compressed variant (fewest mean average bits)
# whose mean validation accuracy reaches the bar; None means the variant with the
# best mean validation accuracy (FP32 runs, or LSQ at a fixed bit width, where there
# are no bits to trade).
TUNING_BARS = {"tune_default_lenet300": 0.98, "tune_penalty_lenet300": 0.98,
               "tune_lr_lenet300": 0.98, "tune_lr_fp32_lenet300": None,
               "tune_lsq_lenet300": None}


def tuning_section(rows):
  out = []
  for sweep, rs in _group([r for r in rows if r["sweep"] in TUNING_BARS],
                          lambda r: r["sweep"]).items():
    bar = TUNING_BARS[sweep]
    variants = _group(rs, lambda r: variant_of(r["run"]))
    val = {v: _mean([r["val_accuracy"] for r in vs]) for v, vs in variants.items()}
    bits = {v: _mean([r["avg_bits"] for r in vs]) for v, vs in variants.items()}
    if bar is None:
      chosen = max(val, key=val.get) if val else None
      rule = "the variant with the best mean validation accuracy"
    else:
      ok = [v for v in variants if val[v] >= bar]
      chosen = min(ok, key=bits.get) if ok else None
      rule = (f"the variant with the fewest mean average bits whose mean validation accuracy "
              f"is at least {bar}")
    out += [f"## Tuning: {sweep}", "",
            f"Selection (on validation only): {rule}. Chosen: **{chosen or 'none'}**.", "",
            "| variant | seeds | val accuracy | avg bits | chosen |", "|---|---|---|---|---|"]
    for v, vs in sorted(variants.items(), key=lambda kv: (bits[kv[0]], -val[kv[0]])):
      out.append(f"| {v} | {len(vs)} | {_ms([r['val_accuracy'] for r in vs])} | "
                 f"{_ms([r['avg_bits'] for r in vs], '{:.2f}')} | {'yes' if v == chosen else ''} |")
    out.append("")
  return out


def unrecorded_sweeps(configs_dir: pathlib.Path, recorded) -> list:
  """Names of the sweeps configured in `configs_dir` that have no record."""
  names = {json.loads(f.read_text())["name"] for f in configs_dir.glob("*.json")}
  return sorted(names - set(recorded))


def main(argv=None):
  try:
    return _main(argv)
  except RecordError as e:  # a damaged line of a committed record, named
    print(f"error: {e}", file=sys.stderr)
    return 2


def _main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--results_dir", default=str(ROOT / "results"),
                  help="the sweeps' record written by scripts/sweep.py")
  ap.add_argument("--out", default=str(ROOT / "docs" / "RESULTS.md"))
  ap.add_argument("--sweeps", default=None, help="comma-separated sweep names (default: all)")
  ap.add_argument("--readme", default=None, help="also rewrite this README's results section")
  args = ap.parse_args(argv)
  results_dir = pathlib.Path(args.results_dir)
  files = sorted(results_dir.glob("*/results.jsonl"))
  if args.sweeps:
    keep = set(args.sweeps.split(","))
    files = [f for f in files if f.parent.name in keep]
  if not files:
    print(f"error: no <sweep>/results.jsonl under {results_dir}", file=sys.stderr)
    return 2
  lines = ["# lqjax results", "",
           "Generated by `python scripts/report.py` from the sweeps' record under `results/` "
           "(in git: `results/<sweep>/results.jsonl` holds every run's results and its exact "
           "command, `results/<sweep>/<run>/metrics.jsonl` its per-epoch log). Hardware: the "
           "2-core CPU machine described in the README unless a table says otherwise. Test "
           "accuracy is measured once, at the end of each run; all choices were made on the "
           "validation split.", ""]
  plots_dir = pathlib.Path(args.out).parent / "plots"
  all_rows = load_rows(files)
  missing = unrecorded_sweeps(ROOT / "sweeps", {f.parent.name for f in files})
  if missing and not args.sweeps:
    print(f"note: no record yet of sweep(s) {', '.join(missing)}: the report leaves them out "
          f"(run scripts/sweep.py --config sweeps/<config>.json)", file=sys.stderr)
  lines += headline_section(all_rows)
  lines += off_cpu_runs(all_rows)
  summary = frontier_summary(all_rows)
  if summary:
    lines += ["## The budget against the baselines", "",
              "The budgeted scheme (`--budget_bits`) against the baselines (LSQ uniform, LSQ "
              "with 8-bit first and last layers, LSQ with HAWQ-v2 widths; each also on the "
              "midrise grid, binary at 1 bit) on the same schedule: the one whose file is "
              "nearest above its own, the most accurate one whose file is at least as large, "
              "and any smaller one that is more accurate (mean ± std over seeds; 1 seed: no "
              "spread):", "", *summary, ""]
  lines += frontier_section(all_rows, plots_dir) + schedules_section(all_rows, results_dir)
  lines += scale_every_section(all_rows)
  lines += dataset_summary(all_rows, plots_dir) + targets_section(all_rows)
  lines += versus_lsq_section(all_rows)
  lines += threshold_section(all_rows) + tuning_section(all_rows)
  lines += ["# Per sweep", ""]
  for f in files:
    rows = [r for r in all_rows if r["sweep"] == f.parent.name]
    if rows:
      lines += sweep_section(f.parent.name, rows, results_dir, plots_dir)
  pathlib.Path(args.out).write_text("\n".join(lines) + "\n")
  print(f"wrote {args.out}")
  if not args.sweeps:  # a whole report: plots it no longer makes go
    for png in plots_dir.glob("*.png"):
      if png.resolve() not in _WRITTEN:
        png.unlink()
  if args.readme:
    p = pathlib.Path(args.readme)
    text = p.read_text()
    b, e = "<!-- results:begin -->", "<!-- results:end -->"
    if b in text and e in text:
      body = "\n".join(readme_headline(all_rows)) + (
          "\n\nRatios are against the same model in FP32 (float32 weights); every run, "
          "baseline, seed and command: [docs/RESULTS.md](docs/RESULTS.md).")
      p.write_text(text[:text.index(b) + len(b)] + "\n" + body + "\n" + text[text.index(e):])
      print(f"updated {p}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

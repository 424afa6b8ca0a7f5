"""The sections of docs/RESULTS.md, each a function of the record's rows."""

from __future__ import annotations

import collections
import pathlib
import re
import statistics

from lqlab.config import reproduce_flags
from lqlab.results.plots import frontier_plot, image, pareto_plot
from lqlab.results.records import (accounted_mark, act_rule_mark, by_schedule, command_today,
                                   convergence, DATASET_NAMES, family, fp32_reference, group_by,
                                   mean_of, mean_std, PUBLISHED, recipe_of, same_recipe,
                                   size_bytes, size_ratio, SUMMARY_SKIP, TARGETS,
                                   THRESHOLD_SWEEPS, train_time, TUNING_BARS, variant_of,
                                   variant_stats)


def sweep_section(name, rows, results_dir, plots_dir):
  out = [f"## {name}", ""]
  by_var = collections.OrderedDict()
  for r in sorted(rows, key=lambda r: r["run"]):
    by_var.setdefault(variant_of(r["run"]), []).append(r)
  out += ["| variant | seeds | epochs | test accuracy | avg bits | packed bytes | ratio | "
          "entropy-coded ratio | train s |", "|---|---|---|---|---|---|---|---|---|"]
  for var, rs in by_var.items():
    out.append(
        f"| {var} | {len(rs)} | {rs[0]['epochs']} | {mean_std([r['test_accuracy'] for r in rs])} | "
        f"{mean_std([r['avg_bits'] for r in rs], '{:.2f}')} | "
        f"{mean_std([size_bytes(r) for r in rs], '{:.0f}')}{accounted_mark(rs)} | "
        f"{mean_std([size_ratio(r) for r in rs], '{:.1f}')} | "
        f"{mean_std([r.get('entropy_coded_ratio') for r in rs], '{:.1f}')} | "
        f"{train_time(rs)} |")
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
    out += image(png, plots_dir, f"{name}")
  return out + [""]


def off_cpu_runs(rows) -> list:
  """The setup's line naming the runs that were not made on the CPU, if any."""
  runs = [r for r in rows if r.get("platform", "cpu") != "cpu"]
  if not runs:
    return []
  return [f"Made on a {p.upper()} (same commands, their `platform` field "
          f"says so): {', '.join(r['sweep'] + ' / ' + r['run'] for r in g)}."
          for p, g in group_by(runs, lambda r: r["platform"]).items()] + [""]


def dataset_summary(rows, plots_dir):
  """One table and one Pareto plot per (dataset, model, epochs), over every sweep."""
  out = ["## Summary per dataset and model", "",
         "Every scheme run on the same model, data and schedule, gathered from all sweeps "
         "(tuning sweeps excepted); mean ± std over seeds. Ratio = FP32 bytes / bytes of the "
         "packed file written (\\*: accounted size, for a peer library that writes no file).", ""]
  for (ds, model, epochs), variants in by_schedule(rows):
    out += [f"### {ds} / {model}, {epochs} epochs", "",
            "| scheme | sweep / variant | seeds | test accuracy | avg bits | bytes | ratio | "
            "entropy-coded ratio | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for (sweep, var), vs in sorted(variants.items(), key=lambda kv: (
        family(kv[1][0]), -(mean_of([size_ratio(r) for r in kv[1]]) or 0))):
      out.append(
          f"| {family(vs[0])} | {sweep} / {var} | {len(vs)} | "
          f"{mean_std([r['test_accuracy'] for r in vs])} | {mean_std([r['avg_bits'] for r in vs], '{:.2f}')} | "
          f"{mean_std([size_bytes(r) for r in vs], '{:.0f}')}{accounted_mark(vs)} | "
          f"{mean_std([size_ratio(r) for r in vs], '{:.1f}')} | "
          f"{mean_std([r.get('entropy_coded_ratio') for r in vs], '{:.1f}')} | "
          f"{train_time(vs)} |")
    png = frontier_plot(f"{ds}_{model}_e{epochs}", variants, plots_dir,
                        f"{DATASET_NAMES.get(ds, ds)}, {model}, {epochs} epochs: every scheme",
                        f"pareto_{ds}_{model}_e{epochs}.png")
    if png:
      out += image(png, plots_dir, f"{ds} {model} {epochs} epochs")
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
    for (ds_, model_, epochs), variants in by_schedule(rows):
      fp32 = [mean_of([r["test_accuracy"] for r in vs]) for vs in variants.values()
              if family(vs[0]) == "fp32"]
      if (ds_, model_) != (ds, model) or not fp32:
        continue
      fp32_any = True
      for (sweep, var), vs in variants.items():
        ratio = mean_of([r.get(field) for r in vs])
        if ratio and family(vs[0]) != "fp32":
          off_cpu = sorted({r.get("platform", "cpu") for r in vs} - {"cpu"})
          label = f"{sweep} / {var}" + (f" (made on {', '.join(off_cpu)})" if off_cpu else "")
          cands.append((ratio, label, epochs,
                        mean_of([r["test_accuracy"] for r in vs]), max(fp32)))
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
  for (ds, model, epochs), variants in by_schedule(rows):
    stats = {k: variant_stats(vs) for k, vs in variants.items()}
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
  groups = group_by(rows, lambda r: (r["dataset"], r["model"], r["epochs"],
                                   re.sub(r"_?k\d+$", "", variant_of(r["run"])) or "default"))
  for (ds, model, epochs, recipe), rs in groups.items():
    by_k = collections.OrderedDict(sorted(group_by(rs, lambda r: r["config"].get(
        "scale_every", 1)).items()))
    base = by_k.get(1, [])
    for k, vs in by_k.items():
      acc, bits = [r["test_accuracy"] for r in vs], [r["avg_bits"] for r in vs]
      agree = "-" if k == 1 else (
          f"{_agree(acc, [r['test_accuracy'] for r in base])}, "
          f"{_agree(bits, [r['avg_bits'] for r in base])}")
      out.append(f"| {ds} / {model} | {epochs} | {recipe} | {k} | {len(vs)} | {mean_std(acc)} | "
                 f"{mean_std(bits, '{:.2f}')} | {agree} | {mean_std([r['train_seconds'] for r in vs], '{:.0f}')} |")
  return out + [""]


def _frontier_stats(variants):
  """{variant: (family, test accuracies, mean packed bytes, (model, epochs))}."""
  return {var: (family(vs[0]), [r["test_accuracy"] for r in vs],
                mean_of([r.get("packed_bytes") for r in vs]), (vs[0]["model"], vs[0]["epochs"]))
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
  for sweep, rs in group_by(rows, lambda r: r["sweep"]).items():
    variants = group_by(rs, lambda r: variant_of(r["run"]))
    stats = _frontier_stats(variants)
    for var, vs in sorted(variants.items(), key=lambda kv: -(stats[kv[0]][2] or 0)):
      fam, acc, size, (model, epochs) = stats[var]
      if not fam.startswith("budgeted"):
        continue
      out.append(f"| [{vs[0]['dataset']} / {model}](#{sweep.lower()}), "
                 f"{epochs} epochs | {vs[0]['config'].get('budget_bits'):g} | {len(vs)} | "
                 f"{mean_std(acc)} | {size:,.0f} | {_versus(_baseline(stats, var, nearest=True))} | "
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
  fp32 = fp32_reference(all_rows)
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
  for sweep, rs in group_by(rows, lambda r: r["sweep"]).items():
    variants = group_by(rs, lambda r: variant_of(r["run"]))
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
                 f"{mean_std(acc)} | {gap} | {mean_std([r['val_accuracy'] for r in vs])} | "
                 f"{mean_std([r['avg_bits'] for r in vs], '{:.2f}')} | "
                 f"{mean_std([r.get('packed_bytes') for r in vs], '{:.0f}')} | "
                 f"{mean_std([size_ratio(r) for r in vs], '{:.1f}')} | "
                 f"{mean_std([r.get('entropy_coded_ratio') for r in vs], '{:.1f}')} | {landing} | "
                 f"{versus} |")
    first = next(iter(variants.values()))[0]
    png = frontier_plot(sweep, {(sweep, v): vs for v, vs in variants.items()}, plots_dir,
                        f"{DATASET_NAMES.get(first['dataset'], first['dataset'])}, "
                        f"{first['model']}, {first['epochs']} epochs: the low-bit frontier",
                        f"pareto_{sweep}.png")
    if png:
      out += image(png, plots_dir, f"{sweep}")
    out.append("")
  return out


def _headline_cells(rows) -> dict:
  """{(dataset, tolerance, ratio field): (ratio, "sweep / variant", model, epochs, accuracy,
  FP32 accuracy, seeds, where)}: the largest mean ratio within each tolerance of FP32."""
  cells = {}
  for (ds, model, epochs), variants in by_schedule(rows):
    fp32 = [mean_of([r["test_accuracy"] for r in vs]) for vs in variants.values()
            if family(vs[0]) == "fp32"]
    if not fp32:
      continue
    ref = max(fp32)
    for (sweep, var), vs in variants.items():
      if family(vs[0]) == "fp32":
        continue
      where = sorted({r.get("platform", "cpu") for r in vs} - {"cpu"})
      acc = mean_of([r["test_accuracy"] for r in vs])
      for tol in (0.3, 1.0):
        if acc < ref - tol / 100 - 1e-9:
          continue
        for field in ("compression_ratio", "entropy_coded_ratio"):
          val = mean_of([r.get(field) for r in vs])
          key = (ds, tol, field)
          if val and val > cells.get(key, (0,))[0]:
            cells[key] = (val, f"{sweep} / {var}", model, epochs, acc, ref, len(vs),
                          f", made on {', '.join(where)}" if where else "")
  return cells


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


def schedules_section(rows, results_dir: pathlib.Path):
  """Each variant of a ``long_`` sweep beside the same recipe on the shorter schedules of
  any other sweep (accuracy, distance to FP32 on each schedule, bits, and how much the bits
  still moved over the last 20% of epochs); then the distance to published figures."""
  fp32 = fp32_reference(rows)
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
  for (sweep, var), vs in group_by(longs, lambda r: (r["sweep"], variant_of(r["run"]))).items():
    recipe, where = recipe_of(vs[0]), (vs[0]["dataset"], vs[0]["model"])
    same = [(key, g) for key, g in group_by(
        [r for r in rows if (r["dataset"], r["model"]) == where and "config" in r
         and not r["sweep"].startswith(SUMMARY_SKIP)],
        lambda r: (r["epochs"], r["sweep"], variant_of(r["run"]))).items()
        if same_recipe(recipe, recipe_of(g[0]))]
    for (epochs, sw, v), g in sorted(same):
      ref = fp32.get((*where, epochs))
      acc = [r["test_accuracy"] for r in g]
      moved = [c[0] for c in (convergence(results_dir / sw / r["run"]) for r in g) if c]
      out.append(f"| {where[0]} / {where[1]} | {var} | {epochs} | {sw} / {v} | {len(g)} | "
                 f"{mean_std(acc)} | "
                 f"{'-' if ref is None else f'{100 * (statistics.mean(acc) - ref):+.2f}'} | "
                 f"{mean_std([r['avg_bits'] for r in g], '{:.2f}')} | "
                 f"{f'{statistics.mean(moved):.1f}%' if moved else '-'} | "
                 f"{mean_std([size_ratio(r) for r in g], '{:.1f}')} | "
                 f"{mean_std([r.get('entropy_coded_ratio') for r in g], '{:.1f}')} |")
  return out + [""]


def _published_rows(rows, fp32):
  out = []
  for (ds, model), figures in PUBLISHED.items():
    for (ds_, model_, epochs), variants in by_schedule(rows):
      ref = fp32.get((ds, model, epochs))
      if (ds_, model_) != (ds, model) or ref is None:
        continue
      for what, acc, bits, paper_fp32 in figures:
        low = [(mean_of([r["test_accuracy"] for r in vs]), f"{sw} / {v}") for (sw, v), vs in
               variants.items() if family(vs[0]) != "fp32"
               and mean_of([r["avg_bits"] for r in vs]) <= bits + 0.05]
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
  return mean_of(vals)


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
  for sweep, rs in group_by(rows, lambda r: r["sweep"]).items():
    out += [f"### {sweep} ({rs[0]['dataset']} / {rs[0]['model']}, {rs[0]['epochs']} epochs)", "",
            "| lambda | seeds | test accuracy | val accuracy | avg bits | dense kernel bits | "
            "conv kernel bits |", "|---|---|---|---|---|---|---|"]
    for lam, vs in sorted(group_by(rs, lambda r: r["threshold"]).items()):
      dense, conv = mean_of([_layer_bits(r, "dense") for r in vs]), mean_of(
          [_layer_bits(r, "conv") for r in vs])
      out.append(f"| {lam:g} | {len(vs)} | {mean_std([r['test_accuracy'] for r in vs])} | "
                 f"{mean_std([r['val_accuracy'] for r in vs])} | {mean_std([r['avg_bits'] for r in vs], '{:.2f}')} | "
                 f"{'-' if dense is None else f'{dense:.2f}'} | "
                 f"{'-' if conv is None else f'{conv:.2f}'} |")
    out.append("")
  return out


def tuning_section(rows):
  out = []
  for sweep, rs in group_by([r for r in rows if r["sweep"] in TUNING_BARS],
                          lambda r: r["sweep"]).items():
    bar = TUNING_BARS[sweep]
    variants = group_by(rs, lambda r: variant_of(r["run"]))
    val = {v: mean_of([r["val_accuracy"] for r in vs]) for v, vs in variants.items()}
    bits = {v: mean_of([r["avg_bits"] for r in vs]) for v, vs in variants.items()}
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
      out.append(f"| {v} | {len(vs)} | {mean_std([r['val_accuracy'] for r in vs])} | "
                 f"{mean_std([r['avg_bits'] for r in vs], '{:.2f}')} | {'yes' if v == chosen else ''} |")
    out.append("")
  return out


# The targets of quantized inputs: (weight bits, input bits) -> points below FP32 allowed.
ACTIVATION_TARGETS = {(8, 8): 0.3, (4, 4): 1.0}


def activations_section(rows):
  """Runs whose layers' inputs are quantized too (``act_bits``), against FP32 on the same
  model and schedule, with the distance to the W8A8 and W4A4 targets."""
  act = [r for r in rows if r.get("config", {}).get("act_bits")
         or r.get("qwix_act") not in (None, "none")]
  if not act:
    return []
  ref = fp32_reference(rows)
  out = ["## Quantized inputs (activations)", "",
         "Weights and every quantized layer's input quantized (`--act_bits`: a learned step "
         "and offset per input, LSQ+, set from the first training batch; the first layer's "
         "input, the image, at `act_first_bits`; A \"ratio\": the steps learned by the ratio "
         "rule with r = B ||dL/da|| / ||a|| and lambda `--act_threshold`); PTQ: min-max weights of the FP32 runs, "
         "the inputs calibrated the same way; qwix: its QAT with int8 inputs at each call's "
         "absmax (dynamic) or at the running mean of the absmax over training, fixed in "
         "evaluation (static). W: the weights' bits (free: the ratio rule's learned widths); A: "
         "the inputs' bits (first layer's). The targets (" + ", ".join(
             f"W{w}A{a} within {tol:g} points of FP32"
             for (w, a), tol in ACTIVATION_TARGETS.items()) + ") are for LSQ weights. "
         "Mean ± std over "
         "seeds; the distance is to the most accurate FP32 variant of the same model and "
         "schedule.", "",
         "Integer path: `lqjax.integer_inference` on the reloaded file against the "
         "fake-quantized model on the whole test split, over the runs that recorded it "
         "(runs that predate the check: `python scripts/integer_check.py RUN_DIR`): argmax "
         "disagreements and the largest logit difference; device bytes: what the integer "
         "function holds.", "",
         "| dataset / model, epochs | variant | W | A | seeds | test accuracy | vs FP32 (points) "
         "| packed bytes | target | integer path: disagreements, max logit diff (runs) | "
         "device bytes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for (ds, model, epochs), variants in by_schedule(act):
    fp32 = ref.get((ds, model, epochs))
    for (sweep, var), vs in variants.items():
      cfg = vs[0]["config"]
      acc = mean_of([r["test_accuracy"] for r in vs])
      if vs[0].get("qwix_act") not in (None, "none"):  # qwix: int8 inputs, dynamic or static
        w, a, first = vs[0]["avg_bits"], f"8 {vs[0]['qwix_act']}", "8"
      else:
        w, a, first = cfg.get("bits"), cfg["act_bits"], cfg.get("act_first_bits", 8)
      dist = "-" if fp32 is None else f"{100 * (acc - fp32):+.2f}"
      tol = ACTIVATION_TARGETS.get((w, a)) if family(vs[0]).startswith("LSQ") else None
      if tol is None or fp32 is None:
        target = "-"
      else:
        met = acc >= fp32 - tol / 100 - 1e-9
        target = f"within {tol:g}: {'met' if met else 'not met'}"
      checked = [r for r in vs if "integer_max_abs_logit_diff" in r]
      integer = "-" if not checked else (
          f"{sum(r['integer_argmax_disagreements'] for r in checked)}, "
          f"{max(r['integer_max_abs_logit_diff'] for r in checked):.3f} ({len(checked)})")
      held = mean_std([r.get("integer_device_bytes") for r in checked], "{:.0f}") if checked else "-"
      rule = act_rule_mark(vs[0]) and f"{act_rule_mark(vs[0])}, lambda {cfg['act_threshold']:g}"
      out.append(f"| {ds} / {model}, {epochs} | {sweep} / {var} | {w or 'free'} | "
                 f"{a}{rule} ({first}) | {len(vs)} | "
                 f"{mean_std([r['test_accuracy'] for r in vs])} | {dist} | "
                 f"{mean_std([size_bytes(r) for r in vs], '{:.0f}')} | {target} | {integer} | "
                 f"{held} |")
  return out + [""]

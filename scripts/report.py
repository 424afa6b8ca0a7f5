"""Generates docs/RESULTS.md (and plots) from the collected sweep results.

  python scripts/report.py [--runs_dir runs] [--out docs/RESULTS.md]

Reads ``runs/<sweep>/results.jsonl`` (written by scripts/sweep.py) and each
run's ``metrics.jsonl``. For every sweep it writes a table of variants (mean
+- std over seeds of test accuracy, average bits, packed bytes and ratios,
train time) with the command of one run; a convergence table (bits change over
the last 20% of epochs, final vs best validation accuracy); and a Pareto plot
of test accuracy against compression ratio. Nothing here is typed in by hand.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re
import statistics
import sys

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


def convergence(run_dir: pathlib.Path):
  """(bits change over the last 20% of epochs in %, final val acc, best val acc, epochs)."""
  path = run_dir / "metrics.jsonl"
  if not path.exists():
    return None
  rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
  if len(rows) < 2:
    return None
  n = len(rows)
  start = rows[max(0, n - 1 - max(1, round(0.2 * n)))]
  end = rows[-1]
  change = abs(end["avg_bits"] - start["avg_bits"]) / max(start["avg_bits"], 1e-9) * 100
  return change, end["val_accuracy"], max(r["val_accuracy"] for r in rows), n


def sweep_section(name, rows, runs_dir, plots_dir):
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
        f"{_ms([r.get('packed_bytes') for r in rs], '{:.0f}')} | "
        f"{_ms([r.get('compression_ratio') for r in rs], '{:.1f}')} | "
        f"{_ms([r.get('entropy_coded_ratio') for r in rs], '{:.1f}')} | "
        f"{_ms([r['train_seconds'] for r in rs], '{:.0f}')} |")
  out += ["", "Convergence (per run; validation accuracy, since the test split is only "
          "evaluated at the end):", "",
          "| run | epochs | bits change, last 20% of epochs | final val acc | best val acc | "
          "final - best (points) | scales frozen at |", "|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: r["run"]):
    c = convergence(runs_dir / name / r["run"])
    if c:
      out.append(f"| {r['run']} | {c[3]} | {c[0]:.1f}% | {c[1]:.4f} | {c[2]:.4f} | "
                 f"{100 * (c[1] - c[2]):+.2f} | {r.get('scales_frozen_at_epoch') or '-'} |")
  out += ["", "Commands (one run per variant; the seed varies):", ""]
  for var, rs in by_var.items():
    if rs[0].get("command"):
      out.append(f"- {var}: `{rs[0]['command']}`")
  png = pareto_plot(name, by_var, plots_dir)
  if png:
    out += ["", f"![{name}]({png.relative_to(plots_dir.parent).as_posix()})"]
  return out + [""]


def pareto_plot(name, by_var, plots_dir):
  pts = [(var, r["compression_ratio"], r["test_accuracy"]) for var, rs in by_var.items()
         for r in rs if r.get("compression_ratio")]
  if not pts:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for var, rs in by_var.items():
    xs = [p[1] for p in pts if p[0] == var]
    ys = [p[2] for p in pts if p[0] == var]
    if xs:
      dots = ax.scatter(xs, ys, label=f"{var} (packed)", s=18)
      ez = [(r["entropy_coded_ratio"], r["test_accuracy"]) for r in rs
            if r.get("entropy_coded_ratio")]
      if ez:
        ax.scatter([e[0] for e in ez], [e[1] for e in ez], marker="x", s=18,
                   color=dots.get_facecolor()[0], label=f"{var} (entropy-coded)")
  ax.set(xscale="log", xlabel="compression ratio (fp32 bytes / file bytes)",
         ylabel="test accuracy", title=name)
  ax.legend(fontsize=6)
  fig.tight_layout()
  plots_dir.mkdir(parents=True, exist_ok=True)
  path = plots_dir / f"{name}.png"
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def readme_headline(runs_dir: pathlib.Path, sweep: str):
  """A short table of one sweep's variants for the README's results section."""
  f = runs_dir / sweep / "results.jsonl"
  if not f.exists():
    return None
  rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
  by_var = collections.OrderedDict()
  for r in sorted(rows, key=lambda r: r["run"]):
    by_var.setdefault(variant_of(r["run"]), []).append(r)
  lines = [f"LeNet-300-100 on MNIST ({rows[0]['epochs']} epochs, mean ± std over seeds; sweep "
           f"`{sweep}`, generated by `python scripts/report.py --readme README.md`):", "",
           "| variant | test accuracy | avg bits | packed file ratio | entropy-coded ratio |",
           "|---|---|---|---|---|"]
  for var, rs in by_var.items():
    lines.append(f"| {var} | {_ms([r['test_accuracy'] for r in rs])} | "
                 f"{_ms([r['avg_bits'] for r in rs], '{:.2f}')} | "
                 f"{_ms([r.get('compression_ratio') for r in rs], '{:.1f}')}x | "
                 f"{_ms([r.get('entropy_coded_ratio') for r in rs], '{:.1f}')}x |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--runs_dir", default=str(ROOT / "runs"))
  ap.add_argument("--out", default=str(ROOT / "docs" / "RESULTS.md"))
  ap.add_argument("--sweeps", default=None, help="comma-separated sweep names (default: all)")
  ap.add_argument("--readme", default=None, help="also rewrite this README's results section")
  ap.add_argument("--headline", default="baselines_mnist_lenet300",
                  help="the sweep quoted in the README")
  args = ap.parse_args(argv)
  runs_dir = pathlib.Path(args.runs_dir)
  files = sorted(runs_dir.glob("*/results.jsonl"))
  if args.sweeps:
    keep = set(args.sweeps.split(","))
    files = [f for f in files if f.parent.name in keep]
  if not files:
    print(f"error: no runs/<sweep>/results.jsonl under {runs_dir}", file=sys.stderr)
    return 2
  lines = ["# lqjax results", "",
           "Generated by `python scripts/report.py` from the run directories under `runs/` "
           "(each run's `command.txt` holds the exact command; `results.json` and "
           "`metrics.jsonl` the numbers). Hardware: the 2-core CPU machine described in the "
           "README unless a table says otherwise. Test accuracy is measured once, at the end of "
           "each run; all choices were made on the validation split.", ""]
  for f in files:
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    if rows:
      lines += sweep_section(f.parent.name, rows, runs_dir, pathlib.Path(args.out).parent / "plots")
  pathlib.Path(args.out).write_text("\n".join(lines) + "\n")
  print(f"wrote {args.out}")
  if args.readme:
    head = readme_headline(runs_dir, args.headline)
    p = pathlib.Path(args.readme)
    text = p.read_text()
    b, e = "<!-- results:begin -->", "<!-- results:end -->"
    if head and b in text and e in text:
      body = head + "\n\nAll measured results: [docs/RESULTS.md](docs/RESULTS.md)."
      p.write_text(text[:text.index(b) + len(b)] + "\n" + body + "\n" + text[text.index(e):])
      print(f"updated {p}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

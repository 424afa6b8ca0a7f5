"""The report's plots: test accuracy against the packed file's ratio."""

from __future__ import annotations

import statistics

from lqlab.results.records import mean_of, family, size_ratio, variant_of


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
    ratio, acc = mean_of([size_ratio(r) for r in vs]), mean_of([r["test_accuracy"] for r in vs])
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
  fams = sorted({p[0] for p in shown})
  # more schemes than the default ten colours: twenty, and a second marker, so none repeat
  colors = plt.get_cmap("tab10" if len(fams) <= 10 else "tab20").colors
  for i, fam in enumerate(fams):
    ps = sorted((p for p in shown if p[0] == fam), key=lambda p: p[1])
    # the scheme's frontier (no variant of it both smaller and more accurate) as its line,
    # its other variants as faint dots of the same colour
    front = [p for p in ps if not any(q[1] > p[1] and q[2] > p[2] for q in ps)]
    line = ax.errorbar([p[1] for p in front], [p[2] for p in front],
                       yerr=[p[3] for p in front], fmt="-" + "os"[i % 2 if len(fams) > 10 else 0],
                       ms=4, lw=1.2, capsize=2, label=fam, color=colors[i % len(colors)])
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


def image(png, plots_dir, alt: str) -> list:
  """The Markdown lines that show a plot in RESULTS.md (which sits beside `plots_dir`)."""
  return ["", f"![{alt}]({png.relative_to(plots_dir.parent).as_posix()})"]

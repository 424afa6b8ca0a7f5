"""The README's generated results: a few rows, the rest in docs/RESULTS.md."""

from __future__ import annotations

from lqlab.results.language import language_headline
from lqlab.results.sections import _headline_cells


def readme_headline(rows, lm_rows=()) -> list:
  """The README's few rows: per dataset, the largest packed and entropy-coded ratios within
  1 point of FP32 on the same schedule, each with its run and seeds; for a language model,
  within 2% of FP32's validation loss."""
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
  return out + language_headline(lm_rows)

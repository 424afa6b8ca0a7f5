"""Checks that runs made again reproduce an earlier generated report.

  python scripts/report.py --out /tmp/new/RESULTS.md
  python scripts/compare_reports.py docs/RESULTS.md /tmp/new/RESULTS.md

For every sweep section of NEW that OLD also has: each per-run convergence row
(epochs, bits change, final and best validation accuracy) and each variant row
with the same number of seeds (test accuracy, average bits) must be identical in
OLD. Packed bytes are reported, not required to match (the file's header holds
the run's config, which gains fields as lqjax grows); train time is ignored.
Exit 1 when a row differs.
"""

from __future__ import annotations

import pathlib
import re
import sys


def sections(text: str) -> dict:
  """{sweep: section text} of a report's "Per sweep" part."""
  text = text.split("\n# Per sweep\n", 1)[-1]
  return dict(chunk.split("\n", 1) for chunk in text.split("\n## ")[1:] if "\n" in chunk)


def rows(body: str):
  """({variant: cells}, {run: cells}) of one sweep section's two tables."""
  variants, runs = {}, {}
  for line in body.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 9 and re.fullmatch(r"\d+", cells[1]):
      variants[cells[0]] = cells[1:]
    elif len(cells) == 7 and re.fullmatch(r".+_s\d+", cells[0]):
      runs[cells[0]] = cells[1:]
  return variants, runs


def compare(old_text: str, new_text: str):
  """(rows compared, differing rows as text, runs new to OLD, byte differences)."""
  old, new = sections(old_text), sections(new_text)
  compared, diffs, fresh, dbytes = 0, [], [], []
  for name, body in new.items():
    if name not in old:
      fresh.append(name)
      continue
    nv, nr = rows(body)
    ov, orr = rows(old[name])
    for run, cells in nr.items():
      if run not in orr:
        fresh.append(f"{name}/{run}")
        continue
      compared += 1
      if orr[run] != cells:
        diffs.append(f"{name}/{run}: {cells} (was {orr[run]})")
    for var, cells in nv.items():
      if var in ov and ov[var][0] == cells[0]:  # same number of seeds
        compared += 1
        # seeds, epochs, test accuracy, avg bits
        if ov[var][:4] != cells[:4]:
          diffs.append(f"{name}/{var}: {cells[:4]} (was {ov[var][:4]})")
        elif cells[4] != "-" and ov[var][4] != "-":  # runs without an exported file have none
          dbytes.append(float(cells[4].split()[0]) - float(ov[var][4].split()[0]))
  return compared, diffs, fresh, dbytes


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 2:
    print(__doc__.strip().splitlines()[0], file=sys.stderr)
    print("usage: compare_reports.py OLD.md NEW.md", file=sys.stderr)
    return 2
  try:
    old_text, new_text = (pathlib.Path(p).read_text() for p in argv)
  except OSError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  compared, diffs, fresh, dbytes = compare(old_text, new_text)
  for d in diffs:
    print(f"differs: {d}")
  span = f"{min(dbytes):+.0f} .. {max(dbytes):+.0f}" if dbytes else "-"
  print(f"{compared} rows compared, {len(diffs)} differ; {len(fresh)} runs or sweeps new to the "
        f"old report; mean packed bytes new - old: {span}")
  return 1 if diffs else 0


if __name__ == "__main__":
  sys.exit(main())

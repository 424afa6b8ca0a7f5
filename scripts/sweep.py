"""Resumable sweep driver: runs a grid of experiment flags and collects results.

  python scripts/sweep.py --config sweeps/stability.json [--dry_run] [--collect]

A config (JSON) names the entry point, the flags every run shares, named
variants (each a set of flags), and seeds::

  {"name": "stability", "module": "experiments.mnist",
   "base": {"epochs": 10, "progress": false},
   "variants": {"ratio": {"rule": "ratio"}, "hybrid": {"rule": "ratio_lsq"}},
   "grid": {"threshold": [0.1, 0.2]},          # optional: crossed with variants
   "seeds": [0, 1, 2]}

A variant may carry its own ``"seeds"`` list, which replaces the sweep's for
that variant (e.g. more seeds for the pair a comparison hinges on).

Every run gets its own workdir ``runs/<name>/<variant>[_<grid point>]_s<seed>``
(checkpoints, exported files, logs: large, not in git). A run whose
results.json exists is skipped, and so is a run already in the sweep's record
(on a new machine, where ``runs/`` is empty, the same command runs only what
the record lacks; ``--rerun`` makes those again). An interrupted run resumes
from its checkpoint, so re-running the same command finishes the sweep. ``--jobs N`` runs
N at once.

After each run the sweep's record is updated in ``results/<name>/`` (small, and
committed, so the evidence outlives the machine that made it):
``results.jsonl`` (one line per run: its results.json, run name and command)
and ``<run>/metrics.jsonl`` (its per-epoch log). Runs already in the record
but no longer under ``runs/`` keep their lines; a run made again replaces its own. A
recorded run is skipped only while the sweep's flags for it are the ones it was run with:
after the config changes, the driver refuses and names each such run and flag
(``--rerun`` makes them again). A run whose workdir another driver holds is reported as
running elsewhere, not as failed.
The merge holds a lock on the record, so two drivers on one sweep (e.g. one per
core, each with its own ``--only``) never drop each other's rows.
scripts/report.py reads only this record.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import pathlib
import re
import shlex
import subprocess
import sys
import time

from lqjax import fileio
from lqlab import files

ROOT = pathlib.Path(__file__).resolve().parent.parent


def expand(cfg: dict):
  """Yields (run_name, flags) for every variant x grid point x seed."""
  grid = cfg.get("grid", {})
  keys = sorted(grid)
  points = list(itertools.product(*(grid[k] for k in keys))) or [()]
  for vname, vflags in cfg["variants"].items():
    vflags = dict(vflags)
    seeds = vflags.pop("seeds", cfg.get("seeds", [0]))
    for point in points:
      gflags = dict(zip(keys, point))
      tag = "_".join(f"{k}{v}" for k, v in gflags.items())
      for seed in seeds:
        flags = {**cfg.get("base", {}), **vflags, **gflags, "seed": seed}
        yield f"{vname}{'_' + tag if tag else ''}_s{seed}", flags


def to_argv(flags: dict):
  out = []
  for k, v in flags.items():
    if isinstance(v, bool):
      out.append(f"--{k}" if v else f"--no{k}")
    else:
      out.append(f"--{k}={v}")
  return out


def recorded(record_dir: pathlib.Path) -> dict:
  """The sweep's record, by run name ({} when there is none yet).

  Raises:
    files.RecordError: a damaged line, named by file and line.
  """
  path = record_dir / "results.jsonl"
  rows = files.read_jsonl(path)
  for i, r in enumerate(rows):
    if not isinstance(r.get("run"), str):
      raise files.RecordError(f"{path}: row {i + 1} names no run")
  return {r["run"]: r for r in rows}


def _flags_of(cmd: str) -> dict:
  """``{flag: value}`` of a command line ``python -m <module> --k=v ...``, without --workdir."""
  out = {}
  for a in shlex.split(cmd)[3:]:
    key, _, value = a[2:].partition("=")
    if key != "workdir":
      out[key] = value
  return out


def flag_difference(row: dict, new_argv) -> list:
  """The flags on which a recorded run and the sweep's current command for it differ.

  A flag the sweep names now that the recorded command left out is no difference when
  the run's recorded config has that value (a default that changed since, now named).
  A row without a command cannot be compared, and gives no difference.
  """
  if not row.get("command"):
    return []
  old = _flags_of(row["command"])
  new = _flags_of("python -m m " + " ".join(shlex.quote(a) for a in new_argv))
  config = row.get("config") if isinstance(row.get("config"), dict) else {}

  def same(k):
    if old.get(k) == new.get(k):
      return True
    return k not in old and k in config and str(config[k]) == new[k]

  return sorted(k for k in set(old) | set(new) if not same(k))


def portable(row: dict, sweep: str) -> dict:
  """A record's row with no path of the machine it ran on: its workdir is
  ``runs/<sweep>/<run>`` (where the driver puts it, relative to the repository), in its
  command, ``workdir`` and ``packed_file``."""
  rel = f"runs/{sweep}/{row['run']}"
  out = dict(row)
  if out.get("command"):
    out["command"] = re.sub(r"--workdir=\S+", f"--workdir={rel}", out["command"])
  if out.get("workdir"):
    out["workdir"] = rel
  if out.get("packed_file"):
    out["packed_file"] = f"{rel}/{pathlib.PurePath(out['packed_file']).name}"
  return out


def collect(out_dir: pathlib.Path, record_dir: pathlib.Path):
  """Merges the finished runs under out_dir into the sweep's record (under its lock);
  returns all its rows, each :func:`portable`."""
  record_dir.mkdir(parents=True, exist_ok=True)
  with files.lock_dir(record_dir, wait=True):
    rows = recorded(record_dir)
    for res in sorted(out_dir.glob("*/results.json")):
      r = json.loads(res.read_text())
      cmd = res.parent / "command.txt"
      r["run"] = res.parent.name
      r["command"] = cmd.read_text().strip() if cmd.exists() else None
      rows[r["run"]] = r
      metrics = res.parent / "metrics.jsonl"
      if metrics.exists():
        fileio.write_bytes_atomic(record_dir / r["run"] / "metrics.jsonl", metrics.read_bytes())
    rows = [portable(rows[k], record_dir.name) for k in sorted(rows)]
    if rows:
      files.write_jsonl_atomic(record_dir / "results.jsonl", rows)
    return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", required=True)
  ap.add_argument("--runs_dir", default=str(ROOT / "runs"), help="where the runs' workdirs go")
  ap.add_argument("--results_dir", default=str(ROOT / "results"),
                  help="where the sweep's record (results.jsonl, metrics) is kept")
  ap.add_argument("--dry_run", action="store_true")
  ap.add_argument("--collect", action="store_true",
                  help="run nothing: only merge the finished runs under runs_dir into the record")
  ap.add_argument("--only", default=None,
                  help="run only runs whose name contains one of these comma-separated strings")
  ap.add_argument("--rerun", action="store_true",
                  help="also make the runs already in the record (their new rows replace the old)")
  ap.add_argument("--jobs", type=int, default=1,
                  help="runs at once (each is its own process; on a 2-core CPU, 2 nearly "
                       "doubles throughput)")
  args = ap.parse_args(argv)
  if args.jobs < 1:
    print(f"error: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
    return 2
  try:
    cfg = json.loads(pathlib.Path(args.config).read_text())
  except (OSError, ValueError) as e:
    print(f"error: cannot read sweep config {args.config}: {e}", file=sys.stderr)
    return 2
  # every path once, against the folder the driver was called from (the runs run in ROOT)
  out_dir = pathlib.Path(args.runs_dir).resolve() / cfg["name"]
  record_dir = pathlib.Path(args.results_dir).resolve() / cfg["name"]
  try:
    done = {} if args.rerun else recorded(record_dir)
  except files.RecordError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out_dir.mkdir(parents=True, exist_ok=True)
  runs = [] if args.collect else list(expand(cfg))
  only = [o for o in (args.only or "").split(",") if o]
  pending, changed = [], []
  for i, (name, flags) in enumerate(runs):
    if only and not any(o in name for o in only):
      continue
    wd = out_dir / name
    if name in done:
      diff = flag_difference(done[name], to_argv(flags))
      if diff:
        changed.append(f"{name} ({', '.join(diff)})")
        continue
      print(f"[{i + 1}/{len(runs)}] {name}: in the record, skipped (--rerun makes it again)",
            flush=True)
      continue
    if (wd / "results.json").exists():
      continue
    argv_ = [sys.executable, "-m", cfg["module"], *to_argv(flags), f"--workdir={wd}"]
    cmd = "python -m " + " ".join(shlex.quote(a) for a in argv_[2:])
    print(f"[{i + 1}/{len(runs)}] {cmd}", flush=True)
    pending.append((name, wd, argv_, cmd))
  if changed:
    print(f"error: {args.config} changed since these runs were recorded in "
          f"{record_dir / 'results.jsonl'}: {'; '.join(changed)}; --rerun makes them again with "
          f"the new flags", file=sys.stderr)
    return 2
  if args.dry_run:
    return 0

  def one(run):
    name, wd, argv_, cmd = run
    wd.mkdir(exist_ok=True)
    try:  # another driver's run in this workdir: it is not ours to report
      files.lock_dir(wd).close()
    except files.LockedError:
      print(f"  {name}: running elsewhere (its workdir is locked), skipped", flush=True)
      return False
    (wd / "command.txt").write_text(cmd + "\n")
    t0 = time.time()
    r = subprocess.run(argv_, cwd=ROOT, capture_output=True, text=True)
    (wd / "log.txt").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
      last = (r.stderr.strip().splitlines() or ["?"])[-1]
      print(f"  {name} failed ({r.returncode}): {last}", flush=True)
    else:
      lines = r.stdout.strip().splitlines()  # the summary is the line before the last
      print(f"  {name}: {lines[-2] if len(lines) > 1 else ''.join(lines)} "
            f"[{time.time() - t0:.0f}s]", flush=True)
    collect(out_dir, record_dir)
    return r.returncode != 0

  with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
    failed = sum(pool.map(one, pending))
  rows = collect(out_dir, record_dir)
  print(f"{len(rows)} results in {record_dir / 'results.jsonl'}; {failed} failed")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

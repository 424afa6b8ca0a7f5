"""Splits a dataset folder into hashed parts and joins them again, checking every hash.

  python scripts/dataset_parts.py split ../shared/datasets/cifar10 .parts/cifar10 --max_mib 48
  python scripts/dataset_parts.py join .parts/cifar10 /tmp/data/cifar10

Moving a dataset in hashed parts, to a machine reached by transfers of limited size (a
device machine takes at most 64 MiB a call, the working tree included): ``split`` cuts each file of the folder
into parts of at most ``--max_mib`` MiB and writes ``manifest.json`` (each file's size
and sha256, and each part's). The parts travel over several calls; ``join`` checks each
part's hash, writes each file atomically and checks the whole file's hash, and exits
with one line naming the first part that is missing or differs. ``join --check`` only
says which parts are still missing. scripts/gpu_frontier_cifar.sh uses it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys

from lqjax import fileio
from lqlab.files import write_json_atomic

MANIFEST = "manifest.json"


def _sha(blob: bytes) -> str:
  return hashlib.sha256(blob).hexdigest()


def split(src, dest, max_bytes: int) -> dict:
  """Writes the parts of every file directly in `src` and the manifest to `dest`."""
  src, dest = pathlib.Path(src), pathlib.Path(dest)
  files = sorted(p for p in src.iterdir() if p.is_file())
  if not files:
    raise ValueError(f"{src} holds no files")
  dest.mkdir(parents=True, exist_ok=True)
  manifest = {"files": {}}
  for f in files:
    blob = f.read_bytes()
    parts = []
    for k, start in enumerate(range(0, max(len(blob), 1), max_bytes)):
      chunk = blob[start:start + max_bytes]
      name = f"{f.name}.part{k:02d}"
      fileio.write_bytes_atomic(dest / name, chunk)
      parts.append({"name": name, "size": len(chunk), "sha256": _sha(chunk)})
    manifest["files"][f.name] = {"size": len(blob), "sha256": _sha(blob), "parts": parts}
  write_json_atomic(dest / MANIFEST, manifest)
  return manifest


def missing(parts_dir, manifest=None) -> list:
  """The parts the manifest names that are not (yet) in `parts_dir`."""
  parts_dir = pathlib.Path(parts_dir)
  manifest = manifest or _manifest(parts_dir)
  return [p["name"] for f in manifest["files"].values() for p in f["parts"]
          if not (parts_dir / p["name"]).is_file()]


def join(parts_dir, dest) -> list:
  """Reassembles every file of the manifest into `dest`; raises ValueError on any fault."""
  parts_dir, dest = pathlib.Path(parts_dir), pathlib.Path(dest)
  manifest = _manifest(parts_dir)
  lost = missing(parts_dir, manifest)
  if lost:
    raise ValueError(f"{len(lost)} part(s) missing in {parts_dir}: {', '.join(lost)}")
  dest.mkdir(parents=True, exist_ok=True)
  written = []
  for name, f in manifest["files"].items():
    chunks = []
    for p in f["parts"]:
      chunk = (parts_dir / p["name"]).read_bytes()
      if len(chunk) != p["size"] or _sha(chunk) != p["sha256"]:
        raise ValueError(f"part {parts_dir / p['name']} differs from the manifest "
                         f"({len(chunk)} bytes, expected {p['size']}): copy it again")
      chunks.append(chunk)
    blob = b"".join(chunks)
    if len(blob) != f["size"] or _sha(blob) != f["sha256"]:
      raise ValueError(f"{name} joined from its parts differs from the manifest's sha256")
    fileio.write_bytes_atomic(dest / name, blob)
    written.append(dest / name)
  return written


def _manifest(parts_dir: pathlib.Path) -> dict:
  path = parts_dir / MANIFEST
  try:
    manifest = json.loads(path.read_text())
    manifest["files"].items()
  except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
    raise ValueError(f"cannot read the parts' manifest {path}: {e}") from None
  return manifest


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  s = sub.add_parser("split", help="cut a folder's files into hashed parts")
  s.add_argument("src")
  s.add_argument("dest")
  s.add_argument("--max_mib", type=float, default=48.0)
  j = sub.add_parser("join", help="reassemble and verify")
  j.add_argument("parts_dir")
  j.add_argument("dest", nargs="?")
  j.add_argument("--check", action="store_true", help="only list the parts still missing")
  args = ap.parse_args(argv)
  try:
    if args.cmd == "split":
      if not args.max_mib > 0:
        raise ValueError(f"--max_mib must be > 0, got {args.max_mib}")
      manifest = split(args.src, args.dest, int(args.max_mib * 2**20))
      n = sum(len(f["parts"]) for f in manifest["files"].values())
      print(f"{len(manifest['files'])} file(s) in {n} part(s) under {args.dest}")
    elif args.check:
      lost = missing(args.parts_dir)
      print(f"missing: {', '.join(lost)}" if lost else "all parts present")
      return 1 if lost else 0
    else:
      if args.dest is None:
        raise ValueError("join needs a destination folder (or --check)")
      for path in join(args.parts_dir, args.dest):
        print(f"{path}: sha256 ok")
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())

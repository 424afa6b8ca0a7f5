"""The application's files: JSON and JSON Lines records (runs' results.json and
metrics.jsonl, sweeps' results.jsonl), npz arrays, a workdir's lock and a folder's hashes.

Every write goes through :func:`lqjax.fileio.write_bytes_atomic` (a temporary beside the
file, then a rename). One JSONL reader serves every record, so that a damaged line is named
the same way everywhere: the file and the line number, in one line.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
from typing import Callable, List, Optional

from lqjax.fileio import write_bytes_atomic

def write_json_atomic(path, obj) -> None:
  write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_jsonl_atomic(path, rows) -> None:
  write_bytes_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())


def read_json(path):
  """The JSON object in `path`."""
  return json.loads(pathlib.Path(path).read_text())


def write_npz_atomic(path, **arrays) -> None:
  """``np.savez_compressed`` through a temporary file and an atomic rename."""
  import numpy as np
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  write_bytes_atomic(path, buf.getvalue())


class DirectoryLock:
  """An exclusive lock on a folder (``<dir>/.lock``, holding the owner's PID)."""

  def __init__(self, fh):
    self._fh = fh

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self):
    import fcntl
    if self._fh is not None:
      fcntl.flock(self._fh, fcntl.LOCK_UN)
      self._fh.close()
      self._fh = None


class LockedError(RuntimeError):
  """Another process holds the folder's lock."""


def lock_dir(path, *, wait: bool = False) -> DirectoryLock:
  """Takes ``<path>/.lock`` exclusively, or raises :class:`LockedError` naming the holder.

  With ``wait=True`` it waits for the holder to let go instead of raising.
  """
  import fcntl
  lock_path = pathlib.Path(path) / ".lock"
  fh = open(lock_path, "a+")
  try:
    fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
  except BlockingIOError:
    fh.seek(0)
    holder = fh.read().strip() or "unknown"
    fh.close()
    raise LockedError(f"{path} is in use by another run (pid {holder}); wait for it to end or "
                      f"use another folder") from None
  fh.seek(0)
  fh.truncate()
  fh.write(str(os.getpid()))
  fh.flush()
  return DirectoryLock(fh)


def tree_hashes(root) -> dict:
  """``{relative path: sha256}`` of every file under `root`."""
  root = pathlib.Path(root)
  out = {}
  for f in sorted(p for p in root.rglob("*") if p.is_file()):
    out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
  return out


class RecordError(ValueError):
  """A record file with a line that is not a JSON object (one line: file, line, reason)."""


def _why(line: str, e: Exception) -> str:
  if line.startswith(("<<<<<<<", "=======", ">>>>>>>")):
    return "a git conflict marker: resolve the merge"
  return f"not JSON ({e})" if isinstance(e, ValueError) else str(e)


def read_jsonl(path, *, cut_last_line_ok: bool = False,
               warn: Optional[Callable[[str], None]] = None) -> List[dict]:
  """The JSON objects of `path`, one per non-empty line ([] when the file does not exist).

  Args:
    path: a ``.jsonl`` file.
    cut_last_line_ok: a last line that does not parse (a write cut off mid-line) is
      dropped, and `warn` is told which; any other bad line is still an error.
    warn: called with one line of text when a cut-off last line is dropped.

  Raises:
    RecordError: a line that is not a JSON object, naming the file and the line.
  """
  path = pathlib.Path(path)
  if not path.exists():
    return []
  try:
    text = path.read_text()
  except (OSError, UnicodeDecodeError) as e:
    raise RecordError(f"{path}: unreadable ({e})") from None
  lines = text.splitlines()
  last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
  rows = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      if not isinstance(row, dict):
        raise ValueError(f"a JSON {type(row).__name__}, not an object")
    except ValueError as e:
      if cut_last_line_ok and i == last:
        if warn is not None:
          warn(f"{path}: line {i + 1} is cut off; it is dropped")
        break
      raise RecordError(f"{path}:{i + 1}: {_why(line, e)}") from None
    rows.append(row)
  return rows

"""Atomic file writes: a temporary file in the same folder, then a rename.

A reader (or a killed run) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import glob
import io
import json
import os
import pathlib
import tempfile


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def _clean_stale_temporaries(path: pathlib.Path, prefix: str):
  """Removes temporaries of `path` left by writers that were killed (their pid is gone)."""
  for stale in path.parent.glob(glob.escape(prefix) + "*.tmp"):
    pid = stale.name[len(prefix):].split(".", 1)[0]
    if pid.isdigit() and not _alive(int(pid)):
      stale.unlink(missing_ok=True)


def write_bytes_atomic(path, blob: bytes) -> int:
  """Writes `blob` to `path` atomically (mode 0644); returns its length.

  The temporary is ``.<name>.<pid>.<random>.tmp`` beside `path`; one that a killed writer
  left behind (its pid no longer runs) is removed by the next write of the same file.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  prefix = f".{path.name}."
  _clean_stale_temporaries(path, prefix)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{prefix}{os.getpid()}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(blob)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return len(blob)


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
  import hashlib
  root = pathlib.Path(root)
  out = {}
  for f in sorted(p for p in root.rglob("*") if p.is_file()):
    out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
  return out

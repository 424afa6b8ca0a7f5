"""Atomic file writes: a temporary file in the same folder, then a rename.

A reader (or a killed run) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import glob
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

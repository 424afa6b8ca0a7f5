"""Reading the application's JSON Lines records: runs' metrics.jsonl, sweeps' results.jsonl.

One reader for all of them, so that a damaged line is named the same way everywhere:
the file and the line number, in one line.
"""

from __future__ import annotations

import json
import pathlib
from typing import Callable, List, Optional


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

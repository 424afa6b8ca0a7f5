"""Checkpoint integrity of a run's workdir: each orbax step's files hashed when saved,
verified before a restore; a damaged or unverifiable step set aside (moved, never deleted)
and the step before it used.

A step without a hash file was cut off between its write and its hashes: its files cannot
be told from damaged ones, so it counts as damaged (:data:`UNHASHED`).

In a multi-process run every process saves and restores through orbax (each its own
shards), and process 0 alone writes the hashes and sets damaged steps aside.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Optional

from lqlab import distributed, files


class CheckpointError(RuntimeError):
  """No intact checkpoint is left in a workdir."""


def hash_path(workdir, step) -> pathlib.Path:
  return workdir / "checkpoint_hashes" / f"{step}.json"


def write_hashes(workdir, step):
  """Records the sha256 of every file of checkpoint `step` (checked before a restore)."""
  files.write_json_atomic(hash_path(workdir, step),
                           files.tree_hashes(workdir / "checkpoints" / str(step)))


def write_error(e: Exception) -> str:
  """The operating system's reason in a failed write's message (tensorstore or Python)."""
  import re
  if isinstance(e, OSError) and e.strerror:
    return e.strerror
  m = re.search(r":\s*([^:\[]+?)\s*\[os_error_code='?(\d+)", str(e))
  if m:
    return m.group(1)
  return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def clean_tmp(workdir):
  import shutil
  for tmp in (workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"):
    shutil.rmtree(tmp, ignore_errors=True)


def set_aside(steps, workdir, mngr):
  """Moves damaged checkpoint steps out of orbax's folder (kept, never deleted)."""
  if distributed.is_main():
    dest = workdir / "damaged_checkpoints"
    dest.mkdir(exist_ok=True)
    for step in steps:
      (workdir / "checkpoints" / str(step)).rename(dest / f"{step}_{int(time.time())}")
      hash_path(workdir, step).unlink(missing_ok=True)
  distributed.barrier("lqlab_set_aside")
  mngr.reload()


def restore_verified(mngr, workdir, state):
  """(state, meta) of the newest intact checkpoint, or None when there is none at all.

  Each checkpoint's files are checked against the hashes recorded when it was
  saved; a damaged or unreadable step is reported and the one before it is used.
  No intact step left: CheckpointError.
  """
  import orbax.checkpoint as ocp
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None
  problems = []
  for step in steps:
    problem = verify(workdir, step)
    if problem:
      problems.append(f"step {step}: {problem}")
      continue
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many kinds for a bad checkpoint
      problems.append(f"step {step}: unreadable ({type(e).__name__})")
      continue
    if problems:
      set_aside([s for s in steps if s > step], workdir, mngr)
      if distributed.is_main():
          print(f"warning: {workdir / 'checkpoints'}: {'; '.join(problems)}; resuming from "
              f"step {step} (the damaged steps are moved to {workdir / 'damaged_checkpoints'})",
              file=sys.stderr, flush=True)
    return restored["state"], dict(restored["meta"])
  if all(UNHASHED in p for p in problems):
    # a run killed between its first checkpoint and that checkpoint's hashes: nothing
    # verified was ever saved, so it starts again (the step is kept aside)
    set_aside(steps, workdir, mngr)
    print(f"warning: {workdir / 'checkpoints'}: {'; '.join(problems)}; starting from step 0 "
          f"(the step is moved to {workdir / 'damaged_checkpoints'})", file=sys.stderr,
          flush=True)
    return None
  raise CheckpointError(f"no intact checkpoint in {workdir / 'checkpoints'} ({'; '.join(problems)})"
                      f"; use a new --workdir")


UNHASHED = "has no recorded hashes (the run stopped while saving it)"


def verify(workdir, step) -> Optional[str]:
  """Why checkpoint `step` cannot be trusted, or None when its files match their hashes.

  A step without a hash file was cut off between its write and its hashes: its files
  cannot be told from damaged ones, so it counts as damaged.
  """
  try:
    want = json.loads(hash_path(workdir, step).read_text())
  except (OSError, ValueError):
    return UNHASHED
  got = files.tree_hashes(workdir / "checkpoints" / str(step))
  changed = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
  return f"{changed[0]} is damaged or missing" if changed else None


def save(mngr, workdir, state, meta):
  """Saves checkpoint ``state.step`` (the train state and the loop's JSON meta) and records
  its files' hashes. A failed write (full disk, read-only folder) leaves no temporary step
  and raises :class:`CheckpointError` naming the reason and the step that is kept."""
  import logging as pylogging

  import orbax.checkpoint as ocp
  pylogging.disable(pylogging.ERROR)  # orbax logs a failed write's traceback; we say it once
  try:
    mngr.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    mngr.wait_until_finished()
    if distributed.is_main():
      write_hashes(workdir, int(state.step))
    distributed.barrier(f"lqlab_hashes_{int(state.step)}")
  except Exception as e:  # OSError from Python, ValueError from tensorstore
    if distributed.peer_failure(e):
      raise
    clean_tmp(workdir)
    kept = (f"step {mngr.latest_step()}, the last complete checkpoint, is kept"
            if mngr.latest_step() is not None else "no checkpoint was complete yet")
    try:
      mngr.close()
    except Exception:  # the manager may be as broken as the write
      pass
    raise CheckpointError(f"cannot write a checkpoint in {workdir / 'checkpoints'} "
                          f"({write_error(e)}); {kept}") from None
  finally:
    pylogging.disable(pylogging.NOTSET)

"""Devices, meshes and processes of a run: data parallel, FSDP, several processes.

A run's mesh has two axes, ``data`` and ``fsdp`` (``--mesh=data:4,fsdp:2``; default: every
device on ``data``). The batch is split over both. Parameters and their optimizer state
are sharded over ``fsdp``, each tensor on its largest axis that the fsdp size divides; a
tensor with no such axis is replicated. A log scale follows its weight (the axes it keeps
whole keep the weight's sharding, :func:`lqjax.tree.scale_names`), so the scales and their
optimizer state shard with the weights they scale. Batch statistics are replicated.

Several processes join through ``jax.distributed`` (gloo collectives on CPU): every
process runs the same program on its own devices, holds only its shard of the training
examples, and process 0 alone writes the workdir's files and logs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import threading
import time
from typing import Optional

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lqjax import tree as qtree

AXES = ("data", "fsdp")


class DistributedError(RuntimeError):
  """A process of a multi-process run failed or is missing."""


def parse_mesh(spec: str) -> dict:
  """``"data:4,fsdp:2"`` -> ``{"data": 4, "fsdp": 2}`` (axes not named have size 1)."""
  sizes = {}
  for part in spec.split(","):
    m = re.fullmatch(r"\s*(\w+)\s*:\s*(\S+)\s*", part)
    if not m:
      raise ValueError(f"--mesh={spec!r}: expected axis:size pairs such as data:4,fsdp:2")
    name, size = m.groups()
    if name not in AXES:
      raise ValueError(f"--mesh={spec!r}: unknown axis {name!r}; the run's model is "
                       f"partitioned over {' and '.join(AXES)} only")
    if name in sizes:
      raise ValueError(f"--mesh={spec!r}: axis {name!r} is named twice")
    if not size.isdigit() or int(size) < 1:
      raise ValueError(f"--mesh={spec!r}: the size of {name!r} must be a positive integer, "
                       f"not {size!r}")
    sizes[name] = int(size)
  return {a: sizes.get(a, 1) for a in AXES}


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a run's arrays live: its mesh and the shardings of replicated arrays, batches
  and the train state."""

  mesh: jax.sharding.Mesh

  @property
  def sizes(self) -> dict:
    return dict(self.mesh.shape)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch(self) -> NamedSharding:
    """Examples split over every device (FSDP is data parallel too)."""
    return NamedSharding(self.mesh, P(AXES))

  def state_shardings(self, state):
    """A tree of shardings for `state` (a train state, or any tree whose leaves' key paths
    end with the params' paths: optimizer moments, best params)."""
    return state_shardings(state, self.mesh)


def make_layout(spec: Optional[str] = None) -> Layout:
  """The mesh of `spec` (see :func:`parse_mesh`) over every device of every process."""
  devices = jax.devices()
  sizes = parse_mesh(spec) if spec else {"data": len(devices), "fsdp": 1}
  n = int(np.prod(list(sizes.values())))
  if n != len(devices):
    raise ValueError(f"--mesh={spec}: {n} devices, but the run has {len(devices)} "
                     f"({jax.process_count()} process(es) x {jax.local_device_count()}); "
                     f"the axis sizes must multiply to {len(devices)}")
  return Layout(jax.sharding.Mesh(np.asarray(devices).reshape(sizes["data"], sizes["fsdp"]),
                                  AXES))


def fsdp_spec(shape, size: int) -> P:
  """The largest axis of `shape` that `size` divides, on ``fsdp``; replicated when none
  does (or when ``size`` is 1)."""
  if size <= 1:
    return P()
  axes = [i for i, d in enumerate(shape) if d % size == 0 and d >= size]
  if not axes:
    return P()
  best = max(axes, key=lambda i: (shape[i], -i))
  return P(*[("fsdp" if i == best else None) for i in range(len(shape))])


def _path_str(keypath) -> tuple:
  out = []
  for k in keypath:
    if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
      continue  # the array inside a box
    out.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return tuple(out)


def param_specs(params, size: int) -> dict:
  """``{path: PartitionSpec}`` of every array of `params` under FSDP over `size` devices:
  weights on their largest divisible axis, log scales following their weights."""
  flat = qtree.flat_leaves(params)
  specs = {path: fsdp_spec(np.shape(arr), size) for path, (arr, _) in flat.items()}
  for qt in qtree.quantized_tensors(params, default=object()):
    w = specs[qt.path]
    names = tuple(w) + (None,) * (len(qt.p.shape) - len(w))
    scale = qtree.scale_names(names, qt.p.shape, np.shape(qt.log_scale))
    specs[qt.scale_path] = P(*scale) if scale else P()
  return specs


def state_shardings(state, mesh: jax.sharding.Mesh):
  """Shardings for every leaf of `state`: a leaf whose key path ends with a params path
  (and has that param's shape) takes the param's FSDP spec; the rest are replicated."""
  size = dict(mesh.shape).get("fsdp", 1)
  params = getattr(state, "params", state)
  specs = param_specs(params, size) if size > 1 else {}
  shapes = {path: np.shape(arr) for path, (arr, _) in qtree.flat_leaves(params).items()}
  by_len = sorted({len(p) for p in specs}, reverse=True)

  def one(keypath, leaf):
    path = _path_str(keypath)
    for n in by_len:
      tail = path[-n:]
      if len(path) >= n and tail in specs and shapes[tail] == np.shape(leaf):
        return NamedSharding(mesh, specs[tail])
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, state)


# --- processes ---------------------------------------------------------------------------

def init_processes(coordinator_address: Optional[str], num_processes: Optional[int],
                   process_id: Optional[int], timeout_s: int = 300):
  """Joins a multi-process run through ``jax.distributed`` before any device is used.

  With no flags, the environment that ``jax.distributed.initialize()`` reads decides
  (``JAX_COORDINATOR_ADDRESS`` and a cluster's variables); with none of those either, the
  run is one process. A peer that has not joined within `timeout_s` ends this process
  with one line (:class:`DistributedError`, raised from a watchdog by ``os._exit``).
  """
  given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
           "--process_id": process_id}
  if all(v is None for v in given.values()):
    if not os.environ.get("JAX_COORDINATOR_ADDRESS"):
      return
  else:
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise ValueError(f"{', '.join(missing)} missing: a multi-process run needs "
                       f"--coordinator_address, --num_processes and --process_id together")
    if num_processes < 1:
      raise ValueError(f"--num_processes={num_processes}: must be at least 1")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id}: must be in [0, {num_processes - 1}] for "
                       f"--num_processes={num_processes}")
    if not re.fullmatch(r"[\w.\-\[\]:]+:\d+", coordinator_address):
      raise ValueError(f"--coordinator_address={coordinator_address!r}: expected host:port")
  if timeout_s < 1:
    raise ValueError(f"--process_timeout={timeout_s}: must be at least 1 second")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # a peer that dies makes the next collective fail in Python (one line, peer_failure)
  # instead of jax's coordination service aborting this process with a C++ trace
  jax.config.update("jax_enable_recoverability", True)

  def missing_peer():
    print(f"error: the processes of the run did not all join within {timeout_s} s "
          f"(coordinator {coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')}); "
          f"start every process with the same --coordinator_address and --num_processes, "
          f"each with its own --process_id", file=sys.stderr, flush=True)
    os._exit(1)

  dog = threading.Timer(timeout_s, missing_peer)
  dog.daemon = True
  dog.start()
  try:
    # jax's own deadline is later than the watchdog's, which says what happened in one line
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout_s + 30,
                               heartbeat_timeout_seconds=HEARTBEAT_S)
  finally:
    dog.cancel()
  _watch_peers()


# A process silent this long counts as stopped (jax's heartbeats run in a thread of their
# own, so a long compile does not silence them).
HEARTBEAT_S = 20
_DONE = threading.Event()


def done(timeout_s: float = HEARTBEAT_S):
  """The run's work across processes is over (every process calls this after a barrier).

  The processes then leave jax's coordination service in order: each other process
  disconnects now, and process 0, which hosts the service, waits up to `timeout_s` for
  them before it may exit. (With recoverable tasks the service does not hold its host back
  for the others; a process whose disconnect finds the service gone is aborted by jax.)
  """
  _DONE.set()
  if jax.process_count() == 1:
    return
  if not is_main():
    jax.distributed.shutdown()
    return
  client = _client()
  if client is None:
    return
  n, deadline = jax.process_count(), time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    try:
      if len(client.get_live_nodes(list(range(n)))) <= 1:
        return
    except Exception:  # the service already says no more: nothing to wait for
      return
    time.sleep(0.05)


def _client():
  """jax's coordination-service client of this process, if it can list live processes."""
  from jax._src import distributed as jax_distributed
  client = getattr(jax_distributed.global_state, "client", None)
  return client if hasattr(client, "get_live_nodes") else None


def _watch_peers(every_s: float = 2.0):
  """A daemon thread that ends this process with one line once a peer has stopped.

  A collective with a dead peer usually fails at once (:func:`peer_failure`), but one that
  first has to meet its peers (gloo sets up each new group through jax's coordination
  service) would wait for ever: the coordination service's list of live processes, which
  drops a process after HEARTBEAT_S without heartbeats, says when to give up.
  """
  client, n = _client(), jax.process_count()
  if client is None:
    return

  def watch():
    while True:
      time.sleep(every_s)
      if _DONE.is_set():
        return
      try:
        live = client.get_live_nodes(list(range(n)))
      except Exception as e:  # the coordinator (process 0) is gone
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
      else:
        if len(live) == n:
          continue
        reason = f"process(es) {sorted(set(range(n)) - set(live))} stopped sending heartbeats"
      if _DONE.is_set():
        return
      print(f"error: another process of the run stopped ({reason}); the last checkpoint is "
            f"kept: start every process again with the same command to resume",
            file=sys.stderr, flush=True)
      os._exit(1)

  threading.Thread(target=watch, daemon=True, name="lqlab-peers").start()


def is_main() -> bool:
  """Whether this process writes the run's files and logs (process 0)."""
  return jax.process_index() == 0


def barrier(name: str):
  """Every process waits here for the others (nothing to wait for with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """Whether `flag` is set in any process (the same answer in each)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray(bool(flag)))))


def fetch(tree, layout: Layout):
  """`tree`'s arrays as host numpy arrays in every process (sharded ones gathered)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  gathered = jax.jit(lambda t: t, out_shardings=layout.replicated)(tree)
  return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)), gathered)


def shard_examples(x: np.ndarray, layout: Layout):
  """`x` (examples first) on the mesh, split over every device: each process puts only the
  rows of its own devices. Rows are padded with zeros to a multiple of the device count
  (the loop never draws the padding)."""
  n = layout.mesh.size
  pad = -x.shape[0] % n
  if pad:
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
  return jax.make_array_from_callback(x.shape, layout.batch, lambda idx: x[idx])


def peer_failure(e: BaseException) -> Optional[str]:
  """The one-line reason when `e` is a collective that failed because a peer stopped."""
  text = str(e)
  if jax.process_count() > 1 and re.search(
      r"Gloo|Connection closed|heartbeat|Barrier|coordination|UNAVAILABLE|DEADLINE", text):
    first = next((ln for ln in text.splitlines() if ln.strip()), type(e).__name__)
    return (f"another process of the run stopped ({first.strip()[:240]}); the last checkpoint "
            f"is kept: start every process again with the same command to resume")
  return None

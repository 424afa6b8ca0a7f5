"""Two processes on localhost (jax.distributed, gloo collectives, 2 host devices each) train
as one process with the same 4 devices does: the same losses, the same packed file, one
writer; a killed process ends its peer with one line, and the run resumes."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from lqlab import distributed

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARGS = ["--model=lenet300", "--epochs=2", "--batch_size=16", "--mesh=data:2,fsdp:2",
        "--progress=false", "--rule=lsq", "--bits=4", "--scale_every=1"]


def _port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir, *, processes: int, devices: int, extra=(), timeout_s: int = 60):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=str(ROOT))
  port = _port()
  procs = []
  for i in range(processes):
    flags = [] if processes == 1 else [
        f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",
        f"--process_id={i}", f"--process_timeout={timeout_s}"]
    log = pathlib.Path(f"{workdir}.{i}.{time.time_ns()}")  # files: a full pipe would block
    p = subprocess.Popen(
        [sys.executable, "-m", "experiments.mnist", f"--workdir={workdir}", *ARGS, *flags,
         *extra], cwd=ROOT, env=env, stdout=open(f"{log}.out", "w"),
        stderr=open(f"{log}.err", "w"))
    p.log = log
    procs.append(p)
  return procs


def _wait(p, timeout=300):
  """(stdout, stderr) of `p` once it has ended."""
  try:
    p.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    p.kill()
    raise
  return pathlib.Path(f"{p.log}.out").read_text(), pathlib.Path(f"{p.log}.err").read_text()


def _finish(procs, timeout=300):
  outs = [_wait(p, timeout) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def _losses(workdir):
  return [json.loads(line)["train_loss"]
          for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _errors(err: str) -> list:
  return [line for line in err.splitlines() if line.startswith("error:")]


def test_two_processes_match_one_and_resume_after_a_killed_peer(tiny_data, tmp_path):
  """The resumed two-process run against one process on the same mesh, uninterrupted:
  the same losses (float tolerance: the collectives sum in another order), the same test
  accuracy and a byte-identical packed file, so it also finishes where an uninterrupted
  two-process run does."""
  t0 = time.time()
  one, cut = tmp_path / "one", tmp_path / "cut"
  # a run whose second process is killed after the first epoch's checkpoint
  procs = _start(cut, processes=2, devices=2)
  steps_per_epoch = 180 // 16  # tiny_data: 200 examples, 10% held out for validation
  first = cut / "checkpoint_hashes" / f"{steps_per_epoch}.json"
  while not first.exists():
    assert procs[0].poll() is None and procs[1].poll() is None, _wait(procs[0])[1][-3000:]
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGKILL)
  t_kill = time.time()
  ref = _start(one, processes=1, devices=4)  # meanwhile: the uninterrupted reference
  _, err = _wait(procs[0], 120)
  waited = time.time() - t_kill
  assert procs[0].returncode == 1
  (line,) = _errors(err)
  assert "another process of the run stopped" in line and "resume" in line, err[-2000:]
  assert waited < distributed.HEARTBEAT_S + 30, waited
  # the same command again: it resumes from the first epoch's checkpoint
  out = _finish(_start(cut, processes=2, devices=2))
  # process 1 logs nothing of the run's (gloo announces its connections)
  assert [ln for ln in out[1][0].splitlines() if not ln.startswith("[Gloo]")] == []
  assert "model:" in out[0][0]
  _finish(ref)

  want = json.loads((one / "results.json").read_text())
  assert want["devices"] == 4 and want["processes"] == 1 and want["mesh"] == "data:2,fsdp:2"
  got = json.loads((cut / "results.json").read_text())
  assert got["processes"] == 2 and got["devices"] == 4
  assert len(_losses(cut)) == 2  # one row per epoch: written once, by process 0
  np.testing.assert_allclose(_losses(cut), _losses(one), rtol=1e-5)
  assert got["test_accuracy"] == want["test_accuracy"]
  assert (cut / "model.lqz").read_bytes() == (one / "model.lqz").read_bytes()
  print(f"two-process test: {time.time() - t0:.0f} s, waited {waited:.1f} s after the kill")


def test_a_missing_peer_ends_the_run_with_one_line(tiny_data, tmp_path):
  (p,) = _start(tmp_path / "w", processes=1, devices=2, extra=[
      f"--coordinator_address=localhost:{_port()}", "--num_processes=2", "--process_id=0",
      "--process_timeout=3"])
  _, err = _wait(p, 120)
  assert p.returncode == 1
  (line,) = _errors(err)
  assert "did not all join within 3 s" in line, err[-2000:]


_LEAVE = """
import sys, time
from lqlab import distributed
pid = int(sys.argv[2])
distributed.init_processes(sys.argv[1], 2, pid, 60)
distributed.barrier("work_over")
if pid == 1:
  time.sleep(2)  # the last process to finish, while process 0 has nothing left to do
distributed.done()
print("left", pid, flush=True)
"""


def test_process_zero_stays_until_its_peers_have_left(tmp_path):
  """Process 0 hosts jax's coordination service: a peer that disconnects after process 0
  has exited is aborted by jax (a C++ trace, exit -6). done() keeps process 0 up until the
  others have disconnected, so a run whose last process finishes late still exits 0."""
  address = f"localhost:{_port()}"
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  procs = [subprocess.Popen([sys.executable, "-c", _LEAVE, address, str(i)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  t0 = time.time()
  outs = [p.communicate(timeout=120) for p in procs]
  for i, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0 and f"left {i}" in out, err[-3000:]
  assert time.time() - t0 < distributed.HEARTBEAT_S + 60

"""Bad input, table-driven, on every CLI: the exit code, one line on stderr that names the
file or flag, and nothing already saved changed (the workdir's files hashed before and after)."""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lqjax import compress, fileio
from lqlab import files
from lqlab.evaluate import collapsed

ROOT = pathlib.Path(__file__).resolve().parent.parent
TRAIN = ["--model=lenet300", "--batch_size=50", "--noprogress", "--rule=ratio"]


def _run(args, data, cache, timeout=600):
  env = dict(os.environ, LQJAX_DATA_DIR=str(data), LQJAX_CACHE_DIR=str(cache),
             JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _hashes(d: pathlib.Path):
  return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}


def _one_error_line(r, needle):
  lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1, r.stderr[-3000:]
  assert needle in lines[0], lines[0]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]


def _make_data(d: pathlib.Path, name="mnist", **override):
  rng = np.random.default_rng(0)
  (d / name).mkdir(parents=True, exist_ok=True)
  for split, n in (("train", 300), ("test", 60)):
    arrays = {"image": rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
              "label": (np.arange(n) % 10).astype(np.uint8)}
    arrays.update(override.get(split, {}))
    np.savez_compressed(d / name / f"{split}.npz", **arrays)
  return d


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 2-epoch run (with its exported file) on tiny random data."""
  base = tmp_path_factory.mktemp("bad")
  data, cache = _make_data(base / "data"), base / "cache"
  wd = base / "run"
  r = _run(["-m", "experiments.mnist", f"--workdir={wd}", "--epochs=2", "--export", *TRAIN],
           data, cache)
  assert r.returncode == 0, r.stderr[-3000:]
  return base, data, cache, wd


def _copy(finished, tmp_path):
  base, data, cache, wd = finished
  dst = tmp_path / "run"
  shutil.copytree(wd, dst, ignore=shutil.ignore_patterns(".lock"))
  return data, cache, dst


CASES = [
    # (name, args made from the workdir, exit code, needle)
    ("fewer epochs relabel", lambda wd: ["-m", "experiments.mnist", f"--workdir={wd}",
                                         "--epochs=1", *TRAIN], 1, "would relabel"),
    ("more epochs relabel", lambda wd: ["-m", "experiments.mnist", f"--workdir={wd}",
                                        "--epochs=3", *TRAIN], 1, "would relabel"),
    ("a seed beyond int64", lambda wd: ["-m", "experiments.mnist", f"--workdir={wd}",
                                        "--epochs=2", "--seed=99999999999999999999", *TRAIN], 2,
     "seed must be a whole number in 0.."),
    ("check a file with a NaN bias", lambda wd: ["-m", "lqlab.export", "--check",
                                                 str(_nan_bias_copy(wd))], 1,
     "crafted.lqz: bias: values are not finite"),
    ("check a file with a duplicate path", lambda wd: ["-m", "lqlab.export", "--check",
                                                       str(_duplicate_path_copy(wd))], 1,
     "the path is listed twice"),
    ("another config", lambda wd: ["-m", "experiments.mnist", f"--workdir={wd}", "--epochs=2",
                                   "--threshold=0.5", *TRAIN], 1, "another config"),
    ("epochs 0", lambda wd: ["-m", "experiments.mnist", f"--workdir={wd}", "--epochs=0",
                             *TRAIN], 2, "epochs must be >= 1"),
    ("batch size 0", lambda wd: ["-m", "experiments.mnist", f"--workdir={wd}", "--epochs=2",
                                 "--model=lenet300", "--batch_size=0", "--noprogress"], 2,
     "batch_size must be >= 1"),
    ("export --out a directory", lambda wd: ["-m", "lqlab.export", str(wd), f"--out={wd}"], 2,
     "is a directory"),
    ("report of a run", lambda wd: ["-m", "lqlab.report", str(wd / "nope")], 2,
     "is not a run directory"),
    ("export --check a directory", lambda wd: ["-m", "lqlab.export", "--check", str(wd)], 1,
     "is a directory"),
    ("export --check a missing file", lambda wd: ["-m", "lqlab.export", "--check",
                                                  str(wd / "none.lqz")], 1, "No such file"),
    ("verify a damaged file", lambda wd: (wd / "model.lqz").write_bytes(b"LQZ\0junk") and
     ["scripts/verify_export.py", str(wd)], 2, "truncated"),
]


def _rewrite(src, change):
  """A copy of the packed file `src` (a workdir: its model.lqz), written beside the
  workdir, with `change(header, payload)` applied and a valid checksum: damage only the
  reader's own checks can find."""
  out = src.parent / "crafted.lqz"
  src = src / "model.lqz" if src.is_dir() else src
  blob = src.read_bytes()
  n = compress._PREFIX.unpack_from(blob)[3]
  header = json.loads(blob[compress._PREFIX.size:compress._PREFIX.size + n])
  payload = bytearray(blob[compress._PREFIX.size + n:-32])
  change(header, payload)
  h = json.dumps(header).encode()
  body = compress._PREFIX.pack(compress.MAGIC, compress.VERSION, 0, len(h)) + h + bytes(payload)
  out.write_bytes(body + hashlib.sha256(body).digest())
  return out


def _nan_bias_copy(wd):
  """A library-written file whose float bias holds a NaN (the runs here quantize biases)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import lqjax
  params = lqjax.quantize(nn.Dense(3, name="fc1"), lqjax.Rule()).init(
      jax.random.key(0), jnp.ones((1, 4)))["params"]
  lqjax.save(wd.parent / "lib.lqz", params)

  def change(header, payload):
    t = next(t for t in header["tensors"] if t["path"][-1] == "bias" and t["kind"] == "float")
    payload[t["offset"]:t["offset"] + 4] = np.float32(np.nan).tobytes()
  return _rewrite(wd.parent / "lib.lqz", change)


def _duplicate_path_copy(wd):
  def change(header, payload):
    header["tensors"].append(dict(header["tensors"][-1]))
  return _rewrite(wd, change)


@pytest.mark.parametrize("name,args,code,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_on_a_finished_run(finished, tmp_path, name, args, code, needle):
  data, cache, wd = _copy(finished, tmp_path)
  argv = args(wd)
  before = _hashes(wd)
  r = _run(argv, data, cache)
  assert r.returncode == code, r.stderr[-3000:]
  _one_error_line(r, needle)
  after = _hashes(wd)
  if name == "verify a damaged file":
    after.pop("model.lqz"), before.pop("model.lqz")
  assert after == before


def test_a_damaged_checkpoint_falls_back_and_keeps_the_results(finished, tmp_path):
  data, cache, wd = _copy(finished, tmp_path)
  results = json.loads((wd / "results.json").read_text())
  last = max(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
  files = sorted((wd / "checkpoints" / str(last)).rglob("*"), key=lambda p: p.stat().st_size
                 if p.is_file() else -1)
  big = files[-1]
  blob = bytearray(big.read_bytes())
  blob[len(blob) // 2] ^= 0xFF
  big.write_bytes(bytes(blob))
  r = _run(["-m", "experiments.mnist", f"--workdir={wd}", "--epochs=2", *TRAIN], data, cache)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"step {last}:" in r.stderr and "is damaged" in r.stderr and "resuming from step" \
      in r.stderr
  again = json.loads((wd / "results.json").read_text())
  assert again["test_accuracy"] == results["test_accuracy"]  # the same run, retrained exactly
  # Export and report refuse the damaged step with one line (before the retraining above
  # replaced it, a copy shows it).


def test_report_and_export_refuse_a_damaged_last_checkpoint(finished, tmp_path):
  data, cache, wd = _copy(finished, tmp_path)
  last = max(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
  big = max((p for p in (wd / "checkpoints" / str(last)).rglob("*") if p.is_file()),
            key=lambda p: p.stat().st_size)
  big.write_bytes(big.read_bytes()[:-7])
  for argv in (["-m", "lqlab.report", str(wd)], ["-m", "lqlab.export", str(wd),
                                                 f"--out={tmp_path / 'x.lqz'}"]):
    r = _run(argv, data, cache)
    assert r.returncode == 2
    _one_error_line(r, "is damaged")


def test_exporting_an_unfinished_run_needs_allow_partial(finished, tmp_path):
  data, cache, wd = _copy(finished, tmp_path)
  (wd / "results.json").unlink()
  r = _run(["-m", "lqlab.export", str(wd), f"--out={tmp_path / 'p.lqz'}"], data, cache)
  assert r.returncode == 2
  _one_error_line(r, "has not finished training")
  r = _run(["-m", "lqlab.export", str(wd), f"--out={tmp_path / 'p.lqz'}", "--allow_partial"],
           data, cache)
  assert r.returncode == 0 and (tmp_path / "p.lqz").is_file()


def test_a_second_run_on_a_locked_workdir_is_refused(finished, tmp_path):
  data, cache, wd = _copy(finished, tmp_path)
  lock = files.lock_dir(wd)
  try:
    before = _hashes(wd)
    r = _run(["-m", "experiments.mnist", f"--workdir={wd}", "--epochs=2", *TRAIN], data, cache)
  finally:
    lock.close()
  assert r.returncode == 1
  _one_error_line(r, f"in use by another run (pid {os.getpid()})")
  assert _hashes(wd) == before


@pytest.mark.parametrize("override,needle", [
    ({"train": {"image": np.zeros((300, 28, 28, 1), np.uint8)}},
     "train.npz: every training image has the same value in channel 0 (its std is 0)"),
    ({"test": {"image": np.zeros((0, 28, 28, 1), np.uint8), "label": np.zeros(0, np.uint8)}},
     "test.npz: the split is empty (0 examples)"),
    ({"train": {"label": np.full(300, 3, np.uint8)}},
     "train.npz: the training labels hold 1 class (3); a classifier needs at least 2"),
    ({"train": {"label": -(np.arange(300) % 10).astype(np.int8)}}, "labels must be >= 0"),
    ({"train": {"label": (np.arange(300) % 10) + 0.5}}, "whole numbers"),
    ({"test": {"image": np.zeros((60, 32, 32, 1), np.uint8)}}, "test images are"),
    ({"train": {"classes": np.array(["a", "b"])}}, "name only 2 classes"),
])
def test_bad_datasets_are_refused_before_anything_is_written(tmp_path, override, needle):
  data = _make_data(tmp_path / "data", **override)
  wd = tmp_path / "wd"
  r = _run(["-m", "experiments.mnist", f"--workdir={wd}", "--epochs=1", *TRAIN], data,
           tmp_path / "cache")
  assert r.returncode == 2
  _one_error_line(r, needle)
  assert not wd.exists()


@pytest.mark.parametrize("content,needle", [
    (b"not a zip at all", "not an npz"), (None, "no 'image' array"),
])
def test_broken_npz_files_are_named(tmp_path, content, needle):
  data = _make_data(tmp_path / "data")
  f = data / "mnist" / "train.npz"
  if content is None:
    np.savez_compressed(f, label=np.zeros(3, np.uint8))
  else:
    f.write_bytes(content)
  r = _run(["-m", "experiments.mnist", f"--workdir={tmp_path / 'wd'}", "--epochs=1", *TRAIN],
           data, tmp_path / "cache")
  assert r.returncode == 2
  _one_error_line(r, needle)
  assert str(f) in r.stderr


def test_nothing_is_written_for_a_batch_larger_than_the_data(tmp_path):
  data = _make_data(tmp_path / "data")
  wd = tmp_path / "wd"
  r = _run(["-m", "experiments.mnist", f"--workdir={wd}", "--epochs=1", "--batch_size=100000",
            "--noprogress"], data, tmp_path / "cache")
  assert r.returncode == 1
  _one_error_line(r, "exceeds the")
  assert not wd.exists()
  r = _run(["-m", "experiments.mnist", f"--workdir={wd}", "--epochs=1", *TRAIN], data,
           tmp_path / "cache")
  assert r.returncode == 0, r.stderr[-2000:]


def test_a_workdir_that_is_a_file(tmp_path):
  data = _make_data(tmp_path / "data")
  f = tmp_path / "afile"
  f.write_text("keep me")
  r = _run(["-m", "experiments.mnist", f"--workdir={f}", "--epochs=1", *TRAIN], data,
           tmp_path / "cache")
  assert r.returncode == 1
  _one_error_line(r, "is a file, not a directory")
  assert f.read_text() == "keep me"


@pytest.mark.parametrize("lr,needle", [("1e10", "loss "), ("1e30", "no checkpoint was saved yet")])
def test_divergence_stops_with_what_is_kept(tmp_path, lr, needle):
  data = _make_data(tmp_path / "data")
  wd = tmp_path / "wd"
  r = _run(["-m", "experiments.mnist", f"--workdir={wd}", "--epochs=2", f"--lr={lr}",
            "--optimizer=sgd", *TRAIN], data, tmp_path / "cache")
  assert r.returncode == 1
  _one_error_line(r, needle)
  assert not (wd / "results.json").exists()


def test_handmade_lqz_headers_are_refused_by_check(tmp_path):
  import hashlib as h
  for header, needle in (({}, "no list of tensors"), ([], "JSON list")):
    hb = json.dumps(header).encode()
    body = compress._PREFIX.pack(compress.MAGIC, compress.VERSION, 0, len(hb)) + hb
    f = tmp_path / "h.lqz"
    f.write_bytes(body + h.sha256(body).digest())
    r = _run(["-m", "lqlab.export", "--check", str(f)], tmp_path, tmp_path / "cache")
    assert r.returncode == 1
    _one_error_line(r, needle)


def test_a_full_disk_stops_with_one_line_and_no_temporary_checkpoint(tmp_path):
  """A file-size limit (RLIMIT_FSIZE) makes every large write fail as a full disk does."""
  data = _make_data(tmp_path / "data")
  wd = tmp_path / "wd"
  env = dict(os.environ, LQJAX_DATA_DIR=str(data), LQJAX_CACHE_DIR=str(tmp_path / "cache"),
             JAX_PLATFORMS="cpu")
  # The limit is set by a shell (ulimit -f, in KiB) rather than a preexec_fn, which would
  # fork this multithreaded (JAX) process.
  r = subprocess.run(["bash", "-c", 'ulimit -f 400 && exec "$@"', "bash", sys.executable, "-m",
                      "experiments.mnist", f"--workdir={wd}", "--epochs=2", *TRAIN], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 1
  _one_error_line(r, "cannot write a checkpoint in")
  assert "File too large" in r.stderr and "no checkpoint was complete yet" in r.stderr
  assert not list((wd / "checkpoints").glob("*orbax-checkpoint-tmp*"))
  assert not (wd / "results.json").exists()


def test_a_collapsed_run_says_so(tmp_path):
  assert collapsed({"scheme": "scale-rule", "avg_bits": 0.0, "test_accuracy": 0.9,
                          "num_classes": 10})
  assert collapsed({"scheme": "scale-rule", "avg_bits": 3.0, "test_accuracy": 0.11,
                          "num_classes": 10})
  assert not collapsed({"scheme": "scale-rule", "avg_bits": 3.0, "test_accuracy": 0.98,
                              "num_classes": 10})
  assert not collapsed({"scheme": "float", "avg_bits": 32.0, "test_accuracy": 0.1,
                              "num_classes": 10})
  data = _make_data(tmp_path / "data")
  wd = tmp_path / "wd"
  # every step a scale step: each one pushes every coarsening group's grid to the limit
  r = _run(["-m", "experiments.mnist", f"--workdir={wd}", "--epochs=2", "--scale_lr=1e3",
            "--scale_every=1", "--scale_stop=none", "--noexport", *TRAIN], data,
           tmp_path / "cache")
  assert r.returncode == 0, r.stderr[-2000:]
  res = json.loads((wd / "results.json").read_text())
  assert res["avg_bits"] < 0.05 and res["collapsed"] is True
  assert "warning: the run collapsed (avg_bits 0.00" in r.stderr


def test_codes_that_overflow_int32_are_refused_not_written(tmp_path):
  import jax.numpy as jnp
  from lqjax import qconfig, tree
  params = {"fc": {"kernel": jnp.full((2, 2), 3e30), "kernel_quant": {"log_scale": tree.QuantScale(
      jnp.full((1, 1), -40.0), config=qconfig.QuantConfig())}}}
  with pytest.raises(ValueError, match="fc/kernel: codes reach the int32 limit"):
    compress.save(tmp_path / "x.lqz", params)
  assert not (tmp_path / "x.lqz").exists()


@pytest.fixture
def read_only_dir(tmp_path):
  """A folder nobody can write to, root included (the immutable attribute)."""
  d = tmp_path / "ro"
  d.mkdir()
  if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(d)],
                                                      capture_output=True).returncode != 0:
    pytest.skip("chattr +i is not available here")
  yield d
  subprocess.run(["chattr", "-i", str(d)], check=True)


def test_read_only_workdir_and_export_location(finished, tmp_path, read_only_dir):
  data, cache, wd = _copy(finished, tmp_path)
  r = _run(["-m", "experiments.mnist", f"--workdir={read_only_dir}", "--epochs=1", *TRAIN],
           data, cache)
  assert r.returncode == 1
  _one_error_line(r, "is not writable")
  r = _run(["-m", "lqlab.export", str(wd), f"--out={read_only_dir / 'm.lqz'}"], data, cache)
  assert r.returncode == 2
  _one_error_line(r, "cannot write")
  assert not list(read_only_dir.iterdir())


@pytest.mark.parametrize("flags,needle", [
    (["--granularity=0,1,2"], "granularity axis 2 does not exist"),
    (["--seed=99999999999999999999"], "seed must be a whole number"),
    (["--layer_bits=fc1=0"], "is not 'module=bits' with bits in 1..16"),
    (["--layer_bits=fc1"], "is not 'module=bits'"),
    (["--layer_bits=fc1=2,fc1=3"], "once per module"),
    (["--layer_bits=fc1=2", "--edge_bits=8"], "not with --float, a size budget or --edge_bits"),
    (["--layer_bits=fc9=2"], "matches no module of the model"),
])
def test_bad_layer_bits_are_refused_before_a_checkpoint(tmp_path, flags, needle):
  _refused_before_a_checkpoint(tmp_path, ["--rule=lsq", "--bits=4", *flags], needle)


@pytest.mark.parametrize("flags,needle", [
    (["--grid=midrise"], "grid 'midrise' needs fixed bits"),
    (["--grid=midrise", "--budget_bits=2"], "grid 'midrise' needs fixed bits"),
    (["--grid=binary", "--bits=1"], "unknown grid 'binary'"),
])
def test_bad_grids_are_refused_before_a_checkpoint(tmp_path, flags, needle):
  _refused_before_a_checkpoint(tmp_path, ["--rule=lsq", *flags], needle)


@pytest.mark.parametrize("flags,needle", [
    (["--act_rule=ratio"], "it needs --act_bits"),
    (["--act_bits=8", "--act_rule=minmax"], "act_rule must be lsq or ratio"),
    (["--act_bits=8", "--act_threshold=0.05"], "give that rule too"),
    (["--act_bits=8", "--act_rule=ratio", "--act_threshold=nan"], "act_threshold must be"),
])
def test_bad_input_rules_are_refused_before_a_checkpoint(tmp_path, flags, needle):
  _refused_before_a_checkpoint(tmp_path, ["--rule=lsq", "--bits=4", *flags], needle)


@pytest.mark.parametrize("flags,needle", [
    (["--mesh=data:3"], "the axis sizes must multiply to 1"),
    (["--mesh=model:1"], "unknown axis 'model'"),
    (["--mesh=data:two"], "must be a positive integer"),
    (["--num_processes=2"], "--coordinator_address, --process_id missing"),
    (["--coordinator_address=localhost:1234", "--num_processes=2", "--process_id=2"],
     "--process_id=2: must be in [0, 1]"),
    (["--coordinator_address=localhost", "--num_processes=2", "--process_id=0"],
     "expected host:port"),
])
def test_bad_mesh_and_process_flags_are_refused_before_a_checkpoint(tmp_path, flags, needle):
  _refused_before_a_checkpoint(tmp_path, flags, needle)


def _refused_before_a_checkpoint(tmp_path, flags, needle):
  """Refused before the workdir is claimed: nothing is written, so the corrected command
  on the same workdir is not 'another config'."""
  data = _make_data(tmp_path / "data")
  wd = tmp_path / "wd"
  r = _run(["-m", "experiments.mnist", f"--workdir={wd}", "--epochs=1", *TRAIN, *flags], data,
           tmp_path / "cache")
  assert r.returncode == 2, r.stderr[-3000:]
  _one_error_line(r, needle)
  assert not wd.exists()


def test_the_corrected_command_runs_on_the_workdir_of_a_refused_typo(tmp_path):
  data = _make_data(tmp_path / "data")
  wd = tmp_path / "wd"
  base = ["-m", "experiments.mnist", f"--workdir={wd}", "--epochs=1", "--noexport", *TRAIN,
          "--rule=lsq", "--bits=4"]
  r = _run(base + ["--layer_bits=fc9=2"], data, tmp_path / "cache")
  assert r.returncode == 2 and not wd.exists()
  r = _run(base + ["--layer_bits=fc1=2"], data, tmp_path / "cache")
  assert r.returncode == 0, r.stderr[-3000:]


def test_check_accepts_any_file_the_library_writes(tmp_path):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import lqjax
  m = lqjax.quantize(nn.Dense(3, name="fc"), lqjax.Rule())
  params = m.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  f = tmp_path / "mine.lqz"
  lqjax.save(f, params, meta={"config": {"model": "my_mlp"}})
  r = _run(["-m", "lqlab.export", "--check", str(f)], tmp_path, tmp_path / "cache")
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.startswith(f"ok: {f}: my_mlp, 2 tensors, ")


def test_export_zstd_without_out_keeps_the_packed_file_it_describes(finished, tmp_path):
  data, cache, wd = _copy(finished, tmp_path)
  results = json.loads((wd / "results.json").read_text())
  before = _hashes(wd)
  r = _run(["-m", "lqlab.export", str(wd), "--zstd"], data, cache)
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"wrote {wd / 'model.lqz.zst'}:" in r.stdout
  assert _hashes(wd) == before  # the same run, the same bytes under each name
  assert (wd / "model.lqz").stat().st_size == results["packed_bytes"]
  assert (wd / "model.lqz.zst").stat().st_size == results["entropy_coded_bytes"]


def test_export_builds_the_onnx_from_the_bytes_it_wrote_not_from_the_path(finished, tmp_path,
                                                                          monkeypatch):
  """Another process replacing --out between the write and the ONNX build changes nothing:
  the ONNX holds this run's model."""
  pytest.importorskip("jax2onnx")
  pytest.importorskip("onnxruntime")
  from lqjax import onnx_export
  from lqlab import export
  data, cache, wd = _copy(finished, tmp_path)
  out, onnx = tmp_path / "same.lqz", tmp_path / "a.onnx"
  real_write = fileio.write_bytes_atomic

  def write_then_replaced(path, blob):
    n = real_write(path, blob)
    if pathlib.Path(path) == out:  # the other process's file lands right after ours
      pathlib.Path(path).write_bytes(b"LQZ\0 another run's file")
    return n

  monkeypatch.setattr(fileio, "write_bytes_atomic", write_then_replaced)
  assert export.main([str(wd), f"--out={out}", f"--onnx={onnx}"]) == 0
  model, variables, meta = export.load(wd / "model.lqz")
  x = np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
  np.testing.assert_allclose(onnx_export.run_onnx(onnx, x),
                             export.predict(model, variables, meta, x), atol=1e-4)


def test_an_unhashed_checkpoint_is_not_trusted(finished, tmp_path):
  """A kill between a checkpoint and its hashes leaves a step that cannot be verified: it is
  set aside with one warning and the run resumes from the step before, to the same result."""
  data, cache, wd = _copy(finished, tmp_path)
  results = json.loads((wd / "results.json").read_text())
  (wd / "results.json").unlink()
  last = max(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
  (wd / "checkpoint_hashes" / f"{last}.json").unlink()
  big = max((p for p in (wd / "checkpoints" / str(last)).rglob("*") if p.is_file()),
            key=lambda p: p.stat().st_size)
  blob = bytearray(big.read_bytes())
  for i in (len(blob) // 3, len(blob) // 2, 2 * len(blob) // 3):
    blob[i] ^= 0xFF
  big.write_bytes(bytes(blob))
  r = _run(["-m", "lqlab.export", str(wd), f"--out={tmp_path / 'x.lqz'}", "--allow_partial"],
           data, cache)
  assert r.returncode == 2
  _one_error_line(r, "has no recorded hashes")
  r = _run(["-m", "experiments.mnist", f"--workdir={wd}", "--epochs=2", *TRAIN], data, cache)
  assert r.returncode == 0, r.stderr[-3000:]
  warnings = [l for l in r.stderr.splitlines() if l.startswith("warning:") and "checkpoints" in l]
  assert len(warnings) == 1 and f"step {last}: has no recorded hashes" in warnings[0]
  again = json.loads((wd / "results.json").read_text())
  assert again["test_accuracy"] == results["test_accuracy"]


def test_a_cut_off_last_metrics_line_does_not_block_resuming(finished, tmp_path):
  data, cache, wd = _copy(finished, tmp_path)
  results = json.loads((wd / "results.json").read_text())
  (wd / "results.json").unlink()
  m = wd / "metrics.jsonl"
  m.write_text(m.read_text()[:-20])
  r = _run(["-m", "experiments.mnist", f"--workdir={wd}", "--epochs=2", *TRAIN], data, cache)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"warning: {m}: line 2 is cut off; it is dropped" in r.stderr
  assert json.loads((wd / "results.json").read_text())["test_accuracy"] == \
      results["test_accuracy"]
  assert len(m.read_text().splitlines()) == 2  # the epoch's row written again from the run


def test_a_damaged_metrics_line_before_the_last_is_named(finished, tmp_path):
  data, cache, wd = _copy(finished, tmp_path)
  (wd / "results.json").unlink()
  m = wd / "metrics.jsonl"
  m.write_text("<<<<<<< HEAD\n" + m.read_text())
  before = _hashes(wd)
  r = _run(["-m", "experiments.mnist", f"--workdir={wd}", "--epochs=2", *TRAIN], data, cache)
  assert r.returncode == 1
  _one_error_line(r, f"{m}:1: a git conflict marker")
  assert _hashes(wd) == before


# A run of experiments.mnist in which one function first sends the process a signal.
_SIGNAL_DRIVER = """
import os, signal, sys
from experiments import common, mnist
from lqlab import {module} as target
real = getattr(target, {attr!r})
calls = []
def hooked(*a, **k):
  calls.append(1)
  if len(calls) == {nth}:
    os.kill(os.getpid(), signal.{sig})
  return real(*a, **k)
setattr(target, {attr!r}, hooked)
sys.argv = ["mnist"] + sys.argv[1:]
common.main(mnist.get_config)
"""


def _run_with_signal(module, attr, sig, args, data, cache, nth=1):
  code = _SIGNAL_DRIVER.format(module=module, attr=attr, sig=sig, nth=nth)
  return _run(["-c", code, *args], data, cache)


@pytest.mark.parametrize("module,attr,sig,when", [
    ("data", "load", "SIGTERM", "SIGTERM while loading the data and building the model"),
    ("step", "init_state", "SIGTERM", "SIGTERM while loading the data and building the model"),
    ("export", "export_after_training", "SIGINT",
     "SIGINT during the final evaluation and export (training is complete"),
])
def test_a_signal_outside_the_epoch_loop_stops_with_one_line(tmp_path, module, attr, sig, when):
  data = _make_data(tmp_path / "data")
  wd = tmp_path / "wd"
  if module == "step":
    module, attr = "train", "init_state"  # train imported it by name
  args = [f"--workdir={wd}", "--epochs=1", *TRAIN]
  r = _run_with_signal(module, attr, sig, args, data, tmp_path / "cache")
  assert r.returncode == 130, r.stderr[-3000:]
  _one_error_line(r, when)
  assert "re-run the same command to resume" in r.stderr
  assert not (wd / "results.json").exists()
  assert not list(wd.glob("**/*.tmp")) if wd.exists() else True
  r = _run(["-m", "experiments.mnist", *args], data, tmp_path / "cache")
  assert r.returncode == 0, r.stderr[-3000:]
  assert (wd / "results.json").exists()


def test_a_signal_in_the_last_chunk_of_the_last_epoch_says_the_run_is_finishing(tmp_path):
  data = _make_data(tmp_path / "data")
  wd = tmp_path / "wd"
  # the signal comes while the last epoch's end is processed (its 2nd epoch-end step)
  r = _run_with_signal("train", "_budget_step", "SIGINT",
                       [f"--workdir={wd}", "--epochs=2", "--noexport", *TRAIN], data,
                       tmp_path / "cache", nth=2)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "warning: SIGINT in the last epoch: the run is finishing" in r.stderr
  assert (wd / "results.json").exists()


def test_temporaries_of_a_killed_export_are_cleaned_by_the_next(tmp_path):
  """A writer killed mid-write leaves .<name>.<pid>.*.tmp; the next write of that file
  removes it (its pid is gone); a live writer's temporary is left alone."""
  out = tmp_path / "m.lqz"
  proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True)
  dead = int(proc.stdout)
  stale = tmp_path / f".m.lqz.{dead}.abc.tmp"
  live = tmp_path / f".m.lqz.{os.getpid()}.xyz.tmp"
  other = tmp_path / "unrelated.tmp"
  for f in (stale, live, other):
    f.write_bytes(b"x")
  fileio.write_bytes_atomic(out, b"new")
  assert not stale.exists() and live.exists() and other.exists()
  assert out.read_bytes() == b"new"


def test_a_missing_dataset_is_one_line_and_tfds_writes_nothing_outside_the_cache(tmp_path):
  home = tmp_path / "home"
  home.mkdir()
  env_home = dict(HOME=str(home))
  wd = tmp_path / "wd"
  env = dict(os.environ, LQJAX_DATA_DIR=str(tmp_path / "nodata"),
             LQJAX_CACHE_DIR=str(tmp_path / "cache"), JAX_PLATFORMS="cpu", **env_home)
  env.pop("TFDS_DATA_DIR", None)
  r = subprocess.run([sys.executable, "-m", "experiments.mnist", f"--workdir={wd}",
                      "--epochs=1", *TRAIN], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 2
  assert len(r.stderr.strip().splitlines()) == 1, r.stderr
  _one_error_line(r, "dataset 'mnist' not found")
  assert not (home / "tensorflow_datasets").exists() and not wd.exists()

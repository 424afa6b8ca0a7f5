"""Export a trained run to the packed file (and ONNX), or verify a file.

  python -m lqlab.export <workdir> [--out model.lqz] [--zstd] [--onnx model.onnx]
  python -m lqlab.export --check model.lqz

Without ``--out`` the file goes to ``<workdir>/model.lqz`` (``model.lqz.zst`` with
``--zstd``), the names training gives them. ``--onnx`` is built from the packed bytes in
memory, so it holds the model of the file this command wrote.

``--check`` verifies magic, version, checksum, the header and that every tensor
decodes to finite values; it exits non-zero with one line on any fault.

The functions here tie a run (its :class:`lqlab.config.TrainConfig`, dataset
normalisation and model) to lqjax's generic file and ONNX exporters: the file's
``meta`` holds the training config, the class count and the normalisation, so
:func:`load` rebuilds the model from the file alone.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import numpy as np

from lqjax import compress, fileio

from lqlab import data
from lqlab.config import TrainConfig, run_meta
from lqlab.evaluate import model_variables, predict_logits
from lqlab.step import build_model


def to_bytes(cfg, num_classes, ds_stats, params, batch_stats, *,
             codec=compress.CODEC_FIXED) -> bytes:
  """The packed file of `cfg`'s trained model, in memory."""
  variables = model_variables(jax.device_get(params), jax.device_get(batch_stats))
  return compress.to_bytes(variables, run_meta(cfg, num_classes, ds_stats), codec=codec)


def export(path, cfg, num_classes, ds_stats, params, batch_stats, *,
           codec=compress.CODEC_FIXED) -> int:
  """Writes `cfg`'s trained model to `path` (atomically); returns the bytes written."""
  return fileio.write_bytes_atomic(path, to_bytes(cfg, num_classes, ds_stats, params, batch_stats,
                                              codec=codec))


#: The file names a run's export gives each codec in its workdir.
DEFAULT_NAMES = {compress.CODEC_FIXED: "model.lqz", compress.CODEC_ZSTD: "model.lqz.zst"}


def _run_meta_of(header) -> dict:
  meta = header.get("meta") if "meta" in header else header  # version 1: at the top
  if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
    raise compress.CorruptFileError("the file holds no training config (not a run's export)")
  return meta


def load(path):
  """Rebuilds a run's model from its file alone.

  Returns:
    (model, variables, meta): Linen variables ``{"params", "batch_stats"?}`` and
    the file's run meta (``config``, ``num_classes``, ``mean``, ``std``).
  """
  return _rebuild(*compress.read(path))


def load_bytes(blob: bytes):
  """:func:`load` of a file's bytes in memory (the very bytes an export wrote)."""
  return _rebuild(*compress.parse(blob))


def _rebuild(header, loaded):
  meta = _run_meta_of(header)
  cfg = TrainConfig.from_json(meta["config"])
  model = build_model(cfg, meta["num_classes"])
  if "params" in loaded:  # version 1
    params, stats = loaded["params"], loaded.get("batch_stats", {})
  else:
    stats = loaded.pop("batch_stats", {})
    params = loaded
  variables = {"params": params}
  if stats:
    variables["batch_stats"] = stats
  return model, variables, meta


def logits_fn(model, mean, std):
  """``fn(variables, uint8 NHWC images) -> logits``, normalisation included (jittable)."""

  def fn(variables, x):
    return model.apply(variables, data.normalize(x, mean, std), train=False)

  return fn


def predict(model, variables, meta, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
  """Logits of a reloaded model on uint8 NHWC images."""
  # The variables are an argument, not a closed-over constant: XLA would
  # otherwise constant-fold the weights into a differently-rounded program.
  fn = jax.jit(logits_fn(model, meta["mean"], meta["std"]))
  return np.concatenate([np.asarray(fn(variables, images[i:i + batch_size]))
                         for i in range(0, images.shape[0], batch_size)])


def integer_results(model, variables, meta, images: np.ndarray, ref: np.ndarray,
                    labels: np.ndarray, batch_size: int = 500) -> dict:
  """``lqjax.integer_inference`` of a reloaded model against the fake-quantized logits
  `ref` on the same images: argmax agreement, the largest logit difference, its test
  accuracy and the bytes it holds on the device."""
  import lqjax
  fn = lqjax.integer_inference(model, variables, train=False)
  norm = jax.jit(lambda x: data.normalize(x, meta["mean"], meta["std"]))
  got = np.concatenate([np.asarray(fn(norm(images[i:i + batch_size])))
                        for i in range(0, images.shape[0], batch_size)])
  return {"integer_identical_argmax": bool(np.array_equal(got.argmax(-1), ref.argmax(-1))),
          "integer_argmax_disagreements": int(np.sum(got.argmax(-1) != ref.argmax(-1))),
          "integer_max_abs_logit_diff": float(np.max(np.abs(got - ref))),
          "integer_test_accuracy": float(np.mean(got.argmax(-1) == labels)),
          "integer_device_bytes": lqjax.integer.device_bytes(fn.variables)}


def onnx_integer_results(model, variables, meta, images: np.ndarray, ref: np.ndarray,
                         labels: np.ndarray) -> dict:
  """The integer function as ONNX (``lqjax.onnx_export.build_integer``: normalised images in,
  Dense layers as MatMulInteger) run by onnxruntime on `images`, against the fake-quantized
  logits `ref`: argmax agreement, the largest logit difference, its accuracy and bytes."""
  import lqjax
  from lqjax import onnx_export
  norm = np.asarray(data.normalize(images, meta["mean"], meta["std"]), np.float32)
  fn = lqjax.integer_inference(model, variables, packed=False, train=False)
  blob = onnx_export.build_integer(fn, norm[:1]).SerializeToString()
  got = onnx_export.run_onnx(blob, norm, optimization="all")
  return {"onnx_integer_argmax_disagreements": int(np.sum(got.argmax(-1) != ref.argmax(-1))),
          "onnx_integer_max_abs_logit_diff": float(np.max(np.abs(got - ref))),
          "onnx_integer_test_accuracy": float(np.mean(got.argmax(-1) == labels)),
          "onnx_integer_bytes": len(blob)}


def onnx_bytes(model, variables, meta, image_shape, weights: str = "int") -> bytes:
  """The run's model as ONNX: uint8 NHWC images in (normalised in the graph), logits out;
  `weights` as in :func:`lqjax.onnx_export.build`."""
  from lqjax import onnx_export
  return onnx_export.to_bytes(logits_fn(model, meta["mean"], meta["std"]), variables,
                              np.zeros((1,) + tuple(image_shape), np.uint8), weights=weights)


def export_onnx(path, model, variables, meta, image_shape) -> int:
  """:func:`onnx_bytes` written to `path` atomically; returns its size."""
  return fileio.write_bytes_atomic(path, onnx_bytes(model, variables, meta, image_shape))


def export_after_training(cfg, model, state, ds, results) -> dict:
  """Hook for train_and_evaluate: writes model.lqz and model.lqz.zst, checks the reload.

  Returns the results entries: packed_bytes, entropy_coded_bytes, compression_ratio,
  entropy_coded_ratio, reload_test_accuracy, reload_identical_argmax (and the
  onnx_* entries when lqjax[export] is installed).
  """
  out = pathlib.Path(results["workdir"])
  stats = (ds.mean, ds.std)
  params, bs = jax.device_get(state.params), jax.device_get(state.batch_stats)
  packed = export(out / "model.lqz", cfg, ds.num_classes, stats, params, bs)
  coded = export(out / "model.lqz.zst", cfg, ds.num_classes, stats, params, bs,
                 codec=compress.CODEC_ZSTD)
  test_x, test_y = np.asarray(ds.test.image), np.asarray(ds.test.label)
  ref = predict_logits(cfg, model, stats, params, bs, test_x)
  m2, v2, meta = load(out / "model.lqz")
  got = predict(m2, v2, meta, test_x)
  fp32 = results["fp32_bytes"]
  extra = {}
  if cfg.act_bits is not None:  # the integer path from the file, on the whole test split
    extra.update(integer_results(m2, v2, meta, test_x, ref, test_y))
  try:
    import jax2onnx  # noqa: F401
    import onnxruntime  # noqa: F401
  except ImportError:  # onnx, onnxruntime and jax2onnx are the optional extra lqjax[export]
    pass
  else:
    from lqjax import onnx_export
    try:
      onnx_bytes = export_onnx(out / "model.onnx", m2, v2, meta, test_x.shape[1:])
    except onnx_export.ExportError as e:  # the run's results stand without the ONNX file
      print(f"warning: ONNX export skipped: {e}", file=sys.stderr)
      return {**extra, **_file_results(packed, coded, fp32, got, ref, test_y, out), "onnx_error": str(e)}
    onnx_logits = onnx_export.run_onnx(out / "model.onnx", test_x)
    extra = {**extra, "onnx_bytes": onnx_bytes,
             "onnx_test_accuracy": float(np.mean(onnx_logits.argmax(-1) == test_y)),
             "onnx_identical_argmax": bool(np.array_equal(onnx_logits.argmax(-1), ref.argmax(-1))),
             "onnx_max_abs_logit_diff": float(np.max(np.abs(onnx_logits - ref)))}
  return {**extra, **_file_results(packed, coded, fp32, got, ref, test_y, out)}


def _file_results(packed, coded, fp32, got, ref, test_y, out) -> dict:
  return {"packed_bytes": packed, "entropy_coded_bytes": coded,
          "file_format_version": compress.VERSION, "compression_ratio": fp32 / packed, "entropy_coded_ratio": fp32 / coded,
          "reload_test_accuracy": float(np.mean(got.argmax(-1) == test_y)),
          "reload_identical_argmax": bool(np.array_equal(got.argmax(-1), ref.argmax(-1))),
          "reload_max_abs_logit_diff": float(np.max(np.abs(got - ref))),
          "packed_file": str(out / "model.lqz")}


def _describe(header) -> str:
  """"<model> (<dataset>), " for a run's export; "" for any other file the library wrote."""
  meta = header.get("meta", header)
  cfg = meta.get("config") if isinstance(meta, dict) else None
  if not isinstance(cfg, dict):
    return ""
  names = [str(cfg[k]) for k in ("model", "dataset") if isinstance(cfg.get(k), (str, int))]
  return f"{names[0]} ({names[1]}), " if len(names) == 2 else (f"{names[0]}, " if names else "")


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m lqlab.export", description=__doc__.splitlines()[0])
  ap.add_argument("workdir", nargs="?")
  ap.add_argument("--out", help="packed file to write (default <workdir>/model.lqz, or "
                                "model.lqz.zst with --zstd)")
  ap.add_argument("--zstd", action="store_true", help="entropy-coded variant (zstd)")
  ap.add_argument("--onnx", help="also write an ONNX model (needs lqjax[export])")
  ap.add_argument("--check", metavar="FILE", help="verify a packed file and exit")
  ap.add_argument("--allow_partial", action="store_true",
                  help="export a run that has not finished (no results.json yet)")
  args = ap.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  if args.check:
    try:
      header, _ = compress.read(args.check)
    except (compress.CorruptFileError, FileNotFoundError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    print(f"ok: {args.check}: {_describe(header)}{len(header['tensors'])} tensors, "
          f"{pathlib.Path(args.check).stat().st_size} bytes")
    return 0
  if not args.workdir:
    ap.error("give a workdir or --check FILE")
  from lqlab import train
  try:
    cfg, model, state, stats, num_classes = train.restore(args.workdir)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not (pathlib.Path(args.workdir) / "results.json").is_file() and not args.allow_partial:
    print(f"error: {args.workdir} has not finished training (no results.json; checkpoint at "
          f"step {int(state.step)}): finish it by re-running its command, or pass "
          f"--allow_partial", file=sys.stderr)
    return 2
  codec = compress.CODEC_ZSTD if args.zstd else compress.CODEC_FIXED
  # each codec has its own name in the workdir: results.json describes each file so named
  out = pathlib.Path(args.out or pathlib.Path(args.workdir) / DEFAULT_NAMES[codec])
  if out.is_dir():
    print(f"error: --out {out} is a directory; give a file path", file=sys.stderr)
    return 2
  try:
    blob = to_bytes(cfg, num_classes, stats, state.params, state.batch_stats, codec=codec)
  except ValueError as e:  # weights or scales the file cannot reproduce
    print(f"error: {e}", file=sys.stderr)
    return 1
  onnx_blob = None
  if args.onnx:  # built from the bytes in memory, never re-read from --out
    from lqjax import onnx_export
    m2, v2, meta = load_bytes(blob)
    try:
      onnx_blob = onnx_bytes(m2, v2, meta, data.image_shape(cfg.dataset))
    except onnx_export.ExportError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
  for path, content in ((out, blob), (args.onnx and pathlib.Path(args.onnx), onnx_blob)):
    if content is None:
      continue
    try:
      fileio.write_bytes_atomic(path, content)
    except OSError as e:
      print(f"error: cannot write {path}: {e.strerror or e}", file=sys.stderr)
      return 2
    print(f"wrote {path}: {len(content)} bytes")
  return 0


if __name__ == "__main__":
  sys.exit(main())

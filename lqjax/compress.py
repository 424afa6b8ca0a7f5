"""The packed model file (``.lqz``): real bytes on disk that reload to the same model.

Layout (all integers little-endian)::

    b"LQZ\\0"  magic
    u16       format version (:data:`VERSION`)
    u16       codec: 0 = fixed-width bit-packed, 1 = zstd (entropy-coded)
    u32       header length H
    H bytes   header, UTF-8 JSON: config, model, classes, normalisation, tensors
    payload   (codec 1: zstd-compressed)
    32 bytes  SHA-256 of everything above

Payload, per tensor in header order:

* quantized (codec 0): per group (the scale's C order) float32 ``log_scale``,
  int32 offset (the group's smallest code) and uint8 bit width b_G; then the
  codes minus their group's offset, b_G bits each, bit-packed LSB-first and
  back to back across the whole tensor (groups in order, elements of a group
  in C order of the reduced axes), padded to a byte at the tensor's end.
* quantized (codec 1): the same group fields, then the codes minus offset as
  uint8 (uint16 when b_G > 8, uint32 when > 16): byte-aligned symbols that zstd
  entropy-codes well.
* float: float32 raw (batch norm, float layers).

The fixed-width payload's size is exactly :func:`lqjax.accounting.model_report`'s
``packed_bytes_accounted``; the file adds only the header and the checksum.

Reloading stores ``log_scale`` (not s) so that s = exp(log s) is recomputed
bit-for-bit as in training; with Q idempotent the reloaded model's forward pass
is identical to the trained one.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import struct
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lqjax import accounting, fileio, layers, types

MAGIC = b"LQZ\0"
VERSION = 1
CODEC_FIXED, CODEC_ZSTD = 0, 1
_PREFIX = struct.Struct("<4sHHI")


class CorruptFileError(ValueError):
  """A packed file that is truncated, corrupted or of an unknown version."""


# ------------------------------------------------------------ bit packing


def pack_bits(values: np.ndarray, widths: np.ndarray) -> bytes:
  """Packs non-negative ints `values[i]` in `widths[i]` bits each, LSB-first."""
  values = np.asarray(values, np.uint64)
  widths = np.asarray(widths, np.int64)
  if values.shape != widths.shape:
    raise ValueError("values and widths differ in shape")
  if np.any(values >= (np.uint64(1) << widths.astype(np.uint64))):
    raise ValueError("a value does not fit its width")
  total = int(widths.sum())
  bits = np.zeros(total, np.uint8)
  offsets = np.cumsum(widths) - widths
  for k in range(int(widths.max(initial=0))):
    m = widths > k
    bits[offsets[m] + k] = ((values[m] >> np.uint64(k)) & np.uint64(1)).astype(np.uint8)
  return np.packbits(bits, bitorder="little").tobytes()


def unpack_bits(buf: bytes, widths: np.ndarray) -> np.ndarray:
  """Inverse of :func:`pack_bits`."""
  widths = np.asarray(widths, np.int64)
  total = int(widths.sum())
  if len(buf) != (total + 7) // 8:
    raise CorruptFileError(f"packed codes hold {len(buf)} bytes, expected {(total + 7) // 8}")
  bits = np.unpackbits(np.frombuffer(buf, np.uint8), bitorder="little")[:total]
  offsets = np.cumsum(widths) - widths
  out = np.zeros(widths.shape, np.uint64)
  for k in range(int(widths.max(initial=0))):
    m = widths > k
    out[m] |= bits[offsets[m] + k].astype(np.uint64) << np.uint64(k)
  return out


def _group_fields(codes, sshape):
  gv = accounting.group_view(codes, sshape).astype(np.int64)
  lo = gv.min(1)
  span = gv.max(1) - lo + 1
  widths = np.ceil(np.log2(span) - 1e-9).clip(min=0).astype(np.int64)
  return gv, lo, widths


def _ungroup(gv, shape, sshape):
  perm = types.group_permutation(shape, sshape)
  arr = gv.reshape([shape[i] for i in perm])
  return np.transpose(arr, np.argsort(perm))


# ------------------------------------------------------------ writing


def _encode_tensors(params, batch_stats, rounding, bits, codec):
  """(tensor entries for the header, payload bytes)."""
  entries, chunks, done = [], [], set()
  pos = 0
  for path, p, ls in layers.iter_quantized(params):
    codes, _ = accounting.tensor_codes(p, ls, rounding, bits)
    gv, lo, widths = _group_fields(codes, ls.shape)
    ls_np = np.asarray(ls, np.float32).reshape(-1)
    head = ls_np.tobytes() + lo.astype(np.int32).tobytes() + widths.astype(np.uint8).tobytes()
    rel = gv - lo[:, None]
    if codec == CODEC_FIXED:
      body = pack_bits(rel.reshape(-1), np.repeat(widths, gv.shape[1]))
    else:
      dt = np.uint8 if widths.max(initial=0) <= 8 else (np.uint16 if widths.max() <= 16 else np.uint32)
      body = rel.astype(dt).tobytes()
    blob = head + body
    entries.append({"path": list(path), "kind": "quantized", "shape": list(p.shape),
                    "scale_shape": list(ls.shape), "offset": pos, "nbytes": len(blob),
                    "symbol_bytes": None if codec == CODEC_FIXED else int(np.dtype(dt).itemsize)})
    chunks.append(blob)
    pos += len(blob)
    done.add(path)
    done.add(path[:-1] + (path[-1] + layers.QUANT_SUFFIX, "log_scale"))
  for coll, tree in (("params", params), ("batch_stats", batch_stats or {})):
    for path, v in traverse_util.flatten_dict(dict(tree)).items():
      if coll == "params" and path in done:
        continue
      blob = np.asarray(v, np.float32).tobytes()
      entries.append({"path": [coll] + list(path), "kind": "float", "shape": list(np.shape(v)),
                      "offset": pos, "nbytes": len(blob)})
      chunks.append(blob)
      pos += len(blob)
  return entries, b"".join(chunks)


def to_bytes(meta: Mapping[str, Any], params, batch_stats=None, *, rounding="floor", bits=None,
             codec: int = CODEC_FIXED) -> bytes:
  """Serialises a trained model (see the module docstring for the layout)."""
  entries, payload = _encode_tensors(jax.device_get(params), jax.device_get(batch_stats),
                                     rounding, bits, codec)
  header = json.dumps({**meta, "rounding": rounding, "bits": bits, "tensors": entries,
                       "payload_bytes": len(payload)}, sort_keys=True).encode()
  if codec == CODEC_ZSTD:
    import zstandard
    payload = zstandard.ZstdCompressor(level=19).compress(payload)
  body = _PREFIX.pack(MAGIC, VERSION, codec, len(header)) + header + payload
  return body + hashlib.sha256(body).digest()


write_atomic = fileio.write_bytes_atomic


# ------------------------------------------------------------ reading


def parse(blob: bytes):
  """Verifies and decodes a file: returns (header, params, batch_stats)."""
  if len(blob) < _PREFIX.size + 32:
    raise CorruptFileError(f"file is truncated ({len(blob)} bytes)")
  magic, version, codec, hlen = _PREFIX.unpack_from(blob)
  if magic != MAGIC:
    raise CorruptFileError("not an lqjax packed model (bad magic bytes)")
  if version != VERSION:
    raise CorruptFileError(f"unsupported format version {version} (this lqjax reads {VERSION})")
  if hashlib.sha256(blob[:-32]).digest() != blob[-32:]:
    raise CorruptFileError("checksum mismatch: the file is truncated or corrupted")
  if codec not in (CODEC_FIXED, CODEC_ZSTD):
    raise CorruptFileError(f"unknown codec {codec}")
  try:
    header = json.loads(blob[_PREFIX.size:_PREFIX.size + hlen])
  except ValueError as e:
    raise CorruptFileError(f"unreadable header: {e}") from None
  payload = blob[_PREFIX.size + hlen:-32]
  if codec == CODEC_ZSTD:
    import zstandard
    payload = zstandard.ZstdDecompressor().decompress(payload, max_output_size=header["payload_bytes"])
  if len(payload) != header["payload_bytes"]:
    raise CorruptFileError("payload size does not match the header")
  flat = {"params": {}, "batch_stats": {}}
  for t in header["tensors"]:
    raw = payload[t["offset"]:t["offset"] + t["nbytes"]]
    shape = tuple(t["shape"])
    if t["kind"] == "float":
      flat[t["path"][0]][tuple(t["path"][1:])] = np.frombuffer(raw, np.float32).reshape(shape)
      continue
    sshape = tuple(t["scale_shape"])
    g = int(np.prod(sshape))
    n = int(np.prod(shape)) // g
    ls = np.frombuffer(raw[:4 * g], np.float32).reshape(sshape)
    lo = np.frombuffer(raw[4 * g:8 * g], np.int32).astype(np.int64)
    widths = np.frombuffer(raw[8 * g:9 * g], np.uint8).astype(np.int64)
    body = raw[9 * g:]
    if t["symbol_bytes"] is None:
      rel = unpack_bits(body, np.repeat(widths, n)).astype(np.int64)
    else:
      dt = {1: np.uint8, 2: np.uint16, 4: np.uint32}[t["symbol_bytes"]]
      rel = np.frombuffer(body, dt).astype(np.int64)
    codes = _ungroup(rel.reshape(g, n) + lo[:, None], shape, sshape)
    path = tuple(t["path"])
    s = np.asarray(jnp.exp(jnp.asarray(ls)))  # same op as quant.scale_from_log
    flat["params"][path] = (s * codes.astype(np.float32)).astype(np.float32)
    flat["params"][path[:-1] + (path[-1] + layers.QUANT_SUFFIX, "log_scale")] = ls
  params = traverse_util.unflatten_dict(flat["params"])
  stats = traverse_util.unflatten_dict(flat["batch_stats"]) if flat["batch_stats"] else {}
  return header, params, stats


def read_codes(blob: bytes):
  """{path: int codes} of every quantized tensor in a file (for tests and ONNX)."""
  header, params, _ = parse(blob)
  out = {}
  for path, p, ls in layers.iter_quantized(params):
    out[path] = accounting.tensor_codes(p, ls, header["rounding"], header["bits"])[0]
  return out


def load(path):
  """Rebuilds a model from a file alone.

  Returns:
    (model, variables, header); ``header["config"]`` is the training config and
    ``header["mean"]``/``["std"]`` the input normalisation.
  """
  from lqjax import train  # the loader needs the model definitions, not the trainer state
  blob = pathlib.Path(path).read_bytes()
  header, params, stats = parse(blob)
  cfg = train.TrainConfig.from_json(header["config"])
  model = train.build_model(cfg, header["num_classes"])
  variables = {"params": params}
  if stats:
    variables["batch_stats"] = stats
  return model, variables, header


def export(path, cfg, num_classes, ds_stats, params, batch_stats, *, codec=CODEC_FIXED) -> int:
  """Writes `cfg`'s trained model to `path`; returns the bytes written."""
  meta = {"format": "lqjax-packed-model", "config": cfg.to_json(), "num_classes": num_classes,
          "mean": list(ds_stats[0]), "std": list(ds_stats[1])}
  blob = to_bytes(meta, params, batch_stats, rounding=cfg.rounding, bits=cfg.bits, codec=codec)
  return write_atomic(path, blob)


def predict(model, variables, header, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
  """Logits of a reloaded model on uint8 NHWC images."""
  from lqjax import data

  # The variables are an argument, not a closed-over constant: XLA would
  # otherwise constant-fold the weights into a differently-rounded program.
  @jax.jit
  def fn(v, x):
    return model.apply(v, data.normalize(x, header["mean"], header["std"]), train=False)

  return np.concatenate([np.asarray(fn(variables, images[i:i + batch_size]))
                         for i in range(0, images.shape[0], batch_size)])


def export_after_training(cfg, model, state, ds, results) -> dict:
  """Hook for train_and_evaluate: writes model.lqz and model.lqz.zst, checks the reload.

  Returns the results entries: packed_bytes, entropy_coded_bytes, compression_ratio,
  entropy_coded_ratio, reload_test_accuracy, reload_identical.
  """
  from lqjax import train
  out = pathlib.Path(results["workdir"])
  stats = (ds.mean, ds.std)
  params, bs = jax.device_get(state.params), jax.device_get(state.batch_stats)
  packed = export(out / "model.lqz", cfg, ds.num_classes, stats, params, bs)
  coded = export(out / "model.lqz.zst", cfg, ds.num_classes, stats, params, bs, codec=CODEC_ZSTD)
  test_x, test_y = np.asarray(ds.test.image), np.asarray(ds.test.label)
  ref = train.predict_logits(cfg, model, stats, params, bs, test_x)
  m2, v2, h2 = load(out / "model.lqz")
  got = predict(m2, v2, h2, test_x)
  fp32 = results["fp32_bytes"]
  extra = {}
  try:
    from lqjax import onnx_export
    onnx_bytes = onnx_export.export_onnx(out / "model.onnx", cfg, ds.num_classes, stats, params, bs)
    onnx_logits = onnx_export.run_onnx(out / "model.onnx", test_x)
    extra = {"onnx_bytes": onnx_bytes,
             "onnx_test_accuracy": float(np.mean(onnx_logits.argmax(-1) == test_y)),
             "onnx_identical_argmax": bool(np.array_equal(onnx_logits.argmax(-1), ref.argmax(-1))),
             "onnx_max_abs_logit_diff": float(np.max(np.abs(onnx_logits - ref)))}
  except ImportError:  # onnx/onnxruntime are the optional extra lqjax[export]
    pass
  return {**extra,
      "packed_bytes": packed, "entropy_coded_bytes": coded,
      "compression_ratio": fp32 / packed, "entropy_coded_ratio": fp32 / coded,
      "reload_test_accuracy": float(np.mean(got.argmax(-1) == test_y)),
      "reload_identical_argmax": bool(np.array_equal(got.argmax(-1), ref.argmax(-1))),
      "reload_max_abs_logit_diff": float(np.max(np.abs(got - ref))),
      "packed_file": str(out / "model.lqz"),
  }

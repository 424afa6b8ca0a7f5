"""The packed model file (``.lqz``): real bytes on disk that reload to the same tree.

:func:`save` writes any tree with quantized tensors (Linen variables, an
``nnx.State`` or an ``nnx.Module``); :func:`load` gives back the same tree (or
updates an NNX module in place). The forward pass after reload is identical,
and the file's size is the accounting (:func:`lqjax.accounting.model_report`)
plus the header and the checksum.

Layout (all integers little-endian)::

    b"LQZ\\0"  magic
    u16       format version (:data:`VERSION`)
    u16       codec: 0 = fixed-width bit-packed, 1 = zstd (entropy-coded)
    u32       header length H
    H bytes   header, UTF-8 JSON: ``meta`` (the caller's, e.g. the training
              config and input normalisation), ``tensors``, ``payload_bytes``
    payload   (codec 1: zstd-compressed)
    32 bytes  SHA-256 of everything above

Each entry of ``tensors`` records the tensor's path, kind, shape, dtype, offset
and byte count, and for a quantized tensor its scale shape and its own
:class:`~lqjax.types.QuantConfig` (``config``: rule, rounding, bits,
granularity, ...). Version 1 files (one model-wide ``rounding``/``bits`` in the
header, the recipe of the training config) are read too.

Payload, per tensor in header order:

* quantized (codec 0): per group (the scale's C order) float32 ``log_scale``,
  int32 offset (the group's smallest code) and uint8 bit width b_G; then the
  codes minus their group's offset, b_G bits each, bit-packed LSB-first and
  back to back across the whole tensor (groups in order, elements of a group
  in C order of the reduced axes), padded to a byte at the tensor's end.
* quantized (codec 1): the same group fields, then the codes minus offset as
  uint8 (uint16 when b_G > 8, uint32 when > 16): byte-aligned symbols that zstd
  entropy-codes well.
* float: the array's bytes raw, in its own dtype (batch norm, float layers).

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
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lqjax import accounting, fileio, tree, types

MAGIC = b"LQZ\0"
VERSION = 2
READS = (1, 2)
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


def _encode_tensors(variables, codec):
  """(tensor entries for the header, payload bytes)."""
  entries, chunks, done = [], [], set()
  pos = 0
  i32 = np.iinfo(np.int32)
  for t in tree.quantized_tensors(variables):
    cfg = t.config
    codes, _ = accounting.tensor_codes(t.p, t.log_scale, cfg.rounding, cfg.bits, cfg.grid)
    if codes.size and (codes.min() <= i32.min or codes.max() >= i32.max):
      raise ValueError(f"{t.name}: codes reach the int32 limit (P/s overflows: the weights "
                       f"diverged or the scale collapsed); refusing to write a lossy file")
    gv, lo, widths = _group_fields(codes, t.log_scale.shape)
    ls_np = np.asarray(t.log_scale, np.float32).reshape(-1)
    head = ls_np.tobytes() + lo.astype(np.int32).tobytes() + widths.astype(np.uint8).tobytes()
    rel = gv - lo[:, None]
    if codec == CODEC_FIXED:
      body = pack_bits(rel.reshape(-1), np.repeat(widths, gv.shape[1]))
    else:
      dt = np.uint8 if widths.max(initial=0) <= 8 else (np.uint16 if widths.max() <= 16 else np.uint32)
      body = rel.astype(dt).tobytes()
    blob = head + body
    entries.append({"path": list(t.path), "kind": "quantized", "shape": list(t.p.shape),
                    "scale_shape": list(t.log_scale.shape), "config": cfg.to_json(),
                    "offset": pos, "nbytes": len(blob),
                    "symbol_bytes": None if codec == CODEC_FIXED else int(np.dtype(dt).itemsize)})
    chunks.append(blob)
    pos += len(blob)
    done.update((t.path, t.scale_path))
  for path, (v, _) in tree.flat_leaves(variables).items():
    if path in done:
      continue
    arr = np.asarray(v)
    blob = np.ascontiguousarray(arr).tobytes()
    entries.append({"path": list(path), "kind": "float", "shape": list(arr.shape),
                    "dtype": arr.dtype.name, "offset": pos, "nbytes": len(blob)})
    chunks.append(blob)
    pos += len(blob)
  return entries, b"".join(chunks)


def to_bytes(variables, meta: Optional[Mapping[str, Any]] = None, *,
             codec: int = CODEC_FIXED) -> bytes:
  """Serialises `variables` (see the module docstring for the layout).

  Args:
    variables: a tree with quantized tensors: Linen variables, an ``nnx.State``
      or an ``nnx.Module``. Every array in it is stored.
    meta: JSON-ready data kept in the header (``header["meta"]``).
    codec: :data:`CODEC_FIXED` (bit-packed) or :data:`CODEC_ZSTD`.
  """
  if codec not in (CODEC_FIXED, CODEC_ZSTD):
    raise ValueError(f"unknown codec {codec}")
  entries, payload = _encode_tensors(jax.device_get(tree._as_tree(variables)), codec)
  header = json.dumps({"format": "lqjax-packed-model", "meta": dict(meta or {}),
                       "tensors": entries, "payload_bytes": len(payload)},
                      sort_keys=True).encode()
  if codec == CODEC_ZSTD:
    import zstandard
    payload = zstandard.ZstdCompressor(level=19).compress(payload)
  body = _PREFIX.pack(MAGIC, VERSION, codec, len(header)) + header + payload
  return body + hashlib.sha256(body).digest()


write_atomic = fileio.write_bytes_atomic


def save(path, variables, meta: Optional[Mapping[str, Any]] = None, *,
         codec: int = CODEC_FIXED) -> int:
  """Writes `variables` to `path` atomically; returns the bytes written."""
  return write_atomic(path, to_bytes(variables, meta, codec=codec))


# ------------------------------------------------------------ reading


def _check_header(header):
  if not isinstance(header, dict):
    raise CorruptFileError(f"header is a JSON {type(header).__name__}, not an object")
  tensors = header.get("tensors")
  if not isinstance(tensors, list):
    raise CorruptFileError("header has no list of tensors")
  n = header.get("payload_bytes")
  if not isinstance(n, int) or n < 0:
    raise CorruptFileError("header has no valid payload_bytes")
  for i, t in enumerate(tensors):
    where = f"tensor {i}"
    if not isinstance(t, dict):
      raise CorruptFileError(f"{where}: not an object")
    path = t.get("path")
    if not isinstance(path, list) or not path or not all(isinstance(p, str) for p in path):
      raise CorruptFileError(f"{where}: no valid path")
    where = "/".join(path)
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
      raise CorruptFileError(f"{where}: no valid shape")
    off, nb = t.get("offset"), t.get("nbytes")
    if not (isinstance(off, int) and isinstance(nb, int) and 0 <= off and 0 <= nb
            and off + nb <= n):
      raise CorruptFileError(f"{where}: offset/nbytes outside the payload")
    if t.get("kind") == "float":
      try:
        dt = np.dtype(t.get("dtype", "float32"))
      except TypeError:
        raise CorruptFileError(f"{where}: unknown dtype {t.get('dtype')!r}") from None
      if nb != dt.itemsize * int(np.prod(shape)):
        raise CorruptFileError(f"{where}: nbytes {nb} does not match shape {shape}")
    elif t.get("kind") == "quantized":
      ss = t.get("scale_shape")
      if not (isinstance(ss, list) and len(ss) == len(shape)
              and all(isinstance(d, int) and d >= 1 and (d == 1 or d == s)
                      for d, s in zip(ss, shape))):
        raise CorruptFileError(f"{where}: scale_shape {ss} does not fit shape {shape}")
      if nb < 9 * int(np.prod(ss)):
        raise CorruptFileError(f"{where}: nbytes {nb} too small for its scale groups")
    else:
      raise CorruptFileError(f"{where}: unknown kind {t.get('kind')!r}")


def _v1_config(header, path) -> types.QuantConfig:
  """The recipe of a version-1 tensor: the file's model-wide rounding and bits."""
  cfg = header.get("config") or {}
  gran = cfg.get("bias_granularity" if path[-1] == "bias" else "granularity", "tensor")
  try:
    return types.QuantConfig(rule=cfg.get("rule", "ratio"), threshold=cfg.get("threshold", 0.2),
                             rounding=header.get("rounding", "floor"), bits=header.get("bits"),
                             granularity=tuple(gran) if isinstance(gran, list) else gran)
  except ValueError as e:
    raise CorruptFileError(f"version-1 header: {e}") from None


def _decode(header, payload, version):
  flat = {}
  for t in header["tensors"]:
    raw = payload[t["offset"]:t["offset"] + t["nbytes"]]
    shape = tuple(t["shape"])
    path = tuple(t["path"])
    if t["kind"] == "float":
      flat[path] = np.frombuffer(raw, np.dtype(t.get("dtype", "float32"))).reshape(shape)
      continue
    sshape = tuple(t["scale_shape"])
    g = int(np.prod(sshape))
    n = int(np.prod(shape)) // g
    ls = np.frombuffer(raw[:4 * g], np.float32).reshape(sshape)
    lo = np.frombuffer(raw[4 * g:8 * g], np.int32).astype(np.int64)
    widths = np.frombuffer(raw[8 * g:9 * g], np.uint8).astype(np.int64)
    if np.any(widths > 32):
      raise CorruptFileError(f"{'/'.join(path)}: a group's bit width exceeds 32")
    body = raw[9 * g:]
    if t.get("symbol_bytes") is None:
      rel = unpack_bits(body, np.repeat(widths, n)).astype(np.int64)
    else:
      dt = {1: np.uint8, 2: np.uint16, 4: np.uint32}.get(t["symbol_bytes"])
      if dt is None or len(body) != n * g * np.dtype(dt).itemsize:
        raise CorruptFileError(f"{'/'.join(path)}: symbols do not match the tensor's size")
      rel = np.frombuffer(body, dt).astype(np.int64)
    codes = _ungroup(rel.reshape(g, n) + lo[:, None], shape, sshape)
    if version == 1:
      cfg = _v1_config(header, path)
      path = ("params",) + path
    else:
      try:
        cfg = types.QuantConfig.from_json(t.get("config") or {})
      except (TypeError, ValueError) as e:
        raise CorruptFileError(f"{'/'.join(path)}: invalid config: {e}") from None
    s = np.asarray(jnp.exp(jnp.asarray(ls)))  # same op as quant.scale_from_log
    values = (s * (codes.astype(np.float32) + np.float32(cfg.offset))).astype(np.float32)
    if not np.all(np.isfinite(values)):
      raise CorruptFileError(f"{'/'.join(path)}: decoded values are not finite")
    flat[path] = values
    flat[tree.scale_path(path)] = tree.QuantScale(ls, cfg)
  return flat


def _unflatten(flat):
  out = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
      if not isinstance(node, dict):
        raise CorruptFileError(f"{'/'.join(path)}: path runs through a tensor")
    node[path[-1]] = v
  return out


def parse(blob: bytes):
  """Verifies and decodes a file: returns (header, tree).

  The tree is nested dicts, with each quantized tensor's log scale boxed with
  its config (:class:`lqjax.tree.QuantScale`). A version-1 file's tree is
  ``{"params": ..., "batch_stats": ...}`` as the model was trained.

  Raises:
    CorruptFileError: truncated, damaged, of an unknown version, or a header
      that does not describe its payload (one line that says which).
  """
  if len(blob) < _PREFIX.size + 32:
    raise CorruptFileError(f"file is truncated ({len(blob)} bytes)")
  magic, version, codec, hlen = _PREFIX.unpack_from(blob)
  if magic != MAGIC:
    raise CorruptFileError("not an lqjax packed model (bad magic bytes)")
  if version not in READS:
    raise CorruptFileError(f"unsupported format version {version} (this lqjax reads "
                           f"{', '.join(map(str, READS))})")
  if hashlib.sha256(blob[:-32]).digest() != blob[-32:]:
    raise CorruptFileError("checksum mismatch: the file is truncated or corrupted")
  if codec not in (CODEC_FIXED, CODEC_ZSTD):
    raise CorruptFileError(f"unknown codec {codec}")
  try:
    header = json.loads(blob[_PREFIX.size:_PREFIX.size + hlen])
  except ValueError as e:
    raise CorruptFileError(f"unreadable header: {e}") from None
  _check_header(header)
  payload = blob[_PREFIX.size + hlen:-32]
  if codec == CODEC_ZSTD:
    import zstandard
    try:
      payload = zstandard.ZstdDecompressor().decompress(
          payload, max_output_size=header["payload_bytes"])
    except zstandard.ZstdError as e:
      raise CorruptFileError(f"zstd payload: {e}") from None
  if len(payload) != header["payload_bytes"]:
    raise CorruptFileError("payload size does not match the header")
  return header, _unflatten(_decode(header, payload, version))


def read(path):
  """(header, tree) of the file at `path`; one-line errors for missing or damaged files."""
  try:
    blob = pathlib.Path(path).read_bytes()
  except IsADirectoryError:
    raise CorruptFileError(f"{path} is a directory, not a packed model") from None
  except OSError as e:
    raise CorruptFileError(f"{path}: {e.strerror}") from None
  try:
    return parse(blob)
  except CorruptFileError as e:
    raise CorruptFileError(f"{path}: {e}") from None


def _match_target(loaded_flat, target_flat, path):
  for k in sorted(set(loaded_flat) | set(target_flat)):
    name = "/".join(k)
    if k not in target_flat:
      raise CorruptFileError(f"{path}: tensor {name} is in the file but not in the model")
    if k not in loaded_flat:
      raise CorruptFileError(f"{path}: tensor {name} of the model is not in the file")
    a, b = np.shape(loaded_flat[k][0]), np.shape(target_flat[k][0])
    if a != b:
      raise CorruptFileError(f"{path}: tensor {name} has shape {list(a)} in the file, "
                             f"{list(b)} in the model")


def load(path, target=None):
  """Loads a packed file.

  Args:
    path: the ``.lqz`` file.
    target: None: return the tree as saved. An ``nnx.Module``: load into it (in
      place) and return it. Any other tree (e.g. Linen variables from
      ``model.init``): check that every tensor is there with the same shape, and
      return the loaded tree.

  Raises:
    CorruptFileError: a missing or damaged file, or a tensor that the target
      lacks or holds in another shape (one line naming the tensor).
  """
  _, loaded = read(path)
  if target is None:
    return loaded
  lflat = tree.flat_leaves(loaded)
  try:
    from flax import nnx
  except ImportError:  # pragma: no cover
    nnx = None
  if nnx is not None and isinstance(target, nnx.Module):
    state = nnx.state(target)
    _match_target(lflat, tree.flat_leaves(state), path)
    nnx.update(target, tree.replace_arrays(state, {
        key: jnp.asarray(lflat[key][0], dtype=np.asarray(tree.leaf_array(var)).dtype)
        for key, var in tree.leaves(state)[0]}))
    return target
  _match_target(lflat, tree.flat_leaves(target), path)
  return loaded


def read_codes(blob: bytes):
  """{path: int codes} of every quantized tensor in a file (for tests and ONNX)."""
  _, loaded = parse(blob)
  return {t.path: accounting.tensor_codes(t.p, t.log_scale, t.config.rounding,
                                          t.config.bits, t.config.grid)[0]
          for t in tree.quantized_tensors(loaded)}

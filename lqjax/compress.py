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
    u32       header length H (as stored)
    H bytes   header, UTF-8 JSON: ``meta`` (the caller's, e.g. the training
              config and input normalisation), ``tensors``, ``payload_bytes``
              (codec 1: one zstd frame, since version 3)
    payload   the tensors' chunks in header order (codec 1: each one zstd frame of
              ``zstd_bytes``, or raw where zstd would not shrink it (``zstd_bytes``
              null); version 2 coded the whole payload as one frame)
    32 bytes  SHA-256 of everything above

``offset``, ``nbytes`` and ``payload_bytes`` count the decoded payload. One frame a
tensor lets zstd fit its entropy coder to each tensor's codes: on LeNet-5 one frame
over all tensors came out larger than the tensors' frames together.

Each entry of ``tensors`` records the tensor's path, kind, shape, dtype, offset
and byte count, and for a quantized tensor its scale shape and its own
:class:`~lqjax.qconfig.QuantConfig` (``config``: rule, rounding, bits,
granularity, ...). Version 1 files (one model-wide ``rounding``/``bits`` in the
header, the recipe of the training config) and version 2 files (codec 1 with its
header in plain JSON) are read too.

Payload, per tensor in header order:

* quantized (codec 0): per group (the scale's C order) float32 ``log_scale``,
  int32 offset (the group's smallest code) and uint8 bit width b_G; then the
  codes minus their group's offset, b_G bits each, bit-packed LSB-first and
  back to back across the whole tensor (groups in order, elements of a group
  in C order of the reduced axes), padded to a byte at the tensor's end.
* quantized (codec 1): the same group fields, then the codes minus offset in
  whichever of two forms zstd codes smaller for this tensor: as byte-aligned
  symbols, uint8 (uint16 when b_G > 8, uint32 when > 16; ``symbol_bytes`` 1, 2
  or 4), or bit-packed as under codec 0 (``symbol_bytes`` null). Symbols win
  where the codes are skewed (zstd's entropy coder finds the common ones); the
  bit-packed form wins where they are near uniform at a few bits each, which
  byte symbols would store with mostly empty bits.
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
import math
import pathlib
import struct
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lqjax import accounting, fileio, qconfig, quant, tree

MAGIC = b"LQZ\0"
VERSION = 3
READS = (1, 2, 3)
CODEC_FIXED, CODEC_ZSTD = 0, 1
_PREFIX = struct.Struct("<4sHHI")
CHECKSUM_BYTES = 32  # SHA-256 of everything before it
#: The largest header (decoded) a file may declare: 256 MiB.
MAX_HEADER_BYTES = 1 << 28
ZSTD_LEVEL = 19
#: dtypes of the arrays stored raw (``kind: float``): numbers and booleans, nothing else.
ARRAY_DTYPES = frozenset(("bool", "int8", "int16", "int32", "int64", "uint8", "uint16",
                          "uint32", "uint64", "float16", "bfloat16", "float32", "float64"))
#: The most elements one tensor of a file may declare (2^34, 64 GiB as float32): a
#: quantized tensor whose groups are all 0 bits wide takes a few bytes for any size, so the
#: payload alone does not bound what decoding it allocates.
MAX_ELEMENTS = 2 ** 34
#: The entropy-coded payload's code symbols by their byte width (``symbol_bytes``).
SYMBOL_DTYPES = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4")}


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
  return gv, lo, accounting.code_bits(lo, gv.max(1))


def _ungroup(gv, shape, sshape):
  vshape, vs = qconfig.grouped_shapes(shape, sshape)
  perm = qconfig.group_permutation(vshape, vs)
  arr = gv.reshape([vshape[i] for i in perm])
  return np.transpose(arr, np.argsort(perm)).reshape(shape)


# ------------------------------------------------------------ writing


def _encode_tensors(variables, codec, pack: bool = True):
  """(tensor entries for the header, each tensor's payload bytes, each one's zstd frame).

  The frames are those of the zstd codec (None under the fixed-width one).
  ``pack=False`` (the fixed-width codec only) computes the entries, byte counts included,
  without writing the payload: b"" in its place.
  """
  entries, chunks, frames, done = [], [], [], set()
  pos = 0
  i32 = np.iinfo(np.int32)
  for t in tree.quantized_tensors(variables):
    cfg = t.config
    _refuse_non_finite(t.name, t.p, "weights")
    _refuse_non_finite("/".join(t.scale_path), t.log_scale, "log scales", allow_inf=True)
    # the forward pass reads log s clipped to +-LOG_SCALE_MAX: the file stores that value
    log_scale = np.clip(np.asarray(t.log_scale, np.float32), -quant.LOG_SCALE_MAX,
                        quant.LOG_SCALE_MAX)
    codes, _ = quant.tensor_codes(t.p, log_scale, cfg)
    if codes.size and (codes.min() <= i32.min or codes.max() >= i32.max):
      raise ValueError(f"{t.name}: codes reach the int32 limit (P/s overflows: the weights "
                       f"diverged or the scale collapsed); refusing to write a lossy file")
    gv, lo, widths = _group_fields(codes, log_scale.shape)
    ls_np = log_scale.reshape(-1)
    head = b"".join(np.asarray(col, dt).tobytes()
                    for col, (_, dt) in zip((ls_np, lo, widths), accounting.GROUP_FIELDS))
    rel = gv - lo[:, None]
    symbol_bytes, frame = None, None
    if codec == CODEC_FIXED:
      body = pack_bits(rel.reshape(-1), np.repeat(widths, gv.shape[1])) if pack else b""
      nbytes = len(head) + (int(widths.sum()) * gv.shape[1] + 7) // 8
    else:
      body, symbol_bytes, frame = _smaller_coded(head, rel, widths)
      nbytes = len(head) + len(body)
    entries.append({"path": list(t.path), "kind": "quantized", "shape": list(t.p.shape),
                    "scale_shape": list(t.log_scale.shape), "config": cfg.to_json(),
                    "offset": pos, "nbytes": nbytes, "symbol_bytes": symbol_bytes})
    if pack:
      chunks.append(head + body)
      frames.append(frame)
    pos += nbytes
    done.update((t.path, t.scale_path))
  for path, (v, _) in tree.flat_leaves(variables).items():
    if path in done:
      continue
    arr = np.asarray(v)
    if arr.dtype.name not in ARRAY_DTYPES:
      raise ValueError(f"{'/'.join(path)}: dtype {arr.dtype.name} cannot be stored (the file "
                       f"holds {', '.join(sorted(ARRAY_DTYPES))})")
    _refuse_non_finite("/".join(path), arr, "values")
    entries.append({"path": list(path), "kind": "float", "shape": list(arr.shape),
                    "dtype": arr.dtype.name, "offset": pos, "nbytes": arr.nbytes})
    if pack:
      chunks.append(np.ascontiguousarray(arr).tobytes())
      frames.append(None if codec == CODEC_FIXED else _zstd(chunks[-1]))
    pos += arr.nbytes
  return entries, chunks, frames


#: The forms of a quantized tensor's codes the zstd codec tries (the first wins a tie).
CODE_FORMS = ("symbols", "packed")


def _smaller_coded(head, rel, widths):
  """(codes body, symbol_bytes, zstd frame of head + body) of a quantized tensor under the
  zstd codec: its codes in whichever of :data:`CODE_FORMS`, byte symbols or bit-packed
  (symbol_bytes None), gives the smaller frame."""
  best = None
  for form in CODE_FORMS:
    if form == "symbols":
      body, symbol_bytes = _symbol_form(rel, widths)
    else:
      body, symbol_bytes = pack_bits(rel.reshape(-1), np.repeat(widths, rel.shape[1])), None
    frame = _zstd(head + body)
    if best is None or len(frame) < len(best[2]):
      best = (body, symbol_bytes, frame)
  return best


def _symbol_form(rel, widths):
  """(codes as byte symbols of the narrowest width that holds every group's, its bytes)."""
  wmax = int(widths.max(initial=0))
  dt = next(d for d in SYMBOL_DTYPES.values() if 8 * d.itemsize >= wmax)
  return rel.astype(dt).tobytes(), dt.itemsize


def _zstd(data: bytes) -> bytes:
  import zstandard
  return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)


def _unzstd(data: bytes, limit: int, what: str) -> bytes:
  """Decompresses one zstd frame of at most `limit` bytes; the frame's declared size is
  checked before anything is allocated."""
  import zstandard
  try:
    size = zstandard.frame_content_size(data)
    if size > limit:
      raise CorruptFileError(f"zstd {what} declares {size} bytes, more than the {limit} "
                             f"expected")
    return zstandard.ZstdDecompressor().decompress(data, max_output_size=limit)
  except zstandard.ZstdError as e:
    raise CorruptFileError(f"zstd {what}: {e}") from None


def _unframe(header, stored: bytes) -> bytes:
  """The decoded payload of a version-3 zstd file: its tensors' chunks stored back to back
  in header order, each a zstd frame of ``nbytes`` (``zstd_bytes`` long) or raw."""
  out, pos = bytearray(header["payload_bytes"]), 0
  for t in header["tensors"]:
    name, nb, zb = "/".join(t["path"]), t["nbytes"], t.get("zstd_bytes")
    if zb is not None and not (_int(zb) and zb >= 1):
      raise CorruptFileError(f"{name}: zstd_bytes {zb!r} is not a whole number >= 1")
    n = nb if zb is None else zb
    if pos + n > len(stored):
      raise CorruptFileError(f"{name}: its stored bytes run past the payload")
    chunk = stored[pos:pos + n]
    if zb is not None:
      chunk = _unzstd(chunk, nb, f"frame of {name}")
      if len(chunk) != nb:
        raise CorruptFileError(f"{name}: its frame decodes to {len(chunk)} bytes, not {nb}")
    out[t["offset"]:t["offset"] + nb] = chunk
    pos += n
  if pos != len(stored):
    raise CorruptFileError(f"the payload holds {len(stored) - pos} bytes more than its "
                           f"tensors' chunks")
  return bytes(out)


def _header(entries, meta, payload_bytes) -> bytes:
  return json.dumps({"format": "lqjax-packed-model", "meta": dict(meta or {}),
                     "tensors": entries, "payload_bytes": payload_bytes},
                    sort_keys=True).encode()


def _sizes(variables, meta):
  entries, _, _ = _encode_tensors(jax.device_get(tree.as_tree(variables)), CODEC_FIXED,
                                  pack=False)
  payload = sum(e["nbytes"] for e in entries)
  return payload, _PREFIX.size + len(_header(entries, meta, payload)) + CHECKSUM_BYTES


def overhead_bytes(variables, meta: Optional[Mapping[str, Any]] = None) -> int:
  """What the bit-packed file of `variables` adds to its payload: the prefix, the header
  and the checksum. Computed without packing the codes (for size budgets in bytes)."""
  return _sizes(variables, meta)[1]


def file_bytes(variables, meta: Optional[Mapping[str, Any]] = None) -> int:
  """The size of the file ``save(path, variables, meta)`` writes, without writing it."""
  return sum(_sizes(variables, meta))


def _refuse_non_finite(name, x, what, allow_inf=False):
  """Refuses a tensor that the file could not reproduce: NaN (and +-inf, unless `allow_inf`)."""
  x = np.asarray(x)
  if not np.issubdtype(x.dtype, np.inexact) and x.dtype.name != "bfloat16":
    return
  x = x.astype(np.float32)
  bad = np.isnan(x) if allow_inf else ~np.isfinite(x)
  if np.any(bad):
    i = np.unravel_index(int(np.argmax(bad)), x.shape) if x.ndim else ()
    raise ValueError(f"{name}: {int(bad.sum())} of {x.size} {what} are not finite (first at "
                     f"index {list(map(int, i))}: {x[i]}); refusing to write a file that "
                     f"would reload as another model")


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
  entries, chunks, frames = _encode_tensors(jax.device_get(tree.as_tree(variables)), codec)
  decoded = sum(map(len, chunks))
  if codec == CODEC_ZSTD:  # each tensor its own frame, or raw where zstd does not shrink it
    for i, e in enumerate(entries):
      coded = len(frames[i]) < len(chunks[i])
      e["zstd_bytes"] = len(frames[i]) if coded else None
      chunks[i] = frames[i] if coded else chunks[i]
  header, payload = _header(entries, meta, decoded), b"".join(chunks)
  if codec == CODEC_ZSTD:
    header = _zstd(header)
  body = _PREFIX.pack(MAGIC, VERSION, codec, len(header)) + header + payload
  return body + hashlib.sha256(body).digest()


def save(path, variables, meta: Optional[Mapping[str, Any]] = None, *,
         codec: int = CODEC_FIXED) -> int:
  """Writes `variables` to `path` atomically; returns the bytes written."""
  return fileio.write_bytes_atomic(path, to_bytes(variables, meta, codec=codec))


# ------------------------------------------------------------ reading


def _int(x) -> bool:
  """A JSON integer (not a boolean)."""
  return type(x) is int


def _dtype(name, where):
  if not isinstance(name, str) or name not in ARRAY_DTYPES:
    raise CorruptFileError(f"{where}: unknown dtype {name!r} (expected one of "
                           f"{', '.join(sorted(ARRAY_DTYPES))})")
  return jnp.dtype(name)  # jnp's: it knows bfloat16


def _check_header(header):
  """Every field's type and range, the byte counts against the payload, and the paths.

  Runs before anything of the payload is decoded or allocated.
  """
  if not isinstance(header, dict):
    raise CorruptFileError(f"header is a JSON {type(header).__name__}, not an object")
  tensors = header.get("tensors")
  if not isinstance(tensors, list):
    raise CorruptFileError("header has no list of tensors")
  n = header.get("payload_bytes")
  if not _int(n) or n < 0:
    raise CorruptFileError("header has no valid payload_bytes")
  if "meta" in header and not isinstance(header["meta"], dict):
    raise CorruptFileError("header meta is not an object")
  paths = []
  for i, t in enumerate(tensors):
    where = f"tensor {i}"
    if not isinstance(t, dict):
      raise CorruptFileError(f"{where}: not an object")
    path = t.get("path")
    if not isinstance(path, list) or not path or not all(isinstance(p, str) and p
                                                         for p in path):
      raise CorruptFileError(f"{where}: no valid path")
    where = "/".join(path)
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(_int(d) and d >= 0 for d in shape):
      raise CorruptFileError(f"{where}: shape {shape!r} is not a list of whole numbers >= 0")
    size = math.prod(shape)
    if size > MAX_ELEMENTS:
      raise CorruptFileError(f"{where}: shape {shape} declares {size} elements, more than the "
                             f"{MAX_ELEMENTS} a tensor may have")
    off, nb = t.get("offset"), t.get("nbytes")
    if not (_int(off) and _int(nb) and 0 <= off and 0 <= nb and off + nb <= n):
      raise CorruptFileError(f"{where}: offset/nbytes outside the payload")
    kind = t.get("kind")
    if kind == "float":
      dt = _dtype(t.get("dtype", "float32"), where)
      if nb != dt.itemsize * size:
        raise CorruptFileError(f"{where}: nbytes {nb} does not match shape {shape} of "
                               f"{dt.name} ({dt.itemsize * size} bytes)")
      paths.append(tuple(path))
    elif kind == "quantized":
      ss = t.get("scale_shape")
      if not (isinstance(ss, list) and len(ss) == len(shape)
              and all(_int(d) and d >= 1 and s % d == 0 for d, s in zip(ss, shape))):
        raise CorruptFileError(f"{where}: scale_shape {ss} does not fit shape {shape}")
      if nb < accounting.GROUP_OVERHEAD_BYTES * math.prod(ss):
        raise CorruptFileError(f"{where}: nbytes {nb} too small for its scale groups")
      sb = t.get("symbol_bytes")
      if sb is not None and sb not in SYMBOL_DTYPES:
        raise CorruptFileError(f"{where}: symbol_bytes {sb!r} is not one of "
                               f"{', '.join(map(str, SYMBOL_DTYPES))}")
      cfg = t.get("config")
      if cfg is not None and not isinstance(cfg, dict):
        raise CorruptFileError(f"{where}: config is not an object")
      paths += [tuple(path), tree.scale_path(tuple(path))]
    else:
      raise CorruptFileError(f"{where}: unknown kind {kind!r}")
  _check_paths(paths)


def _check_paths(paths):
  """The paths rebuild one tree: none twice, none a prefix of another."""
  seen = set()
  for p in paths:
    if p in seen:
      raise CorruptFileError(f"{'/'.join(p)}: the path is listed twice")
    seen.add(p)
  for p in paths:
    for k in range(1, len(p)):
      if p[:k] in seen:
        raise CorruptFileError(f"{'/'.join(p[:k])}: a tensor's path is also a folder of "
                               f"{'/'.join(p)}; the tensors do not make one tree")


def _v1_config(header, path) -> qconfig.QuantConfig:
  """The recipe of a version-1 tensor: the file's model-wide rounding and bits."""
  cfg = header.get("config") or {}
  gran = cfg.get("bias_granularity" if path[-1] == "bias" else "granularity", "tensor")
  try:
    return qconfig.QuantConfig(rule=cfg.get("rule", "ratio"), threshold=cfg.get("threshold", 0.2),
                             rounding=header.get("rounding", "floor"), bits=header.get("bits"),
                             granularity=tuple(gran) if isinstance(gran, list) else gran)
  except ValueError as e:
    raise CorruptFileError(f"version-1 header: {e}") from None


def _group_columns(raw, g):
  """The per-group columns (log scale, offset, bits) of a quantized tensor, and the rest."""
  cols, pos = [], 0
  for _, dt in accounting.GROUP_FIELDS:
    cols.append(np.frombuffer(raw[pos:pos + dt.itemsize * g], dt))
    pos += dt.itemsize * g
  return cols, raw[pos:]


def _decode(header, payload, version):
  flat = {}
  for t in header["tensors"]:
    raw = payload[t["offset"]:t["offset"] + t["nbytes"]]
    shape = tuple(t["shape"])
    path = tuple(t["path"])
    name = "/".join(path)
    if t["kind"] == "float":
      arr = np.frombuffer(raw, _dtype(t.get("dtype", "float32"), name)).reshape(shape)
      if np.issubdtype(arr.dtype, np.inexact) or arr.dtype.name == "bfloat16":
        if not np.all(np.isfinite(arr.astype(np.float32))):
          raise CorruptFileError(f"{name}: values are not finite")
      flat[path] = arr
      continue
    sshape = tuple(t["scale_shape"])
    g = math.prod(sshape)
    n = math.prod(shape) // g
    (ls, lo, widths), body = _group_columns(raw, g)
    ls, lo, widths = ls.reshape(sshape), lo.astype(np.int64), widths.astype(np.int64)
    if not np.all(np.isfinite(ls)) or np.any(np.abs(ls) > quant.LOG_SCALE_MAX):
      raise CorruptFileError(f"{name}: a log scale is not finite or outside "
                             f"+-{quant.LOG_SCALE_MAX:g}")
    if np.any(widths > 32):
      raise CorruptFileError(f"{name}: a group's bit width exceeds 32")
    sb = t.get("symbol_bytes")
    want = (int(widths.sum()) * n + 7) // 8 if sb is None else n * g * sb
    if len(body) != want:  # checked before the codes are allocated
      raise CorruptFileError(f"{name}: the codes take {len(body)} bytes, the groups' widths "
                             f"say {want}")
    if sb is None:
      rel = unpack_bits(body, np.repeat(widths, n)).astype(np.int64)
    else:
      rel = np.frombuffer(body, SYMBOL_DTYPES[sb]).astype(np.int64)
    codes = _ungroup(rel.reshape(g, n) + lo[:, None], shape, sshape)
    if version == 1:
      cfg = _v1_config(header, path)
      path = ("params",) + path
    else:
      try:
        cfg = qconfig.QuantConfig.from_json(t.get("config") or {})
      except (TypeError, ValueError) as e:
        raise CorruptFileError(f"{name}: invalid config: {e}") from None
    # |log s| <= LOG_SCALE_MAX: checked above
    values = np.asarray(quant.dequantize_as(jnp.asarray(codes, jnp.int32), ls, cfg.grid))
    if not np.all(np.isfinite(values)):
      raise CorruptFileError(f"{name}: decoded values are not finite")
    flat[path] = values
    flat[tree.scale_path(path)] = tree.QuantScale(ls, config=cfg)
  return flat


def _unflatten(flat):
  _check_paths(list(flat))
  out = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
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
  if len(blob) < _PREFIX.size + CHECKSUM_BYTES:
    raise CorruptFileError(f"file is truncated ({len(blob)} bytes)")
  magic, version, codec, hlen = _PREFIX.unpack_from(blob)
  if magic != MAGIC:
    raise CorruptFileError("not an lqjax packed model (bad magic bytes)")
  if version not in READS:
    raise CorruptFileError(f"unsupported format version {version} (this lqjax reads "
                           f"{', '.join(map(str, READS))})")
  if hashlib.sha256(blob[:-CHECKSUM_BYTES]).digest() != blob[-CHECKSUM_BYTES:]:
    raise CorruptFileError("checksum mismatch: the file is truncated or corrupted")
  if codec not in (CODEC_FIXED, CODEC_ZSTD):
    raise CorruptFileError(f"unknown codec {codec}")
  if hlen > len(blob) - _PREFIX.size - CHECKSUM_BYTES:
    raise CorruptFileError(f"header length {hlen} runs past the end of the file")
  raw = blob[_PREFIX.size:_PREFIX.size + hlen]
  if codec == CODEC_ZSTD and version >= 3:
    raw = _unzstd(raw, MAX_HEADER_BYTES, "header")
  try:
    header = json.loads(raw)
  except ValueError as e:
    raise CorruptFileError(f"unreadable header: {e}") from None
  _check_header(header)
  payload = blob[_PREFIX.size + hlen:-CHECKSUM_BYTES]
  if codec == CODEC_ZSTD and version >= 3:
    payload = _unframe(header, payload)
  elif codec == CODEC_ZSTD:
    payload = _unzstd(payload, header["payload_bytes"], "payload")
  if len(payload) != header["payload_bytes"]:
    raise CorruptFileError("payload size does not match the header")
  return header, _unflatten(_decode(header, payload, version))


def read(path):
  """(header, tree) of the file at `path`; one-line errors for missing or damaged files."""
  try:
    blob = pathlib.Path(path).read_bytes()
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: No such file") from None
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
    ca, cb = loaded_flat[k][1], target_flat[k][1]
    if ca is not None and cb is not None and ca.to_json() != cb.to_json():
      name = "/".join(k[:-2] + (k[-2][:-len(tree.QUANT_SUFFIX)],))  # the tensor, not its scale
      raise CorruptFileError(f"{path}: {name} was saved with the recipe {_recipe(ca)}, the "
                             f"model quantizes it with {_recipe(cb)}; quantize the model with "
                             f"the file's rules, or load without a target to get the file's")


def _recipe(cfg: qconfig.QuantConfig) -> str:
  d, default = cfg.to_json(), qconfig.QuantConfig(bits=None).to_json()
  return "(" + ", ".join(f"{k}={v!r}" for k, v in d.items() if k == "rule" or v != default.get(k)) \
      + ")"


def _sharding_by_path(shardings) -> dict:
  """``{path: Sharding}`` of a tree of ``jax.sharding.Sharding`` leaves, or of arrays
  whose own shardings span several devices."""
  flat, _ = tree.leaves(shardings)
  out = {}
  for path, leaf in flat:
    if isinstance(leaf, jax.sharding.Sharding):
      out[path] = leaf
      continue
    sh = getattr(tree.leaf_array(leaf), "sharding", None)
    if isinstance(sh, jax.sharding.Sharding) and len(sh.device_set) > 1:  # a sharded array
      out[path] = sh
  return out


def _place(loaded, shardings):
  """`loaded` with each array put on the devices its sharding names (a tree, or one
  Sharding for every array); arrays the tree has no sharding for stay as they are."""
  if shardings is None:
    return loaded
  if isinstance(shardings, jax.sharding.Sharding):
    by_path = {path: shardings for path, _ in tree.leaves(loaded)[0]}
  else:
    by_path = _sharding_by_path(shardings)
  return tree.replace_arrays(loaded, {
      path: jax.device_put(jnp.asarray(tree.leaf_array(leaf)), by_path[path])
      for path, leaf in tree.leaves(loaded)[0] if path in by_path})


def load(path, target=None, *, shardings=None):
  """Loads a packed file.

  Args:
    path: the ``.lqz`` file.
    target: None: return the tree as saved. An ``nnx.Module``: load into it (in
      place) and return it. Any other tree (e.g. Linen variables from
      ``model.init``): check that every tensor is there with the same shape and
      recipe, and return the loaded tree. Either way a target whose recipe for a
      tensor differs from the file's is refused: the model would compute another
      function of the same weights.
    shardings: where the loaded arrays go: a tree of ``jax.sharding.Sharding`` with
      the saved tree's paths (for example ``NamedSharding``s of
      ``nn.get_partition_spec(variables)``), or one Sharding for all. Default: the
      target's own arrays' shardings (a sharded model loads sharded); without a
      target, the default device.

  Raises:
    FileNotFoundError: no file at `path`.
    CorruptFileError: a damaged file, or a tensor that the target lacks, holds in
      another shape or quantizes with another recipe (one line naming the tensor).
  """
  _, loaded = read(path)
  if target is None:
    return _place(loaded, shardings)
  loaded = _place(loaded, shardings if shardings is not None else tree.as_tree(target))
  lflat = tree.flat_leaves(loaded)
  try:
    from flax import nnx
  except ImportError:  # pragma: no cover
    nnx = None
  if nnx is not None and isinstance(target, nnx.Module):
    state = nnx.state(target)
    _match_target(lflat, tree.flat_leaves(state), path)
    nnx.update(target, tree.replace_arrays(state, {
        key: jnp.asarray(lflat[key][0], dtype=tree.leaf_array(var).dtype)
        for key, var in tree.leaves(state)[0]}))
    return target
  _match_target(lflat, tree.flat_leaves(target), path)
  return loaded


def read_codes(blob: bytes):
  """{path: int codes} of every quantized tensor in a file (for tests and ONNX)."""
  _, loaded = parse(blob)
  return {t.path: quant.tensor_codes(t.p, t.log_scale, t.config)[0]
          for t in tree.quantized_tensors(loaded)}

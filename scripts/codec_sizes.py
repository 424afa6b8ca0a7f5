"""The bytes of one model under each form of the packed file, side by side.

  python scripts/codec_sizes.py FILE.lqz [FILE.lqz ...] [--json out.json]

Reads each packed file (either codec) and writes its tree again, in memory, as:

* ``fixed``: codec 0, the codes bit-packed at their groups' widths;
* ``zstd_v2``: codec 1 as format version 2 wrote it: every tensor's codes as byte
  symbols and the JSON header in plain text;
* ``zstd``: codec 1 as this lqjax writes it: the header zstd-coded, and each tensor
  its own zstd frame of byte symbols or bit-packed codes, whichever is smaller.

and prints each size, the header's share of each, and which form each quantized tensor
took. The file's tree and meta are what is written, so the sizes are those of the model
the file holds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys

import jax

from lqjax import compress
from lqjax import tree as lqtree


def version2_zstd(tree, meta) -> bytes:
  """The bytes format version 2's zstd codec wrote for `tree`: byte symbols, the header in
  plain JSON, and one zstd frame over the whole payload."""
  saved = compress.CODE_FORMS
  compress.CODE_FORMS = ("symbols",)
  try:
    entries, chunks, _ = compress._encode_tensors(tree, compress.CODEC_ZSTD)
  finally:
    compress.CODE_FORMS = saved
  payload = b"".join(chunks)
  header = compress._header(entries, meta, len(payload))
  body = (compress._PREFIX.pack(compress.MAGIC, 2, compress.CODEC_ZSTD, len(header)) + header
          + compress._zstd(payload))
  return body + hashlib.sha256(body).digest()


def sizes(path) -> dict:
  header, tree = compress.read(path)
  tree = jax.device_get(lqtree.as_tree(tree))
  meta = header.get("meta", {})
  forms = {}
  blobs = {"fixed": compress.to_bytes(tree, meta),
           "zstd_v2": version2_zstd(tree, meta),
           "zstd": compress.to_bytes(tree, meta, codec=compress.CODEC_ZSTD)}
  out = {"file": str(path)}
  for name, blob in blobs.items():
    hlen = compress._PREFIX.unpack_from(blob)[3]
    out[name] = {"bytes": len(blob), "header_bytes": hlen}
  h3, _ = compress.parse(blobs["zstd"])
  for t in h3["tensors"]:
    if t["kind"] == "quantized":
      forms["/".join(t["path"])] = ("bit-packed" if t["symbol_bytes"] is None
                                    else f"{t['symbol_bytes']}-byte symbols")
  out["forms"] = forms
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("files", nargs="+")
  ap.add_argument("--json", default=None, help="also write the sizes to this JSON file")
  args = ap.parse_args(argv)
  rows = []
  for f in args.files:
    try:
      rows.append(sizes(f))
    except (OSError, compress.CorruptFileError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  for r in rows:
    print(r["file"])
    for name in ("fixed", "zstd_v2", "zstd"):
      b, h = r[name]["bytes"], r[name]["header_bytes"]
      print(f"  {name:8s} {b:>10,d} B  header {h:>8,d} B ({100 * h / b:4.1f}%)")
    for t, form in r["forms"].items():
      print(f"    {t}: {form}")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())

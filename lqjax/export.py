"""Export a trained run to the packed file, or verify a file.

  python -m lqjax.export <workdir> --out model.lqz [--zstd] [--onnx model.onnx]
  python -m lqjax.export --check model.lqz

``--check`` verifies magic, version, checksum and that every tensor decodes;
it exits non-zero with one line on any fault.
"""

import argparse
import pathlib
import sys


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m lqjax.export", description=__doc__.splitlines()[0])
  ap.add_argument("workdir", nargs="?")
  ap.add_argument("--out", help="packed file to write (default <workdir>/model.lqz)")
  ap.add_argument("--zstd", action="store_true", help="entropy-coded variant (zstd)")
  ap.add_argument("--onnx", help="also write an ONNX model (needs lqjax[export])")
  ap.add_argument("--check", metavar="FILE", help="verify a packed file and exit")
  args = ap.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from lqjax import compress
  if args.check:
    try:
      header, params, _ = compress.parse(pathlib.Path(args.check).read_bytes())
    except (compress.CorruptFileError, OSError) as e:
      print(f"error: {args.check}: {e}", file=sys.stderr)
      return 1
    n = len(header["tensors"])
    print(f"ok: {args.check}: {header['config']['model']} ({header['config']['dataset']}), "
          f"{n} tensors, {pathlib.Path(args.check).stat().st_size} bytes")
    return 0
  if not args.workdir:
    ap.error("give a workdir or --check FILE")
  import jax

  from lqjax import train
  try:
    cfg, model, state, stats, num_classes = train.restore(args.workdir)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = pathlib.Path(args.out or pathlib.Path(args.workdir) / "model.lqz")
  codec = compress.CODEC_ZSTD if args.zstd else compress.CODEC_FIXED
  params, bs = jax.device_get(state.params), jax.device_get(state.batch_stats)
  n = compress.export(out, cfg, num_classes, stats, params, bs, codec=codec)
  print(f"wrote {out}: {n} bytes")
  if args.onnx:
    from lqjax import onnx_export
    onnx_export.export_onnx(args.onnx, cfg, num_classes, stats, params, bs)
    print(f"wrote {args.onnx}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

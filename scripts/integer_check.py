"""The integer path of finished runs, from their packed files, on the whole test split.

  python scripts/integer_check.py RUN_DIR [RUN_DIR ...] [--data_dir DIR] [--onnx]

For each run directory (``--workdir`` of a run with ``--act_bits``): reloads
``model.lqz``, runs the fake-quantized model and ``lqjax.integer_inference`` on the test
split, and prints one JSON line: argmax agreement, the largest logit difference, both
test accuracies, the bytes the integer function holds on the device and the file's. A
Shakespeare GPT run (``experiments.shakespeare``) is checked on every window of the
validation split instead: positions whose argmax differs, both validation losses.
Training records the same fields for runs made with this version (lqlab.export).
``--onnx`` adds the same for the integer function exported to ONNX and run by
onnxruntime (``onnx_integer_*``; needs the export extra).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("runs", nargs="+", help="run directories holding model.lqz")
  ap.add_argument("--data_dir", default=None, help="dataset folder (default: $LQJAX_DATA_DIR)")
  ap.add_argument("--onnx", action="store_true",
                  help="also the integer function as ONNX in onnxruntime")
  args = ap.parse_args(argv)
  from lqjax import compress
  from lqlab import data, export
  for run in args.runs:
    path = pathlib.Path(run) / "model.lqz"
    if (pathlib.Path(run) / "config.json").exists() and _is_language_model(path):
      from lqlab import lm
      try:
        res = lm.integer_results(run, args.data_dir, onnx=args.onnx)
      except (OSError, ValueError, compress.CorruptFileError, data.DatasetNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
      print(json.dumps({"run": str(run), **res, "packed_bytes": path.stat().st_size}))
      continue
    try:
      model, variables, meta = export.load(path)
    except (OSError, compress.CorruptFileError) as e:
      print(f"error: {e if str(path) in str(e) else f'{path}: {e}'}", file=sys.stderr)
      return 2
    try:
      ds = data.load(meta["config"]["dataset"], args.data_dir)
    except data.DatasetNotFoundError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    images, labels = np.asarray(ds.test.image), np.asarray(ds.test.label)
    ref = export.predict(model, variables, meta, images)
    res = export.integer_results(model, variables, meta, images, ref, labels)
    if args.onnx:
      res.update(export.onnx_integer_results(model, variables, meta, images, ref, labels))
    print(json.dumps({"run": str(run), "fake_quant_test_accuracy":
                      float(np.mean(ref.argmax(-1) == labels)),
                      **res, "packed_bytes": path.stat().st_size}))
  return 0


def _is_language_model(path) -> bool:
  from lqjax import compress
  try:
    header, _ = compress.read(path)
  except (OSError, compress.CorruptFileError):
    return False  # the image path says what is wrong with the file
  return header.get("meta", {}).get("model") == "gpt"


if __name__ == "__main__":
  sys.exit(main())

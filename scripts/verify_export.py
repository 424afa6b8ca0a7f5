"""Checks a run's exported files against the trained model, on the whole test split.

  python scripts/verify_export.py RUN_DIR [--data_dir DIR]

Recomputes the trained model's test logits from its checkpoint, the packed
file's (model.lqz, rebuilt from the file alone) and the ONNX model's (with
onnxruntime), and prints accuracies, argmax agreement, logit differences,
file sizes and compression ratios. Exits non-zero if the reloaded file's
predictions differ from the trained model's.
"""

import argparse
import json
import pathlib
import sys

import numpy as np
from lqlab.evaluate import model_variables, predict_logits


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("run_dir")
  ap.add_argument("--data_dir", default=None)
  args = ap.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  import jax

  from lqjax import accounting, compress

  from lqlab import data, export, train
  run = pathlib.Path(args.run_dir)
  try:
    cfg, model, state, stats, _ = train.restore(run)
    x, y = data.load_arrays(cfg.dataset, args.data_dir)["test"]
    if not (run / "model.lqz").is_file():
      raise FileNotFoundError(f"{run / 'model.lqz'} not found: export the run first (--export)")
  except (FileNotFoundError, ValueError, data.DatasetNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  params, bs = jax.device_get(state.params), jax.device_get(state.batch_stats)
  ref = predict_logits(cfg, model, stats, params, bs, x)
  out = {"trained_test_accuracy": float(np.mean(ref.argmax(-1) == y))}
  try:
    m2, v2, h2 = export.load(run / "model.lqz")
  except compress.CorruptFileError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  got = export.predict(m2, v2, h2, x)
  out.update(file_test_accuracy=float(np.mean(got.argmax(-1) == y)),
             file_identical_argmax=bool(np.array_equal(got.argmax(-1), ref.argmax(-1))),
             file_max_abs_logit_diff=float(np.abs(got - ref).max()))
  if (run / "model.onnx").exists():
    from lqjax import onnx_export
    on = onnx_export.run_onnx(run / "model.onnx", x)
    out.update(onnx_test_accuracy=float(np.mean(on.argmax(-1) == y)),
               onnx_identical_argmax=bool(np.array_equal(on.argmax(-1), ref.argmax(-1))),
               onnx_max_abs_logit_diff=float(np.abs(on - ref).max()),
               onnx_bytes=(run / "model.onnx").stat().st_size)
  summ = accounting.summarize(accounting.model_report(model_variables(params, bs)))
  packed = (run / "model.lqz").stat().st_size
  coded = (run / "model.lqz.zst").stat().st_size if (run / "model.lqz.zst").exists() else None
  out.update(fp32_bytes=summ["fp32_bytes"], packed_bytes=packed,
             packed_bytes_accounted=summ["packed_bytes_accounted"], avg_bits=summ["avg_bits"],
             compression_ratio=summ["fp32_bytes"] / packed)
  if coded:
    out.update(entropy_coded_bytes=coded, entropy_coded_ratio=summ["fp32_bytes"] / coded)
  print(json.dumps(out, indent=2))
  return 0 if out["file_identical_argmax"] else 1


if __name__ == "__main__":
  sys.exit(main())

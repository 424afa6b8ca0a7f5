"""The learned input quantizers of finished runs, read from their packed files.

  python scripts/input_scales.py RUN_DIR [RUN_DIR ...]

For each run directory (``--workdir`` of a run with ``--act_bits``) prints one JSON line:
per quantized layer input, its step s, offset z, bits b and the range the b-bit grid
covers, [s * qn + z, s * qp + z]. A stacked layer has one of each per block. This is how
the rules for inputs compare (LSQ+ against the ratio rule, ``--act_rule``): at the same
bits a larger step is a wider range with coarser levels.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def input_quantizers(state) -> dict:
  """``{layer path: (log_scale, zero_point)}`` of every input quantizer in a state tree."""
  from lqjax import tree
  found = {}
  for path, (value, _) in tree.flat_leaves(state).items():
    if len(path) >= 2 and path[-2] == tree.INPUT_QUANT:
      found.setdefault("/".join(map(str, path[:-2])), {})[path[-1]] = np.asarray(value,
                                                                                np.float64)
  return {k: (v[tree.SCALE_NAME], v[tree.ZERO_NAME]) for k, v in found.items()}


def bits_of(meta: dict) -> dict:
  """``{"first": (path, bits), "rest": bits}`` of an application run's inputs, from the
  file's run config (the first layer's input at ``act_first_bits``); {} when the file
  does not say (a language model's file, or a user's)."""
  cfg = meta.get("config") if isinstance(meta, dict) else None
  if not isinstance(cfg, dict) or not cfg.get("act_bits"):
    return {}
  from lqlab import models
  spec = models.MODEL_SPECS.get(cfg.get("model"))
  first = spec.edge_layers[0] if spec is not None else None
  return {"first": (first, cfg.get("act_first_bits", 8)), "rest": cfg["act_bits"]}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("runs", nargs="+", help="run directories holding model.lqz")
  args = ap.parse_args(argv)
  from lqjax import compress, quant
  for run in args.runs:
    path = pathlib.Path(run) / "model.lqz"
    try:
      header, state = compress.read(path)
    except (OSError, compress.CorruptFileError) as e:
      print(f"error: {e if str(path) in str(e) else f'{path}: {e}'}", file=sys.stderr)
      return 2
    meta = header.get("meta", header)
    found = input_quantizers(state.get("params", state))
    if not found:
      print(f"error: {path}: no input quantizers (a run without --act_bits)", file=sys.stderr)
      return 2
    widths, layers = bits_of(meta), {}
    for name, (log_s, z) in sorted(found.items()):
      s = np.exp(log_s)
      entry = {"step": s.tolist(), "offset": z.tolist()}
      if widths:
        bits = widths["first"][1] if name == widths["first"][0] else widths["rest"]
        qn, qp = quant.code_range(bits)
        entry.update(bits=bits, range=[(s * qn + z).tolist(), (s * qp + z).tolist()])
      layers[name] = entry
    cfg = meta.get("config", {}) if isinstance(meta, dict) else {}
    print(json.dumps({"run": str(run), "act_rule": cfg.get("act_rule", "lsq"),
                      "inputs": layers}))
  return 0


if __name__ == "__main__":
  sys.exit(main())

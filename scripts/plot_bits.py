"""Plots bits per layer (and val accuracy) against epoch for one or more runs.

  python scripts/plot_bits.py RUN_DIR [RUN_DIR ...] --out bits.png

Reads each run's metrics.jsonl.
"""

import argparse
import json
import pathlib
import sys


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("runs", nargs="+")
  ap.add_argument("--out", required=True)
  args = ap.parse_args(argv)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(len(args.runs), 2, figsize=(11, 3.2 * len(args.runs)), squeeze=False)
  for (ax_bits, ax_acc), run in zip(axes, args.runs):
    path = pathlib.Path(run) / "metrics.jsonl"
    if not path.exists():
      print(f"error: {path} not found", file=sys.stderr)
      return 2
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    epochs = [r["epoch"] for r in rows]
    for layer in rows[0].get("bits_per_layer", {}):
      ax_bits.plot(epochs, [r["bits_per_layer"][layer] for r in rows], label=layer)
    ax_bits.plot(epochs, [r["avg_bits"] for r in rows], "k--", lw=2, label="average")
    ax_bits.set(xlabel="epoch", ylabel="bits", title=f"{pathlib.Path(run).name}: bits per layer")
    ax_bits.legend(fontsize=6)
    ax_acc.plot(epochs, [r["val_accuracy"] for r in rows], "o-")
    ax_acc.set(xlabel="epoch", ylabel="val accuracy", title="validation accuracy")
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

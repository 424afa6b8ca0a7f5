"""HAWQ-v2 per-layer bit widths from a trained float run: the mixed-precision baseline's flag.

  python scripts/hawq_bits.py --workdir runs/<sweep>/fp32_s0 --budget_bits 2 [--out alloc.json]

Loads the float run's final checkpoint and estimates each tensor's Hessian trace
of the cross-entropy (:func:`lqjax.sensitivity.hessian_traces`: Hutchinson,
``--batches`` training batches of the run's batch size x ``--samples`` probes,
evaluation mode). It then gives each layer one width in 1..8 (``--widths``
restricts the choices; :func:`lqjax.sensitivity.allocate`) so that the model's
average bits per quantized weight, scale storage included, meet
``--budget_bits``. The scale groups are those of an LSQ run with the float
run's granularity settings.

A 1-bit layer on the default (midtread) grid is {-s, 0}: with ReLU after it and
inputs that are mostly positive, it can start with no positive pre-activation and
never train (docs/METHOD.md). ``--grid=midrise`` costs and trains the widths on the
symmetric grid s*(q+1/2), binary {-s/2, +s/2} at 1 bit; ``--widths=2,...,8`` keeps
every layer at 2 bits or more.

Prints ``--layer_bits=...`` (and ``--grid=midrise`` when chosen) for an LSQ run
(``--rule=lsq --bits=8 --layer_bits=...``);
``--out`` also writes the allocation, its traces and per-layer costs as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys

import jax
import jax.numpy as jnp

from lqjax import sensitivity, tree
from lqlab import data, files, step, train


def allocation(workdir, budget_bits: float, *, data_dir=None, batches: int = 8,
               samples: int = 4, seed: int = 0, limit=None,
               widths=sensitivity.DEFAULT_CHOICES, grid: str = "midtread"):
  """``({layer: bits}, info)`` for the float run in `workdir` at `budget_bits` (see module doc)."""
  cfg, model, state, ds_stats, num_classes = train.restore(workdir)
  if not cfg.float_model:
    raise ValueError(f"{workdir} is a {cfg.rule} run; HAWQ widths come from a float run (--float)")
  ds = data.load(cfg.dataset, data_dir, limit=limit)
  chunks = step.first_batches(ds.train, cfg.batch_size, batches)
  ce = step.eval_loss(cfg, model, ds_stats)
  traces = sensitivity.hessian_traces(lambda p, b: ce(p, state.batch_stats, *b), state.params,
                                      chunks, jax.random.key(seed), samples)
  qcfg = dataclasses.replace(cfg, float_model=False, rule="lsq", bits=8, grid=grid)
  qmodel = step.build_model(qcfg, num_classes)
  sample = jnp.zeros((1,) + data.image_shape(cfg.dataset))
  qparams = qmodel.init(jax.random.key(0), sample, train=False)["params"]
  qparams = tree.replace_arrays(qparams, {p: a for p, (a, _) in
                                          tree.flat_leaves(state.params).items()})
  chosen, info = sensitivity.allocate(qparams, budget_bits, traces, widths)
  info.update(workdir=str(workdir), batches=len(chunks), samples=samples, seed=seed, grid=grid,
              traces={"/".join(p): t for p, t in sorted(traces.items())})
  return chosen, info


def flag(widths, grid="midtread") -> str:
  return "--layer_bits=" + ",".join(f"{k}={v}" for k, v in widths.items()) + (
      "" if grid == "midtread" else f" --grid={grid}")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True, help="a finished float run (--float)")
  ap.add_argument("--budget_bits", type=float, required=True,
                  help="average bits per quantized weight, scale storage included")
  ap.add_argument("--data_dir", default=None, help="dataset folder (default: $LQJAX_DATA_DIR)")
  ap.add_argument("--batches", type=int, default=8, help="training batches the traces average")
  ap.add_argument("--samples", type=int, default=4, help="Hutchinson probes per batch")
  ap.add_argument("--seed", type=int, default=0, help="seed of the probes")
  ap.add_argument("--widths", default="1,2,3,4,5,6,7,8",
                  help="the widths a layer may take (comma-separated, each in 1..16)")
  ap.add_argument("--grid", default="midtread", choices=("midtread", "midrise"),
                  help="the fixed-width grid the widths are costed and trained on")
  ap.add_argument("--limit", type=int, default=None, help="first N examples only (tests)")
  ap.add_argument("--out", default=None, help="write the allocation here (JSON)")
  args = ap.parse_args(argv)
  if not (math.isfinite(args.budget_bits) and args.budget_bits > 0):
    print(f"error: --budget_bits must be a finite number > 0, got {args.budget_bits}",
          file=sys.stderr)
    return 2
  if args.batches < 1 or args.samples < 1:
    print("error: --batches and --samples must be >= 1", file=sys.stderr)
    return 2
  try:
    choices = tuple(sorted({int(w) for w in args.widths.split(",")}))
  except ValueError:
    choices = ()
  if not choices or not all(1 <= w <= 16 for w in choices):
    print(f"error: --widths must be comma-separated integers in 1..16, got {args.widths!r}",
          file=sys.stderr)
    return 2
  try:
    widths, info = allocation(args.workdir, args.budget_bits, data_dir=args.data_dir,
                              batches=args.batches, samples=args.samples, seed=args.seed,
                              limit=args.limit, widths=choices, grid=args.grid)
  except (FileNotFoundError, ValueError, data.DatasetNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  info["flag"] = flag(widths, args.grid)
  info["command"] = "python scripts/hawq_bits.py " + " ".join(
      shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
  if args.out:
    files.write_json_atomic(args.out, {"widths": widths, **info})
  print(f"# {info['bits']:.4f} bits per weight (target {args.budget_bits:g}); "
        f"cost {info['cost']:.4g}", file=sys.stderr)
  print(info["flag"])
  return 0


if __name__ == "__main__":
  sys.exit(main())

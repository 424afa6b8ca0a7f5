"""FSDP: per-device bytes of the compiled train step, and the loss against the unsharded run.

  python benchmarks/run.py fsdp [--dataset cifar10 --model vit --steps 20 --devices 8]
                                [--out docs/bench_fsdp.json] [--readme docs/PERFORMANCE.md]
  python benchmarks/run.py fsdp --from_json docs/bench_fsdp.json --readme docs/PERFORMANCE.md

On `--devices` host devices (XLA's ``--xla_force_host_platform_device_count``), one
process: for 1, 2, 4, ... fsdp shards (mesh ``data:devices/n,fsdp:n``) the run's model
(lqlab's step: rules, optimizer split, scales every 16 steps) is compiled and its memory
analysis read: the bytes of the step's arguments per device (parameters, scales, their
optimizer state and the best-params copy, plus one batch) and the train state's own bytes
per device, counted from its shards. Then `--steps` steps from the same initial state and
batches, and the loss of each step against the data-parallel run (fsdp 1, parameters
replicated). The JSON records the machine, the CPU's flags and the versions.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

if "jax" not in sys.modules:  # the devices must exist before jax starts
  _n = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), "8")
  os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={_n}")

import jax
import numpy as np

from bench import machine_info, replace_section
from lqlab import data, distributed
from lqlab.config import TrainConfig
from lqlab.files import write_json_atomic
from lqlab.step import (build_model, init_state, make_chunk_runner, make_optimizer,
                        make_train_step)

ROOT = pathlib.Path(__file__).resolve().parent.parent


def state_bytes_per_device(state) -> int:
  """The bytes of `state`'s shards on the first device."""
  dev = jax.devices()[0]
  return int(sum(s.data.nbytes for leaf in jax.tree_util.tree_leaves(state)
                 for s in leaf.addressable_shards if s.device == dev))


def measure(cfg: TrainConfig, ds, fsdp: int, steps: int) -> dict:
  n = len(jax.devices())
  layout = distributed.make_layout(f"data:{n // fsdp},fsdp:{fsdp}")
  model = build_model(cfg, ds.num_classes)
  steps_per_epoch = len(ds.train) // cfg.batch_size
  tx = make_optimizer(cfg, steps_per_epoch)
  sample = np.zeros((1,) + tuple(ds.train.image.shape[1:]), np.float32)
  state = init_state(cfg, model, tx, sample, layout)
  shardings = layout.state_shardings(state)
  train_step = make_train_step(cfg, model, tx, (ds.mean, ds.std))
  batch = (jax.device_put(ds.train.image[:cfg.batch_size], layout.batch),
           jax.device_put(ds.train.label[:cfg.batch_size], layout.batch))
  step = jax.jit(lambda s, b, r: jax.lax.with_sharding_constraint(
      train_step(s, b, r, scale_step=True)[0], shardings))
  mem = step.lower(state, batch, jax.random.key(0)).compile().memory_analysis()
  run_chunk = make_chunk_runner(cfg, train_step, steps_per_epoch, jax.random.key(cfg.seed + 2),
                                layout.batch, shardings)
  perm = data.epoch_permutation(jax.random.key(cfg.seed + 1), 0, len(ds.train))
  sharded = sum(1 for s in jax.tree_util.tree_leaves(shardings)
                if any(axis is not None for axis in s.spec))
  out = {"fsdp": fsdp, "mesh": f"data:{n // fsdp},fsdp:{fsdp}",
         "state_bytes_per_device": state_bytes_per_device(state),
         "sharded_leaves": sharded, "leaves": len(jax.tree_util.tree_leaves(shardings))}
  if mem is not None:
    out.update(argument_bytes_per_device=int(mem.argument_size_in_bytes),
               output_bytes_per_device=int(mem.output_size_in_bytes),
               temp_bytes_per_device=int(mem.temp_size_in_bytes))
  state, metrics = run_chunk(state, perm, ds.train.image, ds.train.label, steps)
  out["losses"] = [float(x) for x in np.asarray(metrics["loss"])]
  out["final_params"] = distributed.fetch(state.params, layout)
  return out


def render(doc: dict) -> str:
  """The PERFORMANCE.md table of a bench_fsdp JSON."""
  lines = [f"{doc['model']} on {doc['dataset']}, {doc['rule']} {doc['bits']}-bit, batch "
           f"{doc['batch_size']}, {doc['devices']} host devices ({doc['machine']}, jax "
           f"{doc['jax']}); `{doc['command']}`:", "",
           "| mesh | train state per device | step arguments per device | state vs fsdp 1 | "
           f"loss, {doc['steps']} steps: max relative diff | params: max abs diff |",
           "|---|---|---|---|---|---|"]
  for r in doc["rows"]:
    arg = r.get("argument_bytes_per_device")
    lines.append(f"| {r['mesh']} | {r['state_bytes_per_device']:,} B | "
                 f"{f'{arg:,} B' if arg is not None else '-'} | 1/{r['state_bytes_ratio']:.2f} | "
                 f"{r['max_rel_loss_diff']:.1e} | {r['max_abs_param_diff']:.1e} |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--dataset", default="cifar10")
  ap.add_argument("--model", default="vit")
  ap.add_argument("--rule", default="lsq")
  ap.add_argument("--bits", type=int, default=4)
  ap.add_argument("--batch_size", type=int, default=128)
  ap.add_argument("--limit", type=int, default=4096, help="training examples loaded")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--data_dir", default=None)
  ap.add_argument("--out", default="docs/bench_fsdp.json")
  ap.add_argument("--readme", default=None, help="write the table into this file's "
                  "<!-- bench-fsdp --> section")
  ap.add_argument("--from_json", default=None, help="measure nothing: render this JSON")
  args = ap.parse_args(argv)
  if args.from_json:
    return replace_section(pathlib.Path(args.readme or "docs/PERFORMANCE.md"), "bench-fsdp",
                           render(json.loads(pathlib.Path(args.from_json).read_text())))
  n = len(jax.devices())
  if n != args.devices:
    print(f"error: {n} devices, expected --devices={args.devices} (set XLA_FLAGS before "
          f"jax starts, or run this script directly)", file=sys.stderr)
    return 2
  cfg = TrainConfig(dataset=args.dataset, model=args.model, rule=args.rule, bits=args.bits,
                    batch_size=args.batch_size, scale_optimizer="adam", scale_lr=1e-3)
  layout = distributed.make_layout()
  ds = data.load(args.dataset, args.data_dir, limit=args.limit, sharding=layout.replicated)
  rows = []
  shards = [s for s in (1, 2, 4, 8, 16, 32) if s <= n and n % s == 0]
  for fsdp in shards:
    rows.append(measure(cfg, ds, fsdp, args.steps))
    print(f"fsdp {fsdp}: state {rows[-1]['state_bytes_per_device']:,} B/device, step "
          f"arguments {rows[-1].get('argument_bytes_per_device', 0):,} B/device", flush=True)
  ref = rows[0]
  for r in rows:
    r["max_rel_loss_diff"] = float(np.max(np.abs(np.subtract(r["losses"], ref["losses"]))
                                          / np.abs(ref["losses"])))
    r["max_abs_param_diff"] = float(max(
        np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
        for a, b in zip(jax.tree_util.tree_leaves(r["final_params"]),
                        jax.tree_util.tree_leaves(ref["final_params"]))))
    r["state_bytes_ratio"] = ref["state_bytes_per_device"] / r["state_bytes_per_device"]
  for r in rows:
    del r["final_params"]
  out = {"command": "python benchmarks/run.py fsdp " + " ".join(argv if argv is not None
                                                               else sys.argv[1:]),
         "dataset": args.dataset, "model": args.model, "rule": args.rule, "bits": args.bits,
         "batch_size": args.batch_size, "steps": args.steps, "devices": n,
         **machine_info(), "rows": rows}
  if args.out:
    write_json_atomic(ROOT / args.out if not pathlib.Path(args.out).is_absolute()
                      else pathlib.Path(args.out), out)
  for r in rows:
    print(f"fsdp {r['fsdp']}: state 1/{r['state_bytes_ratio']:.2f}, loss max rel diff "
          f"{r['max_rel_loss_diff']:.1e}, params max abs diff {r['max_abs_param_diff']:.1e}")
  if args.readme:
    return replace_section(pathlib.Path(args.readme), "bench-fsdp", render(out))
  return 0

"""Per-layer memory report of a trained run.

  python -m lqlab.report <workdir>

Prints :func:`lqjax.report` of the run's final checkpoint: per tensor the recipe
asked (rule, width, granularity), the code bits learned, bytes and ratio; the
averages over the quantized weights and over all weights; and the size of the
run's packed file (its header holds the run's config).
"""

import sys

from absl import app, logging
from lqlab.evaluate import model_variables


def main(argv):
  if len(argv) != 2:
    print("usage: python -m lqlab.report <workdir>", file=sys.stderr)
    return 2
  import jax

  from lqlab import train
  logging.set_verbosity(logging.WARNING)
  try:
    cfg, _, state, stats, num_classes = train.restore(argv[1])
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  import lqjax
  from lqlab.config import run_meta
  print(lqjax.report(model_variables(jax.device_get(state.params),
                                     jax.device_get(state.batch_stats)),
                     meta=run_meta(cfg, num_classes, stats)))
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))

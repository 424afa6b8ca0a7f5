"""Per-layer memory report of a trained run.

  python -m lqlab.report <workdir>

Prints layer, shape, granularity, bits min/mean/max, bytes, ratio per tensor
and the model's total (the same numbers as
:func:`lqjax.accounting.model_report`).
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
    cfg, _, state, _, _ = train.restore(argv[1])
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  import lqjax
  print(lqjax.report(model_variables(jax.device_get(state.params),
                                           jax.device_get(state.batch_stats))))
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))

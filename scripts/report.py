"""Generates docs/RESULTS.md (and its plots) from the sweeps' record; with --readme, the
README's results too (lqlab.results).

  python scripts/report.py [--results_dir results] [--out docs/RESULTS.md] [--readme README.md]
"""

import sys

from lqlab.results.cli import main

if __name__ == "__main__":
  sys.exit(main())

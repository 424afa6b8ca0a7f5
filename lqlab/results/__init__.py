"""The results report of the application: docs/RESULTS.md, its plots and the README's
results, generated from the sweeps' committed record (``python scripts/report.py``).

* :mod:`lqlab.results.records`: the record as rows, schemes, recipes, statistics, and the
  figures compared against (``constants.json``);
* :mod:`lqlab.results.sections`: one function per section of RESULTS.md;
* :mod:`lqlab.results.plots`: accuracy against packed size;
* :mod:`lqlab.results.readme`: the README's few rows;
* :mod:`lqlab.results.cli`: the command line.
"""

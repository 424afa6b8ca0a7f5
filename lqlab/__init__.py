"""lqlab: the application around lqjax: models (a registry), data and importers, the
training loop, and the CLIs (export, report, ptq). It uses lqjax's public pieces;
lqjax imports nothing from here."""

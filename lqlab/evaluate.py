"""Evaluation and the results of a trained model (accuracies, bits, sizes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lqjax import accounting

from lqlab import data
from lqlab.config import TrainConfig
from lqlab.step import _preprocess

def make_eval_fn(cfg: TrainConfig, model, ds_stats, sharding, batch_size: int = 500):
  """Returns jitted ``evaluate(params, batch_stats, images, labels) -> (acc, loss)``."""

  @jax.jit
  def logits_fn(params, batch_stats, images):
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    images = jax.lax.with_sharding_constraint(images, sharding)
    return model.apply(variables, _preprocess(cfg, ds_stats, images, None, False), train=False)

  def evaluate(params, batch_stats, split: data.Split):
    n = len(split)
    correct, loss = 0.0, 0.0
    for i in range(0, n, batch_size):
      x, y = split.image[i:i + batch_size], split.label[i:i + batch_size]
      if x.shape[0] % sharding.mesh.size:  # last partial batch: pad to the mesh
        pad = sharding.mesh.size - x.shape[0] % sharding.mesh.size
        logits = logits_fn(params, batch_stats, jnp.pad(x, ((0, pad),) + ((0, 0),) * 3))[:-pad]
      else:
        logits = logits_fn(params, batch_stats, x)
      correct += float(jnp.sum(jnp.argmax(logits, -1) == y))
      loss += float(jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y)))
    return correct / n, loss / n

  return evaluate


def predict_logits(cfg, model, ds_stats, params, batch_stats, images, batch_size=500):
  """Host-side logits for `images` (used to compare exported models)."""
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  fn = jax.jit(lambda v, x: model.apply(v, _preprocess(cfg, ds_stats, x, None, False), train=False))
  return np.concatenate([np.asarray(fn(variables, images[i:i + batch_size]))
                         for i in range(0, images.shape[0], batch_size)])


def collapsed(results: dict) -> bool:
  """A quantized run whose grid fell to (almost) one bin per group, or to chance accuracy."""
  if results.get("scheme") == "float":
    return False
  chance = 1.0 / max(int(results.get("num_classes", 10)), 1)
  return results["avg_bits"] < 0.05 or results["test_accuracy"] < 1.5 * chance


def model_variables(params, batch_stats):
  """One tree of every array of a model, for accounting and files: the params at
  the top (their paths as in the params collection) and ``batch_stats`` beside them."""
  return dict(params, batch_stats=batch_stats) if batch_stats else params


def final_results(cfg: TrainConfig, params, batch_stats, evaluate, ds, workdir, *,
                  train_seconds: float, devices, host_variables=None, **extra) -> dict:
  """The results.json entries of a trained model: accuracies, bits and sizes, config.

  `host_variables`: ``(params, batch_stats)`` already fetched to the host (a sharded
  multi-process run's, gathered); None: fetched here."""
  val_acc, _ = evaluate(params, batch_stats, ds.val)
  test_acc, test_loss = evaluate(params, batch_stats, ds.test)
  host_params, host_bs = host_variables if host_variables is not None else \
      jax.device_get((params, batch_stats))
  report = accounting.model_report(model_variables(host_params, host_bs))
  summ = accounting.summarize(report)
  penalty = cfg.inverse_scale or cfg.bin_count or cfg.deviation
  out = {
      "dataset": cfg.dataset, "model": cfg.model,
      "scheme": "float" if cfg.float_model else ("penalty" if penalty else "scale-rule"),
      "rule": None if cfg.float_model else cfg.rule, "threshold": cfg.threshold,
      "granularity": list(cfg.granularity) if isinstance(cfg.granularity, tuple) else cfg.granularity,
      "seed": cfg.seed, "epochs": cfg.epochs, "num_classes": ds.num_classes,
      "val_accuracy": val_acc, "test_accuracy": test_acc,
      "test_loss": test_loss, "fp32_bytes": summ["fp32_bytes"],
      "quantized_bits_per_layer": summ["quantized_bits_per_layer"] if not cfg.float_model else {},
      "avg_bits": summ["avg_bits"] if not cfg.float_model else 32.0,
      "packed_bytes_accounted": summ["packed_bytes_accounted"],
      "train_seconds": train_seconds, "devices": len(devices), **extra,
      "platform": devices[0].platform, "workdir": str(workdir), "config": cfg.to_json(),
  }
  out["collapsed"] = collapsed(out)
  return out

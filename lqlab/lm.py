"""Character-level language modelling on Tiny Shakespeare with a quantized GPT (NNX).

The loop follows nanoGPT's ``train.py`` (Karpathy): random windows of ``context``
characters, AdamW (betas 0.9/0.99, weight decay 0.1 on matrices, gradient
clipping at 1.0), a linear warmup then cosine decay of the learning rate to
``min_lr`` over ``iters`` steps. Its defaults are nanoGPT's CPU configuration for
Shakespeare-char: 4 layers, 4 heads, width 128, context 64, batch 12, 2000
iterations, lr 1e-3, no dropout (nanoGPT's README reports a validation loss of
about 1.88 for it).

Data (nanoGPT's split): the first 90% of the characters train, the last 10% are the
validation split every number is reported on. The last :data:`TUNE_FRACTION` of
all characters before the validation split are held out of training as the tuning
split: the brake and any choice of settings look only at it.

The quantization (``lqjax.quantize`` by rules, from outside the scanned stack):
every matrix, the attention q/k/v/out projections, the MLP and the token and
position embeddings (the head is tied to the token embedding); the LayerNorms stay
float. The scales train with :func:`lqjax.optim.split`, every ``scale_every``
steps, with the ratio rules' validation brake on the tuning split's loss and the
size budget's schedule applied at each evaluation (an "epoch" of
:class:`lqjax.budget.Schedule` is one evaluation interval).

A run writes, like the image experiments, ``metrics.jsonl`` (one row per evaluation),
``results.json``, orbax checkpoints at each evaluation (a killed run resumes from
the last one) and the packed ``model.lqz``, whose reload is checked to give the same
logits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lqjax
from lqjax import qconfig
from lqlab import checkpoints, data, files, transformers
from lqlab import train as train_lib

DATASET = "tinyshakespeare"
TRAIN_FRACTION = 0.9  # nanoGPT's split: the rest is the validation split
TUNE_FRACTION = 0.05  # of all characters, held out from the end of the training part
EVAL_BATCH = 128


# ------------------------------------------------------------------ data


@dataclasses.dataclass(frozen=True)
class Text:
  vocab: str  # the characters, in id order
  train: np.ndarray  # int32 ids
  tune: np.ndarray
  val: np.ndarray


def text_path(data_dir: Optional[str]) -> pathlib.Path:
  """``<data_dir>/tinyshakespeare/input.txt`` (data_dir, else $LQJAX_DATA_DIR), else the
  per-user cache; one-line DatasetNotFoundError when neither has it."""
  looked = []
  d = data.resolve_data_dir(data_dir)
  for root in ([d] if d else []) + [data.cache_dir()]:
    p = root / DATASET / "input.txt"
    looked.append(str(p))
    if p.is_file():
      return p
  raise data.DatasetNotFoundError(
      f"dataset {DATASET!r} not found: looked for {' and '.join(looked)}; set --data_dir or "
      f"LQJAX_DATA_DIR to a folder with {DATASET}/input.txt (char-rnn's Tiny Shakespeare)")


def load_text(data_dir: Optional[str] = None, limit: Optional[int] = None) -> Text:
  """The corpus split as nanoGPT splits it, plus the tuning slice (module docstring).
  `limit` keeps the first `limit` characters of each split (smoke tests)."""
  path = text_path(data_dir)
  try:
    text = path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise data.DatasetNotFoundError(f"{path}: cannot read it as UTF-8 text ({e})") from None
  if len(text) < 1000:
    raise data.DatasetNotFoundError(f"{path}: {len(text)} characters; a language model needs "
                                    f"a corpus of at least 1000")
  vocab = "".join(sorted(set(text)))
  ids = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64)
  lut = np.zeros(max(map(ord, vocab)) + 1, np.int32)
  lut[[ord(c) for c in vocab]] = np.arange(len(vocab), dtype=np.int32)
  ids = lut[ids]
  n = len(ids)
  n_train = int(n * TRAIN_FRACTION)
  n_tune = int(n * TUNE_FRACTION)
  parts = ids[:n_train - n_tune], ids[n_train - n_tune:n_train], ids[n_train:]
  if limit is not None:
    parts = tuple(p[:limit] for p in parts)
  return Text(vocab, *parts)


def windows(ids: np.ndarray, context: int):
  """Every non-overlapping window of the split: (inputs, next-character targets)."""
  n = (len(ids) - 1) // context
  x = ids[:n * context].reshape(n, context)
  y = ids[1:n * context + 1].reshape(n, context)
  return x, y


def sample_batch(train: jax.Array, key, batch: int, context: int):
  """nanoGPT's ``get_batch``: `batch` windows at uniformly random offsets."""
  ix = jax.random.randint(key, (batch,), 0, train.shape[0] - context - 1)
  take = jax.vmap(lambda i: jax.lax.dynamic_slice(train, (i,), (context + 1,)))(ix)
  return take[:, :-1], take[:, 1:]


# ------------------------------------------------------------------ config

RULES = ("ratio", "lsq", "fixed")
QWIX_TYPES = {8: "int8", 4: "int4", 2: "int2"}  # qwix_bits -> qwix's weight type


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMConfig:
  """Everything that defines a language-model run (the flags of experiments.shakespeare)."""

  layers: int = 4
  heads: int = 4
  width: int = 128
  context: int = 64
  iters: int = 2000
  batch_size: int = 12
  lr: float = 1e-3
  min_lr: float = 1e-4
  warmup: int = 100
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  eval_every: int = 250
  seed: int = 0
  float_model: bool = False
  rule: str = "ratio"
  threshold: float = 0.2
  granularity: qconfig.Granularity = "row"
  block_size: Optional[int] = None
  bits: Optional[int] = None
  rounding: str = "round"
  edge_bits: Optional[int] = None  # the embeddings (and so the tied head) at this width
  init_bits: int = 8
  scale_optimizer: str = "sgd"  # the log scales' optimizer: sgd | adam
  scale_lr: float = 0.02
  scale_every: int = 16
  scale_decay_fraction: float = 0.8
  brake_tolerance: float = 0.01  # nats of tuning loss above the best before a brake
  budget_bits: Optional[float] = None
  # post-training quantization of a finished FP32 run ("{seed}" is this run's seed): its
  # weights with min-max scales at --bits under --rule=fixed, evaluated without training
  ptq_from: Optional[str] = None
  # google/qwix's QAT of the float model (with --float): int<qwix_bits> weights, an absmax
  # scale per output channel, nothing learned and no packed file (a peer reference point)
  qwix_bits: Optional[int] = None
  # the inputs of every quantized matrix (attention projections, MLP) at this width: a
  # learned step and offset each (LSQ+), calibrated on a batch of training windows before
  # the first step; the embeddings' inputs are token ids and stay as they are
  act_bits: Optional[int] = None
  limit: Optional[int] = None

  def __post_init__(self):
    for name in ("layers", "heads", "width", "context", "iters", "batch_size", "eval_every",
                 "scale_every"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {v!r}")
    if self.width % self.heads:
      raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
    for name in ("lr", "min_lr", "weight_decay", "grad_clip", "scale_lr", "brake_tolerance",
                 "threshold"):
      v = getattr(self, name)
      if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if self.lr == 0:
      raise ValueError("lr must be > 0")
    if not 0 < self.scale_decay_fraction <= 1:
      raise ValueError(f"scale_decay_fraction must be in (0, 1], got {self.scale_decay_fraction}")
    if self.scale_optimizer not in ("sgd", "adam"):
      raise ValueError(f"unknown scale_optimizer {self.scale_optimizer!r}; expected sgd or adam")
    if self.rule not in RULES:
      raise ValueError(f"unknown rule {self.rule!r}; expected one of {', '.join(RULES)}")
    if self.budget_bits is not None:
      if self.rule != "ratio" or self.float_model:
        raise ValueError("budget_bits needs the learned rule (--rule=ratio, free bit widths)")
      if not (math.isfinite(self.budget_bits) and self.budget_bits > 0):
        raise ValueError(f"budget_bits must be a finite number > 0, got {self.budget_bits}")
    if self.limit is not None and self.limit < 1:
      raise ValueError(f"limit must be >= 1, got {self.limit}")
    if self.qwix_bits is not None:
      if self.qwix_bits not in QWIX_TYPES:
        raise ValueError(f"qwix_bits must be one of {sorted(QWIX_TYPES)}, got {self.qwix_bits}")
      if not self.float_model:
        raise ValueError("qwix_bits quantizes the float model with qwix: pass --float too")
    if self.act_bits is not None:
      if isinstance(self.act_bits, bool) or not isinstance(self.act_bits, int) \
          or not 1 <= self.act_bits <= 16:
        raise ValueError(f"act_bits must be a whole number in 1..16, got {self.act_bits!r}")
      if self.float_model or self.ptq_from is not None:
        raise ValueError("act_bits quantizes the inputs of the quantized matrices while they "
                         "train: not with --float or --ptq_from")
    if self.ptq_from is not None and (self.rule != "fixed" or self.float_model):
      raise ValueError("ptq_from needs --rule=fixed and --bits (post-training quantization)")
    self.rules()  # validates the quantization settings

  def weights_config(self) -> qconfig.QuantConfig:
    bits = self.bits if self.rule != "ratio" else None
    if self.rule != "ratio" and bits is None:
      raise ValueError(f"rule {self.rule!r} needs --bits")
    if self.rule == "ratio" and self.bits is not None:
      raise ValueError("rule 'ratio' learns the bit widths: leave --bits out")
    return qconfig.QuantConfig(rule=self.rule, threshold=self.threshold, rounding=self.rounding,
                               bits=bits, granularity=self.granularity,
                               block_size=self.block_size, init_bits=self.init_bits)

  def rules(self):
    """The rules: attention projections with the granularity asked for; with ``head``, the
    MLP and embeddings (which have no heads axis) per row; the embeddings at `edge_bits`
    (LSQ) when that is set."""
    if self.float_model:
      return None
    cfg = self.weights_config()
    rest = dataclasses.replace(cfg, granularity="row") if cfg.granularity == "head" else cfg
    rules = []
    if self.edge_bits is not None:
      rules.append(lqjax.Rule("wte|wpe", qconfig.QuantConfig(
          rule="lsq", bits=self.edge_bits, rounding="round", granularity="row")))
    act = None if self.act_bits is None else qconfig.QuantConfig(
        rule="lsq", bits=self.act_bits, rounding="round")
    rules += [lqjax.Rule("blocks/attn/(query|key|value|out)", cfg, inputs=act),
              lqjax.Rule("blocks/(fc|proj)" + ("" if self.edge_bits is not None else "|wte|wpe"),
                         rest, inputs=act)]
    return rules

  @property
  def tag(self) -> str:
    if self.qwix_bits is not None:
      return f"qwix_{QWIX_TYPES[self.qwix_bits]}"
    return "float" if self.float_model else ("ptq" if self.ptq_from else self.rule)

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    for k in ("qwix_bits", "act_bits"):
      if d[k] is None:  # records from before the field read the same
        del d[k]
    if isinstance(d["granularity"], tuple):
      d["granularity"] = list(d["granularity"])
    return d


def build(cfg: LMConfig, vocab_size: int):
  """The float GPT and, unless `cfg.float_model`, the model quantized by `cfg.rules()`;
  with `cfg.qwix_bits`, the float GPT quantized by qwix (:func:`qwix_model`)."""
  model = transformers.GPT(transformers.GPTConfig(vocab_size, cfg.context, cfg.layers,
                                                  cfg.heads, cfg.width),
                           rngs=nnx.Rngs(cfg.seed))
  if cfg.qwix_bits is not None:
    return qwix_model(model, cfg.qwix_bits, cfg.context)
  return model if cfg.float_model else lqjax.quantize(model, cfg.rules())


def qwix_model(model, bits: int, context: int):
  """google/qwix's quantization-aware training of `model` (the peer's own API): every
  dot_general/einsum whose operand is a weight fake-quantizes it to int<bits> with an absmax
  scale per output channel (qwix's default), straight-through; the embedding lookups and
  the activations stay float, and no scale is learned."""
  try:
    import qwix
  except ImportError:
    raise data.DatasetNotFoundError("qwix is not installed: pip install qwix") from None
  rule = qwix.QtRule(module_path=".*", weight_qtype=getattr(jnp, QWIX_TYPES[bits]))
  return qwix.quantize_model(model, qwix.QtProvider([rule]),
                             jnp.zeros((1, context), jnp.int32))


def qwix_nominal_bytes(params, bits: int) -> int:
  """The accounted size of the qwix model (qwix writes no packed file): `bits` per element of
  every matrix that enters a dot (attention, MLP, the token table as the tied head) and a
  float32 scale per output channel; the position table and the norms at 32 bits. Counting
  the token table at `bits` favours qwix: its lookup reads the float table."""
  from lqjax import tree
  total = 0.0
  for path, (v, _) in tree.flat_leaves(params).items():
    name, shape, size = "/".join(map(str, path)), np.shape(v), int(np.size(v))
    if not (name.endswith("kernel") or "wte" in name):  # norms, the position table
      total += 4 * size
      continue
    if "wte" in name:  # (vocab, width): the head contracts width, a scale per token
      contracted = shape[1]
    elif "attn/out" in name:  # (layers, heads, head_dim, width)
      contracted = shape[1] * shape[2]
    else:  # (layers, in, ...) for q/k/v and the MLP
      contracted = shape[1]
    total += size * bits / 8 + 4 * size // contracted
  return int(math.ceil(total))


# ------------------------------------------------------------------ training


def lr_schedule(cfg: LMConfig):
  """nanoGPT's: linear warmup to lr, cosine to min_lr at `iters`."""
  warm = min(cfg.warmup, cfg.iters // 2)  # tiny runs keep a decay phase
  return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warm, cfg.iters, cfg.min_lr)


def make_optimizer(cfg: LMConfig):
  decay = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731  matrices only
  weights = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                        optax.adamw(lr_schedule(cfg), b1=0.9, b2=0.99,
                                    weight_decay=cfg.weight_decay, mask=decay))
  if cfg.float_model:
    return weights
  # the schedule counts scale updates (one every scale_every steps), as in lqlab.step
  stop = max(int(cfg.iters * cfg.scale_decay_fraction / cfg.scale_every), 1)
  lr = optax.cosine_decay_schedule(cfg.scale_lr * cfg.scale_every, stop)
  scales = optax.adam(lr) if cfg.scale_optimizer == "adam" else optax.sgd(lr)
  return lqjax.optim.split(weights, scales)


def _loss(graphdef, params, rest, x, y):
  logits = nnx.merge(graphdef, params, rest)(x)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return ce.mean(), jnp.mean(jnp.argmax(logits, -1) == y)


def make_step(cfg: LMConfig, graphdef, tx):
  @functools.partial(jax.jit, static_argnames="scale_step", donate_argnums=(0, 1))
  def step(params, opt_state, rest, train, key, scale_step=True):
    x, y = sample_batch(train, key, cfg.batch_size, cfg.context)

    def loss(p):
      if not cfg.float_model and not scale_step:
        p = lqjax.optim.stop_scale_gradients(p)
      return _loss(graphdef, p, rest, x, y)[0]

    value, grads = jax.value_and_grad(loss)(params)
    if cfg.float_model:
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, value
    updates, opt_state = tx.update(grads, opt_state, params, scale_step=scale_step)
    return lqjax.optim.apply_updates(params, updates, scale_step=scale_step), opt_state, value

  return step


def make_eval(graphdef):
  @jax.jit
  def batch_sums(params, rest, x, y):
    logits = nnx.merge(graphdef, params, rest)(x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(ce), jnp.sum(jnp.argmax(logits, -1) == y)

  def evaluate(params, rest, split: np.ndarray, context: int):
    """(mean loss in nats per character, next-character accuracy) over every window."""
    x, y = windows(split, context)
    loss = acc = 0.0
    for i in range(0, len(x), EVAL_BATCH):
      lsum, asum = batch_sums(params, rest, x[i:i + EVAL_BATCH], y[i:i + EVAL_BATCH])
      loss, acc = loss + float(lsum), acc + float(asum)
    return loss / y.size, acc / y.size

  return evaluate


def make_fisher(graphdef, rest, train: np.ndarray, context: int, batches: int = 8,
                batch: int = 32):
  """``(fisher, ratio)``: ``fisher(params)`` the squared gradients summed over `batches` fixed
  training batches (:func:`lqjax.budget.squared_gradients`), which weight the budget's
  choice of groups; ``ratio(params)`` the quantiles of r = ||dL/dP|| / ||P|| per tensor on
  the first of them (:func:`lqjax.optim.ratio_stats`), the quantity lambda is set against."""
  x, y = windows(train, context)
  stride = max(len(x) // (batches * batch), 1)
  idx = np.arange(batches * batch) * stride % len(x)
  data = [(x[idx[i::batches]], y[idx[i::batches]]) for i in range(batches)]
  grad = jax.jit(jax.grad(lambda p, b: _loss(graphdef, p, rest, *b)[0]))
  fisher = lambda params: lqjax.budget.squared_gradients(grad, params, data)  # noqa: E731
  ratio = jax.jit(lambda params: lqjax.optim.ratio_stats(params, grad(params, data[0])))
  return fisher, ratio


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class State:
  step: jax.Array
  params: object
  opt_state: object
  best_params: object  # the brake's best (the scales are rolled back to it)


class TrainingError(RuntimeError):
  pass


def _same_run(cfg: LMConfig, workdir: pathlib.Path):
  path = workdir / "config.json"
  if path.exists():
    before = files.read_json(path)
    if before != cfg.to_json():
      changed = sorted(k for k in set(before) | set(cfg.to_json())
                       if before.get(k) != cfg.to_json().get(k))
      raise TrainingError(f"{workdir} holds a run with other settings ({', '.join(changed)}); "
                          f"use a new --workdir, or the same flags to resume it")
  else:
    files.write_json_atomic(path, cfg.to_json())


def train(cfg: LMConfig, workdir, data_dir: Optional[str] = None, *, progress: bool = True,
          export: bool = True) -> dict:
  """Trains (or resumes) one run in `workdir`; returns and writes ``results.json``."""
  import orbax.checkpoint as ocp
  workdir = pathlib.Path(workdir).resolve()
  text = load_text(data_dir, cfg.limit)  # bad data: one line, before compute
  if len(text.train) <= cfg.context + 1:
    raise data.DatasetNotFoundError(f"the training split has {len(text.train)} characters, "
                                    f"fewer than a window of {cfg.context + 1}")
  model = build(cfg, len(text.vocab))
  if cfg.ptq_from is not None:
    ptq_weights(model, pathlib.Path(cfg.ptq_from.format(seed=cfg.seed)) / "model.lqz", cfg.bits)
  workdir.mkdir(parents=True, exist_ok=True)
  with files.lock_dir(workdir):
    _same_run(cfg, workdir)
    if cfg.ptq_from is not None:
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)
      return _finish(cfg, workdir, text, graphdef, params, rest, [],
                     {"seconds": 0.0, "brakes": 0}, export)
    return _train(cfg, workdir, text, model, progress, export, ocp)


def ptq_weights(model, path: pathlib.Path, bits: int):
  """Loads an FP32 run's packed file into quantized `model` (in place), every log scale
  set to the min-max scale of its weight at `bits` (lqlab.ptq.minmax_log_scale)."""
  from lqjax import tree
  from lqlab import ptq
  if not path.is_file():
    raise data.DatasetNotFoundError(f"--ptq_from: {path} not found (the FP32 run's packed file)")
  loaded = tree.flat_leaves(lqjax.load(path))
  state = nnx.state(model)
  arrays = {}
  for key, (_, cfg) in tree.flat_leaves(state).items():
    if tree.is_scale_path(key):
      continue
    if key not in loaded:
      raise TrainingError(f"--ptq_from: {path} has no tensor {'/'.join(key)}")
    arrays[key] = jnp.asarray(loaded[key][0])
  for t in tree.quantized_tensors(state):
    arrays[t.scale_path] = ptq.minmax_log_scale(arrays[t.path], None, bits, t.log_scale.shape)
  nnx.update(model, tree.replace_arrays(state, {k: arrays[k] for k, _ in tree.leaves(state)[0]}))


def _train(cfg, workdir, text, model, progress, export, ocp):
  if cfg.act_bits is not None:  # the input ranges from data (a resumed run restores them)
    x, _ = sample_batch(jnp.asarray(text.train), jax.random.key(cfg.seed + 2), cfg.batch_size,
                        cfg.context)
    lqjax.calibrate(model, x)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = make_optimizer(cfg)
  # the brake of the ratio rule; a size budget sets the scales itself (as in lqlab.train)
  brake = None if cfg.float_model or cfg.rule != "ratio" or cfg.budget_bits else \
      lqjax.optim.Brake(tolerance=cfg.brake_tolerance)
  best = jax.tree.map(jnp.copy, params) if brake is not None else {}
  state = State(jnp.zeros((), jnp.int32), params, tx.init(params), best)
  mngr = ocp.CheckpointManager(
      workdir / "checkpoints",
      options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False))
  meta = {"evals": [], "brakes": 0, "best": None, "start_bits": None, "seconds": 0.0}
  restored = checkpoints.restore_verified(mngr, workdir, state)
  if restored is not None:
    state, meta = restored
  step_fn, evaluate = make_step(cfg, graphdef, tx), make_eval(graphdef)
  train_ids = jnp.asarray(text.train)
  key = jax.random.key(cfg.seed + 1)
  n_evals = math.ceil(cfg.iters / cfg.eval_every)
  phase = max(1, round(n_evals * cfg.scale_decay_fraction))
  sched = lqjax.budget.Schedule(cfg.budget_bits, phase) if cfg.budget_bits else None
  if sched is not None and meta["start_bits"] is None:
    meta["start_bits"] = sched.init(state.params).start_bits
  fisher, ratio = make_fisher(graphdef, rest, text.train, cfg.context)
  metrics_path = workdir / "metrics.jsonl"
  rows = [r for r in (files.read_jsonl(metrics_path) if metrics_path.exists() else [])
          if r["step"] <= int(state.step)]
  t0 = time.time() - meta["seconds"]
  step = int(state.step)
  bar = None
  if progress and sys.stderr.isatty():
    from tqdm import tqdm
    bar = tqdm(total=cfg.iters, initial=step, desc=f"{DATASET} gpt {cfg.tag}", leave=False)
  params, opt_state = state.params, state.opt_state
  best_params = state.best_params
  ctx = (step_fn, evaluate, rest, train_ids, key, text, brake, sched, fisher, bar, t0,
         progress, workdir, ratio)
  with train_lib._SignalFlag() as stop:  # SIGINT/SIGTERM: checkpoint, then one line
    while step < cfg.iters:
      step, params, opt_state, best_params, meta, rows = _interval(
          cfg, step, params, opt_state, best_params, meta, rows, stop, ctx)
      state = State(jnp.asarray(step, jnp.int32), params, opt_state, best_params)
      checkpoints.save(mngr, workdir, state, meta)
      files.write_jsonl_atomic(metrics_path, rows)
      if stop.hit:
        mngr.close()
        raise train_lib.Interrupted(f"{stop.hit} at step {step}: checkpoint saved in "
                                    f"{workdir / 'checkpoints'}; re-run the same command to "
                                    f"resume")
  if bar is not None:
    bar.close()
  mngr.close()
  return _finish(cfg, workdir, text, graphdef, params, rest, rows, meta, export)


def _interval(cfg, step, params, opt_state, best_params, meta, rows, stop, ctx):
  """Trains to the next evaluation (or to a signal), then evaluates there: the brake and
  the budget act at evaluations only."""
  (step_fn, evaluate, rest, train_ids, key, text, brake, sched, fisher, bar, t0,
   progress, workdir, ratio) = ctx
  end = min(cfg.iters, (step // cfg.eval_every + 1) * cfg.eval_every)
  losses = []
  for i in range(step, end):
    scale_step = cfg.float_model or lqjax.optim.is_scale_step(i, cfg.scale_every)
    params, opt_state, loss = step_fn(params, opt_state, rest, train_ids,
                                      jax.random.fold_in(key, i), scale_step=scale_step)
    losses.append(loss)
    if bar is not None:
      bar.update(1)
    if stop.hit and i + 1 < end:  # stop here; the interval resumes from this step
      meta["seconds"] = time.time() - t0
      return i + 1, params, opt_state, best_params, meta, rows
  train_loss = float(jnp.mean(jnp.stack(losses)))
  if not math.isfinite(train_loss):
    raise TrainingError(f"the training loss is {train_loss} between steps {step} and {end}; "
                        f"the last checkpoint in {workdir / 'checkpoints'} is kept: lower "
                        f"--lr or --scale_lr and use a new --workdir")
  step = end
  epoch = math.ceil(step / cfg.eval_every)
  row = {"step": step, "train_loss": train_loss}
  tune_loss, tune_acc = evaluate(params, rest, text.tune, cfg.context)
  row.update(tune_loss=tune_loss, tune_accuracy=tune_acc)
  if not cfg.float_model:
    if brake is not None:
      bstate = lqjax.optim.BrakeState(
          -meta["best"] if meta["best"] is not None else -float("inf"),
          meta.get("best_step", 0), meta["brakes"], best_params)
      bstate, params, opt_state, event = lqjax.optim.brake_update(
          brake, bstate, params, opt_state, -tune_loss, step)
      best_params = bstate.best_params
      meta.update(best=-bstate.best, best_step=bstate.best_step, brakes=bstate.brakes)
      if event:
        row["brake"] = event.replace("val accuracy", "minus tuning loss")
    if sched is not None:
      params, opt_state, info = sched.update(
          lqjax.budget.ScheduleState(meta["start_bits"]), epoch, params, opt_state,
          functools.partial(fisher, params))
      if info is not None:
        row["budget"] = float(info["budget"])
    row["avg_bits"] = float(lqjax.accounting.average_bits(params)[0])
    row["ratio"] = {k: {q: float(v) for q, v in d.items()} for k, d in ratio(params).items()}
  row["seconds"] = time.time() - t0
  rows.append(row)
  meta["seconds"] = row["seconds"]
  if progress:
    bits = f" avg_bits {row['avg_bits']:.2f}" if "avg_bits" in row else ""
    print(f"step {step}: train_loss {train_loss:.4f} tune_loss {tune_loss:.4f}{bits}",
          flush=True)
  return step, params, opt_state, best_params, meta, rows


def _finish(cfg, workdir, text, graphdef, params, rest, rows, meta, export):
  evaluate = make_eval(graphdef)
  val_loss, val_acc = evaluate(params, rest, text.val, cfg.context)
  tune_loss, _ = evaluate(params, rest, text.tune, cfg.context)
  res = {"dataset": DATASET, "model": "gpt", "rule": cfg.tag, "seed": cfg.seed,
         "config": cfg.to_json(), "steps": cfg.iters, "val_loss": val_loss,
         "val_bpc": val_loss / math.log(2), "val_accuracy": val_acc, "tune_loss": tune_loss,
         "train_seconds": meta["seconds"], "vocab": text.vocab,
         "parameters": count_weights(params)}
  res["fp32_bytes"] = 4 * res["parameters"]
  if not cfg.float_model:
    res["avg_bits"] = float(lqjax.accounting.average_bits(params)[0])
    res["bits_per_tensor"] = bits_per_layer(params)
    res["brakes"] = meta["brakes"]
  if export:
    res.update(_export(cfg, workdir, text, graphdef, params, rest))
  files.write_json_atomic(workdir / "results.json", res)
  return res


def config_of(workdir) -> LMConfig:
  """The LMConfig a run directory was made with (its config.json)."""
  d = files.read_json(pathlib.Path(workdir) / "config.json")
  if isinstance(d.get("granularity"), list):
    d["granularity"] = tuple(d["granularity"])
  return LMConfig(**d)


def integer_results(workdir, data_dir: Optional[str] = None, batch: int = 128,
                    onnx: bool = False) -> dict:
  """``lqjax.integer_inference`` of a finished run's packed file against the
  fake-quantized model, on every window of nanoGPT's validation split: the positions whose
  argmax differs, the largest logit difference, both validation losses (nats/char) and
  the bytes the integer function holds. `onnx`: the same for the integer function exported
  by ``lqjax.onnx_export.build_integer`` (its blocks one ONNX Loop) and run by onnxruntime
  (``onnx_integer_*``, and the graph's bytes)."""
  cfg = config_of(workdir)
  if cfg.act_bits is None:
    raise ValueError(f"{workdir}: a run without --act_bits has no integer route")
  text = load_text(data_dir)
  model = build(cfg, len(text.vocab))
  lqjax.load(pathlib.Path(workdir) / "model.lqz", target=model)
  fn = lqjax.integer_inference(model)
  fake = nnx.jit(lambda m, x: m(x))
  fns = {"integer": fn}
  if onnx:
    from lqjax import onnx_export
    blob = onnx_export.build_integer(lqjax.integer_inference(model, packed=False),
                                     jnp.zeros((1, cfg.context), jnp.int32)).SerializeToString()
    sess = onnx_export.session(blob, "all")
    name = sess.get_inputs()[0].name
    fns["onnx_integer"] = lambda xb: jnp.asarray(sess.run(None, {name: np.asarray(xb)})[0])
  x, y = windows(text.val, cfg.context)
  differ, diff, loss = dict.fromkeys(fns, 0), dict.fromkeys(fns, 0.0), dict.fromkeys(fns, 0.0)
  loss_fake = 0.0
  for i in range(0, len(x), batch):
    xb, yb = jnp.asarray(x[i:i + batch]), jnp.asarray(y[i:i + batch])
    ref = fake(model, xb)
    loss_fake += float(optax.softmax_cross_entropy_with_integer_labels(ref, yb).sum())
    for k, f in fns.items():
      got = f(xb)
      differ[k] += int(jnp.sum(jnp.argmax(ref, -1) != jnp.argmax(got, -1)))
      diff[k] = max(diff[k], float(jnp.max(jnp.abs(ref - got))))
      loss[k] += float(optax.softmax_cross_entropy_with_integer_labels(got, yb).sum())
  n = int(y.size)
  out = {"positions": n, "fake_quant_val_loss": loss_fake / n,
         "integer_device_bytes": lqjax.integer.device_bytes(fn.variables)}
  for k in fns:
    out.update({f"{k}_argmax_disagreements": differ[k], f"{k}_max_abs_logit_diff": diff[k],
                f"{k}_val_loss": loss[k] / n})
  if onnx:
    out["onnx_integer_bytes"] = len(blob)
  return out


def count_weights(params) -> int:
  """The float model's parameter count: every array but the log scales."""
  from lqjax import tree
  return sum(int(np.size(v)) for path, (v, _) in tree.flat_leaves(params).items()
             if not tree.is_scale_path(path))


def bits_per_layer(params) -> dict:
  """``{tensor: average code bits}``; a tensor of the scanned stack gets a list, one entry
  per block (where do the bits go: early or late blocks)."""
  from lqjax import quant, tree
  out = {}
  for t in tree.quantized_tensors(params):
    b = np.asarray(lqjax.accounting.group_bits(quant.codes_of(t.p, t.log_scale, t.config),
                                               t.log_scale.shape))
    stacked = t.path[0] == "blocks"
    out[t.name] = b.reshape(b.shape[0], -1).mean(1).tolist() if stacked else float(b.mean())
  return out


def _export(cfg, workdir, text, graphdef, params, rest) -> dict:
  """Writes model.lqz and checks that its reload computes the same logits (a qwix model:
  its accounted size only)."""
  if cfg.qwix_bits is not None:
    import qwix
    nominal = qwix_nominal_bytes(params, cfg.qwix_bits)
    return {"scheme": "qwix", "qwix_version": qwix.__version__, "avg_bits": cfg.qwix_bits,
            "nominal_bytes": nominal}
  state = nnx.merge_state(params, rest) if len(jax.tree.leaves(rest)) else params
  meta = {"model": "gpt", "dataset": DATASET, "vocab": text.vocab,
          "gpt": dataclasses.asdict(transformers.GPTConfig(
              len(text.vocab), cfg.context, cfg.layers, cfg.heads, cfg.width))}
  path = workdir / "model.lqz"
  lqjax.save(path, state, meta)
  model = nnx.merge(graphdef, params, rest)
  x, _ = windows(text.val, cfg.context)
  before = np.asarray(model(jnp.asarray(x[:8])))
  lqjax.load(path, target=model)
  after = np.asarray(model(jnp.asarray(x[:8])))
  if not np.array_equal(before, after):
    raise TrainingError(f"{path}: the reloaded model's logits differ from the trained "
                        f"model's (largest difference {np.abs(before - after).max():.3g})")
  blob = path.read_bytes()
  coded = lqjax.save(workdir / "model.lqz.zst", state, meta, codec=lqjax.compress.CODEC_ZSTD)
  return {"packed_file": str(path), "packed_bytes": len(blob), "entropy_coded_bytes": coded,
          "file_format_version": lqjax.compress.VERSION}

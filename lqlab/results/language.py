"""The language-model sections of docs/RESULTS.md: Tiny Shakespeare with the character-level
GPT (records of ``experiments.shakespeare``, whose rows carry ``val_loss``)."""

from __future__ import annotations

import collections
import math
import statistics

from lqlab.results.plots import _save, image
from lqlab.results.records import _CONSTANTS, command_today, mean_std, variant_of

#: nanoGPT's published validation losses on Shakespeare-char (nats per character).
NANOGPT = {tuple(k["config"]): (k["loss"], k["what"]) for k in _CONSTANTS["nanogpt"]}


def is_language(r) -> bool:
  return "val_loss" in r and "test_accuracy" not in r


def _model_key(r):
  c = r["config"]
  return (c["layers"], c["heads"], c["width"], c["context"], c["batch_size"], c["iters"])


def _variants(rows):
  by = collections.OrderedDict()
  for r in sorted(rows, key=lambda r: r["run"]):
    by.setdefault(variant_of(r["run"]), []).append(r)
  return by


def paired_ref(rs, fp32):
  """FP32's mean validation loss over the seeds the runs `rs` used (a seed fixes the
  initialisation and the batches, so seed 0 of a variant is set against seed 0 of FP32);
  over every FP32 seed where one of them is missing."""
  if not fp32:
    return None
  by_seed = {r.get("seed"): r["val_loss"] for r in fp32}
  seeds = [r.get("seed") for r in rs]
  if all(s is not None and s in by_seed for s in seeds):
    return _mean([by_seed[s] for s in seeds])
  return _mean([r["val_loss"] for r in fp32])


def _mean(xs):
  xs = [x for x in xs if x is not None]
  return statistics.mean(xs) if xs else None


def language_sections(rows, plots_dir, results_dir=None) -> list:
  """Every language-model sweep: its table, its plot, the targets, where the bits go and
  the ranges of r that lambda is set against."""
  out = []
  for sweep in sorted({r["sweep"] for r in rows}):
    out += _sweep(sweep, [r for r in rows if r["sweep"] == sweep], plots_dir, results_dir)
  return out


#: Layer types of the GPT, by tensor path.
LAYER_TYPES = (("attention q/k/v/out", ("attn/",)), ("MLP", ("/fc/", "/proj/")),
               ("embeddings (tied head)", ("wte/", "wpe/")))


def lambda_ranges(name, by, results_dir) -> list:
  """r = ||dL/dP|| / ||P|| per layer type, p10..p90 over the groups of its tensors, at the
  first and the last evaluation of each learned-rule run (its metrics.jsonl): lambda
  coarsens the groups whose r is below it."""
  if results_dir is None:
    return []
  from lqlab.files import read_jsonl
  cells = collections.defaultdict(list)
  for v, rs in by.items():
    for r in rs:
      path = results_dir / name / r["run"] / "metrics.jsonl"
      rows = [m for m in read_jsonl(path) if m.get("ratio")] if path.exists() else []
      if not rows:
        continue
      for when, m in (("first", rows[0]), ("last", rows[-1])):
        for kind, keys in LAYER_TYPES:
          qs = [q for t, q in m["ratio"].items() if any(k in "/" + t + "/" for k in keys)]
          if qs:
            cells[(v, kind)].append((when, min(q["p10"] for q in qs), max(q["p90"] for q in qs)))
  if not cells:
    return []
  out = ["", "Where lambda acts: r = ||dL/dP|| / ||P|| per scale group, p10 to p90 over each "
         "layer type's groups, at the first and the last evaluation (a group coarsens while "
         "its r is below lambda):", "", "| variant | layer type | first evaluation | last "
         "evaluation |", "|---|---|---|---|"]
  for (v, kind), vals in cells.items():
    first = [x for x in vals if x[0] == "first"]
    last = [x for x in vals if x[0] == "last"]
    fmt = lambda xs: f"{min(x[1] for x in xs):.4f} to {max(x[2] for x in xs):.4f}"  # noqa: E731
    out.append(f"| {v} | {kind} | {fmt(first)} | {fmt(last)} |")
  return out


def _sweep(name, rows, plots_dir, results_dir=None):
  by = _variants(rows)
  fp32 = by.get("fp32")
  ref = _mean([r["val_loss"] for r in fp32]) if fp32 else None
  # the FP32 run's own size is the reference of every ratio
  fp32_bytes = (fp32 or rows)[0]["fp32_bytes"]
  out = [f"## {name}: character-level GPT on Tiny Shakespeare", "",
         "Validation loss on nanoGPT's split (the last 10% of the characters), in nats per "
         "character (bits per character beside it), mean ± std over seeds; \"vs FP32\" sets each "
         "variant against FP32 on the same seeds. The tuning split "
         "(5% of the characters before it, held out of training) chose every setting. "
         f"Ratios are against the FP32 parameters ({fp32_bytes:,} B).", "",
         "| variant | seeds | val loss | bits/char | vs FP32 | avg bits | packed bytes | ratio "
         "| zstd bytes | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
  for var, rs in by.items():
    loss = [r["val_loss"] for r in rs]
    pref = paired_ref(rs, fp32)
    rel = "-" if pref is None or var == "fp32" else f"{100 * (_mean(loss) / pref - 1):+.2f}%"
    packed, mark = [_bytes(r) for r in rs], " (accounted)" if _accounted(rs) else ""
    out.append(
        f"| {var} | {len(rs)} | {mean_std(loss)} | "
        f"{mean_std([x / math.log(2) for x in loss], '{:.3f}')} | {rel} | "
        f"{mean_std([r.get('avg_bits') for r in rs], '{:.2f}')} | "
        f"{mean_std(packed, '{:.0f}')}{mark if any(packed) else ''} | "
        f"{mean_std([fp32_bytes / p for p in packed if p], '{:.1f}')} | "
        f"{mean_std([r.get('entropy_coded_bytes') for r in rs], '{:.0f}')} | "
        f"{mean_std([r['train_seconds'] for r in rs], '{:.0f}')} |")
  if fp32:
    out += _against_nanogpt(fp32)
  out += _targets(by, fp32, fp32_bytes)
  out += _where_bits_go(by)
  out += lambda_ranges(name, by, results_dir)
  png = _plot(name, by, ref, fp32_bytes, plots_dir)
  if png:
    out += image(png, plots_dir, name)
  out += ["", "Commands (one run per variant; the seed varies):", ""]
  for var, rs in by.items():
    if rs[0].get("command"):
      out.append(f"- {var}: `{command_today(rs[0]['command'])}`")
  return out + [""]


def _tokens(key) -> int:
  """Training characters seen: batch x context x iterations."""
  return key[3] * key[4] * key[5]


def _against_nanogpt(fp32) -> list:
  """FP32's distance to nanoGPT's published loss: of the same configuration where nanoGPT
  publishes one, else of its largest (a larger model trained on more characters, said so)."""
  key = _model_key(fp32[0])
  loss = [r["val_loss"] for r in fp32]
  same = key in NANOGPT
  pub_key = key if same else max(NANOGPT, key=_tokens)
  pub, what = NANOGPT[pub_key]
  text = (f"FP32 against nanoGPT ({what}): {mean_std(loss)} here, {pub:.2f} published, a "
          f"distance of {_mean(loss) - pub:+.3f} nats ({100 * (_mean(loss) / pub - 1):+.1f}%).")
  if not same:
    text += (f" This configuration ({key[0]} layers, {key[1]} heads, width {key[2]}, context "
             f"{key[3]}, batch {key[4]}, {key[5]} iterations) is not nanoGPT's: it trains on "
             f"{_tokens(key):,} characters, nanoGPT's on {_tokens(pub_key):,} "
             f"({_tokens(pub_key) / _tokens(key):.0f}x as many).")
  return ["", text]


def _accounted(rs) -> bool:
  """A peer's run (qwix) writes no file: its size is accounted (``nominal_bytes``)."""
  return all(r.get("nominal_bytes") and not r.get("packed_bytes") for r in rs)


def _bytes(r):
  """The written file's bytes, or a peer's accounted bytes where it writes none."""
  return r.get("packed_bytes") or r.get("nominal_bytes")


def _targets(by, fp32, fp32_bytes):
  if not fp32:
    return []
  out = ["", "Targets (distances, against FP32 on the same seeds; the runs do not stop at "
         "them):", ""]
  four = [v for v in by if v.startswith(("lsq_4bit", "budget_4bit"))]
  for v in four:
    d = 100 * (_mean([r["val_loss"] for r in by[v]]) / paired_ref(by[v], fp32) - 1)
    out.append(f"- 4 bits within +1% of FP32's loss: {v} is at {d:+.2f}% "
               f"({'met' if d <= 1 else 'not met'}).")
  best = None
  for v, rs in by.items():
    if v == "fp32" or not all(r.get("packed_bytes") for r in rs):
      continue
    d = 100 * (_mean([r["val_loss"] for r in rs]) / paired_ref(rs, fp32) - 1)
    ratio = fp32_bytes / _mean([r["packed_bytes"] for r in rs])
    if d <= 2 and (best is None or ratio > best[1]):
      best = (v, ratio, d)
  out.append("- A packed file >= 12x smaller than FP32 within +2% loss: " + (
      f"the smallest within +2% is {best[0]}, {best[1]:.1f}x at {best[2]:+.2f}% "
      f"({'met' if best[1] >= 12 else 'not met'})." if best else
      "no quantized variant is within +2%." if len(by) > 1 else "no quantized variant yet."))
  b2, l2 = by.get("budget_2bit"), by.get("lsq_2bit")
  if b2 and l2:
    lb, ll = [r["val_loss"] for r in b2], [r["val_loss"] for r in l2]
    sb, sl = _mean([r["packed_bytes"] for r in b2]), _mean([r["packed_bytes"] for r in l2])
    spread = max(statistics.stdev(lb) if len(lb) > 1 else 0, statistics.stdev(ll) if len(ll) > 1 else 0)
    gap = _mean(ll) - _mean(lb)
    out.append(f"- The 2-bit budget against uniform LSQ 2-bit: loss {mean_std(lb)} at "
               f"{sb:,.0f} B against {mean_std(ll)} at {sl:,.0f} B; the budget is "
               f"{gap:+.4f} nats better, the larger seed spread is {spread:.4f} "
               f"({'met' if gap > spread and sb <= sl else 'not met'}: better by more than "
               f"the spread at equal or smaller size).")
  return out


def _where_bits_go(by):
  out = []
  for v, rs in by.items():
    per = [r.get("bits_per_tensor") for r in rs if r.get("bits_per_tensor")]
    if not per or not v.startswith(("budget", "ratio")):
      continue
    names = sorted(per[0])
    out += ["", f"Where the bits go in {v} (mean code bits over {len(per)} seed(s); a stacked "
            f"tensor per block, first to last):", "", "| tensor | bits |", "|---|---|"]
    for n in names:
      vals = [p[n] for p in per]
      if isinstance(vals[0], list):
        cells = " / ".join(f"{statistics.mean(col):.2f}" for col in zip(*vals))
      else:
        cells = f"{statistics.mean(vals):.2f}"
      out.append(f"| {n} | {cells} |")
  return out


def _labels(fig, ax, pts, colors):
  """Each point's name beside it, at the first vertical offset (in points) whose box
  overlaps no label placed before it (points in order of size)."""
  fig.canvas.draw()  # fixes the limits: data -> pixel coordinates
  px = fig.dpi / 72
  placed = []
  for p in sorted(pts, key=lambda p: p[1]):
    x, y = ax.transData.transform((p[1], p[2]))
    w, h = 7 * 0.6 * len(p[0]) * px, 9 * px
    for dy in (3, -10, 12, -19, 21, -28, 30, -37):
      box = (x + 4 * px, y + dy * px, x + 4 * px + w, y + dy * px + h)
      if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
                 for b in placed):
        break
    placed.append(box)
    ax.annotate(p[0], (p[1], p[2]), fontsize=7, xytext=(4, dy), textcoords="offset points",
                color=colors[p[0].split("_")[0]])


def _plot(name, by, ref, fp32_bytes, plots_dir):
  pts = []
  for v, rs in by.items():
    if v == "fp32" or not all(_bytes(r) for r in rs):
      continue
    loss = [r["val_loss"] for r in rs]
    pts.append((v, _mean([_bytes(r) for r in rs]), _mean(loss),
                statistics.stdev(loss) if len(loss) > 1 else 0.0))
  if not pts:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(9, 4.2))
  colors = {}
  for fam in sorted({p[0].split("_")[0] for p in pts}):
    ps = sorted((p for p in pts if p[0].split("_")[0] == fam), key=lambda p: p[1])
    line = ax.errorbar([p[1] for p in ps], [p[2] for p in ps], yerr=[p[3] for p in ps],
                       fmt="o", ms=5, capsize=2, mfc="none" if fam == "qwix" else None,
                       label=f"{fam} (accounted size)" if fam == "qwix" else fam)
    colors[fam] = line[0].get_color()
  if ref is not None:
    ax.axhline(ref, ls="--", color="gray", lw=1, label="FP32")
  ax.set_xscale("log")
  _labels(fig, ax, pts, colors)
  ax.set_xlabel("packed file (bytes; qwix: accounted, it writes none)")
  ax.set_ylabel("validation loss (nats/char)")
  ax.set_title(f"{name}: validation loss against file size (FP32 {fp32_bytes:,} B)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, plots_dir / f"{name}.png")


def _size(r) -> str:
  """``gpt <layers>x<width>``: which of the configurations a README row is."""
  cfg = r.get("config", {})
  return f"gpt {cfg.get('layers', '?')}x{cfg.get('width', '?')}"


def language_headline(rows) -> list:
  """README rows: per language-model sweep with an FP32 run, the largest packed and zstd
  ratios within +2% of FP32's validation loss (mean over seeds)."""
  out = []
  for sweep in sorted({r["sweep"] for r in rows}):
    by = _variants([r for r in rows if r["sweep"] == sweep])
    if "fp32" not in by or len(by) == 1:  # nothing quantized to set beside FP32 yet
      continue
    fp32_bytes = by["fp32"][0]["fp32_bytes"]
    cells = []
    for field in ("packed_bytes", "entropy_coded_bytes"):
      best = None
      for v, rs in by.items():
        if v == "fp32" or not all(r.get(field) for r in rs):
          continue
        loss = _mean([r["val_loss"] for r in rs])
        pref = paired_ref(rs, by["fp32"])
        ratio = fp32_bytes / _mean([r[field] for r in rs])
        if loss <= 1.02 * pref and (best is None or ratio > best[0]):
          best = (ratio, loss, v, len(rs), pref)
      cells.append(" - |" if best is None else (
          f" **{best[0]:.1f}x**: loss {best[1]:.4f} vs FP32 {best[4]:.4f} "
          f"({_size(by['fp32'][0])} {best[2]}, within "
          f"2%, {best[3]} seed{'s' if best[3] > 1 else ''}) |"))
    out.append(f"| tinyshakespeare |{''.join(cells)}")
  return out

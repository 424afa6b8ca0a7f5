"""Bit accounting (METHOD.md section 6).

For each quantized parameter and each scale group G:

* codes q = quantize_codes(P, s); integer range [min q_G, max q_G];
* bits_G = ceil(log2(max q_G - min q_G + 1)), 0 for a single bin (the codes are
  stored relative to the group's offset min q_G, so a range that does not start
  at 0 costs no extra bits);
* storage: bits_G x |G| code bits, plus per group a float32 scale, an int32
  offset and a uint8 bit width (:data:`GROUP_OVERHEAD_BYTES`).

Each tensor is accounted with its own recipe (rounding, bits, granularity), read
from the tree (:mod:`lqjax.tree`). Parameters that are not quantized (batch
norm, float layers) count at 32 bits.
The exported file (:mod:`lqjax.compress`) lays the data out exactly so: its
payload size equals :func:`model_report`'s ``packed_bytes``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from lqjax import qconfig, quant, tree

#: What the packed file stores per scale group, as three columns (one after the other, each
#: over all of a tensor's groups): the float32 log scale, the int32 offset (the group's
#: smallest code) and the uint8 bit width.
GROUP_FIELDS = (("log_scale", np.dtype("<f4")), ("offset", np.dtype("<i4")),
                ("bits", np.dtype("u1")))
GROUP_OVERHEAD_BYTES = sum(dt.itemsize for _, dt in GROUP_FIELDS)


def code_bits(lo, hi):
  """The bits of a group whose codes run from `lo` to `hi`: ceil(log2(hi - lo + 1)), 0 for
  a single code. The one definition of a group's width (accounting, file, budget).

  Exact for every int32 code range, with no floating-point epsilon: the bit length of
  hi - lo. numpy in, numpy int64 out; jax in, jax int32 out (jittable, through the
  count of leading zeros of the unsigned difference).
  """
  if isinstance(lo, jax.Array) or isinstance(hi, jax.Array):
    diff = jax.lax.bitcast_convert_type(jnp.asarray(hi, jnp.int32) - jnp.asarray(lo, jnp.int32),
                                        jnp.uint32)  # hi - lo < 2^32: exact modulo 2^32
    return 32 - jax.lax.clz(diff).astype(jnp.int32)
  diff = np.asarray(hi, np.float64) - np.asarray(lo, np.float64)  # exact below 2^53
  return np.where(diff > 0, np.frexp(np.maximum(diff, 1.0))[1], 0).astype(np.int64)


def group_bits(codes: jax.Array, sshape) -> jax.Array:
  """:func:`code_bits` per group, of the scale's shape, as float32 (jittable)."""
  cshape, vshape = qconfig.grouped_shapes(codes.shape, sshape)
  codes = jnp.reshape(codes, cshape)
  axes = qconfig.shared_axes(codes.shape, vshape)
  hi = jnp.max(codes, axis=axes, keepdims=True) if axes else codes
  lo = jnp.min(codes, axis=axes, keepdims=True) if axes else codes
  return code_bits(jnp.asarray(lo), jnp.asarray(hi)).astype(jnp.float32).reshape(sshape)


def average_bits(params, default: Optional[qconfig.QuantConfig] = None):
  """Element-weighted average code bits over all quantized parameters (jittable).

  Args:
    params: a tree with quantized tensors (Linen params, ``nnx.State`` or module).
    default: the recipe of scales saved without one (see
      :func:`lqjax.tree.quantized_tensors`).

  Returns:
    (average over the model, {tensor path: average of that tensor}).
  """
  total_bits, total_n, per = 0.0, 0, {}
  for t in tree.quantized_tensors(params, default):
    b = group_bits(quant.codes_of(t.p, t.log_scale, t.config), t.log_scale.shape)
    n_group = t.p.size // t.log_scale.size
    layer_bits = jnp.sum(b) * n_group
    per[t.name] = layer_bits / t.p.size
    total_bits, total_n = total_bits + layer_bits, total_n + t.p.size
  avg = total_bits / max(total_n, 1) if total_n else jnp.zeros(())
  return avg, per


@dataclasses.dataclass
class TensorReport:
  path: str
  shape: tuple
  granularity: str  # described by the scale shape
  groups: int
  elements: int
  bits_min: int
  bits_mean: float
  bits_max: int
  code_bytes: int
  overhead_bytes: int
  fp32_bytes: int
  quantized: bool
  rule: Optional[str] = None
  bits: Optional[int] = None
  rounding: Optional[str] = None
  grid: Optional[str] = None

  @property
  def bytes(self) -> int:
    return self.code_bytes + self.overhead_bytes

  @property
  def ratio(self) -> float:
    return self.fp32_bytes / max(self.bytes, 1)


def describe_granularity(granularity: qconfig.Granularity) -> str:
  """The granularity as the recipe asked for it: a name, or ``axes(0,2)``."""
  if isinstance(granularity, str):
    return granularity
  return "axes(" + ",".join(str(a) for a in granularity) + ")"


def group_view(codes: np.ndarray, sshape) -> np.ndarray:
  """Codes as (groups, elements per group), groups in the scale's C order."""
  g = int(np.prod(sshape)) if len(sshape) else 1
  cshape, vshape = qconfig.grouped_shapes(codes.shape, sshape)
  codes = np.reshape(codes, cshape)
  return np.transpose(codes, qconfig.group_permutation(cshape, vshape)).reshape(g, -1)


def model_report(variables, default: Optional[qconfig.QuantConfig] = None):
  """Per-tensor accounting of a model.

  Args:
    variables: every array the model needs (Linen variables: params and
      batch_stats; an ``nnx.State`` or module), quantized tensors with their
      recipes.
    default: the recipe of scales saved without one.

  Returns:
    A list of :class:`TensorReport`, quantized tensors first in path order, then
    every other array at 32 bits.
  """
  rows, done = [], set()
  for t in tree.quantized_tensors(variables, default):
    codes, _ = quant.tensor_codes(t.p, t.log_scale, t.config)
    gv = group_view(codes, t.log_scale.shape)
    gb = code_bits(gv.min(1), gv.max(1))
    n_group = gv.shape[1]
    rows.append(TensorReport(
        path=t.name, shape=tuple(t.p.shape),
        granularity=describe_granularity(t.config.granularity), groups=gv.shape[0],
        elements=int(t.p.size), bits_min=int(gb.min()), bits_mean=float(gb.mean()),
        bits_max=int(gb.max()), code_bytes=int(math.ceil(int((gb * n_group).sum()) / 8)),
        overhead_bytes=gv.shape[0] * GROUP_OVERHEAD_BYTES, fp32_bytes=4 * int(t.p.size),
        quantized=True, rule=t.config.rule, bits=t.config.bits, rounding=t.config.rounding,
        grid=t.config.grid))
    done.update((t.path, t.scale_path))
  for path, (v, _) in tree.flat_leaves(variables).items():
    if path in done:
      continue
    n = int(np.size(v))
    rows.append(TensorReport(
        path="/".join(path), shape=tuple(np.shape(v)), granularity="float", groups=0,
        elements=n, bits_min=32, bits_mean=32.0, bits_max=32, code_bytes=4 * n,
        overhead_bytes=0, fp32_bytes=4 * n, quantized=False))
  return rows


def summarize(rows) -> dict:
  """Totals: fp32 bytes (float model), packed bytes, average bits of quantized weights."""
  q = [r for r in rows if r.quantized]
  weights = [r for r in rows if not r.path.endswith(tree.SCALE_NAME)]
  n_all = sum(r.elements for r in weights)
  fp32 = sum(r.fp32_bytes for r in weights)
  packed = sum(r.bytes for r in rows)
  n_q = sum(r.elements for r in q)
  return {
      "fp32_bytes": int(fp32),
      "packed_bytes_accounted": int(packed),
      "avg_bits": float(sum(r.bits_mean * r.elements for r in q) / n_q) if n_q else 32.0,
      # over every weight, the float ones at 32 bits (what the model is on average)
      "avg_bits_all": float(sum(r.bits_mean * r.elements for r in weights) / n_all)
                      if n_all else 32.0,
      "quantized_bits_per_layer": {r.path: r.bits_mean for r in q},
      "quantized_elements": int(n_q),
      "ratio_accounted": fp32 / max(packed, 1),
  }


def format_table(rows, file_bytes: Optional[int] = None) -> str:
  """The per-tensor table: the recipe as asked (rule, width, granularity) beside what was
  learned (the bits each group's codes need), the totals over the quantized weights and
  over all of them, and, given `file_bytes`, the packed file's real size."""
  head = f"{'tensor':40s} {'shape':>18s} {'rule':>16s} {'granularity':>12s} " \
         f"{'code bits min/mean/max':>22s} {'bytes':>10s} {'ratio':>7s}"
  lines = [head, "-" * len(head)]
  for r in rows:
    bits = f"{r.bits_min}/{r.bits_mean:.2f}/{r.bits_max}"
    rule = "float" if not r.quantized else r.rule + (f"/{r.bits}b" if r.bits else "/free") + (
        f"/{r.grid}" if r.grid not in (None, "midtread") else "")
    lines.append(f"{r.path:40s} {str(r.shape):>18s} {rule:>16s} {r.granularity:>12s} "
                 f"{bits:>22s} {r.bytes:>10d} {r.ratio:>6.1f}x")
  s = summarize(rows)
  lines.append("-" * len(head))
  lines.append(f"{'total (payload)':40s} {'':>18s} {'':>16s} {'':>12s} {s['avg_bits']:>22.2f} "
               f"{s['packed_bytes_accounted']:>10d} {s['ratio_accounted']:>6.1f}x"
               f"   (fp32 {s['fp32_bytes']} bytes)")
  lines.append(f"code bits: what each scale group's codes need (at most the rule's width); "
               f"{s['avg_bits']:.2f} on average over the {s['quantized_elements']} quantized "
               f"weights, {s['avg_bits_all']:.2f} over all weights (float ones at 32)")
  if file_bytes is not None:
    lines.append(f"packed file (lqjax.save): {file_bytes} bytes = payload "
                 f"{s['packed_bytes_accounted']} + header and checksum "
                 f"{file_bytes - s['packed_bytes_accounted']}; "
                 f"{s['fp32_bytes'] / file_bytes:.1f}x smaller than fp32")
  return "\n".join(lines)

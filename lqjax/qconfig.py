"""Configuration types and granularity: the leaf module of lqjax.

Granularity decides which elements of a parameter share one scale. It is data,
not a class hierarchy: :func:`scale_shape` turns a name (or an explicit tuple of
axes) and the parameter's :class:`Layout` (which of its axes are the layer's
inputs and outputs) into the scale's shape. The scale has the parameter's number
of axes; an axis of size 1 is shared by the whole group, an axis of the
parameter's size is kept (one scale per index), and an axis of a size in between
is cut into that many blocks of consecutive elements (``block``).

The layer knows its layout: a Dense kernel is (in, out); a DenseGeneral /
LinearGeneral kernel is (batch..., inputs..., outputs...), for example an
attention query kernel (embed, heads, head_dim) has two output axes and the
output projection (heads, head_dim, embed) two input axes; a Conv kernel is
(spatial..., Cin, Cout); an Embed table (vocab, features) has the vocabulary as
its output axis (a row is one token's vector, and ``attend`` computes one logit
per row). Einsum kernels and registered layers take the default: the last axis
is the output, the one before it the input. Leading axes of a stack of layers
(``nnx.vmap`` over a layer, DenseGeneral's batch axes) always keep their own
scales: each layer of the stack has its own.

==============  =====================  ======================  =====================
granularity     Dense kernel (in, out)  Conv (H, W, Cin, Cout)  q/k/v kernel (in, H, D)
==============  =====================  ======================  =====================
``tensor``      ()                      ()                      ()
``row``         out                     Cout                    H, D (every output)
``channel``     = row                   = row                   = row
``column``      in                      Cin                     in
``spatial``     ValueError              H, W                    ValueError
``head``        ValueError              ValueError              H (one per head)
``block``       in/k blocks x out       Cin/k blocks x Cout     in/k blocks x H x D
``element``     all                     all                     all
tuple           the axes given          the axes given          the axes given
==============  =====================  ======================  =====================

``row`` is a row of W in ``y = W x`` (one output neuron): every output axis is
kept. A bias keeps all of its axes under ``row``. ``head`` keeps the heads axis:
the first output axis of a kernel with two or more of them (q/k/v, (in, H, D)),
else the first input axis of a kernel with two or more inputs (the output
projection, (H, D, out)); a kernel with one input and one output axis has no
heads axis and is refused. ``block`` (with ``QuantConfig.block_size`` k) keeps
the output axes and cuts the flattened axes the layer sums over (its inputs; for
a conv kernel the spatial axes and Cin, the im2col order) into groups of k
consecutive elements (w2g64 of the LLM literature): axes that k does not cut into
whole blocks are refused with one line (nothing is padded). A tuple gives the kept axes of the stored
parameter itself, stack axes included.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional, Sequence, Tuple, Union

Granularity = Union[str, Tuple[int, ...]]

GRANULARITIES = ("tensor", "row", "column", "channel", "spatial", "element", "head", "block")
RULES = ("fixed", "lsq", "ratio", "ratio_lsq")
ROUNDINGS = ("floor", "round")
# Where a fixed-width grid puts its levels, as the offset of Q/s from an integer:
# ``midtread`` s * q (zero is a level; the thesis's grid, and the only one for free bit
# widths, where a one-bin group is pruned); ``midrise`` s * (q + 1/2) (symmetric, no zero:
# at 1 bit the binary {-s/2, +s/2} of BinaryConnect-style weights).
GRIDS = {"midtread": 0.0, "midrise": 0.5}


def grid_offset(grid: str, bits: Optional[int] = None, *, fixed: bool = False) -> float:
  """The offset o of Q/s from the integer code q on `grid` (:data:`GRIDS`).

  Raises ValueError for an unknown name and, unless `fixed` (the width is known to be
  fixed, e.g. when dequantizing codes), for a grid other than midtread with free bits.
  """
  if grid not in GRIDS:
    raise ValueError(f"unknown grid {grid!r}; expected one of {', '.join(GRIDS)}")
  if grid != "midtread" and bits is None and not fixed:
    raise ValueError(f"grid {grid!r} needs fixed bits: free bit widths grow a midtread "
                     f"grid, whose one-bin groups are pruned to zero")
  return GRIDS[grid]


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which axes of a parameter are its layer's inputs and outputs (non-negative axes).

  Axes in neither are the kernel's spatial axes (conv) or, when listed in `stacked`, the
  leading axes of a stack of layers, which always keep their own scales.
  """

  inputs: Tuple[int, ...]
  outputs: Tuple[int, ...]
  stacked: Tuple[int, ...] = ()

  @classmethod
  def default(cls, ndim: int, stacked: int = 0) -> "Layout":
    """The last axis is the output, the one before it the input (Dense, Conv); a 1-axis
    parameter (a bias) is all output. `stacked` leading axes are a stack's."""
    st = tuple(range(stacked))
    if ndim - stacked <= 1:
      return cls((), tuple(range(stacked, ndim)), st)
    return cls((ndim - 2,), (ndim - 1,), st)

  @classmethod
  def of(cls, ndim: int, n_inputs: int, n_outputs: int) -> "Layout":
    """(stack..., inputs..., outputs...): a kernel whose layer declares `n_inputs` input and
    `n_outputs` output axes; leading axes beyond those are a stack's."""
    stacked = ndim - n_inputs - n_outputs
    if stacked < 0:
      raise ValueError(f"a parameter with {ndim} axes cannot have {n_inputs} input and "
                       f"{n_outputs} output axes")
    return cls(tuple(range(stacked, stacked + n_inputs)),
               tuple(range(stacked + n_inputs, ndim)), tuple(range(stacked)))


def _layout(shape, layout: Optional[Layout]) -> Layout:
  ndim = len(shape)
  layout = Layout.default(ndim) if layout is None else layout
  if any(not 0 <= a < ndim for a in layout.inputs + layout.outputs + layout.stacked):
    raise ValueError(f"layout {layout} does not fit a parameter of shape {tuple(shape)}")
  return layout


def heads_axis(shape: Sequence[int], layout: Optional[Layout] = None) -> int:
  """The heads axis of an attention kernel (see the module docstring); ValueError if none."""
  lay = _layout(shape, layout)
  if len(lay.outputs) >= 2:
    return lay.outputs[0]
  if len(lay.inputs) >= 2:
    return lay.inputs[0]
  raise ValueError(
      f"granularity 'head' needs a kernel with a heads axis (an attention projection: "
      f"DenseGeneral/LinearGeneral with features (heads, head_dim), or axis=(-2, -1) for the "
      f"output); this parameter of shape {tuple(shape)} has one input and one output axis")


def kept_axes(shape: Sequence[int], granularity: Granularity,
              layout: Optional[Layout] = None) -> Tuple[int, ...]:
  """Axes of a parameter of `shape` that keep their own scale (``block`` aside).

  Args:
    shape: the parameter's shape.
    granularity: one of :data:`GRANULARITIES` or a tuple of axes (negative
      axes count from the end).
    layout: the layer's input and output axes (default :meth:`Layout.default`).

  Returns:
    The kept axes, sorted, non-negative. For ``block`` the kept axes besides the
    blocked input axes (the outputs and the stack).

  Raises:
    ValueError: unknown name, an axis the shape does not have, or a name that
      needs axes the parameter does not have (``column`` on a bias, ``head``
      on a Dense kernel).
  """
  ndim = len(shape)
  if isinstance(granularity, (tuple, list)):
    axes = []
    for a in granularity:
      if not isinstance(a, int) or not -ndim <= a < ndim:
        raise ValueError(
            f"granularity axis {a!r} does not exist for a parameter of shape "
            f"{tuple(shape)}")
      axes.append(a % ndim)
    if len(set(axes)) != len(axes):
      raise ValueError(f"granularity {tuple(granularity)!r} repeats an axis")
    return tuple(sorted(axes))
  if granularity not in GRANULARITIES:
    raise ValueError(
        f"unknown granularity {granularity!r}; expected one of "
        f"{', '.join(GRANULARITIES)} or a tuple of axes")
  if ndim == 0:
    return ()
  lay = _layout(shape, layout)
  st = lay.stacked
  if granularity == "tensor":
    return st
  if granularity in ("row", "channel", "block"):
    return tuple(sorted(st + lay.outputs))
  if granularity == "element":
    return tuple(range(ndim))
  if granularity == "head":
    return tuple(sorted(st + (heads_axis(shape, lay),)))
  if granularity == "column":
    if not lay.inputs:
      raise ValueError(
          f"granularity 'column' needs a parameter with an input axis (a kernel), got shape "
          f"{tuple(shape)}")
    return tuple(sorted(st + lay.inputs))
  # spatial
  spatial = tuple(a for a in range(ndim) if a not in lay.inputs + lay.outputs + st)
  if not spatial:
    raise ValueError(
        f"granularity 'spatial' needs a parameter with spatial axes (a conv "
        f"kernel), got shape {tuple(shape)}")
  return tuple(sorted(st + spatial))


def _contracted(shape, lay: Layout) -> Tuple[int, ...]:
  """The axes a layer sums over: its inputs, and a conv kernel's spatial axes."""
  return tuple(a for a in range(len(shape)) if a not in lay.outputs + lay.stacked)


def _block_sizes(shape, lay: Layout, k: int) -> dict:
  """Scale sizes of the input axes when their flattened elements (the last input axis
  fastest) are cut into blocks of `k` consecutive elements."""
  out, rest = {}, k
  for a in reversed(_contracted(shape, lay)):
    d = shape[a]
    if rest >= d and rest % d == 0:  # the axis lies inside one block
      out[a], rest = 1, rest // d
    elif rest < d and d % rest == 0:  # the axis holds d / rest blocks
      out[a], rest = d // rest, 1
    else:
      rest = 0
      break
  if rest != 1:
    inputs = " x ".join(str(shape[a]) for a in _contracted(shape, lay))
    raise ValueError(
        f"block_size {k} does not divide the input axes ({inputs}) of a parameter of shape "
        f"{tuple(shape)} into whole blocks; choose a block size that does (blocks are not "
        f"padded)")
  return out


def scale_shape(shape: Sequence[int], granularity: Granularity,
                layout: Optional[Layout] = None, block_size: Optional[int] = None
                ) -> Tuple[int, ...]:
  """Shape of the scale for a parameter of `shape`: reduced axes set to 1, blocked input
  axes to their number of blocks (``block``, with `block_size`)."""
  keep = kept_axes(shape, granularity, layout)
  out = [d if i in keep else 1 for i, d in enumerate(shape)]
  if granularity == "block":
    if block_size is None:
      raise ValueError("granularity 'block' needs block_size")
    lay = _layout(shape, layout)
    if not lay.inputs:
      raise ValueError(f"granularity 'block' needs a parameter with an input axis (a "
                       f"kernel), got shape {tuple(shape)}")
    for a, n in _block_sizes(shape, lay, block_size).items():
      out[a] = n
  return tuple(out)


def config_scale_shape(shape: Sequence[int], config: "QuantConfig",
                       layout: Optional[Layout] = None) -> Tuple[int, ...]:
  """:func:`scale_shape` of a parameter under `config` (its granularity and block size)."""
  return scale_shape(shape, config.granularity, layout, config.block_size)


def grouped_shapes(shape: Sequence[int], sshape: Sequence[int]):
  """(parameter shape, scale shape) with every blocked axis split in two, (blocks, k) and
  (blocks, 1), so that the scale broadcasts against the parameter. Shapes without blocks
  come back unchanged."""
  if len(shape) != len(sshape):
    raise ValueError(f"scale shape {tuple(sshape)} does not fit a parameter of shape "
                     f"{tuple(shape)}")
  p, s = [], []
  for d, e in zip(shape, sshape):
    if e in (1, d):
      p.append(d)
      s.append(e)
    elif e > 0 and d % e == 0:
      p += [e, d // e]
      s += [e, 1]
    else:
      raise ValueError(f"scale shape {tuple(sshape)} does not fit a parameter of shape "
                       f"{tuple(shape)}")
  return tuple(p), tuple(s)


def is_blocked(shape: Sequence[int], sshape: Sequence[int]) -> bool:
  return any(e not in (1, d) for d, e in zip(shape, sshape))


def reduced_axes(shape: Sequence[int], granularity: Granularity,
                 layout: Optional[Layout] = None) -> Tuple[int, ...]:
  """Axes that share one scale (the complement of :func:`kept_axes`)."""
  keep = kept_axes(shape, granularity, layout)
  return tuple(i for i in range(len(shape)) if i not in keep)


def shared_axes(shape: Sequence[int], sshape: Sequence[int]) -> Tuple[int, ...]:
  """Axes along which a scale of shape `sshape` broadcasts against `shape` (same ndim).

  The inverse view of :func:`reduced_axes`, read off an existing scale's shape
  (a size-1 parameter axis counts as kept: sharing it changes nothing).
  """
  return tuple(i for i, (a, b) in enumerate(zip(shape, sshape)) if b == 1 and a != 1)


def group_permutation(shape: Sequence[int], sshape: Sequence[int]) -> Tuple[int, ...]:
  """Axis order that puts the kept axes first and the shared ones last, so that
  ``transpose(x, perm).reshape(groups, -1)`` lists one scale group per row."""
  shared = shared_axes(shape, sshape)
  return tuple(i for i in range(len(shape)) if i not in shared) + shared


def group_size(shape: Sequence[int], granularity: Granularity) -> int:
  """Number of elements that share one scale."""
  return math.prod(shape[i] for i in reduced_axes(shape, granularity))


def parse_granularity(text: str) -> Granularity:
  """Parses a command-line granularity: a name, or comma-separated axes."""
  text = text.strip()
  if text in GRANULARITIES:
    return text
  try:
    return tuple(int(t) for t in text.split(",") if t.strip())
  except ValueError:
    raise ValueError(
        f"unknown granularity {text!r}; expected one of "
        f"{', '.join(GRANULARITIES)} or comma-separated axes like '0,1'"
    ) from None


class _Unset:
  """The default of ``QuantConfig.bits``: "not given" (None is "free", said explicitly)."""

  def __repr__(self):
    return "<bits not given>"


_UNSET = _Unset()
#: Rules whose ``bits`` must be given: a fixed width is what they are used for.
FIXED_WIDTH_RULES = ("fixed", "lsq")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
  """How one parameter is quantized (one nested quantizer module).

  Variants are made with ``dataclasses.replace``.
  """

  # Scale-gradient rule: fixed | lsq | ratio | ratio_lsq (see lqjax.quant).
  rule: str = "ratio"
  # lambda of the ratio rules: groups with r < threshold get coarser grids.
  threshold: float = 0.2
  # floor (thesis default) or round (round-to-nearest).
  rounding: str = "floor"
  # Clip codes to the signed b-bit range; None leaves the bit width free. The rules
  # ``fixed`` and ``lsq`` need it given (an int, or None said explicitly).
  bits: Optional[int] = _UNSET  # type: ignore[assignment]
  # midtread (levels s * q) | midrise (s * (q + 1/2); needs bits): see GRIDS.
  grid: str = "midtread"
  # Who shares a scale (see the module docstring).
  granularity: Granularity = "tensor"
  # Elements per group along the input axes, with granularity "block" only (32, 64 and 128
  # are the LLM literature's; any divisor of the input axes is accepted).
  block_size: Optional[int] = None
  # Initial bit budget over the group's range, for free bit widths.
  init_bits: int = 8
  # Weight of the LSQ term in the ratio_lsq hybrid rule.
  lsq_weight: float = 1.0
  # lambda_hi of the ratio rules: r above it makes the grid finer; None: never.
  relax_threshold: Optional[float] = None

  def __post_init__(self):
    if self.bits is _UNSET:
      if self.rule in FIXED_WIDTH_RULES:
        raise ValueError(f"rule {self.rule!r} needs bits (1..16): it learns or keeps a step for "
                         f"a fixed code range; pass bits=None explicitly to leave the width free")
      object.__setattr__(self, "bits", None)
    for name in ("bits", "init_bits", "block_size"):
      v = getattr(self, name)
      if v is None and name in ("bits", "block_size"):
        continue
      if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{name} must be a whole number, got {v!r}")
      object.__setattr__(self, name, int(v))
    for name in ("threshold", "lsq_weight", "relax_threshold"):
      v = getattr(self, name)
      if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
        raise ValueError(f"{name} must be a number, got {v!r}")
    if self.rule not in RULES:
      raise ValueError(f"unknown rule {self.rule!r}; expected one of {', '.join(RULES)}")
    if self.rounding not in ROUNDINGS:
      raise ValueError(
          f"unknown rounding {self.rounding!r}; expected one of {', '.join(ROUNDINGS)}")
    if not math.isfinite(self.threshold) or self.threshold < 0:
      raise ValueError(f"threshold must be a finite number >= 0, got {self.threshold}")
    if self.bits is not None and not 1 <= self.bits <= 16:
      raise ValueError(f"bits must be in 1..16 or None, got {self.bits}")
    grid_offset(self.grid, self.bits)
    if not 1 <= self.init_bits <= 16:
      raise ValueError(f"init_bits must be in 1..16, got {self.init_bits}")
    if not math.isfinite(self.lsq_weight) or self.lsq_weight < 0:
      raise ValueError(f"lsq_weight must be >= 0, got {self.lsq_weight}")
    if self.relax_threshold is not None and not self.relax_threshold >= self.threshold:
      raise ValueError(f"relax_threshold ({self.relax_threshold}) must be >= threshold "
                       f"({self.threshold})")
    if isinstance(self.granularity, list):
      object.__setattr__(self, "granularity", tuple(self.granularity))
    if isinstance(self.granularity, str) and self.granularity not in GRANULARITIES:
      raise ValueError(
          f"unknown granularity {self.granularity!r}; expected one of "
          f"{', '.join(GRANULARITIES)} or a tuple of axes")
    if self.granularity == "block":
      if self.block_size is None:
        raise ValueError("granularity 'block' needs block_size (elements per group along the "
                         "input axes, e.g. 32, 64 or 128)")
      if self.block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {self.block_size}")
    elif self.block_size is not None:
      raise ValueError(f"block_size is for granularity 'block' only, not "
                       f"{self.granularity!r}")

  @property
  def offset(self) -> float:
    """Q / s - q: 0 on the midtread grid, 1/2 on the midrise grid."""
    return GRIDS[self.grid]

  def to_json(self) -> dict:
    """A JSON-ready dict (a tuple granularity becomes a list)."""
    d = dataclasses.asdict(self)
    if d["grid"] == "midtread":  # defaults are left out: files stay readable where
      del d["grid"]              # the field is unknown
    if d["block_size"] is None:
      del d["block_size"]
    if isinstance(d["granularity"], tuple):
      d["granularity"] = list(d["granularity"])
    return d

  @classmethod
  def from_json(cls, d: dict) -> "QuantConfig":
    """Inverse of :meth:`to_json`; unknown keys are an error, missing ones default."""
    d = dict(d)
    if isinstance(d.get("granularity"), list):
      d["granularity"] = tuple(d["granularity"])
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"unknown QuantConfig fields {', '.join(unknown)}")
    return cls(**d)

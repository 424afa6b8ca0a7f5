"""Configuration types and granularity: the leaf module of lqjax.

Granularity decides which elements of a parameter share one scale. It is data,
not a class hierarchy: one function, :func:`kept_axes`, turns a name (or an
explicit tuple of axes) into the axes that keep their own scale; every other
axis is reduced (shares the scale). The scale's shape is the parameter's shape
with the reduced axes set to 1, so it broadcasts against the parameter.

Axes by parameter kind (Flax layouts):

==============  =====================  =====================  ==============
granularity     Dense kernel (in, out)  Conv kernel            bias (out,)
                                        (H, W, Cin, Cout)
==============  =====================  =====================  ==============
``tensor``      ()                      ()                     ()
``row``         (1,) = out              (3,) = Cout            (0,)
``channel``     (1,) = out              (3,) = Cout            (0,)
``column``      (0,) = in               (2,) = Cin             ValueError
``spatial``     ValueError              (0, 1) = H, W          ValueError
``element``     (0, 1)                  (0, 1, 2, 3)           (0,)
tuple           the axes given          the axes given         the axes given
==============  =====================  =====================  ==============

``row`` is a row of W in ``y = W x`` (one output neuron); with Flax's (in, out)
kernel layout that is a column of the stored array, i.e. the last axis. For any
parameter, ``row``/``channel`` keep the last axis, ``column`` keeps the
second-to-last, and ``spatial`` keeps all axes before the last two.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional, Sequence, Tuple, Union

Granularity = Union[str, Tuple[int, ...]]

GRANULARITIES = ("tensor", "row", "column", "channel", "spatial", "element")
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


def kept_axes(shape: Sequence[int], granularity: Granularity) -> Tuple[int, ...]:
  """Axes of a parameter of `shape` that keep their own scale.

  Args:
    shape: the parameter's shape.
    granularity: one of :data:`GRANULARITIES` or a tuple of axes (negative
      axes count from the end).

  Returns:
    The kept axes, sorted, non-negative.

  Raises:
    ValueError: unknown name, an axis the shape does not have, or a name that
      needs more axes than the parameter has (``column`` on a bias).
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
  if granularity == "tensor" or ndim == 0:
    return ()
  if granularity in ("row", "channel"):
    return (ndim - 1,)
  if granularity == "element":
    return tuple(range(ndim))
  if granularity == "column":
    if ndim < 2:
      raise ValueError(
          f"granularity 'column' needs a parameter with >= 2 axes, got shape "
          f"{tuple(shape)}")
    return (ndim - 2,)
  # spatial
  if ndim < 3:
    raise ValueError(
        f"granularity 'spatial' needs a parameter with >= 3 axes (a conv "
        f"kernel), got shape {tuple(shape)}")
  return tuple(range(ndim - 2))


def scale_shape(shape: Sequence[int], granularity: Granularity) -> Tuple[int, ...]:
  """Shape of the scale for a parameter of `shape`: reduced axes set to 1."""
  keep = kept_axes(shape, granularity)
  return tuple(d if i in keep else 1 for i, d in enumerate(shape))


def reduced_axes(shape: Sequence[int], granularity: Granularity) -> Tuple[int, ...]:
  """Axes that share one scale (the complement of :func:`kept_axes`)."""
  keep = kept_axes(shape, granularity)
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
    for name in ("bits", "init_bits"):
      v = getattr(self, name)
      if v is None and name == "bits":
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

  @property
  def offset(self) -> float:
    """Q / s - q: 0 on the midtread grid, 1/2 on the midrise grid."""
    return GRIDS[self.grid]

  def to_json(self) -> dict:
    """A JSON-ready dict (a tuple granularity becomes a list)."""
    d = dataclasses.asdict(self)
    if d["grid"] == "midtread":  # the default is left out: files stay readable where
      del d["grid"]              # the field is unknown
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

"""Quantized tensors in any parameter tree: the scale carries its tensor's recipe.

A quantized parameter ``P`` at path ``.../kernel`` has its log scale at
``.../kernel_quant/log_scale``. The log scale leaf carries the tensor's
:class:`~lqjax.qconfig.QuantConfig` (rule, rounding, bits, granularity) as static
metadata, so every later stage (accounting, penalties, the packed file, ONNX,
reports) reads each tensor's own recipe from the tree alone:

* Linen: the leaf is a :class:`QuantScale` box (a ``flax.linen`` ``AxisMetadata``
  like ``nn.Partitioned``). ``Module.param`` unboxes it, so model code sees a
  plain array; ``jax.grad``, optax and orbax see a pytree node whose one child
  is the array and whose config is static.
* NNX: the leaf is an ``nnx.Param`` subclass (``lqjax.nnx_quant.ScaleParam``)
  with the config as Variable metadata; ``nnx.state(model)`` carries it.

:func:`quantized_tensors` reads either (a Linen variables dict, an ``nnx.State``,
an ``nnx.Module``) and returns one :class:`QTensor` per quantized parameter;
:func:`flat_arrays` gives every leaf by path.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import jax
from flax import struct
from flax.linen import meta

from lqjax import qconfig

QUANT_SUFFIX = "_quant"
SCALE_NAME = "log_scale"
# a layer's input quantizer (lqjax.inputs): .../input_quant/log_scale and .../zero_point
INPUT_QUANT = "input" + QUANT_SUFFIX
ZERO_NAME = "zero_point"

Path = Tuple[str, ...]


class QuantScale(meta.Partitioned):
  """A Linen log-scale leaf boxed with its tensor's config (static metadata).

  It is a ``flax.linen`` ``Partitioned`` box: where its weight is partitioned
  (``nn.with_partitioning``), ``names`` are the weight's names on the axes the scale
  keeps, None on the axes it reduces (:func:`scale_names`), so ``nn.get_partition_spec``
  and ``nn.logical_to_mesh_sharding`` give the scales their weights' sharding. An
  unpartitioned weight's scale has ``names=None``: it is replicated, and stacking by
  ``nn.scan``/``nn.vmap`` needs no partition name.
  """

  value: Any
  names: Any = struct.field(pytree_node=False, default=None)
  mesh: Any = struct.field(pytree_node=False, default=None)
  config: qconfig.QuantConfig = struct.field(pytree_node=False, default=None)
  # a weight under nn.with_logical_partitioning: names are logical, mapped by these rules
  # (or the nn.logical_axis_rules in force)
  logical: bool = struct.field(pytree_node=False, default=False)
  rules: Any = struct.field(pytree_node=False, default=None)

  def __eq__(self, other):  # value arrays compare elementwise: compare by identity instead
    return self is other

  __hash__ = object.__hash__

  def unbox(self, apply_constraint=True):
    if self.names is None:
      return self.value
    if self.logical:
      if apply_constraint and (meta.global_mesh_defined() or self.mesh is not None):
        from flax.linen import spmd
        return spmd.with_logical_constraint(self.value, self.get_partition_spec(),
                                            rules=self.rules, mesh=self.mesh)
      return self.value
    return super().unbox(apply_constraint)

  def get_partition_spec(self) -> jax.sharding.PartitionSpec:
    if self.names is None:
      return jax.sharding.PartitionSpec()
    return super().get_partition_spec()

  def add_axis(self, index, params):  # nn.scan / nn.vmap stack the value; the recipe stays
    if self.names is None:
      return self
    if meta.PARTITION_NAME not in params:
      names = list(self.names)
      names.insert(index, None)
      return self.replace(names=tuple(names))
    return super().add_axis(index, params)

  def remove_axis(self, index, params):
    if self.names is None:
      return self
    if meta.PARTITION_NAME not in params:
      names = list(self.names)
      names.pop(index)
      return self.replace(names=tuple(names))
    return super().remove_axis(index, params)


def scale_names(weight_names, weight_shape, scale_shape):
  """The partitioning of a log scale from its weight's: the weight's axis name where the
  scale keeps that axis whole, None where it reduces it (to one scale, or to blocks);
  None for an unpartitioned weight."""
  if weight_names is None or all(n is None for n in weight_names):
    return None
  return tuple(n if s == w else None
               for n, w, s in zip(weight_names, weight_shape, scale_shape))


@dataclasses.dataclass(frozen=True)
class QTensor:
  """One quantized parameter: its path, latent P, log scale and recipe."""

  path: Path
  p: jax.Array
  log_scale: jax.Array
  config: qconfig.QuantConfig

  @property
  def name(self) -> str:
    return "/".join(self.path)

  @property
  def scale_path(self) -> Path:
    return scale_path(self.path)


def scale_path(path: Path) -> Path:
  """``.../kernel`` -> ``.../kernel_quant/log_scale``."""
  return tuple(path[:-1]) + (path[-1] + QUANT_SUFFIX, SCALE_NAME)


def _key_str(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _is_box(x) -> bool:
  return isinstance(x, QuantScale) or _is_variable(x)


def _is_variable(x) -> bool:
  try:
    from flax import nnx
  except ImportError:  # pragma: no cover
    return False
  return isinstance(x, nnx.Variable)


def _variable_config(var) -> Optional[qconfig.QuantConfig]:
  cfg = var.get_metadata().get("config") if hasattr(var, "get_metadata") else None
  return cfg if isinstance(cfg, qconfig.QuantConfig) else None


def as_tree(tree):
  """An ``nnx.Module``'s state; any other tree as it is."""
  try:
    from flax import nnx
    if isinstance(tree, nnx.Module):
      return nnx.state(tree)
  except ImportError:  # pragma: no cover
    pass
  return tree


def leaves(tree):
  """``([(path, leaf)], treedef)`` of `tree`, with boxes and NNX Variables kept whole.

  `path` is a tuple of strings. :func:`leaf_array` reads a leaf's array and
  :func:`with_array` makes a leaf of the same kind that holds another, so that
  ``jax.tree_util.tree_unflatten(treedef, ...)`` rebuilds a tree of the same kind.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(as_tree(tree), is_leaf=_is_box)
  out = []
  for kp, leaf in flat:
    path = tuple(_key_str(k) for k in kp)
    if path and path[-1] == "value" and not _is_box(leaf):  # a Variable flattened as a node
      path = path[:-1]
    out.append((path, leaf))
  return out, treedef


def leaf_array(leaf):
  """The array a leaf of :func:`leaves` holds."""
  if isinstance(leaf, QuantScale):
    return leaf.value
  return leaf.get_value() if _is_variable(leaf) else leaf


def with_array(leaf, array):
  """A leaf of the same kind as `leaf` (box, Variable or array) that holds `array`."""
  if isinstance(leaf, QuantScale):
    return leaf.replace(value=array)
  if _is_variable(leaf):
    var = leaf.copy()
    var.set_value(array)
    return var
  return array


def flat_leaves(tree) -> Dict[Path, Tuple[Any, Optional[qconfig.QuantConfig]]]:
  """``{path: (array, config or None)}`` of every array leaf of `tree`.

  `tree` is a Linen variables/params dict, an ``nnx.State`` or an ``nnx.Module``.
  The config is set on log-scale leaves (boxed or NNX metadata) only.
  """
  out = {}
  for path, leaf in leaves(tree)[0]:
    cfg = leaf.config if isinstance(leaf, QuantScale) else (
        _variable_config(leaf) if _is_variable(leaf) else None)
    out[path] = (leaf_array(leaf), cfg)
  return out


def quantized_tensors(tree, default: Optional[qconfig.QuantConfig] = None) -> list:
  """One :class:`QTensor` per quantized parameter of `tree`, in path order.

  Args:
    tree: Linen variables or params (with :class:`QuantScale` boxes), an
      ``nnx.State`` or an ``nnx.Module``.
    default: the recipe of log scales that carry none (a tree saved before
      configs travelled with tensors); None makes such a tree an error.

  Raises:
    ValueError: a log scale without a config and no `default`.
  """
  flat = flat_leaves(tree)
  out = []
  for path in sorted(flat):
    if len(path) < 2 or path[-1] != SCALE_NAME or not path[-2].endswith(QUANT_SUFFIX):
      continue
    p_path = path[:-2] + (path[-2][: -len(QUANT_SUFFIX)],)
    if p_path not in flat:
      continue
    log_scale, cfg = flat[path]
    if cfg is None:
      if default is None:
        raise ValueError(f"{'/'.join(path)}: a log scale without its QuantConfig (quantize the "
                         f"model with lqjax.quantize, or pass default=)")
      cfg = default
    out.append(QTensor(p_path, flat[p_path][0], log_scale, cfg))
  return out


def replace_arrays(tree, arrays: Dict[Path, Any]):
  """`tree` (or an ``nnx.Module``'s state) with the leaves at `arrays`' paths holding its
  arrays, each leaf kept of its kind (box, Variable or array)."""
  flat, treedef = leaves(tree)
  missing = set(arrays) - {path for path, _ in flat}
  if missing:
    raise KeyError(f"no leaf at {', '.join('/'.join(p) for p in sorted(missing))}")
  return jax.tree_util.tree_unflatten(
      treedef, [with_array(leaf, arrays[path]) if path in arrays else leaf
                for path, leaf in flat])


def is_scale_path(path) -> bool:
  """Whether a key path (strings or jax key entries) leads to a log scale, or to an input
  quantizer's offset (trained with the scales)."""
  keys = [_key_str(k) for k in path]
  if keys and keys[-1] == "value":  # an NNX Variable flattened as a node
    keys = keys[:-1]
  return SCALE_NAME in keys or keys[-2:] == [INPUT_QUANT, ZERO_NAME]


def unbox(tree):
  """`tree` with every :class:`QuantScale` box replaced by its array."""
  return jax.tree_util.tree_map(lambda x: x.value if isinstance(x, QuantScale) else x, tree,
                                is_leaf=lambda x: isinstance(x, QuantScale))



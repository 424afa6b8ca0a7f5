"""Rules that choose, by module path, which parameters get a learned quantizer.

``lqjax.quantize(model, rules)`` (:mod:`lqjax.interception`) quantizes an unchanged Linen or NNX model: each
module is matched against the rules in order by its path (``"/"``-joined names,
for example ``"stage1_block2/conv1"`` or ``"layers/0/linear"``) with
``re.fullmatch``; the **first** rule that matches decides:

* ``config=None``: the module stays float;
* otherwise the module's parameters named in ``params`` (kernels and embeddings
  by default) get ``config``, and its bias gets ``bias`` when that is set (biases
  stay float by default).

Supported layers (:data:`LINEN_LAYERS`, :data:`NNX_LAYERS`): Dense,
DenseGeneral, Conv (depthwise too), ConvTranspose, Embed, Einsum, and
attention through its projections. Norm layers always stay float. A rule that
matches another module that owns a parameter it names is an error (one line
naming the module and its type), and so is a rule that matches no module
path at all (checked when the Linen model is initialised, and when an NNX model
is quantized): a silent no-op rule is how a user ends up with a float layer they
believe quantized.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence, Tuple

from lqjax import types

DEFAULT_PARAMS = ("kernel", "embedding")


class QuantizeError(ValueError):
  """A rule set that cannot be applied to a model (one line, names the module)."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """Quantize the modules whose path matches `module_path` (``re.fullmatch``).

  Attributes:
    module_path: a regular expression over the ``/``-joined module path; the
      default matches every module.
    config: the weights' recipe; None keeps the matched modules float.
    params: parameter names that get `config` (default: ``kernel``, ``embedding``).
    bias: the biases' recipe; None (default) keeps biases float.
  """

  module_path: str = ".*"
  config: Optional[types.QuantConfig] = types.QuantConfig()
  params: Tuple[str, ...] = DEFAULT_PARAMS
  bias: Optional[types.QuantConfig] = None

  def __post_init__(self):
    try:
      re.compile(self.module_path)
    except re.error as e:
      raise QuantizeError(f"Rule module_path {self.module_path!r} is not a regular expression: "
                          f"{e}") from None
    if isinstance(self.params, str):
      object.__setattr__(self, "params", (self.params,))
    object.__setattr__(self, "params", tuple(self.params))
    for name, cfg in (("config", self.config), ("bias", self.bias)):
      if cfg is not None and not isinstance(cfg, types.QuantConfig):
        raise QuantizeError(f"Rule {name} must be a lqjax.QuantConfig or None, got "
                            f"{type(cfg).__name__}")

  def configs(self) -> dict:
    """``{parameter name: QuantConfig}`` that this rule gives a matched module."""
    if self.config is None:
      return {}
    out = {name: self.config for name in self.params}
    if self.bias is not None:
      out["bias"] = self.bias
    return out


def as_rules(rules) -> Tuple[Rule, ...]:
  """Normalises `rules` (None, one Rule or a sequence) to a tuple of Rules."""
  if rules is None:
    return (Rule(),)
  if isinstance(rules, Rule):
    return (rules,)
  rules = tuple(rules)
  for r in rules:
    if not isinstance(r, Rule):
      raise QuantizeError(f"rules must be lqjax.Rule objects, got {type(r).__name__}")
  if not rules:
    raise QuantizeError("rules is empty: give at least one lqjax.Rule")
  return rules


class Matcher:
  """First-match lookup of module paths, remembering which rules matched something."""

  def __init__(self, rules: Sequence[Rule]):
    self.rules = tuple(rules)
    self.matched = [False] * len(self.rules)

  def match(self, path: str) -> Optional[Rule]:
    first = None
    for i, r in enumerate(self.rules):
      if re.fullmatch(r.module_path, path):
        self.matched[i] = True
        if first is None:
          first = r
    return first

  def check_all_matched(self):
    for i, (r, hit) in enumerate(zip(self.rules, self.matched)):
      if not hit:
        raise QuantizeError(f"lqjax.quantize: rule {i} (module_path={r.module_path!r}) matches "
                            f"no module of the model")


def join_path(path) -> str:
  return "/".join(str(p) for p in path)


def unsupported(path: str, layer_type: type, pname: str, supported) -> QuantizeError:
  names = ", ".join(sorted({c.__name__ for c in supported}))
  return QuantizeError(
      f"lqjax.quantize: module {path or '<root>'!r} is a {layer_type.__name__}, which lqjax does "
      f"not quantize (its parameter {pname!r} matched a rule); supported: {names}. Keep it float "
      f"with Rule(module_path={path!r}, config=None) placed before the rule")


def tensor_error(path: str, e: Exception) -> QuantizeError:
  return QuantizeError(f"lqjax.quantize: {path}: {e}")

"""Rules that choose, by module path, which parameters get a learned quantizer.

``lqjax.quantize(model, rules)`` (:mod:`lqjax.interception`) quantizes an unchanged Linen or NNX model: each
module is matched against the rules in order by its path (``"/"``-joined names,
for example ``"stage1_block2/conv1"`` or ``"layers/0/linear"``) with
``re.fullmatch``; the **first** rule that matches decides:

* ``config=None``: the module stays float;
* otherwise the module's parameters named in ``params`` (kernels and embeddings
  by default) get ``config``, and its bias gets ``bias`` when that is set (biases
  stay float by default);
* ``inputs`` (a :class:`~lqjax.qconfig.QuantConfig`, default None) also quantizes the
  input of each matched Dense, DenseGeneral, Conv, ConvTranspose or Einsum layer with a
  learned scale and offset (:mod:`lqjax.inputs`); ``config=None`` with ``inputs`` set
  quantizes the inputs alone.

Supported layers (:data:`LINEN_LAYERS`, :data:`NNX_LAYERS`): Dense,
DenseGeneral, Conv (depthwise too), ConvTranspose, Embed, Einsum, and
attention through its projections. Norm layers always stay float. A rule that
matches another module that owns a parameter it names is an error (one line
naming the module and its type). So is each silent no-op rule, checked when the
Linen model is initialised and when an NNX model is quantized: a rule that
matches no module path, a rule shadowed by an earlier one (it matches modules, but
an earlier rule comes first on every one of them), and a rule whose modules have
parameters, but none of those it names. A silent no-op rule is how a user ends up with a
float layer they believe quantized.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Optional, Sequence, Tuple

from lqjax import inputs as inputs_lib, qconfig

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
    inputs: the recipe of the matched layers' inputs (:mod:`lqjax.inputs`: rule ``lsq``
      or ``fixed``, bits given, one scale per tensor); None (default) keeps them float.
  """

  module_path: str = ".*"
  config: Optional[qconfig.QuantConfig] = qconfig.QuantConfig()
  params: Tuple[str, ...] = DEFAULT_PARAMS
  bias: Optional[qconfig.QuantConfig] = None
  inputs: Optional[qconfig.QuantConfig] = None

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
      if cfg is not None and not isinstance(cfg, qconfig.QuantConfig):
        raise QuantizeError(f"Rule {name} must be a lqjax.QuantConfig or None, got "
                            f"{type(cfg).__name__}")
    if self.inputs is not None:
      try:
        inputs_lib.check_config(self.inputs)
      except ValueError as e:
        raise QuantizeError(f"Rule {self.module_path!r}: {e}") from None

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
  """First-match lookup of module paths, remembering what each rule matched and decided.

  After the model is walked, :meth:`check` refuses the three silent no-op rules: a rule
  that matches no module, one whose every module an earlier rule decides first (shadowed),
  and one whose modules have none of the parameters it names (``params=("kernal",)``).
  """

  def __init__(self, rules: Sequence[Rule]):
    self.rules = tuple(rules)
    self.matched = [[] for _ in self.rules]   # module paths each rule matches
    self.decided = [[] for _ in self.rules]   # module paths where it is the first match
    self.owner = {}                           # module path -> index of the deciding rule
    self.found = [set() for _ in self.rules]  # parameter names of the modules it decides
    self.fed = [False for _ in self.rules]    # whether it quantizes some module's input
    self.paths = []                           # every module path walked, in order

  def match(self, path: str) -> Optional[Rule]:
    if path not in self.paths:
      self.paths.append(path)
    first = None
    for i, r in enumerate(self.rules):
      if re.fullmatch(r.module_path, path):
        self.matched[i].append(path)
        if first is None:
          first = i
    if first is None:
      return None
    self.decided[first].append(path)
    self.owner[path] = first
    return self.rules[first]

  def saw_param(self, module_path: str, name: str):
    """Records that the module at `module_path` has a parameter `name`."""
    i = self.owner.get(module_path)
    if i is not None:
      self.found[i].add(name)

  def saw_inputs(self, module_path: str):
    """Records that the deciding rule's ``inputs`` quantize the input of `module_path`."""
    i = self.owner.get(module_path)
    if i is not None:
      self.fed[i] = True

  def _suggest(self, rule: Rule) -> str:
    """The closest module paths to a rule that matched none, and how many there are."""
    paths = [p for p in self.paths if p]
    close = difflib.get_close_matches(rule.module_path, paths, n=3, cutoff=0.3)
    listed = close or paths[:6]
    return (f"{'closest' if close else 'its modules include'}: "
            f"{', '.join(repr(p) for p in listed) or 'none'} ({len(paths)} module paths; "
            f"Flax names unnamed layers Dense_0, Dense_1, ... and nn.Sequential's layers_0, ...)")

  def check(self):
    for i, r in enumerate(self.rules):
      what = f"lqjax.quantize: rule {i} (module_path={r.module_path!r})"
      if not self.matched[i]:
        raise QuantizeError(f"{what} matches no module of the model; {self._suggest(r)}")
      if not self.decided[i]:
        j = self.owner[self.matched[i][0]]
        raise QuantizeError(
            f"{what} is shadowed: rule {j} (module_path={self.rules[j].module_path!r}) comes "
            f"first on every module it matches ({', '.join(self.matched[i][:3])}); put rule {i} "
            f"before rule {j}, or remove it")
      # modules with parameters, none of them named by the rule (a typo such as "kernal");
      # a catch-all rule left only parameterless containers by earlier rules is fine
      names = set(r.configs())
      if names and self.found[i] and not names & self.found[i]:
        have = sorted(self.found[i])
        raise QuantizeError(
            f"{what} names parameters {', '.join(sorted(names))}, which none of its modules "
            f"({', '.join(self.decided[i][:3])}{', ...' if len(self.decided[i]) > 3 else ''}) "
            f"has; they have {', '.join(have)}")
      if r.inputs is not None and not self.fed[i]:
        mods = ", ".join(self.decided[i][:3]) + (", ..." if len(self.decided[i]) > 3 else "")
        raise QuantizeError(
            f"{what} has inputs=, but none of its modules ({mods}) has an input to quantize "
            f"(an Embed's input is token ids; norms and containers take none): select the "
            f"Dense, Conv or Einsum layers with the rule, or drop inputs=")



def join_path(path) -> str:
  return "/".join(str(p) for p in path)


#: Layer types registered by :func:`register_layer` (any Linen or NNX module class).
REGISTERED = []


def register_layer(cls: type) -> type:
  """Lets rules quantize the parameters of `cls` (your own layer) with any granularity.

  ``row``, ``channel`` and ``column`` then mean the parameter's last and second-to-last
  axis, as for Flax's kernels (see :mod:`lqjax.qconfig`): register a layer whose kernels are
  laid out so. Usable as a class decorator; returns `cls`.
  """
  if not isinstance(cls, type):
    raise QuantizeError(f"register_layer takes a module class, got {type(cls).__name__}")
  if cls not in REGISTERED:
    REGISTERED.append(cls)
  return cls


def supports(module, cfg: qconfig.QuantConfig, builtin) -> bool:
  """Whether a rule's `cfg` may quantize a parameter of `module`: a layer lqjax knows
  (`builtin`) or one registered (:func:`register_layer`), or any module when the rule
  gives its axes explicitly (a tuple granularity: it says itself which axes keep a scale,
  ``()`` for one scale over the tensor)."""
  return (isinstance(module, builtin) or isinstance(module, tuple(REGISTERED))
          or not isinstance(cfg.granularity, str))


def unsupported(path: str, layer_type: type, pname: str, supported) -> QuantizeError:
  names = ", ".join(sorted({c.__name__ for c in supported}))
  return QuantizeError(
      f"lqjax.quantize: module {path or '<root>'!r} is a {layer_type.__name__}, whose "
      f"parameter {pname!r} matched a rule; lqjax knows the layout of {names}. To quantize "
      f"it, give the rule explicit axes (granularity=(-1,) keeps the last axis, () shares one "
      f"scale) or call lqjax.register_layer({layer_type.__name__}); to keep it float, put "
      f"Rule(module_path={path!r}, config=None) before the rule")


def tensor_error(path: str, e: Exception) -> QuantizeError:
  return QuantizeError(f"lqjax.quantize: {path}: {e}")

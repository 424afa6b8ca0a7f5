"""The library stands alone: lqjax imports nothing of the application, and its modules'
imports flow one way (no cycles, lazy imports included)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _imports(package: str):
  mods = {p.stem: p for p in (ROOT / package).glob("*.py")}
  graph, foreign = {}, {}
  for name, path in mods.items():
    deps, other = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module:
        top, _, sub = node.module.partition(".")
        if top == package:
          deps |= {sub.split(".")[0]} if sub else {a.name for a in node.names if a.name in mods}
        other.add(top)
      elif isinstance(node, ast.Import):
        for a in node.names:
          top, _, sub = a.name.partition(".")
          if top == package and sub:
            deps.add(sub.split(".")[0])
          other.add(top)
    graph[name], foreign[name] = deps - {name}, other
  return graph, foreign


def _cycle(graph):
  def visit(n, path):
    for d in graph.get(n, ()):
      if d in path:
        return path[path.index(d):] + [d]
      found = visit(d, path + [d])
      if found:
        return found
    return None
  for n in graph:
    if n != "__init__":
      found = visit(n, [n])
      if found:
        return found
  return None


def test_the_library_imports_nothing_of_the_application():
  _, foreign = _imports("lqjax")
  for name, tops in foreign.items():
    assert not tops & {"lqlab", "experiments", "scripts", "benchmarks", "absl"}, (name, tops)


def test_no_import_cycles():
  for package in ("lqjax", "lqlab"):
    graph, _ = _imports(package)
    assert _cycle(graph) is None, (package, _cycle(graph))


def _core_dependencies(extra=None):
  """The import names of pyproject.toml's core dependencies, or of one extra's."""
  import re
  import tomllib
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  deps = project["optional-dependencies"][extra] if extra else project["dependencies"]
  return {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].replace("-", "_") for d in deps}


def test_the_library_imports_only_its_core_dependencies():
  """Every module under lqjax/, lazy imports included, imports the standard library, lqjax
  and the core dependencies of pyproject.toml; only onnx_export may import its extra."""
  import sys
  allowed = _core_dependencies() | set(sys.stdlib_module_names) | {"lqjax"}
  assert allowed >= {"jax", "flax", "optax", "numpy", "zstandard"}
  _, foreign = _imports("lqjax")
  export_extra = _core_dependencies("export")
  assert export_extra >= {"onnx", "onnxruntime", "jax2onnx", "onnx_ir", "ml_dtypes"}
  for name, tops in foreign.items():
    extra = tops - allowed - (export_extra if name == "onnx_export" else set())
    assert not extra, f"lqjax/{name}.py imports {sorted(extra)}, not core dependencies"


_PATH = None


def _named_paths(text):
  """(path, name) pairs: repository paths a text names, and the name after ``path.py:``."""
  import re
  global _PATH
  _PATH = _PATH or re.compile(
      r"(?<![\w/.-])((?:lqjax|lqlab|scripts|benchmarks|experiments|examples|sweeps|tests|docs|"
      r"results|notebooks)/[\w./<>*-]*[\w>*])(?:`?:\s*`?([A-Za-z_]\w*))?")
  for m in _PATH.finditer(text):
    yield m.group(1), m.group(2)


def test_every_repository_path_the_docs_name_exists():
  """README, docs and the modules' docstrings name files that exist (a <placeholder>
  matches any name), and a ``file.py: name`` reference names something in that file."""
  import glob
  import re
  texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
  for folder in ("lqjax", "lqlab", "scripts", "benchmarks", "experiments", "examples"):
    texts += sorted((ROOT / folder).glob("*.py"))
  missing = []
  for f in texts:
    for path, name in _named_paths(f.read_text()):
      pattern = re.sub(r"<[^>]*>", "*", path)
      hits = glob.glob(str(ROOT / pattern)) if "*" in pattern else (
          [str(ROOT / pattern)] if (ROOT / pattern).exists() else [])
      if not hits and not path.endswith("_"):  # an f-string's fragment (docs/bench_{...})
        missing.append(f"{f.relative_to(ROOT)}: {path}")
      elif name and path.endswith(".py") and not (any if "*" in pattern else all)(
          re.search(rf"\b{name}\b", pathlib.Path(h).read_text()) for h in hits):
        missing.append(f"{f.relative_to(ROOT)}: {path}: {name}")
  assert not missing, missing


def test_the_public_surface_is_all_and_only_all():
  import lqjax
  assert all(hasattr(lqjax, n) for n in lqjax.__all__)
  for internal in ("init_scale", "scale_from_log", "format_table", "kept_axes", "QuantScale",
                   "Quantizer"):
    assert internal not in lqjax.__all__ and not hasattr(lqjax, internal), internal
  from lqjax import compress, qconfig, quant, tree
  assert all((quant.init_scale, quant.scale_from_log, qconfig.kept_axes, tree.QuantScale))
  assert {lqjax.CODEC_FIXED, lqjax.CODEC_ZSTD} == {compress.CODEC_FIXED, compress.CODEC_ZSTD}

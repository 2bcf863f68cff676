"""The import graph of ``jaxrec`` and ``pallas_kernels``: no cycle between modules, the one-way
layering of DESIGN.md, and no module reaching for another's private names.

Dependencies point one way::

  experiments -> train, inference, linearize -> models -> layers -> ops, sharding -> pallas_kernels

``pallas_kernels`` imports nothing from ``jaxrec``. ``sharding`` (the mesh and its logical-axis
rules) and ``typing`` (the shape aliases) sit beside ``ops`` and are leaves: they import no other
part of the project. ``data`` is a leaf too, used from the models up (tokenizers of pretrained
models, train, experiments).

The graph is read from the source with ``ast``, so nothing is imported, and every import
statement counts wherever it stands: at module level, under ``if TYPE_CHECKING:`` (a layer must
not name a model even for typing), in class bodies and inside functions. A deferred import
(inside a function) only postpones the dependency: a model loader importing the trainer's
sharding rules is still a model that needs the trainer (``models.hf_layout`` and
``models.xlstm`` did, deferred because importing ``jaxrec.train`` at module level runs its
``__init__``, which imports the models back). So the cycle check reads the same graph as the
layering, deferred imports included: it could only report a false cycle where two modules need
each other and one defers its import to get past the loop at import time, and that is a cycle
of the design all the same. No module defers a project import; across parts the layering
forbids such a pair anyway, and within a part it is one module split in two.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WALKED = ("jaxrec", "pallas_kernels")  # the packages whose imports are read
KNOWN = (*WALKED, "experiments")  # and the project modules an import may name

# Rank of each part of the project: a module may import its own rank or lower.
RANKS = {
  "pallas_kernels": 0,
  "jaxrec.typing": 1,  # the shape aliases: a leaf, named by every annotated module above kernels
  "jaxrec.ops": 1,
  "jaxrec.sharding": 1,  # mesh axes and logical-axis rules: a leaf, read by layers, models, train
  "jaxrec.layers": 2,
  "jaxrec.models": 3,  # below what uses a model: it imports no trainer, inference or conversion
  "jaxrec.train": 4,
  "jaxrec.inference": 4,
  "jaxrec.linearize": 4,
  "jaxrec": 4,  # jaxrec/__init__.py alone: it re-exports the public API (ops, generate)
  "experiments": 5,
}
DATA = "jaxrec.data"  # a leaf imported from rank DATA_USERS up
DATA_USERS = 3
LEAVES = (DATA, "jaxrec.sharding", "jaxrec.typing")  # they import nothing of the project


def module_files(root: pathlib.Path, packages) -> dict[str, pathlib.Path]:
  """``{dotted module name: path}`` of every ``.py`` file under ``root/<package>``."""
  files = {}
  for package in packages:
    for path in sorted((root / package).rglob("*.py")):
      parts = path.relative_to(root).with_suffix("").parts
      if parts[-1] == "__init__":
        parts = parts[:-1]
      files[".".join(parts)] = path
  return files


def _resolve(name: str, modules) -> str | None:
  """The longest prefix of ``name`` that is a project module (``a.b.attr`` -> ``a.b``)."""
  parts = name.split(".")
  for end in range(len(parts), 0, -1):
    prefix = ".".join(parts[:end])
    if prefix in modules:
      return prefix
  return None


def imports_of(module: str, path: pathlib.Path, modules, is_package: bool):
  """``[(imported project module, line)]`` of every import statement of ``module``, at module
  level or inside functions."""
  found = []
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from the module's package, up level - 1 packages
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, base] if base else package)
      # `from a import b` imports the module a.b when there is one, else a's attribute b.
      names = [
        f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
        for alias in node.names
      ]
    else:
      continue
    for name in names:
      target = _resolve(name, modules)
      if target is not None and target != module:
        found.append((target, node.lineno))
  return found


def import_graph(root: pathlib.Path):
  """``{module: {imported module: first line}}`` over the walked packages."""
  modules = module_files(root, KNOWN)
  graph = {}
  for module, path in module_files(root, WALKED).items():
    edges = {}
    for target, line in imports_of(module, path, modules, path.name == "__init__.py"):
      edges.setdefault(target, line)
    graph[module] = edges
  return graph


def find_cycles(graph) -> list[list[str]]:
  """One cycle ``[a, b, ..., a]`` per strongly connected component that has one (Tarjan), from
  the component's first module by name."""
  index, low, on_stack, stack, cycles = {}, {}, set(), [], []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in graph:
        continue
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.add(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(_cycle_through(min(component), component, graph))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return cycles


def _cycle_through(start, component, graph) -> list[str]:
  """A shortest cycle ``[start, ..., start]`` inside ``component`` (breadth first)."""
  parents, frontier = {start: None}, [start]
  while frontier:
    following = []
    for v in frontier:
      for w in sorted(graph[v]):
        if w == start:
          path = [v]
          while parents[path[-1]] is not None:
            path.append(parents[path[-1]])
          return [*reversed(path), start]
        if w in component and w not in parents:
          parents[w] = v
          following.append(w)
    frontier = following
  raise AssertionError(f"no cycle through {start}")


def part_of(module: str) -> str:
  """The layering part a module belongs to (the longest matching prefix)."""
  for part in sorted((*RANKS, DATA), key=len, reverse=True):
    if module == part or (part != "jaxrec" and module.startswith(part + ".")):
      return part
  raise ValueError(f"{module}: not placed in the layering; add its package to RANKS")


def layering_violations(graph) -> list[str]:
  """Every import against the one-way layering, as ``module:line imports target (why)``."""
  bad = []
  for module, edges in sorted(graph.items()):
    src = part_of(module)
    for target, line in sorted(edges.items()):
      dst = part_of(target)
      if src == dst:
        continue
      if src in LEAVES:
        why = f"{src} is a leaf and imports nothing of the project"
      elif dst == DATA:
        why = None if RANKS[src] >= DATA_USERS else f"{src} is below the users of {DATA}"
      else:
        why = None if RANKS[src] >= RANKS[dst] else f"{src} may not import the higher {dst}"
      if why:
        bad.append(f"{module}:{line} imports {target} ({why})")
  return bad


def test_no_import_cycle_between_modules():
  cycles = find_cycles(import_graph(ROOT))
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_follow_the_one_way_layering():
  graph = import_graph(ROOT)
  assert {"jaxrec.layers", "jaxrec.models", "pallas_kernels.gla"} <= set(graph)
  assert "jaxrec.sharding" in graph["jaxrec.layers.moe"]  # the rules sit below the layers
  violations = layering_violations(graph)
  assert not violations, "imports against the layering:\n" + "\n".join(violations)


def _is_private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_module_owner(module: str) -> str | None:
  """The package a private module belongs to: ``a.b`` for ``a.b._c`` (or ``a.b._c.d``)."""
  parts = module.split(".")
  for i, part in enumerate(parts):
    if _is_private(part):
      return ".".join(parts[:i])
  return None


def _may_use(importer: str, module: str) -> bool:
  """Whether ``importer`` may name the project module ``module``: a private module only from
  inside the package that owns it."""
  owner = _private_module_owner(module)
  return owner is None or importer == owner or importer.startswith(owner + ".")


def private_name_uses(root: pathlib.Path) -> list[str]:
  """Every use of another module's private name in the walked packages, as
  ``module:line name``: ``from m import _x`` where ``_x`` is not a submodule the importer may
  use, an import of a private module from outside its package, and ``alias._x`` where ``alias``
  names an imported project module."""
  modules = module_files(root, KNOWN)
  bad = []
  for module, path in module_files(root, WALKED).items():
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = {}  # local name -> the project module it is bound to
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        for alias in node.names:
          if _resolve(alias.name, modules) is None:
            continue
          if not _may_use(module, alias.name):
            bad.append(f"{module}:{node.lineno} {alias.name}")
          local = alias.asname or alias.name.split(".")[0]
          aliases[local] = alias.name if alias.asname else local
      elif isinstance(node, ast.ImportFrom) and not node.level:
        base = node.module or ""
        if _resolve(base, modules) is None:
          continue
        if not _may_use(module, base):
          bad.append(f"{module}:{node.lineno} {base}")
          continue
        for alias in node.names:
          full = f"{base}.{alias.name}"
          if full in modules:
            if not _may_use(module, full):
              bad.append(f"{module}:{node.lineno} {full}")
            aliases[alias.asname or alias.name] = full
          elif _is_private(alias.name):
            bad.append(f"{module}:{node.lineno} {full}")
    for node in ast.walk(tree):
      if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
        and _is_private(node.attr)
      ):
        full = f"{aliases[node.value.id]}.{node.attr}"
        if full not in modules or not _may_use(module, full):
          bad.append(f"{module}:{node.lineno} {full}")
  return sorted(set(bad))


def test_no_module_uses_another_modules_private_names():
  bad = private_name_uses(ROOT)
  assert not bad, "private names used outside their module:\n" + "\n".join(bad)


def _write(root: pathlib.Path, files: dict[str, str]) -> None:
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_checks_catch_a_typing_only_cycle_and_an_upward_import(tmp_path):
  """A miniature project with today's mistakes: the checks must name them."""
  _write(
    tmp_path,
    {
      "jaxrec/__init__.py": "",
      "jaxrec/layers/__init__.py": "from jaxrec.layers.attention import Attention\n",
      "jaxrec/layers/attention.py": (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "  from jaxrec.models.config import LMConfig\n"
        "def lazy():\n"
        "  import jaxrec.train\n"
      ),
      "jaxrec/models/__init__.py": "",
      "jaxrec/models/config.py": "from jaxrec import layers\n",
      "jaxrec/train/__init__.py": "",
      "jaxrec/data/__init__.py": "from ..layers import attention\n",
      "jaxrec/ops/__init__.py": "",
      "jaxrec/ops/scan.py": "import pallas_kernels.linear_scan\n",
      "pallas_kernels/__init__.py": "",
      "pallas_kernels/linear_scan.py": "from jaxrec.data import corpora\n",
    },
  )
  graph = import_graph(tmp_path)
  assert find_cycles(graph) == [
    ["jaxrec.layers", "jaxrec.layers.attention", "jaxrec.models.config", "jaxrec.layers"]
  ]
  assert layering_violations(graph) == [
    "jaxrec.data:1 imports jaxrec.layers.attention (jaxrec.data is a leaf and imports nothing "
    "of the project)",
    "jaxrec.layers.attention:3 imports jaxrec.models.config (jaxrec.layers may not import the "
    "higher jaxrec.models)",
    "jaxrec.layers.attention:5 imports jaxrec.train (jaxrec.layers may not import the higher "
    "jaxrec.train)",
    "pallas_kernels.linear_scan:1 imports jaxrec.data (pallas_kernels is below the users of "
    "jaxrec.data)",
  ]
  with pytest.raises(ValueError, match=r"jaxrec\.extra: not placed in the layering"):
    part_of("jaxrec.extra")


def test_the_checks_read_imports_inside_functions(tmp_path):
  """A miniature project whose upward imports all stand inside functions: a model loader reaching
  for the trainer's sharding rules (as ``models.hf_layout`` did before ``jaxrec.sharding``), a
  model's method reaching for inference in a nested function, the sharding leaf reaching for a
  layer. The layering check names each, and with the imports back the cycle check sees the
  loops they close."""
  _write(
    tmp_path,
    {
      "jaxrec/__init__.py": "",
      "jaxrec/sharding.py": "def rules():\n  from jaxrec.layers import moe\n",
      "jaxrec/layers/__init__.py": "",
      "jaxrec/layers/moe.py": "from jaxrec.sharding import rules\n",
      "jaxrec/models/__init__.py": "",
      "jaxrec/models/hf_layout.py": (
        "import jaxrec.layers\n"
        "def shardings(state, mesh):\n"
        "  from jaxrec.train import sharding\n"
        "  return sharding.tree_shardings(state, mesh)\n"
      ),
      "jaxrec/models/lm.py": (
        "class LM:\n"
        "  def generate(self):\n"
        "    def inner():\n"
        "      import jaxrec.inference.generate\n"
        "    return inner\n"
      ),
      "jaxrec/inference/__init__.py": "",
      "jaxrec/inference/generate.py": "from jaxrec.models import lm\n",
      "jaxrec/train/__init__.py": "",
      "jaxrec/train/sharding.py": "from jaxrec.models.hf_layout import shardings\n",
    },
  )
  graph = import_graph(tmp_path)
  assert find_cycles(graph) == [
    ["jaxrec.inference.generate", "jaxrec.models.lm", "jaxrec.inference.generate"],
    ["jaxrec.layers.moe", "jaxrec.sharding", "jaxrec.layers.moe"],
    ["jaxrec.models.hf_layout", "jaxrec.train.sharding", "jaxrec.models.hf_layout"],
  ]
  assert layering_violations(graph) == [
    "jaxrec.models.hf_layout:3 imports jaxrec.train.sharding (jaxrec.models may not import the "
    "higher jaxrec.train)",
    "jaxrec.models.lm:4 imports jaxrec.inference.generate (jaxrec.models may not import the "
    "higher jaxrec.inference)",
    "jaxrec.sharding:2 imports jaxrec.layers.moe (jaxrec.sharding is a leaf and imports nothing "
    "of the project)",
  ]


def test_the_private_name_check_catches_what_the_newton_split_did(tmp_path):
  """A miniature project: private names imported across modules (at module level or in a
  method), a private module used outside its package, and a private attribute read off an
  imported module are caught; package-private modules used inside their package are not."""
  _write(
    tmp_path,
    {
      "jaxrec/__init__.py": "",
      "jaxrec/ops/__init__.py": "",
      "jaxrec/ops/_checks.py": "def check(): pass\n",
      "jaxrec/ops/newton.py": "from jaxrec.ops import _checks\ndef _validate(): pass\n",
      "jaxrec/ops/sharded.py": (
        "from jaxrec.ops.newton import _validate\n"
        "from jaxrec.ops import newton as nt\n"
        "def f():\n"
        "  import jaxrec.ops._checks\n"
        "  return nt._validate(), nt.__name__\n"
      ),
      "jaxrec/layers/__init__.py": "",
      "jaxrec/layers/_params.py": "def logical_param(): pass\n",
      "jaxrec/layers/linear.py": "from jaxrec.layers._params import logical_param\n",
      "jaxrec/models/__init__.py": "",
      "jaxrec/models/lm.py": (
        "from jaxrec.layers._params import logical_param\n"
        "class LM:\n"
        "  def __call__(self):\n"
        "    from jaxrec.ops.newton import _validate\n"
      ),
      "pallas_kernels/__init__.py": "",
      "pallas_kernels/_backend.py": "",
      "pallas_kernels/gla/__init__.py": "",
      "pallas_kernels/gla/kernel.py": "from pallas_kernels._backend import compiled_on\n",
    },
  )
  assert private_name_uses(tmp_path) == [
    "jaxrec.models.lm:1 jaxrec.layers._params",
    "jaxrec.models.lm:4 jaxrec.ops.newton._validate",
    "jaxrec.ops.sharded:1 jaxrec.ops.newton._validate",
    "jaxrec.ops.sharded:5 jaxrec.ops.newton._validate",
  ]

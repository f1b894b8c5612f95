"""Imports flow one way: a module imports only from its own layer or the layers below.

The layer table below is the one docs/architecture.md shows. Each module's imports are
read from its source (not executed), top-level and function-local alike, so a hidden
upward import fails here as surely as a visible one.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

# Lowest first. A module may import from its own layer and any layer listed before it.
# "=name" matches that module alone (a root package's __init__), "name" it and below.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("configs", "=m3jax"),
    ("m3jax.core",),
    ("data_pipeline",),
    ("m3jax.model",),
    ("m3jax.retrieval",),
    ("m3jax.memory",),
    ("m3jax.training", "m3jax.inference"),
    ("m3jax.evaluation",),
    ("m3jax.bench", "m3jax.planning"),
    ("m3jax.demo",),
    ("m3jax.commands", "m3jax.cli", "launch"),
)
PROJECT = ("m3jax", "data_pipeline", "configs", "launch")


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def project_modules() -> dict[str, pathlib.Path]:
  found = {}
  for top in PROJECT:
    for path in sorted((REPO / top).rglob("*.py")):
      found[module_name(path)] = path
  return found


MODULES = project_modules()


def layer_of(module: str) -> int:
  best, where = -1, None
  for i, group in enumerate(LAYERS):
    for prefix in group:
      if prefix.startswith("="):
        if module == prefix[1:]:
          return i
        continue
      if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
        best, where = len(prefix), i
  if where is None:
    raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS")
  return where


def imports(path: pathlib.Path, module: str) -> list[tuple[str, int, bool]]:
  """(imported project module, line, function-local?) for every import in `path`."""
  tree = ast.parse(path.read_text(), filename=str(path))
  top_level = set(id(n) for n in tree.body)
  is_pkg = path.name == "__init__.py"
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = module.split(".")
        anchor = anchor[:len(anchor) - node.level + (1 if is_pkg else 0)]
        base = ".".join(anchor + ([base] if base else []))
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
               for a in node.names]
    else:
      continue
    for name in names:
      if name.split(".")[0] in PROJECT:
        while name not in MODULES and "." in name:
          name = name.rsplit(".", 1)[0]
        found.append((name, node.lineno, id(node) not in top_level))
  return found


def test_every_module_has_a_layer():
  for module in MODULES:
    layer_of(module)


def test_no_import_from_a_higher_layer():
  bad = []
  for module, path in MODULES.items():
    mine = layer_of(module)
    for target, line, _ in imports(path, module):
      if layer_of(target) > mine:
        bad.append(f"{path.relative_to(REPO)}:{line}: {module} (layer {mine}) imports "
                   f"{target} (layer {layer_of(target)})")
  assert not bad, "imports from a higher layer:\n" + "\n".join(bad)


def test_no_import_cycles():
  graph = {m: {t for t, _, _ in imports(p, m) if t != m} for m, p in MODULES.items()}
  state: dict[str, int] = {}
  cycles = []

  def visit(m: str, stack: list[str]) -> None:
    state[m] = 1
    stack.append(m)
    for t in sorted(graph.get(m, ())):
      if state.get(t) == 1:
        cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
      elif t not in state:
        visit(t, stack)
    stack.pop()
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [])
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_function_local_imports_say_why():
  """A project import inside a function hides a dependency; only an optional heavy
  dependency (or JAX start-up order) justifies one, and its line says so."""
  bad = []
  for module, path in MODULES.items():
    lines = path.read_text().split("\n")
    for target, line, local in imports(path, module):
      if local and "#" not in lines[line - 1]:
        bad.append(f"{path.relative_to(REPO)}:{line}: {lines[line - 1].strip()}")
  assert not bad, "function-local project imports without a reason:\n" + "\n".join(bad)


@pytest.mark.parametrize("layer", range(len(LAYERS)))
def test_layer_table_names_real_packages(layer):
  for prefix in LAYERS[layer]:
    prefix = prefix.lstrip("=")
    assert any(m == prefix or m.startswith(prefix + ".") for m in MODULES), prefix

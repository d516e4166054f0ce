"""The package's import graph: no cycles, the CPU kernels behind one seam."""

import ast
import os
import pathlib

from conftest import REPO

PACKAGE = pathlib.Path(REPO) / 'alexnet_jax'


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts = parts[:-1]
  return '.'.join(parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in PACKAGE.rglob('*.py')}


def _imports(path: pathlib.Path, modules) -> list[tuple[str, bool]]:
  """(imported project module, whether inside a function) for every import in `path`."""
  tree = ast.parse(path.read_text(), str(path))
  in_function = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      in_function.update(id(n) for n in ast.walk(node) if n is not node)
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from alexnet_jax.data import common` imports the module
      # alexnet_jax.data.common; `from alexnet_jax.ops import Ops` the module
      # alexnet_jax.ops.
      names = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in modules
               else node.module for a in node.names]
    else:
      continue
    found += [(n, id(node) in in_function) for n in names if n in modules]
  return found


def _graph():
  modules = _modules()
  return {name: _imports(path, modules) for name, path in modules.items()}


def test_no_import_cycles_in_the_package():
  graph = {m: sorted({n for n, _ in deps}) for m, deps in _graph().items()}
  state = {}  # 1: on the current path, 2: done

  def visit(m, path):
    state[m] = 1
    for n in graph[m]:
      if state.get(n) == 1:
        cycle = path[path.index(n):] + [n]
        raise AssertionError('import cycle: ' + ' -> '.join(cycle))
      if n not in state:
        visit(n, path + [n])
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  assert len(graph) > 20  # the walk saw the whole package


def test_no_project_import_is_placed_inside_a_function():
  inside = sorted((m, n) for m, deps in _graph().items() for n, f in deps if f)
  assert not inside, inside


def test_only_the_selection_point_imports_the_cpu_kernels():
  importers = sorted({m for m, deps in _graph().items()
                      for n, _ in deps if n.startswith('alexnet_jax.cpu')
                      and not m.startswith('alexnet_jax.cpu')})
  assert importers == ['alexnet_jax.backend']


def test_the_model_and_trainer_never_name_a_backend():
  for name in ('model.py', 'train.py', 'parallel.py'):
    text = (PACKAGE / name).read_text().lower()
    for word in ('onednn', 'cpu_kernels', 'ffi', 'alexnet_jax.cpu', 'winograd'):
      assert word not in text, (name, word)


def test_benchmarks_and_torch_stay_outside_the_package():
  assert not (PACKAGE / 'benchmarks').exists()
  for path in PACKAGE.rglob('*.py'):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [node.module or '']
      else:
        continue
      for n in names:
        assert n.split('.')[0] not in ('torch', 'benchmarks', 'sklearn', 'skimage', 'pytest'), (
            os.fspath(path), n)

"""No module of the project imports one that imports it back (function-local imports too)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("gsm_optax", "models", "training", "configs", "benchmarks")


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _project_modules() -> dict[str, pathlib.Path]:
  modules = {}
  for package in PACKAGES:
    for path in (ROOT / package).rglob("*.py"):
      modules[_module_name(path)] = path
  modules["train"] = ROOT / "train.py"
  return modules


def _imports(path: pathlib.Path, name: str, modules: dict[str, pathlib.Path]) -> set[str]:
  """Project modules imported anywhere in the file (module level or inside functions)."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
      targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
    else:
      continue
    for target in targets:
      while target and target not in modules:
        target = target.rpartition(".")[0]
      if target and target != name:
        found.add(target)
  return found


def _parent_packages(name: str) -> list[str]:
  parts = name.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A cycle of the directed graph as [a, b, ..., a], or None."""
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    stack.append(node)
    for target in sorted(graph.get(node, ())):
      if state.get(target) == 1:
        return stack[stack.index(target) :] + [target]
      if target not in state and (cycle := visit(target)):
        return cycle
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_the_import_graph_has_no_cycle():
  modules = _project_modules()
  graph = {name: _imports(path, name, modules) for name, path in modules.items()}
  # Importing a.b runs a/__init__.py first: a package's __init__ importing its own
  # submodules is the usual re-export, so edges from a module to its parent
  # packages are not counted.
  graph = {name: targets - set(_parent_packages(name)) for name, targets in graph.items()}
  cycle = find_cycle(graph)
  assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_cycle_check_finds_a_cycle_through_a_function_local_import(tmp_path):
  (tmp_path / "pkg").mkdir()
  (tmp_path / "pkg" / "a.py").write_text("def f():\n  from pkg import b\n")
  (tmp_path / "pkg" / "b.py").write_text("import pkg.a\n")
  modules = {"pkg.a": tmp_path / "pkg" / "a.py", "pkg.b": tmp_path / "pkg" / "b.py"}
  graph = {name: _imports(path, name, modules) for name, path in modules.items()}
  assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
  assert find_cycle({"x": {"y"}, "y": set()}) is None


def test_importing_the_program_starts_no_backend():
  """jax.distributed.initialize must come before any backend: importing gsm_optax and
  train.py (models, training) may not create arrays (a module-level jnp constant did)."""
  import socket
  import subprocess
  import sys

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  code = (
    "import gsm_optax, train, jax\n"
    "jax.config.update('jax_cpu_collectives_implementation', 'gloo')\n"
    f"jax.distributed.initialize('127.0.0.1:{port}', num_processes=1, process_id=0)\n"
    "print(jax.process_count())\n"
  )
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "1"

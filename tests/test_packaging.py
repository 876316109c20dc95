"""The wheel ships the library `gsm_optax` only, with its license and version.

`models/`, `training/`, `configs/`, `train.py` and `benchmarks/` are repository
code, run from a checkout: a wheel that installed top-level `models` or
`training` packages would clash with a user's own modules of those names.
The wheel is built from a copy of the checkout with `pip wheel --no-deps
--no-build-isolation --no-index` (offline; setuptools >= 77 comes with the
`test` extra). A second test checks that every third-party module the
repository code imports is declared in pyproject.toml.
"""

from __future__ import annotations

import ast
from email.parser import Parser
import importlib.metadata
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

import gsm_optax

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Not copied into the build tree: environments, caches, build outputs.
_IGNORED = shutil.ignore_patterns(
  ".*", "__pycache__", "build", "dist", "*.egg-info", "runs", "workdir*"
)
# The directories of repository code, imported from the checkout (first party).
_REPOSITORY_CODE = ("models", "training", "configs", "benchmarks", "tests", "notebooks")


def _pyproject() -> dict:
  with open(ROOT / "pyproject.toml", "rb") as f:
    return tomllib.load(f)


def _normalize(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
  return _normalize(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip()).group(0))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
  setuptools_version = importlib.metadata.version("setuptools")
  assert int(setuptools_version.split(".")[0]) >= 77, (
    f"setuptools {setuptools_version} is too old to build gsm_optax offline: "
    'pip install "setuptools>=77" (it is in the `test` extra)'
  )
  tmp = tmp_path_factory.mktemp("wheel")
  source, out = tmp / "src", tmp / "dist"
  shutil.copytree(ROOT, source, ignore=_IGNORED)
  result = subprocess.run(
    [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation"]
    + ["--no-index", "--quiet", "--wheel-dir", str(out)],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  (path,) = out.glob("*.whl")
  with zipfile.ZipFile(path) as archive:
    yield archive


def test_wheel_holds_only_the_gsm_optax_package(wheel):
  version = gsm_optax.__version__
  dist_info = f"gsm_optax-{version}.dist-info/"
  names = wheel.namelist()
  stray = [name for name in names if not name.startswith(("gsm_optax/", dist_info))]
  assert not stray, f"the wheel must ship gsm_optax only, found {stray}"
  # Every module of the library (with the subpackage gsm_optax.baselines) is in it.
  modules = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "gsm_optax").rglob("*.py"))
  assert "gsm_optax/baselines/__init__.py" in modules
  assert sorted(name for name in names if name.startswith("gsm_optax/")) == modules
  top_level = wheel.read(dist_info + "top_level.txt").decode().split()
  assert top_level == ["gsm_optax"]


def test_wheel_metadata_license_version_and_requirements(wheel):
  version = gsm_optax.__version__
  dist_info = f"gsm_optax-{version}.dist-info/"
  metadata = Parser().parsestr(wheel.read(dist_info + "METADATA").decode())
  assert metadata["Name"] == "gsm_optax"
  assert metadata["Version"] == version  # read from gsm_optax.__version__
  assert "version" in _pyproject()["project"]["dynamic"]
  # PEP 639: an SPDX expression and the license file, no legacy License field.
  assert metadata["License-Expression"] == "Apache-2.0"
  assert metadata.get_all("License-File") == ["LICENSE"]
  assert metadata["License"] is None
  license_text = wheel.read(dist_info + "licenses/LICENSE").decode()
  assert license_text == (ROOT / "LICENSE").read_text()
  assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
  assert metadata["Requires-Python"] == ">=3.11"
  # The library needs jax, optax and numpy only; flax etc. come with extras.
  unconditional = {
    _requirement_name(requirement)
    for requirement in metadata.get_all("Requires-Dist")
    if "extra ==" not in requirement
  }
  assert unconditional == {"jax", "optax", "numpy"}
  assert set(metadata.get_all("Provides-Extra")) == {"train", "test", "bench"}


def _imported_modules(source: str) -> set[str]:
  modules = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      modules.update(alias.name.split(".")[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      modules.add(node.module.split(".")[0])
    elif (  # pytest.importorskip("x"), importlib.import_module("x")
      isinstance(node, ast.Call)
      and isinstance(node.func, ast.Attribute)
      and node.func.attr in ("importorskip", "import_module")
      and node.args
      and isinstance(node.args[0], ast.Constant)
    ):
      modules.add(node.args[0].value.split(".")[0])
  return modules


def _repository_imports() -> dict[str, set[str]]:
  """Top-level module -> files of the repository code (and notebooks) importing it."""
  sources = {"train.py": (ROOT / "train.py").read_text()}
  for directory in _REPOSITORY_CODE:
    for path in (ROOT / directory).rglob("*.py"):
      sources[path.relative_to(ROOT).as_posix()] = path.read_text()
    for path in (ROOT / directory).glob("*.ipynb"):
      cells = json.loads(path.read_text())["cells"]
      code = "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
      # Shell escapes (!pip ...) and magics are not Python: `pass` in their place.
      lines = [re.sub(r"^(\s*)[!%].*", r"\1pass", line) for line in code.splitlines()]
      sources[path.relative_to(ROOT).as_posix()] = "\n".join(lines)
  imports: dict[str, set[str]] = {}
  for name, source in sources.items():
    for module in _imported_modules(source):
      imports.setdefault(module, set()).add(name)
  return imports


def test_every_third_party_import_of_the_repository_code_is_declared():
  project = _pyproject()["project"]
  declared = {_requirement_name(r) for r in project["dependencies"]}
  for requirements in project["optional-dependencies"].values():
    declared.update(_requirement_name(r) for r in requirements)
  first_party = {"gsm_optax", "train", *_REPOSITORY_CODE}
  first_party.update(path.stem for path in (ROOT / "tests").glob("*.py"))
  distributions = importlib.metadata.packages_distributions()
  undeclared = {}
  for module, files in sorted(_repository_imports().items()):
    if module in sys.stdlib_module_names or module in first_party or module == "__future__":
      continue
    names = {_normalize(name) for name in distributions.get(module, [module])}
    if not names & declared:
      undeclared[module] = (sorted(names), sorted(files))
  assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"

"""The notebooks in notebooks/ run top to bottom in smoke mode.

Each notebook is executed in a fresh python3 kernel started in notebooks/ with
GSM_NOTEBOOK_SMOKE=1 (its parameters cell reads it: a data subset and one or
two epochs; for the language model, short epochs and the first test windows),
and its outputs are checked, not written back: the committed notebooks keep the
outputs of their full run. One notebook, by hand:
``GSM_NOTEBOOK_SMOKE=1 pytest --nbmake notebooks/quickstart.ipynb``.

The setup cell (first code cell) is also run without a kernel, its `!` shell
commands recorded: locally it needs nothing and puts the repository root on
sys.path; in Colab it clones the repository at REPO_URL, installs
gsm_optax[train] from the clone and imports models/training from it, and with
REPO_URL unset it stops with one line saying what to set.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
import types

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

from training import data  # noqa: E402
from training import text_data  # noqa: E402

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = ("quickstart", "gsm_vs_magnitude", "winning_tickets", "structured", "transformer")
LANGUAGE_MODELS = ("transformer",)  # the byte-level GPT on Jane Austen; the others: Fashion-MNIST
CELL_TIMEOUT_S = 300
SMOKE_TRAIN_EXAMPLES = 2048  # max_train_examples of the image notebooks' smoke mode
SMOKE_EVAL_WINDOWS = 256  # test windows the language model's smoke mode evaluates
KERNEL_KINDS = 6  # query, key, value, out, fc1, fc2: the columns of the GPT's heat map


def _smoke_marker(name: str) -> str:
  """What the notebook prints in smoke mode only."""
  if name in LANGUAGE_MODELS:
    return f"eval_windows={SMOKE_EVAL_WINDOWS} of"
  return f"num_train={SMOKE_TRAIN_EXAMPLES}"


@pytest.fixture(scope="module")
def fashion_mnist_available() -> None:
  try:
    data.load_dataset("fashion_mnist", max_train_examples=1, max_test_examples=1)
  except data.DataNotFoundError as err:
    pytest.skip(f"Fashion-MNIST not available: {str(err).splitlines()[0]}")


@pytest.fixture(scope="module")
def austen_available() -> None:
  # Only where it is already unpacked: the test never fetches the package.
  directories = (os.path.join(text_data.cache_root(), "janeaustenr"), text_data.SYSTEM_AUSTEN_DIR)
  if not any(os.path.isdir(d) and text_data.find_austen_rdx(d) for d in directories):
    pytest.skip("Jane Austen's novels not available: r-cran-janeaustenr is not unpacked")


def _stream_text(notebook) -> str:
  return "\n".join(
    output.get("text", "")
    for cell in notebook.cells
    if cell.cell_type == "code"
    for output in cell.get("outputs", [])
    if output.output_type == "stream"
  )


def _count_images(notebook) -> int:
  return sum(
    "image/png" in output.get("data", {})
    for cell in notebook.cells
    if cell.cell_type == "code"
    for output in cell.get("outputs", [])
  )


def _check_final_accuracy(name: str, text: str) -> None:
  final = re.findall(r"final accuracy[^\n]*?(\d+\.\d+)%", text)
  assert final, f"{name} printed no final accuracy"
  assert all(0.0 <= float(value) <= 100.0 for value in final)


def _check_language_model(name: str, text: str) -> None:
  """The GPT notebook: its final bits per byte, the heat map's densities, the samples,
  the narrow exports."""
  final = re.findall(r"final bits per byte: (\d+\.\d+) at C = 10\.00 ", text)
  assert len(final) == 1, f"{name} printed no final bits per byte after a cut to 10x"
  # Below 8 bits, a uniform guess over the 256 bytes: even the smoke run learns something.
  assert 0.0 < float(final[0]) < 8.0, final
  # The heat map's numbers: one row of densities per block, for each of the two cuts.
  grid = re.findall(rf"^  block \d+((?: +\d+\.\d\d){{{KERNEL_KINDS}}})$", text, flags=re.M)
  assert len(grid) == 2 * 2, f"{name}: expected 2 blocks x 2 cuts of kernel densities"
  densities = [float(value) for row in grid for value in row.split()]
  assert all(0.0 <= value <= 100.0 for value in densities)
  assert any(value > 0.0 for value in densities)
  # Both samples continue the prompt (the dense and the pruned model's).
  assert len(re.findall(r"It is a truth universally acknowledged", text)) >= 2
  # The narrow exports (weight GSM, neuron GSM) compute what their masked models do.
  gaps = re.findall(r"narrow vs masked: largest logit difference (\S+)", text)
  assert len(gaps) == 2 and all(float(gap) < 1e-4 for gap in gaps), gaps


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom_in_smoke_mode(name, request, monkeypatch):
  request.getfixturevalue(
    "austen_available" if name in LANGUAGE_MODELS else "fashion_mnist_available"
  )
  monkeypatch.setenv("GSM_NOTEBOOK_SMOKE", "1")  # the kernel inherits the env
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  notebook = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
  client = nbclient.NotebookClient(
    notebook,
    timeout=CELL_TIMEOUT_S,
    kernel_name="python3",
    resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
  )
  client.execute()  # raises CellExecutionError on the first failing cell

  text = _stream_text(notebook)
  assert _smoke_marker(name) in text, "smoke mode was not on"
  if name in LANGUAGE_MODELS:
    _check_language_model(name, text)
  else:
    _check_final_accuracy(name, text)
  # The LM's two: its curves and the heat map of the kernels' densities.
  assert _count_images(notebook) >= 2, f"{name} drew no plots"


def test_notebooks_have_a_parameters_cell_and_committed_outputs():
  for name in NOTEBOOKS:
    notebook = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: one cell tagged 'parameters' expected"
    assert "GSM_NOTEBOOK_SMOKE" in tagged[0].source
    # The committed notebook shows a full (non-smoke) run with its plots.
    assert _count_images(notebook) >= 2, f"{name}: commit it with its outputs"
    assert _smoke_marker(name) not in _stream_text(notebook), (
      f"{name}: the committed outputs are from a smoke run"
    )


# --------------------------------------------------------------------------- #
# The setup cell (first code cell), run without a kernel
# --------------------------------------------------------------------------- #


def _setup_cell(name: str) -> str:
  notebook = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
  return next(cell for cell in notebook.cells if cell.cell_type == "code").source


def _run_setup_cell(source: str, monkeypatch, *, colab: bool, url: str | None):
  """Executes the cell as IPython would, recording its shell commands (`!...`).

  Returns (shell commands with {variables} expanded, namespace, exception or None).
  """
  inputtransformer2 = pytest.importorskip("IPython.core.inputtransformer2")
  python = inputtransformer2.TransformerManager().transform_cell(source)
  namespace, commands = {}, []

  class Shell:
    def system(self, command):
      commands.append(command.format(**namespace))

  namespace["get_ipython"] = Shell
  # sys.path as in a fresh kernel: without the repository root that pytest adds.
  root = str(NOTEBOOKS_DIR.parent)
  monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.abspath(p) != root])
  monkeypatch.chdir(NOTEBOOKS_DIR)
  if colab:
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
  else:
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
  if url is None:
    monkeypatch.delenv("GSM_OPTAX_REPO", raising=False)
  else:
    monkeypatch.setenv("GSM_OPTAX_REPO", url)
  try:
    exec(compile(python, "setup cell", "exec"), namespace)  # pylint: disable=exec-used
  except Exception as err:  # pylint: disable=broad-except
    return commands, namespace, err
  return commands, namespace, None


def test_setup_cells_are_the_same_in_every_notebook():
  sources = {name: _setup_cell(name) for name in NOTEBOOKS}
  assert len(set(sources.values())) == 1, "keep the notebooks' setup cells identical"
  source = sources[NOTEBOOKS[0]]
  # The repository's address lives in one variable, also read from GSM_OPTAX_REPO.
  assert source.count('REPO_URL = os.environ.get("GSM_OPTAX_REPO", "")') == 1
  assert len(re.findall(r"^\s*REPO_URL\s*=", source, flags=re.M)) == 1
  assert "git+" not in source and "github.com" not in source


def test_setup_cell_locally_needs_nothing(monkeypatch):
  commands, namespace, error = _run_setup_cell(
    _setup_cell("quickstart"), monkeypatch, colab=False, url=None
  )
  assert error is None and commands == []
  root = str(NOTEBOOKS_DIR.parent)
  assert namespace["REPO_DIR"] == root and sys.path[0] == root


def test_setup_cell_in_colab_without_repo_url_says_what_to_set(monkeypatch):
  commands, _, error = _run_setup_cell(_setup_cell("quickstart"), monkeypatch, colab=True, url=None)
  assert error is not None and commands == [], "stop before any clone or install"
  # IPython renders the error with _render_traceback_: one line, no traceback.
  (line,) = error._render_traceback_()
  assert "\n" not in line and "REPO_URL" in line and "GSM_OPTAX_REPO" in line


def test_setup_cell_in_colab_clones_installs_and_imports_from_the_clone(monkeypatch):
  url = "https://example.org/someone/gsm_optax.git"
  commands, namespace, error = _run_setup_cell(
    _setup_cell("quickstart"), monkeypatch, colab=True, url=url
  )
  assert error is None
  clone_dir = namespace["REPO_DIR"]
  assert namespace["REPO_URL"] == url and clone_dir != str(NOTEBOOKS_DIR.parent)
  clone, install = commands
  assert clone.startswith("git clone") and clone.split()[-2:] == [url, clone_dir]
  # gsm_optax with its training extras, from the clone (same commit as models/, training/).
  assert install.startswith("pip install") and f'"{clone_dir}[train]"' in install
  assert sys.path[0] == clone_dir  # `import models`, `import training` from the clone

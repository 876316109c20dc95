"""The notebooks in notebooks/ run top to bottom in smoke mode.

Each notebook is executed in a fresh python3 kernel started in notebooks/ with
GSM_NOTEBOOK_SMOKE=1 (its parameters cell reads it: a data subset and one or
two epochs), and its outputs are checked, not written back: the committed
notebooks keep the outputs of their full run. One notebook, by hand:
``GSM_NOTEBOOK_SMOKE=1 pytest --nbmake notebooks/quickstart.ipynb``.
"""

from __future__ import annotations

import pathlib
import re

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

from training import data  # noqa: E402

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = ("quickstart", "gsm_vs_magnitude", "winning_tickets")
CELL_TIMEOUT_S = 300
SMOKE_TRAIN_EXAMPLES = 2048  # max_train_examples of the notebooks' smoke mode


@pytest.fixture(scope="module")
def fashion_mnist_available() -> None:
  try:
    data.load_dataset("fashion_mnist", max_train_examples=1, max_test_examples=1)
  except data.DataNotFoundError as err:
    pytest.skip(f"Fashion-MNIST not available: {str(err).splitlines()[0]}")


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


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom_in_smoke_mode(name, fashion_mnist_available, monkeypatch):
  del fashion_mnist_available
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
  assert f"num_train={SMOKE_TRAIN_EXAMPLES}" in text, "smoke mode was not on"
  final = re.findall(r"final accuracy[^\n]*?(\d+\.\d+)%", text)
  assert final, f"{name} printed no final accuracy"
  assert all(0.0 <= float(value) <= 100.0 for value in final)
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
    assert f"num_train={SMOKE_TRAIN_EXAMPLES}" not in _stream_text(notebook), (
      f"{name}: the committed outputs are from a smoke run"
    )

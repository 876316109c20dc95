"""The quick mode of benchmarks/paper_tables.py: every table, row and method, numbers in range.

One module-level run of ``paper_tables.py --quick`` on tiny Fashion-MNIST subsets
(skipped when Fashion-MNIST is not installed). It compiles some 140 XLA
programs (about 90 s on 2 cores), so it is a slow test, kept out of the default
run to hold the suite under 5 minutes: ``bash scripts/test.sh -m slow``.
"""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import paper_tables  # noqa: E402
from training import data  # noqa: E402

pytestmark = [
  pytest.mark.slow,
  pytest.mark.skipif(
    not os.path.isdir(data.DEBIAN_FASHION_MNIST_DIR),
    reason="Fashion-MNIST (Debian package dataset-fashion-mnist) is not installed",
  ),
]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  """(results JSON, Markdown text, output dir, docs dir) of one quick run."""
  base = tmp_path_factory.mktemp("paper_tables")
  out, docs = base / "out", base / "docs"
  assert (
    paper_tables.main(
      ["--quick", "--workdir", str(base / "runs"), "--out", str(out), "--docs", str(docs)]
    )
    == 0
  )
  with open(out / "paper_tables_quick.json") as f:
    results = json.load(f)
  return results, (out / "paper_tables_quick.md").read_text(), out, docs


def _in_unit_range(x):
  return isinstance(x, float) and 0.0 <= x <= 1.0


def test_table1_has_every_row_and_method_with_accuracies_in_range(quick):
  results = quick[0]
  expected = [
    (model, c) for model, s in paper_tables.settings(True).items() for c in s["compressions"]
  ]
  assert [(r["model"], r["compression"]) for r in results["table1"]] == expected
  for row in results["table1"]:
    for key in ("dense_accuracy", *paper_tables.METHODS, "gmp_no_ft", "admm_no_ft"):
      assert _in_unit_range(row[key]), (row["model"], key, row[key])
    # Every method reached the target compression with the same number of weights.
    assert set(row["compression_reached"]) == {"gsm", "magnitude", "gmp", "admm"}
    for reached in row["compression_reached"].values():
      assert reached == pytest.approx(row["compression"], rel=1e-3)
    assert len(set(row["nonzeros"].values())) == 1


def test_every_method_gets_the_same_epoch_budget_after_the_dense_model(quick):
  results = quick[0]
  for row in results["table1"]:
    budget = results["settings"][row["model"]]["budget_epochs"]
    totals = {m: sum(e.values()) for m, e in row["epochs"].items()}
    assert totals == {"gsm": budget, "magnitude": budget, "gmp": budget, "admm": budget}
  sup = results["supplement"]
  assert {m: sum(e.values()) for m, e in sup["epochs"].items()} == dict.fromkeys(
    ("gsm", "magnitude", "gmp", "admm"), sup["budget_epochs"]
  )


def test_table4_has_both_tickets_for_every_ticket_row(quick):
  results = quick[0]
  expected = [(model, c) for model, s in paper_tables.settings(True).items() for c in s["tickets"]]
  assert [(r["model"], r["compression"]) for r in results["table4"]] == expected
  for row in results["table4"]:
    for key in ("magnitude_ticket", "gsm_ticket", "dense_accuracy"):
      assert _in_unit_range(row[key]), key
    dense_epochs = results["settings"][row["model"]]["dense_epochs"]
    assert row["retrain_epochs"] == dense_epochs  # the dense schedule


def test_per_layer_densities_match_the_compression(quick):
  results = quick[0]
  assert len(results["densities"]) == len(results["table1"])
  for entry in results["densities"]:
    size = sum(layer["size"] for layer in entry["layers"])
    for method in ("gsm", "magnitude"):
      kept = sum(layer[f"{method}_density"] * layer["size"] for layer in entry["layers"])
      assert kept == pytest.approx(int(size / entry["compression"]), abs=0.5), method
      assert all(0.0 <= layer[f"{method}_density"] <= 1.0 for layer in entry["layers"])


def test_markdown_has_every_table_and_row(quick):
  results, md = quick[0], quick[1]
  for title in (
    "## Table 1 analogue",
    "## Table 4 analogue",
    "## Per-layer density",
    "### Longer budget",
  ):
    assert title in md, title
  for label in paper_tables.METHOD_LABELS.values():
    assert label in md
  for row in results["table1"]:
    assert f"| {row['model']} | {row['compression']:g}x | " in md
  assert "epochs for every method" in md


def test_plots_are_written_as_png(quick):
  docs = quick[3]
  for name in ("paper_accuracy_vs_compression_quick.png", "paper_layer_density_quick.png"):
    with open(docs / name, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
  assert not os.path.exists(docs / "RESULTS.md")  # only the full mode writes it


def test_results_md_generated_block_is_replaced_in_place(tmp_path):
  path = str(tmp_path / "RESULTS.md")
  paper_tables.write_results_md(path, "first")
  with open(path, "a") as f:
    f.write("\nhand-written discussion\n")
  paper_tables.write_results_md(path, "second")
  text = open(path).read()
  assert "second" in text and "first" not in text
  assert text.endswith("hand-written discussion\n")

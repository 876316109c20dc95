"""benchmarks/evidence_report.py: tables, verdicts and tickets from synthetic raw records."""

import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import evidence_report  # noqa: E402


def _records(method, compression, accuracies, stage="grid", budget=60, before=None):
  """Synthetic raw records, one per seed; `before`: the accuracies just before the cut."""
  before = accuracies if before is None else before
  return [
    {
      "stage": stage,
      "model": "lenet_300_100",
      "method": method,
      "compression": compression,
      "budget": budget,
      "seed": seed,
      "name": f"lenet_300_100/{stage}/{method}_c{compression:g}/seed{seed}",
      "status": "done",
      "learning_rate": None if stage == "ticket" else 0.03,
      "accuracy_before_prune": b,
      "accuracy_after_prune": a,
      "accuracy_final": a,
      "validation_accuracy_final": a,
      "dense_accuracy": 0.9 + 0.001 * seed,
    }
    for seed, (a, b) in enumerate(zip(accuracies, before))
  ]


def _std_text(values):
  v = 100 * np.array(values)
  return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"


def test_tables_and_verdicts_follow_the_two_standard_error_rule(tmp_path):
  gsm, gmp, mag = [0.880, 0.882, 0.884], [0.886, 0.887, 0.888], [0.879, 0.885, 0.891]
  records = (
    _records("gsm", 60.0, gsm) + _records("gmp", 60.0, gmp) + _records("magnitude", 60.0, mag)
  )
  records += _records("ticket_gsm", 60.0, [0.80, 0.82], "ticket", 30)
  records += _records("ticket_magnitude", 60.0, [0.70, 0.71], "ticket", 30)
  records += _records("gsm", 60.0, [0.87], budget=15)
  records += [dict(r, status="diverged") for r in _records("admm", 60.0, [0.1, 0.1])]
  (tmp_path / "evidence_raw.json").write_text(json.dumps({"records": records}))
  text = evidence_report.section(str(tmp_path))
  assert f"| gsm | 0.03 | {_std_text(gsm)} |" in text
  assert f"| gmp | 0.03 | {_std_text(gmp)} |" in text
  assert "| admm | - | 2 diverged |" in text and text.count("| admm |") == 1  # its table only

  def label(a, b):
    d = 100 * (np.mean(a) - np.mean(b))
    se = 100 * np.sqrt(np.var(a, ddof=1) / 3 + np.var(b, ddof=1) / 3)
    return f"{d:+.2f} ({'clear' if abs(d) > 2 * se else 'within the spread'})"

  verdict = next(line for line in text.splitlines() if line.startswith("- lenet_300_100, 60x"))
  assert verdict.startswith(f"- lenet_300_100, 60x, 60 epochs: **gmp** {_std_text(gmp)}; ")
  assert f"magnitude {label(mag, gmp)}" in verdict and "within the spread" in verdict
  assert f"gsm {label(gsm, gmp)}" in verdict and "gsm -0.50 (clear)" in verdict
  ticket = "| lenet_300_100 | 60x | 70.50 ± 0.71 (n=2) | 81.00 ± 1.41 (n=2) | +10.50 (clear) |"
  assert ticket in text


def test_the_section_replaces_only_its_own_block(tmp_path):
  doc = "intro\n" + evidence_report.BEGIN + "\nold\n" + evidence_report.END + "\nkept\n"
  new = evidence_report.replace_between(doc, "new\n")
  assert new == f"intro\n{evidence_report.BEGIN}\nnew\n{evidence_report.END}\nkept\n"
  assert evidence_report.replace_between("kept\n", "x\n").endswith("\n\nkept\n")


def test_the_cut_cost_sentence_and_table_follow_the_records(tmp_path):
  records = _records("gsm", 60.0, [0.880, 0.870, 0.890], before=[0.881, 0.874, 0.890])
  records += _records("gsm", 120.0, [0.85, 0.86], before=[0.852, 0.861])
  records += _records("gsm", 60.0, [0.80, 0.81], budget=15, before=[0.82, 0.84])
  records += _records("gsm", 60.0, [0.84], budget=30, before=[0.85])
  records += _records("gsm_gradual", 60.0, [0.80], before=[0.85])
  records += _records("gmp", 60.0, [0.89], before=[0.85])  # fine-tuned: not a cut cost
  records += [dict(r, status="diverged") for r in _records("gsm", 10.0, [0.1], before=[0.9])]
  (tmp_path / "evidence_raw.json").write_text(json.dumps({"records": records}))
  text = evidence_report.section(str(tmp_path))
  # Means over seeds (0.1 + 0.4 + 0) / 3 at 60x and 0.15 at 120x; one seed lost 0.4.
  sentence = (
    "GSM's final cut costs at most 0.17 point (mean over seeds; 0.40 for one seed) in every "
    "cell with the full budget (60 or more epochs after the dense model), but 1.00 with 30 "
    "epochs and 2.50 with 15 epochs"
  )
  assert f"**GSM's cut, over every run below:** {sentence}." in text
  assert "| gsm | lenet_300_100 | 60x | 60 | 3 | 0.17 | 0.40 |" in text
  assert "| gsm | lenet_300_100 | 60x | 15 | 2 | 2.50 | 3.00 |" in text
  assert "| gsm_gradual | lenet_300_100 | 60x | 60 | 1 | 5.00 | 5.00 |" in text
  assert "| gmp |" not in text.split("The final cut's cost")[1]
  assert "10x" not in text.split("The final cut's cost")[1]  # the diverged seed has no cut


def _words(path):
  with open(os.path.join(evidence_report.ROOT, path)) as f:
    return " ".join(f.read().split())


def test_the_docs_say_what_the_committed_records_say_about_the_cut():
  sentence = evidence_report.cut_sentence(evidence_report.all_cut_costs())
  assert sentence.startswith("GSM's final cut costs at most ")
  assert sentence in _words("README.md")
  assert sentence in _words("docs/RESULTS.md")
  with open(os.path.join(evidence_report.ROOT, "docs", "RESULTS.md")) as f:
    text = f.read()
  regenerated = evidence_report.replace_between(text, evidence_report.section())
  assert regenerated == text, "run python benchmarks/evidence_report.py"


def _lm_records(method, compression, bits, before=None):
  """Synthetic LM records, one per seed; `before`: bits per byte just before the cut."""
  before = bits if before is None else before
  return [
    {
      "stage": "grid",
      "model": "gpt_austen",
      "method": method,
      "compression": compression,
      "budget": 4,
      "seed": seed,
      "name": f"gpt_austen/grid/{method}_c{compression:g}_e4/seed{seed}",
      "status": "done",
      "learning_rate": 1e-3,
      "bits_per_byte_before_prune": b,
      "bits_per_byte_after_prune": a,
      "bits_per_byte_final": a,
      "validation_bits_per_byte_final": a,
      "dense_bits_per_byte": 2.3,
    }
    for seed, (a, b) in enumerate(zip(bits, before))
  ]


def test_language_model_cells_rank_lowest_bits_per_byte_first_and_cost_the_cut_in_bits(tmp_path):
  gsm, gmp = [2.43, 2.44, 2.45], [2.40, 2.401, 2.402]
  records = _lm_records("gsm", 10.0, gsm, before=[2.42, 2.44, 2.45]) + _lm_records("gmp", 10.0, gmp)
  (tmp_path / "evidence_lm_raw.json").write_text(json.dumps({"records": records}))
  source = ("evidence_lm_raw.json", "LM", "python benchmarks/evidence.py --model gpt_austen")
  old = evidence_report.SOURCES
  evidence_report.SOURCES = (source,)
  try:
    text = evidence_report.section(str(tmp_path))
  finally:
    evidence_report.SOURCES = old
  assert "(test bits per byte, lower is better, mean ± std over seeds)" in text
  assert f"| gsm | 0.001 | {np.mean(gsm):.4f} ± {np.std(gsm, ddof=1):.4f} |" in text
  d = np.mean(gsm) - np.mean(gmp)
  se = np.sqrt(np.var(gsm, ddof=1) / 3 + np.var(gmp, ddof=1) / 3)
  assert d > 2 * se
  verdict = next(line for line in text.splitlines() if line.startswith("- gpt_austen, 10x"))
  assert verdict == (f"- gpt_austen, 10x, 4 epochs: **gmp** 2.4010 ± 0.0010; gsm {d:+.4f} (clear).")
  # the cut: after - before in bits per byte, 0.01 / 3 on average, 0.01 at most
  assert "| gsm | gpt_austen | 10x | 4 | 3 | 0.0033 | 0.0100 |" in text
  assert "GSM's cut, over every run below" not in text  # the sentence is the images'


def test_a_transformers_full_budget_is_its_grids_and_channel_kinds_are_compared_apart(tmp_path):
  vit = [
    dict(r, model="vit_fashion", budget=6) for r in _records("gsm", 10.0, [0.86], before=[0.87])
  ]
  records = _records("gsm", 60.0, [0.880], before=[0.881]) + vit
  (tmp_path / "evidence_raw.json").write_text(json.dumps({"records": records}))
  sentence = evidence_report.cut_sentence(evidence_report.all_cut_costs(str(tmp_path)))
  assert sentence == (
    "GSM's final cut costs at most 1.00 point (mean over seeds; 1.00 for one seed) in every cell "
    "with the full budget (60 or more epochs after the dense model, 6 for vit_fashion)"
  )
  lm = []
  for method, bits, macs in (
    ("gsm_neurons", [2.8, 3.1, 3.4], 0.7),
    ("l1_neurons", [2.9, 2.9, 2.9], 0.7),
    ("gsm_heads", [2.6, 2.6, 2.6], 0.8),
    ("l1_heads", [2.8, 2.8, 2.8], 0.8),
  ):
    for r in _lm_records(method, 2.0, bits):
      lm.append(r | {"method_results": {"macs_narrow": macs, "macs_dense": 1.0}})
  (tmp_path / "evidence_raw.json").write_text(json.dumps({"records": lm}))
  text = evidence_report.section(str(tmp_path))
  assert "| gsm_heads | 0.001 | 2.6000 ± 0.0000; MACs 0.800 |" in text
  assert "| l1_neurons | 0.001 | 2.9000 ± 0.0000; MACs 0.700 |" in text
  assert "- gpt_austen, 2x neurons, 4 epochs: **l1_neurons** 2.9000 ± 0.0000; " in text
  assert "gsm_neurons +0.2000 (within the spread)." in text  # std 0.3: 2 SE = 0.35
  assert (
    "- gpt_austen, 2x heads, 4 epochs: **gsm_heads** 2.6000 ± 0.0000; l1_heads +0.2000 (clear)."
    in text
  )
  assert "Verdicts (differences in bits per byte against the best method of each cell):" in text

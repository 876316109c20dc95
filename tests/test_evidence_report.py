"""benchmarks/evidence_report.py: tables, verdicts and tickets from synthetic raw records."""

import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import evidence_report  # noqa: E402


def _records(method, compression, accuracies, stage="grid", budget=60):
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
      "accuracy_final": a,
      "validation_accuracy_final": a,
      "dense_accuracy": 0.9 + 0.001 * seed,
    }
    for seed, a in enumerate(accuracies)
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

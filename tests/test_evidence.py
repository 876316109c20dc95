"""benchmarks/evidence.py end to end: a tiny grid run as train.py subprocesses, then resumed.

Slow (four train.py processes, ~50 s on 2 CPU cores): ``pytest -m slow tests/test_evidence.py``.
"""

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from test_train import data_dir  # noqa: E402, F401  (the fixture)

from benchmarks import evidence  # noqa: E402


def _tiny_grid(data_dir, tmp_path):  # noqa: F811
  return [
    "--only=method=gsm,compression=60",
    "--stage=grid",
    "--seeds=0,1",
    "--max_examples=512",
    "--epochs=1",
    "--dense_epochs=1",
    "--learning_rate=0.03",
    f"--data_dir={data_dir}",
    f"--workdir_root={tmp_path / 'runs'}",
    f"--out={tmp_path / 'out'}",
  ]


@pytest.mark.slow
def test_tiny_grid_runs_once_resumes_as_a_no_op_and_aggregates_the_raw_records(
  data_dir,  # noqa: F811
  tmp_path,
  monkeypatch,
):
  args = _tiny_grid(data_dir, tmp_path)
  assert evidence.main(args) == 0
  with open(tmp_path / "out" / "evidence_raw.json") as f:
    records = json.load(f)["records"]
  names = sorted(r["name"] for r in records)
  assert names == [
    "lenet_300_100/dense/seed0",
    "lenet_300_100/dense/seed1",
    "lenet_300_100/grid/gsm_c60_e1/seed0",
    "lenet_300_100/grid/gsm_c60_e1/seed1",
  ]
  assert all(r["status"] == "done" and r["command"].startswith("python train.py") for r in records)
  summaries = sorted((tmp_path / "runs").glob("**/summary.json"))
  assert len(summaries) == 4
  mtimes = [p.stat().st_mtime_ns for p in summaries]

  def no_training(*args):
    raise AssertionError(f"a finished cell was run again: {args}")

  monkeypatch.setattr(evidence, "run_cell", no_training)
  assert evidence.main(args) == 0
  assert [p.stat().st_mtime_ns for p in summaries] == mtimes

  grid = [r for r in records if "/grid/" in r["name"]]
  cells = []
  for key in ("accuracy_final", "validation_accuracy_final", "dense_accuracy"):
    values = 100 * np.array([r[key] for r in grid])
    std = np.sqrt(np.sum((values - values.mean()) ** 2) / (len(values) - 1))
    cells.append(f"{values.mean():.2f} ± {std:.2f}")
  expected = f"| lenet_300_100 | 60 | 1 | gsm | 0.03 | 2 | {' | '.join(cells)} |"
  table = (tmp_path / "out" / "evidence.md").read_text()
  assert expected in table.splitlines()
  assert (tmp_path / "out" / "evidence.png").stat().st_size > 0

"""benchmarks/evidence.py end to end: a tiny grid run as train.py subprocesses, then resumed.

Slow (four train.py processes, ~50 s on 2 CPU cores): ``pytest -m slow tests/test_evidence.py``.
"""

import json
import os
import shutil
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
  expected = f"| lenet_300_100 | 60 | 1 | gsm | 0.03 | 2 | {' | '.join(cells)} | - |"  # no MACs: not a channel method
  table = (tmp_path / "out" / "evidence.md").read_text()
  assert expected in table.splitlines()
  assert (tmp_path / "out" / "evidence.png").stat().st_size > 0


def _fake_train(started: list[str]):
  """A run_cell that writes a summary.json from its flags instead of training."""

  def run_cell(argv, workdir, lock=None, env=None):
    flags = dict(a[2:].split("=", 1) for a in argv[2:])
    dense = flags.get("config.dense_checkpoint")
    if dense is not None:  # the dense model it starts from exists already
      assert os.path.exists(os.path.join(dense, "summary.json")), (workdir, dense)
    source = flags.get("config.lottery.gsm_checkpoint")
    if source is not None:
      assert os.path.exists(os.path.join(source, "summary.json")), (workdir, source)
    started.append(os.path.relpath(workdir, os.path.dirname(os.path.dirname(dense or workdir))))
    os.makedirs(workdir, exist_ok=True)
    summary = {"accuracy_final": float(flags["config.seed"]) / 10, "flags": flags}
    if flags.get("config.method") in ("gsm_channels", "filter_l1"):
      summary["method_results"] = {"macs_narrow": 1 + int(flags["config.seed"]), "macs_dense": 4}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f)
    _write_config(workdir, flags)
    return 0

  return run_cell


def _write_config(workdir: str, flags: dict[str, str]) -> None:
  """train.py's config.json: the config.* flags as nested fields."""
  config: dict = {}
  for key, value in flags.items():
    if key.startswith("config."):
      *parents, leaf = key.split(".")[1:]
      node = config
      for parent in parents:
        node = node.setdefault(parent, {})
      node[leaf] = value
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f)


@pytest.mark.parametrize("jobs", [1, 3])
def test_cells_wait_for_the_cells_they_start_from_and_variants_get_their_fields(
  tmp_path, monkeypatch, jobs
):
  rates = tmp_path / "lr.json"
  rates.write_text(json.dumps({"chosen": {"gsm": 0.03, "magnitude": 0.1, "gmp": 0.1}}))
  started = []
  monkeypatch.setattr(evidence, "run_cell", _fake_train(started))
  monkeypatch.setattr(evidence, "plot", lambda rows, path: None)  # matplotlib: 4 s
  args = [
    "--model=lenet5",
    "--only=method=gsm|gsm_ema|gsm_age|gsm_ft|gmp|ticket_gsm|ticket_magnitude,compression=125",
    "--seeds=0,1",
    f"--rates_from={rates}",
    f"--jobs={jobs}",
    f"--workdir_root={tmp_path / 'runs'}",
    f"--out={tmp_path / 'out'}",
    "--tag=t",
  ]
  assert evidence.main(args) == 0
  assert len(started) == 2 + 2 * 5 + 2 * 2 and len(set(started)) == len(started)
  with open(tmp_path / "out" / "t_raw.json") as f:
    records = {r["name"]: r for r in json.load(f)["records"]}
  assert len(records) == 16 and all(r["status"] == "done" for r in records.values())

  def flags(name):
    with open(tmp_path / "runs" / name / "summary.json") as f:
      return json.load(f)["flags"]

  ft = flags("lenet5/grid/gsm_ft_c125_e60/seed1")
  assert ft["config.method"] == "gsm" and ft["config.gsm.finetune"] == "True"
  assert (ft["config.gsm.epochs"], ft["config.finetune.epochs"]) == ("50", "10")
  assert (ft["config.gsm.learning_rate"], ft["config.finetune.learning_rate"]) == ("0.03", "0.1")
  ema = flags("lenet5/grid/gsm_ema_c125_e60/seed0")
  assert ema["config.gsm.score_ema"] == "0.9" and ema["config.gsm.learning_rate"] == "0.03"
  age = flags("lenet5/grid/gsm_age_c125_e60/seed0")
  assert age["config.gsm.passive_decay_growth"] == "4.0"
  ticket = flags("lenet5/ticket/ticket_gsm_c125/seed1")
  assert ticket["config.method"] == "lottery" and ticket["config.lottery.ticket"] == "gsm"
  source = str(tmp_path / "runs" / "lenet5/grid/gsm_c125_e60/seed1")
  assert ticket["config.lottery.gsm_checkpoint"] == source
  assert ticket["config.dense.epochs"] == "30" and "config.gsm.epochs" not in ticket
  assert records["lenet5/ticket/ticket_gsm_c125/seed1"]["command"].startswith(
    "python train.py --config=configs/evidence_lenet5.py"
  )
  table = (tmp_path / "out" / "t.md").read_text()
  assert "| lenet5 | 125 | 30 | ticket_gsm | - | 2 | 5.00 ± 7.07 |" in table


def test_a_deadline_starts_no_cell_and_reports_what_was_not_run(tmp_path, monkeypatch, capsys):
  started = []
  monkeypatch.setattr(evidence, "run_cell", _fake_train(started))
  args = ["--only=method=gsm,compression=60,budget=60", "--learning_rate=0.03"]
  args += [f"--workdir_root={tmp_path}", f"--out={tmp_path}", "--deadline=-1", "--seeds=0"]
  assert evidence.main(args) == 0
  assert started == []
  assert (
    "lenet_300_100/grid/gsm_c60_e60/seed0: not run (the deadline passed)" in capsys.readouterr().out
  )
  monkeypatch.setattr(evidence, "plot", lambda rows, path: None)
  assert evidence.main([*args[:-2], "--seeds=0", "--stage=grid"]) == 0 and len(started) == 2
  text = (tmp_path / "evidence.md").read_text()
  assert "; one learning rate for every method, 0.03 (--learning_rate, no sweep)." in text


def test_structured_grid_takes_the_sweeps_rates_and_prunes_conv2(tmp_path, monkeypatch):
  rates = tmp_path / "lr.json"
  rates.write_text(json.dumps({"chosen": {"gsm": 0.03, "magnitude": 0.1}}))
  started = []
  monkeypatch.setattr(evidence, "run_cell", _fake_train(started))
  monkeypatch.setattr(evidence, "plot", lambda rows, path: None)
  common = ["--model=lenet5", "--grid=structured", "--seeds=0,1", f"--out={tmp_path / 'out'}"]
  with pytest.raises(SystemExit, match="--grid structured takes a sweep's rates"):
    evidence.main(common)
  args = [*common, f"--rates_from={rates}", f"--workdir_root={tmp_path / 'runs'}", "--tag=s"]
  assert evidence.main(args) == 0
  assert len(started) == 2 + 2 * 6  # dense, then 2 channel methods x 2 C + 2 N:M methods

  def flags(name):
    with open(tmp_path / "runs" / "lenet5" / "grid" / name / "summary.json") as f:
      return json.load(f)["flags"]

  channels = flags("gsm_channels_c2.38_e60/seed0")
  assert channels["config.method"] == "gsm_channels" and channels["config.compression"] == "2.38"
  assert channels["config.channels.layers"] == "conv2" and channels["config.gsm.epochs"] == "60"
  assert channels["config.gsm.learning_rate"] == "0.03"
  l1 = flags("filter_l1_c7.1_e60/seed1")
  assert l1["config.finetune.learning_rate"] == "0.1" and l1["config.finetune.epochs"] == "60"
  nm = flags("magnitude_nm_c2_e60/seed0")
  assert nm["config.method"] == "magnitude_nm" and nm["config.nm.layers"] == "conv2,fc1,fc2"
  table = (tmp_path / "out" / "s.md").read_text()
  # seeds 0 and 1: MACs 1/4 and 2/4 of the dense model's, mean 0.375
  assert "| lenet5 | 7.1 | 60 | filter_l1 | 0.1 | 2 | 5.00 ± 7.07 |" in table
  assert table.count("| 0.375 |") == 4 and table.count("| - |\n") == 2


def _fake_lm_train(started: list[str]):
  """A run_cell for the LM: validation bits per byte |log10(lr) + 3| + seed / 10 (best at 1e-3
  for AdamW; SGD's rates all lie above 1e-3, so its smallest wins), test = validation + 0.01."""

  def run_cell(argv, workdir, lock=None, env=None):
    flags = dict(a[2:].split("=", 1) for a in argv[2:])
    started.append(workdir)
    section = {"gmp": "gmp", "magnitude": "finetune"}.get(flags["config.method"], "gsm")
    lr = float(flags.get(f"config.{section}.learning_rate", "1e-3"))
    validation = abs(np.log10(lr) + 3) + float(flags["config.seed"]) / 10
    summary = {
      "bits_per_byte_final": validation + 0.01,
      "validation_bits_per_byte_final": validation,
      "dense_bits_per_byte": 2.0,
      "flags": flags,
    }
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f)
    _write_config(workdir, flags)
    return 0

  return run_cell


def test_lm_grid_sweeps_per_optimizer_picks_the_lowest_validation_bits_and_sets_each_cell(
  tmp_path, monkeypatch
):
  started = []
  monkeypatch.setattr(evidence, "run_cell", _fake_lm_train(started))
  monkeypatch.setattr(evidence, "plot", lambda rows, path: None)
  args = ["--model=gpt_austen", "--seeds=0,1", "--tag=lm", f"--out={tmp_path / 'out'}"]
  assert evidence.main([*args, f"--workdir_root={tmp_path / 'runs'}"]) == 0
  # 2 dense; 4 methods x 4 rates swept on seed 0, and 3e-2 for gsm and magnitude; 4 methods x
  # 3 C x 2 seeds, but seed 0's C = 10 cells are the sweep's runs at the chosen rates (the same
  # command): not run again
  assert len(started) == 2 + 16 + 2 + 24 - 4 and len(set(started)) == len(started)
  records = json.loads((tmp_path / "out" / "lm_raw.json").read_text())["records"]
  twin = next(r for r in records if r["name"] == "gpt_austen/grid/gsm_sgd_c10_e4/seed0")
  assert "gsm_sgd_c10_e4_lr0.01/seed0" in twin["command"] and twin["status"] == "done"
  assert twin["validation_bits_per_byte_final"] == 1.0  # |log10(0.01) + 3|
  lr = json.loads((tmp_path / "out" / "lm_lr.json").read_text())
  assert lr["chosen"] == {"gsm": 1e-3, "gsm_sgd": 0.01, "gmp": 1e-3, "magnitude": 1e-3}

  def flags(name):
    return json.loads((tmp_path / "runs" / "gpt_austen" / name / "summary.json").read_text())[
      "flags"
    ]

  dense = flags("dense/seed1")
  assert dense["config.dense.epochs"] == "8" and "config.compression" not in dense
  sgd = flags("grid/gsm_sgd_c4_e4/seed1")
  assert (sgd["config.method"], sgd["config.gsm.optimizer"], sgd["config.gsm.momentum"]) == (
    "gsm",
    "sgd",
    "0.99",
  )
  assert sgd["config.gsm.learning_rate"] == "0.01" and sgd["config.gsm.epochs"] == "4"
  adamw = flags("grid/gsm_c2_e4/seed0")
  assert "config.gsm.optimizer" not in adamw and adamw["config.compression"] == "2.0"
  gmp = flags("grid/gmp_c10_e4/seed1")
  assert (gmp["config.gmp.epochs"], gmp["config.finetune.epochs"]) == ("2", "2")
  assert gmp["config.dense_checkpoint"].endswith("gpt_austen/dense/seed1")
  table = (tmp_path / "out" / "lm.md").read_text()
  # seeds 0 and 1 at the chosen rate: test 0.01 and 0.11, mean 0.06, std 0.0707
  assert "| gpt_austen | 10 | 4 | gsm_sgd | 0.01 | 2 | 1.0600 ± 0.0707 | 1.0500 ± 0.0707 " in table
  assert "| gpt_austen | 2 | 4 | gsm | 0.001 | 2 | 0.0600 ± 0.0707 |" in table


def test_ramp_grid_takes_gsm_graduals_rate_and_ends_the_ramp_at_b_over_8_and_16(
  tmp_path, monkeypatch
):
  rates = tmp_path / "lr.json"
  rates.write_text(json.dumps({"chosen": {"gsm": 0.03, "gsm_gradual": 0.1}}))
  started = []
  monkeypatch.setattr(evidence, "run_cell", _fake_train(started))
  monkeypatch.setattr(evidence, "plot", lambda rows, path: None)
  args = ["--grid=ramp", "--seeds=0", f"--rates_from={rates}", "--tag=r"]
  assert evidence.main([*args, f"--workdir_root={tmp_path}", f"--out={tmp_path}"]) == 0
  assert len(started) == 1 + 2 * 3

  def flags(name):
    path = tmp_path / "lenet_300_100" / "grid" / name / "seed0" / "summary.json"
    return json.loads(path.read_text())["flags"]

  for method, ramp in (("gsm_gradual", "15.0"), ("gsm_ramp8", "7.5"), ("gsm_ramp16", "3.75")):
    cell = flags(f"{method}_c120_e60")
    assert (cell["config.method"], cell["config.gsm.ramp_epochs"]) == ("gsm", ramp)
    assert cell["config.gsm.learning_rate"] == "0.1"


def test_the_vit_grid_is_gsm_against_gmp_at_10x_and_30x_swept_with_adamws_rates():
  assert evidence.grid_groups("vit_fashion") == [
    ("gsm", 10.0, 6),
    ("gmp", 10.0, 6),
    ("gsm", 30.0, 6),
    ("gmp", 30.0, 6),
  ]
  rates = (3e-4, 1e-3, 3e-3, 1e-2)  # gsm chose 1e-2, the edge: 3e-2 swept too
  assert evidence.sweep_rates("vit_fashion") == {"gsm": (*rates, 3e-2), "gmp": rates}
  cells = evidence.all_cells([0, 1, 2], 6, None, "vit_fashion")
  assert [c.stage for c in cells].count("sweep") == 9 and len(cells) == 3 + 9 + 12


def test_a_grid_cell_run_at_a_rate_the_sweep_no_longer_chooses_stops_the_runner(
  tmp_path, monkeypatch, capsys
):
  rates = tmp_path / "lr.json"
  rates.write_text(json.dumps({"chosen": {"gsm_gradual": 0.03}}))
  started = []
  monkeypatch.setattr(evidence, "run_cell", _fake_train(started))
  monkeypatch.setattr(evidence, "plot", lambda rows, path: None)
  args = ["--grid=ramp", "--seeds=0", f"--rates_from={rates}", "--only=method=gsm_ramp8"]
  args += [f"--workdir_root={tmp_path}", f"--out={tmp_path}", "--tag=r"]
  assert evidence.main(args) == 0 and len(started) == 1 + 2
  assert (
    "learning rates chosen on the validation split: gsm_gradual 0.03"
    in (tmp_path / "r.md").read_text()
  )
  rates.write_text(json.dumps({"chosen": {"gsm_gradual": 0.1}}))
  assert evidence.main(args) == 2 and len(started) == 3
  err = capsys.readouterr().err
  workdir = tmp_path / "lenet_300_100" / "grid" / "gsm_ramp8_c60_e60" / "seed0"
  assert (
    "lenet_300_100/grid/gsm_ramp8_c60_e60/seed0: gsm.learning_rate ran with 0.03, now 0.1; "
    f"delete {workdir} to rerun it" in err
  )
  shutil.rmtree(workdir)
  shutil.rmtree(workdir.parent.parent / "gsm_ramp8_c120_e60")
  assert evidence.main(args) == 0 and len(started) == 5


def test_the_lm_channel_grid_prunes_neurons_and_heads_with_gsms_and_magnitudes_rates(
  tmp_path, monkeypatch
):
  rates = tmp_path / "lr.json"
  rates.write_text(json.dumps({"chosen": {"gsm": 0.003, "magnitude": 0.001}}))
  started = []
  monkeypatch.setattr(evidence, "run_cell", _fake_lm_train(started))
  monkeypatch.setattr(evidence, "plot", lambda rows, path: None)
  args = ["--model=gpt_austen", "--grid=channels", "--seeds=0", f"--rates_from={rates}"]
  assert evidence.main([*args, f"--workdir_root={tmp_path}", f"--out={tmp_path}", "--tag=c"]) == 0
  assert len(started) == 1 + 4

  def flags(name):
    path = tmp_path / "gpt_austen" / "grid" / name / "seed0" / "summary.json"
    return json.loads(path.read_text())["flags"]

  heads = flags("gsm_heads_c2_e4")
  assert (heads["config.method"], heads["config.channels.groups"]) == ("gsm_channels", "heads")
  assert "config.gsm.passive_rule" not in heads and heads["config.gsm.learning_rate"] == "0.003"
  l1 = flags("l1_neurons_c2_e4")
  assert (l1["config.method"], l1["config.channels.groups"]) == ("filter_l1", "neurons")
  assert (l1["config.finetune.learning_rate"], l1["config.finetune.epochs"]) == ("0.001", "4")

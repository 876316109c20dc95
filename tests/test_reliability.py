"""Nothing a user trained is lost: checkpoints, signals, divergence, bad input.

Real processes and real files: ``train.py`` is started as a subprocess and sent
SIGTERM / SIGKILL, checkpoint files are truncated and bit-flipped on disk. Every
run trains LeNet-300-100 for a few 8-step epochs on the synthetic IDX data of
``test_train.py``.
"""

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from test_train import DENSE_EPOCHS  # noqa: E402
from test_train import GSM_EPOCHS  # noqa: E402
from test_train import ROOT  # noqa: E402
from test_train import STEPS_PER_EPOCH  # noqa: E402
from test_train import _assert_trees_equal  # noqa: E402
from test_train import _final_state  # noqa: E402
from test_train import _load_with_ctrl_c  # noqa: E402
from test_train import _rows  # noqa: E402
from test_train import data_dir  # noqa: E402, F401  (the fixture)
from test_train import finished_run  # noqa: E402, F401  (the fixture)
from test_train import tiny_command  # noqa: E402
from test_train import tiny_config  # noqa: E402

import train  # noqa: E402
from training import checkpoints  # noqa: E402
from training import data  # noqa: E402
from training import stages  # noqa: E402
from training import train_lib  # noqa: E402

FINAL_STEP = STEPS_PER_EPOCH * (DENSE_EPOCHS + GSM_EPOCHS)


def _final_model(workdir):
  return checkpoints.load_model(os.path.join(workdir, "final_model"))


def _steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


# --------------------------------------------------------------------------- #
# Data loss
# --------------------------------------------------------------------------- #


def test_a_committed_step_is_never_written_again(finished_run, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(finished_run[0], workdir)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=1)
  try:
    raw = ckpt.restore_raw(FINAL_STEP)
    assert ckpt.save(FINAL_STEP, raw, {"phase": "other"}) is False
    assert ckpt.restore_meta(FINAL_STEP)["phase"] == "gsm"  # the original, untouched
  finally:
    ckpt.close()


def test_a_signal_at_the_last_batch_of_an_epoch_keeps_its_checkpoint(
  finished_run, data_dir, tmp_path, monkeypatch
):
  """The end-of-epoch save and the interrupt save are the same step: with
  checkpoint_keep=1 the old program deleted it and lost every checkpoint."""
  config = tiny_config(data_dir)
  config.checkpoint_keep = 1
  workdir = str(tmp_path / "keep1")
  _load_with_ctrl_c(monkeypatch, (0, STEPS_PER_EPOCH - 1))  # last batch of dense epoch 1
  with pytest.raises(train_lib.TrainingInterrupted, match=f"checkpoint of step {STEPS_PER_EPOCH} "):
    train_lib.train_and_evaluate(config, workdir)
  assert _steps(workdir) == [STEPS_PER_EPOCH]
  _, meta = _final_state(workdir)
  assert (meta["phase"], meta["epoch"], meta["batch"]) == ("dense", 1, 0)
  monkeypatch.undo()
  train_lib.train_and_evaluate(config, workdir)
  _assert_trees_equal(_final_model(workdir), _final_model(finished_run[0]))


def _damage(workdir, kind):
  """Damages the latest checkpoint of ``workdir`` on disk; returns its step."""
  step = _steps(workdir)[-1]
  root = os.path.join(workdir, "checkpoints", str(step))
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "state")) for f in fs]
  data = max(files, key=os.path.getsize)
  if kind == "truncated data":
    with open(data, "r+b") as f:
      f.truncate(os.path.getsize(data) // 2)
  elif kind == "flipped bits":
    with open(data, "r+b") as f:
      f.seek(os.path.getsize(data) // 2)
      byte = f.read(1)
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte[0] ^ 0x10]))
  elif kind == "truncated meta":
    meta = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "meta")) for f in fs]
    for path in meta:
      with open(path, "r+b") as f:
        f.truncate(5)
  elif kind == "empty step directory":
    step += STEPS_PER_EPOCH
    os.makedirs(os.path.join(workdir, "checkpoints", str(step)))
  return step


@pytest.mark.parametrize(
  "kind", ["truncated data", "flipped bits", "truncated meta", "empty step directory"]
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(
  finished_run, data_dir, tmp_path, capsys, kind
):
  reference_dir = finished_run[0]
  workdir = str(tmp_path / "damaged")
  shutil.copytree(reference_dir, workdir)
  os.remove(os.path.join(workdir, "summary.json"))
  damaged = _damage(workdir, kind)
  summary = train_lib.train_and_evaluate(tiny_config(data_dir), workdir)
  printed = capsys.readouterr().out
  assert f"checkpoint of step {damaged} is damaged" in printed
  assert os.path.isdir(os.path.join(workdir, "damaged_checkpoints", str(damaged)))
  # The last epoch was trained again from the previous checkpoint: the same result.
  _assert_trees_equal(_final_model(workdir), _final_model(reference_dir))
  assert summary["accuracy_final"] == finished_run[1]["accuracy_final"]
  assert len(_rows(workdir)) == DENSE_EPOCHS + GSM_EPOCHS


def test_checksums_catch_a_flipped_bit_that_orbax_restores(finished_run, tmp_path):
  """Without the checksum the damaged array restores silently (the old behaviour)."""
  workdir = str(tmp_path / "flipped")
  shutil.copytree(finished_run[0], workdir)
  step = _damage(workdir, "flipped bits")
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    raw = ckpt.restore_raw(step)  # orbax itself does not notice
    stored = checkpoints.array_checksums(raw)
    meta_path = os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")
    with open(meta_path) as f:
      expected = json.load(f)["array_checksums"]
    assert stored != expected
  finally:
    ckpt.close()


def test_when_every_checkpoint_is_damaged_the_error_says_what_to_do(finished_run, tmp_path):
  workdir = str(tmp_path / "all_damaged")
  shutil.copytree(finished_run[0], workdir)
  for step in _steps(workdir):
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step), "meta"))
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), log=lambda _: None)
  try:
    with pytest.raises(checkpoints.CheckpointError, match="run the same command again to start"):
      ckpt.restore_latest(lambda meta: None)
  finally:
    ckpt.close()


# --------------------------------------------------------------------------- #
# Preemption: real processes
# --------------------------------------------------------------------------- #


def _start(data_dir, workdir, *extra):
  return subprocess.Popen(
    tiny_command(data_dir, workdir, *extra),
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _wait_for(predicate, process, timeout=120):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return
    if process.poll() is not None:
      raise AssertionError(f"train.py ended early: {process.communicate()[1][-2000:]}")
    time.sleep(0.05)
  process.kill()
  raise AssertionError("timed out")


def _checkpoint_count(workdir):
  try:
    return len(_steps(workdir))
  except FileNotFoundError:
    return 0


@pytest.mark.parametrize(
  "sig",
  # SIGKILL is slow-marked: the default suite keeps SIGTERM, the same resume path.
  [signal.SIGTERM, pytest.param(signal.SIGKILL, marks=pytest.mark.slow)],
  ids=["SIGTERM", "SIGKILL"],
)
def test_a_preempted_process_resumes_to_the_uninterrupted_result(
  finished_run, data_dir, tmp_path, sig
):
  """SIGTERM: the step in progress is checkpointed, exit 143. SIGKILL: at most the
  step in progress is lost (a checkpoint every step). Both resume bitwise."""
  workdir = str(tmp_path / "preempted")
  extra = ("--config.checkpoint_every_steps=1", "--config.checkpoint_keep=2")
  process = _start(data_dir, workdir, *extra)
  _wait_for(lambda: _checkpoint_count(workdir) >= 1 and _steps(workdir)[-1] >= 5, process)
  process.send_signal(sig)
  _, stderr = process.communicate(timeout=120)
  if sig == signal.SIGTERM:
    assert process.returncode == 143, stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("train.py: interrupted: checkpoint of step "), line
    assert line.endswith("run the same command again to resume")
  else:
    assert process.returncode == -signal.SIGKILL
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  result = subprocess.run(
    tiny_command(data_dir, workdir, *extra), cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "resumed from the checkpoint of step" in result.stdout
  _assert_trees_equal(_final_model(workdir), _final_model(finished_run[0]))
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["accuracy_final"] == finished_run[1]["accuracy_final"]


@pytest.mark.slow  # two train.py processes: 13 s
def test_a_second_run_on_a_busy_workdir_is_refused(data_dir, tmp_path):
  workdir = str(tmp_path / "busy")
  first = _start(data_dir, workdir, "--config.dense.epochs=200")
  _wait_for(lambda: _checkpoint_count(workdir) >= 1, first)
  second = subprocess.run(
    tiny_command(data_dir, workdir, "--config.dense.epochs=200"),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  first.kill()
  first.communicate()
  assert second.returncode == 1
  errors = [line for line in second.stderr.splitlines() if line.startswith("train.py")]
  assert errors == [
    f"train.py: error: workdir {workdir} is in use by another train.py (pid {first.pid}); "
    "wait for it to finish, or use another --workdir"
  ]
  rows = _rows(workdir)
  assert [row["epoch"] for row in rows] == list(range(1, len(rows) + 1))  # one writer only


@pytest.mark.slow  # a SIGKILLed train.py process: 18 s
def test_a_killed_run_leaves_no_stale_lock(data_dir, tmp_path):
  workdir = str(tmp_path / "stale")
  first = _start(data_dir, workdir)
  _wait_for(lambda: os.path.exists(os.path.join(workdir, "config.json")), first)
  first.kill()
  first.communicate()
  result = subprocess.run(
    tiny_command(data_dir, workdir), cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-2000:]


# --------------------------------------------------------------------------- #
# Preemption: in-process
# --------------------------------------------------------------------------- #


def test_checkpoint_every_steps_saves_inside_epochs(data_dir, tmp_path):
  config = tiny_config(data_dir)
  config.checkpoint_every_steps = 3
  config.checkpoint_keep = 100
  config.gsm.epochs = 1
  workdir = str(tmp_path / "every3")
  train_lib.train_and_evaluate(config, workdir)
  epochs = DENSE_EPOCHS + 1
  expected = sorted(
    {e * STEPS_PER_EPOCH + s for e in range(epochs) for s in (3, 6)}
    | {e * STEPS_PER_EPOCH for e in range(1, epochs + 1)}
  )
  assert _steps(workdir) == expected
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    meta = ckpt.restore_meta(STEPS_PER_EPOCH + 3)
  finally:
    ckpt.close()
  assert (meta["phase"], meta["epoch"], meta["batch"]) == ("dense", 1, 3)


def test_resume_jumps_straight_to_the_saved_batch(data_dir, tmp_path, monkeypatch):
  config = tiny_config(data_dir)
  workdir = str(tmp_path / "jump")
  _load_with_ctrl_c(monkeypatch, (1, 4))
  with pytest.raises(train_lib.TrainingInterrupted):
    train_lib.train_and_evaluate(config, workdir)
  monkeypatch.undo()
  calls = []
  real = data.load_dataset

  def recording(*args, **kwargs):
    dataset = real(*args, **kwargs)
    inner = dataset.train_batches

    def train_batches(batch_size, *, epoch, seed, start=0, shard=(0, 1)):
      calls.append((epoch, start))
      return inner(batch_size, epoch=epoch, seed=seed, start=start, shard=shard)

    monkeypatch.setattr(dataset, "train_batches", train_batches)
    return dataset

  monkeypatch.setattr(data, "load_dataset", recording)
  train_lib.train_and_evaluate(config, workdir)
  assert calls[0] == (1, 5)  # data epoch 1, from batch 5: batches 0-4 are never read


def test_a_signal_during_the_final_cut_stops_at_once_and_loses_nothing(
  finished_run, data_dir, tmp_path, monkeypatch
):
  config = tiny_config(data_dir)
  config.dense_checkpoint = finished_run[0]
  workdir = str(tmp_path / "cut")
  real_cut = stages.global_cut

  def cut_with_ctrl_c(params, compression, pool=None):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(1.0)  # the handler raises here
    return real_cut(params, compression, pool)

  monkeypatch.setattr(stages, "global_cut", cut_with_ctrl_c)
  with pytest.raises(train_lib.TrainingInterrupted) as err:
    train_lib.train_and_evaluate(config, workdir)
  last = STEPS_PER_EPOCH * GSM_EPOCHS
  assert str(err.value) == (
    f"interrupted while entering the stage 'cut'; nothing is lost: the checkpoint of step "
    f"{last} holds all training so far; run the same command again to resume"
  )
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  monkeypatch.undo()
  summary = train_lib.train_and_evaluate(config, workdir)
  assert summary["nonzeros"] <= summary["keep"]


# --------------------------------------------------------------------------- #
# Fail fast, fail loud
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
  "fields, message",
  [
    (
      {"compression": 1e6},
      "config.compression=1e+06: compression 1000000.0 keeps Q = int(266200 / 1000000.0) = 0",
    ),
    (
      {"method": "magnitude", "compression": 2000.0, "magnitude.layerwise": True},
      "config.compression=2000 keeps no weight of the layer ['fc3']['kernel'] (1000 weights)",
    ),
    (
      {"method": "gmp", "compression": 2000.0, "gmp.layerwise": True},
      "config.compression=2000 keeps no weight of the layer ['fc3']['kernel'] (1000 weights)",
    ),
    (
      {"method": "admm", "admm.densities": (0.1, 0.2)},
      "config.admm.densities: densities as a sequence needs one density per pooled leaf",
    ),
  ],
)
def test_pool_dependent_values_are_checked_before_anything_is_written(
  data_dir, tmp_path, fields, message
):
  config = tiny_config(data_dir)
  for key, value in fields.items():
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
  workdir = str(tmp_path / "never_created")
  with pytest.raises(train_lib.ConfigError) as err:
    train_lib.train_and_evaluate(config, workdir)
  assert str(err.value).startswith(message) and "\n" not in str(err.value)
  assert not os.path.exists(workdir)


@pytest.mark.slow  # a train.py process: 12 s
def test_a_diverged_run_stops_with_exit_3_keeping_the_last_good_checkpoint(data_dir, tmp_path):
  workdir = tmp_path / "diverged"
  result = subprocess.run(
    tiny_command(data_dir, workdir, "--config.gsm.learning_rate=1e4"),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == train.EXIT_DIVERGED, result.stderr[-2000:]
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith("train.py: error: training diverged in the gsm phase: ")
  assert f"the last good checkpoint, step {DENSE_EPOCHS * STEPS_PER_EPOCH}, is kept" in line
  assert _steps(str(workdir))[-1] == DENSE_EPOCHS * STEPS_PER_EPOCH
  assert not (workdir / "summary.json").exists()
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))


def test_json_outputs_never_hold_nan():
  from training import report

  assert report.json_line({"loss": float("nan"), "x": [float("inf"), 1.0]}) == (
    '{"loss": null, "x": [null, 1.0]}\n'
  )


def _one_error_line(stderr):
  lines = [line for line in stderr.splitlines() if line.startswith("train.py")]
  assert len(lines) == 1, stderr[-3000:]
  return lines[0]


def test_a_file_as_workdir_is_one_error_line(data_dir, tmp_path):
  path = tmp_path / "a_file"
  path.write_text("x")
  result = subprocess.run(
    tiny_command(data_dir, path), cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 1
  assert _one_error_line(result.stderr) == (
    f"train.py: error: --workdir {path} is a file, not a directory"
  )


def test_a_corrupt_config_json_is_one_error_line(finished_run, data_dir, tmp_path):
  workdir = tmp_path / "corrupt_config"
  shutil.copytree(finished_run[0], workdir)
  (workdir / "config.json").write_text('{"model": ')
  result = subprocess.run(
    tiny_command(data_dir, workdir), cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 1
  assert _one_error_line(result.stderr).startswith(
    f"train.py: error: workdir {workdir}: config.json is not valid JSON ("
  )


def test_a_dense_checkpoint_of_another_model_is_refused_before_training(
  finished_run, data_dir, tmp_path
):
  config = tiny_config(data_dir)
  config.model = "lenet5"
  config.dense_checkpoint = finished_run[0]
  workdir = str(tmp_path / "other_model")
  with pytest.raises(train_lib.ConfigError) as err:
    train_lib.train_and_evaluate(config, workdir)
  assert str(err.value).startswith(
    f"config.dense_checkpoint={finished_run[0]!r} does not fit the model lenet5 "
  )
  assert not os.path.exists(workdir)


def test_a_full_disk_is_one_error_line_and_keeps_the_checkpoints(
  data_dir, tmp_path, monkeypatch, capsys
):
  config = tiny_config(data_dir)
  workdir = str(tmp_path / "full")
  real_save = checkpoints.Checkpointer.save

  def save(self, step, state, meta):
    if step > STEPS_PER_EPOCH:
      raise OSError(28, "No space left on device", os.path.join(workdir, "checkpoints"))
    return real_save(self, step, state, meta)

  monkeypatch.setattr(checkpoints.Checkpointer, "save", save)
  assert train.run(config, workdir) == train.EXIT_ERROR
  line = _one_error_line(capsys.readouterr().err)
  assert line == (
    f"train.py: error: No space left on device: {workdir}/checkpoints; the checkpoints "
    "already written are intact: fix this and run the same command again to resume"
  )
  assert _steps(workdir) == [STEPS_PER_EPOCH]


def test_corrupt_data_is_one_error_line(data_dir, tmp_path):
  broken = tmp_path / "broken_data"
  shutil.copytree(data_dir, broken)
  images = broken / "train-images-idx3-ubyte"
  images.write_bytes(images.read_bytes()[:1000])  # truncated
  result = subprocess.run(
    tiny_command(broken, tmp_path / "w"), cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 1
  line = _one_error_line(result.stderr)
  assert line.startswith("train.py: error: ") and str(images) in line
  assert not (tmp_path / "w").exists()


def test_gsm_epochs_report_nonfinite_scores(finished_run):
  rows = _rows(finished_run[0])
  assert all(row["nonfinite_scores"] == 0 for row in rows if row["phase"] == "gsm")
  assert np.isfinite([row["train_loss"] for row in rows]).all()


def test_a_workdir_that_cannot_be_created_is_one_error_line(data_dir, tmp_path):
  """Under a file: what a read-only parent does for a non-root user (root ignores modes)."""
  blocker = tmp_path / "file"
  blocker.write_text("x")
  workdir = str(blocker / "run")
  with pytest.raises(train_lib.ConfigError) as err:
    train_lib.train_and_evaluate(tiny_config(data_dir), workdir)
  assert str(err.value) == f"cannot create or write the workdir {workdir}: Not a directory"

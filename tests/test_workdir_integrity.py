"""A workdir never hands a run something it did not prove: identity, restore errors, hashes.

Real files (checkpoints truncated, bit-flipped, made unreadable on disk) and real
``train.py`` processes where the behaviour needs one. Every run is the tiny
LeNet-300-100 run of ``test_train.py``.
"""

import errno
import json
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest
from test_reliability import FINAL_STEP  # noqa: E402
from test_reliability import _damage  # noqa: E402
from test_reliability import _final_model  # noqa: E402
from test_reliability import _one_error_line  # noqa: E402
from test_reliability import _steps  # noqa: E402
from test_train import DENSE_EPOCHS  # noqa: E402
from test_train import GSM_EPOCHS  # noqa: E402
from test_train import ROOT  # noqa: E402
from test_train import STEPS_PER_EPOCH  # noqa: E402
from test_train import _assert_trees_equal  # noqa: E402
from test_train import _load_with_ctrl_c  # noqa: E402
from test_train import _rows  # noqa: E402
from test_train import data_dir  # noqa: E402, F401  (the fixture)
from test_train import finished_run  # noqa: E402, F401  (the fixture)
from test_train import tiny_command  # noqa: E402
from test_train import tiny_config  # noqa: E402

import train  # noqa: E402
from training import checkpoints  # noqa: E402
from training import config as config_lib  # noqa: E402
from training import report  # noqa: E402
from training import train_lib  # noqa: E402

DENSE_END = DENSE_EPOCHS * STEPS_PER_EPOCH


def _copy(finished_run, tmp_path, name="copy"):
  """A copy of the finished run's workdir without summary.json (so a rerun resumes)."""
  workdir = str(tmp_path / name)
  shutil.copytree(finished_run[0], workdir)
  os.remove(os.path.join(workdir, "summary.json"))
  return workdir


def _largest_file(directory):
  files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
  return max(files, key=os.path.getsize)


def _flip_byte(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x10]))


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _model_hashes(path):
  return checkpoints.array_checksums(checkpoints.load_model(path))


def _target_like_saved(ckpt, step):
  """The checkpoint's own arrays as the restore target (the structure the program builds)."""
  return ckpt.restore_raw(step)


# --------------------------------------------------------------------------- #
# 1. The workdir's identity
# --------------------------------------------------------------------------- #


def _strip_to(workdir, case):
  """Leaves what a lost run leaves: its checkpoints deleted, or killed in its first epoch."""
  shutil.rmtree(os.path.join(workdir, "checkpoints"))
  if case in ("killed in the first epoch", "no fingerprint, checkpoints deleted"):
    for name in ("dense_model", "final_model"):
      shutil.rmtree(os.path.join(workdir, name))
    os.remove(os.path.join(workdir, "metrics.jsonl"))
  if case == "no fingerprint, checkpoints deleted":
    os.remove(os.path.join(workdir, config_lib.FINGERPRINT_FILE))


@pytest.mark.parametrize(
  "case",
  ["checkpoints deleted", "killed in the first epoch", "no fingerprint, checkpoints deleted"],
)
def test_a_workdir_without_checkpoints_refuses_another_config(
  finished_run, data_dir, tmp_path, case
):
  """The old program trained a lottery ticket from the stale theta_0 of seed 0 (exit 0)."""
  workdir = _copy(finished_run, tmp_path)
  _strip_to(workdir, case)
  initial = os.path.join(workdir, "initial_model")
  before = _model_hashes(initial)
  extra = ("--config.method=lottery", "--config.seed=1")
  result = subprocess.run(
    tiny_command(data_dir, workdir, *extra), cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 1, result.stderr[-2000:]
  line = _one_error_line(result.stderr)
  assert line.startswith(f"train.py: error: workdir {workdir} was started by a different config (")
  assert "method: 'gsm' there, 'lottery' here" in line and "seed: 0 there, 1 here" in line
  assert line.endswith("resume with the same config, or use a new --workdir")
  assert _model_hashes(initial) == before
  assert not os.path.exists(os.path.join(workdir, "summary.json"))


def test_the_fingerprint_is_written_before_anything_else(data_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / "order")
  fingerprint = os.path.join(workdir, config_lib.FINGERPRINT_FILE)
  seen = []

  def recording(function):
    def wrapped(*args, **kwargs):
      seen.append((function.__name__, os.path.isfile(fingerprint)))
      return function(*args, **kwargs)

    return wrapped

  monkeypatch.setattr(report, "write_json", recording(report.write_json))
  monkeypatch.setattr(checkpoints, "save_model", recording(checkpoints.save_model))
  monkeypatch.setattr(checkpoints.Checkpointer, "save", recording(checkpoints.Checkpointer.save))
  _load_with_ctrl_c(monkeypatch, (0, 2))
  with pytest.raises(train_lib.TrainingInterrupted):
    train_lib.train_and_evaluate(tiny_config(data_dir), workdir)
  assert {"save_model", "save"} <= {name for name, _ in seen}
  assert all(present for _, present in seen), seen


def test_a_workdir_from_before_fingerprints_resumes_and_gets_one(finished_run, data_dir, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  fingerprint = os.path.join(workdir, config_lib.FINGERPRINT_FILE)
  os.remove(fingerprint)
  config = tiny_config(data_dir)
  config.eval_batch_size = 50  # a harmless field
  summary = train_lib.train_and_evaluate(config, workdir)
  assert summary["accuracy_final"] == finished_run[1]["accuracy_final"]
  with (
    open(fingerprint) as f,
    open(os.path.join(finished_run[0], config_lib.FINGERPRINT_FILE)) as g,
  ):
    assert f.read() == g.read()


def test_fields_added_later_keep_the_fingerprint(finished_run, data_dir):
  config = tiny_config(data_dir)
  stored = config_lib.config_json(config)
  del stored["gsm"]["passive_rule"], stored["validation_examples"]  # a config.json from before
  assert config_lib.fingerprint(stored) == config_lib.fingerprint(config_lib.config_json(config))
  stored["gsm"]["passive_rule"] = "shrink"
  assert config_lib.fingerprint(stored) != config_lib.fingerprint(config_lib.config_json(config))


def test_an_initial_model_of_other_weights_is_rewritten_with_this_config_s(
  finished_run, data_dir, tmp_path, monkeypatch, capsys
):
  """A workdir from before fingerprints whose initial_model/ another config left."""
  workdir = _copy(finished_run, tmp_path)
  _strip_to(workdir, "no fingerprint, checkpoints deleted")
  initial = os.path.join(workdir, "initial_model")
  shutil.rmtree(initial)
  shutil.copytree(os.path.join(finished_run[0], "dense_model"), initial)  # other weights
  _load_with_ctrl_c(monkeypatch, (0, 2))
  with pytest.raises(train_lib.TrainingInterrupted):
    train_lib.train_and_evaluate(tiny_config(data_dir), workdir)
  assert f"{initial} did not hold this config's initial weights; rewritten" in (
    capsys.readouterr().out
  )
  assert _model_hashes(initial) == _model_hashes(os.path.join(finished_run[0], "initial_model"))


# --------------------------------------------------------------------------- #
# 2. Restore errors: damage is moved aside, a read error moves nothing
# --------------------------------------------------------------------------- #


def _without_dac_override():
  """A command prefix that makes root obey file modes (root ignores them otherwise)."""
  if os.getuid() != 0:
    return []
  if shutil.which("setpriv") is None:
    pytest.skip("running as root without setpriv: file modes cannot be enforced")
  drop = "-dac_override,-dac_read_search"
  return ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}"]


@pytest.mark.parametrize("part", ["state", "meta"])
def test_an_unreadable_checkpoint_stops_with_the_reason_and_moves_nothing(
  finished_run, data_dir, tmp_path, part
):
  """The old program called it damaged, moved it aside and retrained the last epoch."""
  workdir = _copy(finished_run, tmp_path)
  unreadable = _largest_file(os.path.join(workdir, "checkpoints", str(FINAL_STEP), part))
  os.chmod(unreadable, 0)
  result = subprocess.run(
    [*_without_dac_override(), *tiny_command(data_dir, workdir)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 1, result.stderr[-2000:]
  line = _one_error_line(result.stderr)
  assert line.startswith(
    f"train.py: error: cannot read the checkpoint of step {FINAL_STEP} in {workdir}/checkpoints ("
  )
  assert "Permission denied" in line and "nothing was moved" in line
  assert "start from the beginning" not in line
  assert _steps(workdir)[-1] == FINAL_STEP
  assert not os.path.exists(os.path.join(workdir, "damaged_checkpoints"))
  os.chmod(unreadable, 0o644)  # fixed: that very checkpoint restores and verifies
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    step, _, _ = ckpt.restore_latest(lambda meta: _target_like_saved(ckpt, FINAL_STEP))
  finally:
    ckpt.close()
  assert step == FINAL_STEP


@pytest.mark.parametrize(
  "error, reason",
  [
    (OSError(errno.EIO, "Input/output error", "/nfs/ckpt/d/0"), "Input/output error"),
    (MemoryError(), "MemoryError"),
    (
      ValueError(
        'UNAVAILABLE: Error reading "params" in OCDBT database: Input/output error '
        "[os_error_code='5']"
      ),
      "Input/output error",
    ),
    (ValueError("Topology mismatch detected. Please provide a target tree"), "Topology mismatch"),
  ],
  ids=["EIO", "MemoryError", "TensorStore EIO", "an error about no file"],
)
def test_a_read_error_stops_with_the_reason_and_moves_nothing(
  finished_run, data_dir, tmp_path, monkeypatch, capsys, error, reason
):
  workdir = _copy(finished_run, tmp_path)

  def failing(self, target, step=None):
    raise error

  monkeypatch.setattr(checkpoints.Checkpointer, "restore_state", failing)
  assert train.run(tiny_config(data_dir), workdir) == train.EXIT_ERROR
  line = _one_error_line(capsys.readouterr().err)
  assert line.startswith(f"train.py: error: cannot read the checkpoint of step {FINAL_STEP} ")
  assert reason in line and "nothing was moved" in line, line
  assert "start from the beginning" not in line
  assert not os.path.exists(os.path.join(workdir, "damaged_checkpoints"))
  assert _steps(workdir)[-1] == FINAL_STEP


@pytest.mark.parametrize("change", ["dtype", "extra leaf", "phase unknown"])
def test_a_checkpoint_the_program_no_longer_builds_is_not_called_damaged(
  finished_run, tmp_path, change
):
  """A code change is not damage: the checkpoint is kept for the version that wrote it."""
  workdir = _copy(finished_run, tmp_path)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), log=lambda _: None)

  def target_for(meta):
    target = _target_like_saved(ckpt, FINAL_STEP)
    if change == "dtype":
      target["step"] = np.asarray(target["step"], np.int16)
    elif change == "extra leaf":
      target["params"]["fc4"] = {"kernel": np.zeros((3, 3), np.float32)}
    else:
      raise KeyError(meta["phase"])
    return target

  try:
    with pytest.raises(checkpoints.CheckpointError) as err:
      ckpt.restore_latest(target_for)
  finally:
    ckpt.close()
  message = str(err.value)
  assert message.startswith(f"the checkpoint of step {FINAL_STEP} in {workdir}/checkpoints ")
  assert "another version of train.py" in message and "nothing was moved" in message
  assert "\n" not in message
  assert _steps(workdir)[-1] == FINAL_STEP
  assert not os.path.exists(os.path.join(workdir, "damaged_checkpoints"))


def test_start_from_the_beginning_is_advised_only_when_every_checkpoint_is_damaged(
  finished_run, tmp_path, monkeypatch
):
  workdir = _copy(finished_run, tmp_path)
  newest, older = _steps(workdir)[-1], _steps(workdir)[-2]
  _damage(workdir, "truncated data")  # the newest: proven damaged
  real = checkpoints.Checkpointer.restore_state

  def restore_state(self, target, step=None):
    if step == older:
      raise PermissionError(errno.EACCES, "Permission denied", "/w/checkpoints/x")
    return real(self, target, step)

  monkeypatch.setattr(checkpoints.Checkpointer, "restore_state", restore_state)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), log=lambda _: None)
  try:
    with pytest.raises(checkpoints.CheckpointError) as err:
      ckpt.restore_latest(lambda meta: _target_like_saved(ckpt, older))
  finally:
    ckpt.close()
  assert "Permission denied" in str(err.value) and "start from" not in str(err.value)
  assert os.listdir(os.path.join(workdir, "damaged_checkpoints")) == [str(newest)]
  assert _steps(workdir)[-1] == older


# --------------------------------------------------------------------------- #
# 3. The meta is covered by a hash
# --------------------------------------------------------------------------- #


def _meta_path(workdir, step):
  return os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")


def test_a_changed_number_in_the_meta_is_damage(finished_run, data_dir, tmp_path, capsys):
  """The old program accepted "epoch": 3 -> 2 and trained a fourth GSM epoch (exit 0)."""
  workdir = _copy(finished_run, tmp_path)
  path = _meta_path(workdir, FINAL_STEP)
  with open(path) as f:
    meta = json.load(f)
  assert (meta["phase"], meta["epoch"]) == ("gsm", GSM_EPOCHS)
  meta["epoch"] = GSM_EPOCHS - 1
  with open(path, "w") as f:
    json.dump(meta, f)
  summary = train_lib.train_and_evaluate(tiny_config(data_dir), workdir)
  printed = capsys.readouterr().out
  assert f"checkpoint of step {FINAL_STEP} is damaged (its meta fails its checksum)" in printed
  assert os.path.isdir(os.path.join(workdir, "damaged_checkpoints", str(FINAL_STEP)))
  _assert_trees_equal(_final_model(workdir), _final_model(finished_run[0]))
  assert summary["accuracy_final"] == finished_run[1]["accuracy_final"]
  assert len(_rows(workdir)) == DENSE_EPOCHS + GSM_EPOCHS


def test_a_meta_from_before_its_hash_still_restores(finished_run, data_dir, tmp_path, capsys):
  workdir = _copy(finished_run, tmp_path)
  path = _meta_path(workdir, FINAL_STEP)
  with open(path) as f:
    meta = json.load(f)
  del meta[checkpoints.META_HASH]
  with open(path, "w") as f:
    json.dump(meta, f)
  summary = train_lib.train_and_evaluate(tiny_config(data_dir), workdir)
  assert f"resumed from the checkpoint of step {FINAL_STEP} " in capsys.readouterr().out
  assert summary["accuracy_final"] == finished_run[1]["accuracy_final"]


# --------------------------------------------------------------------------- #
# 4. A non-finite state is never a checkpoint
# --------------------------------------------------------------------------- #


def test_non_finite_params_are_never_checkpointed(data_dir, tmp_path, capsys):
  """The old program saved the NaN/inf params of the first GSM step as the last good one."""
  config = tiny_config(data_dir)
  config.gsm.learning_rate = 1e39  # inf in float32: every weight non-finite after one step
  config.checkpoint_every_steps = 1
  config.checkpoint_keep = 100
  workdir = str(tmp_path / "nonfinite")
  assert train.run(config, workdir) == train.EXIT_DIVERGED
  line = _one_error_line(capsys.readouterr().err)
  assert line.startswith("train.py: error: training diverged in the gsm phase: ")
  assert f"the last good checkpoint, step {DENSE_END}, is kept" in line
  assert _steps(workdir)[-1] == DENSE_END
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    for step in _steps(workdir):
      state = ckpt.restore_raw(step)
      for leaf in jax.tree.leaves((state["params"], state["batch_stats"])):
        assert np.isfinite(leaf).all(), step
  finally:
    ckpt.close()


# --------------------------------------------------------------------------- #
# 5. Exported models carry hashes checked on load
# --------------------------------------------------------------------------- #


def _damage_model(directory, kind):
  data = _largest_file(directory)
  (_flip_byte if kind == "flipped" else _truncate)(data)


@pytest.mark.parametrize("kind", ["flipped", "truncated"])
def test_a_damaged_exported_model_is_an_error_naming_it(finished_run, tmp_path, kind):
  model = str(tmp_path / "dense_model")
  shutil.copytree(os.path.join(finished_run[0], "dense_model"), model)
  checkpoints.load_model(model)  # intact: loads
  _damage_model(model, kind)
  with pytest.raises(checkpoints.CheckpointError) as err:
    checkpoints.load_model(model)
  message = str(err.value)
  assert message.startswith(f"the model in {model} is damaged (") and "\n" not in message


def test_a_model_exported_before_hashes_still_loads(finished_run, tmp_path):
  model = str(tmp_path / "final_model")
  shutil.copytree(os.path.join(finished_run[0], "final_model"), model)
  os.remove(os.path.join(model, checkpoints.MODEL_CHECKSUMS))
  _assert_trees_equal(checkpoints.load_model(model), _final_model(finished_run[0]))


def _ticket_config(data_dir, source, **fields):
  config = tiny_config(data_dir)
  config.method = "lottery"
  config.dense_checkpoint = source
  config.dense.epochs = 0
  for key, value in fields.items():
    config.lottery[key] = value
  return config


@pytest.mark.parametrize(
  "where",
  ["dense_checkpoint flipped", "dense_checkpoint truncated", "initial_model", "gsm_checkpoint"],
)
def test_a_damaged_model_read_by_a_run_is_one_error_line(
  finished_run, data_dir, tmp_path, capsys, where
):
  """The old program printed a long traceback (truncated) or trained on the flipped weights."""
  source = str(tmp_path / "source")
  shutil.copytree(finished_run[0], source)
  if where.startswith("dense_checkpoint"):
    config = tiny_config(data_dir)
    config.dense_checkpoint = source
    damaged = os.path.join(source, "dense_model")
    _damage_model(damaged, where.split()[-1])
  elif where == "initial_model":
    config = _ticket_config(data_dir, source, ticket="magnitude")
    damaged = os.path.join(source, "initial_model")
    _damage_model(damaged, "flipped")
  else:
    config = _ticket_config(data_dir, finished_run[0], ticket="gsm", gsm_checkpoint=source)
    damaged = os.path.join(source, "final_model")
    _damage_model(damaged, "flipped")
  assert train.run(config, str(tmp_path / "run")) == train.EXIT_ERROR
  line = _one_error_line(capsys.readouterr().err)
  assert line.startswith(f"train.py: error: the model in {damaged} is damaged ("), line

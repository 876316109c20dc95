"""Every failure train.py expects is one ``train.py:`` line on stderr, with nothing else.

Real processes and real files where the behaviour needs them: a write that
really fails (``ulimit -f`` makes TensorStore's writes fail as a full disk does,
without root), damaged checkpoint files, misspelled flags. Every run trains
LeNet-300-100 on the synthetic IDX data of ``test_train.py``.
"""

import math
import os
import shutil
import subprocess
import sys

import pytest
from test_train import DENSE_EPOCHS  # noqa: E402
from test_train import ROOT  # noqa: E402
from test_train import STEPS_PER_EPOCH  # noqa: E402
from test_train import data_dir  # noqa: E402, F401  (the fixture)
from test_train import finished_run  # noqa: E402, F401  (the fixture)
from test_train import tiny_command  # noqa: E402
from test_train import tiny_config  # noqa: E402

import train  # noqa: E402
from training import checkpoints  # noqa: E402
from training import config as config_lib  # noqa: E402
from training import train_lib  # noqa: E402

DENSE_END = DENSE_EPOCHS * STEPS_PER_EPOCH
ENOSPC = (
  'RESOURCE_EXHAUSTED: Error writing "params.fc1.kernel/0.0" in OCDBT database at local file '
  '"{where}/ocdbt.process_0/": Failed writing: "{where}/ocdbt.process_0/d/4f2a": Failed to write '
  "777743 bytes to file 13: No space left on device [os_error_code='28']"
)


def _steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _only_line(stderr):
  """The one line of ``stderr``; fails showing stderr if there is anything else."""
  lines = stderr.strip().splitlines()
  assert len(lines) == 1, stderr[-3000:]
  return lines[0]


def _run(command, timeout=300, **kwargs):
  return subprocess.run(
    command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs
  )


def _resumable_copy(finished_run, tmp_path, keep_steps):
  """A copy of the finished run that still has to train: only ``keep_steps`` checkpoints."""
  workdir = tmp_path / "copy"
  shutil.copytree(finished_run[0], workdir)
  for name in ("summary.json", "sparsity.png", "curves.png"):
    os.remove(workdir / name)
  shutil.rmtree(workdir / "final_model")
  for step in _steps(workdir):
    if step not in keep_steps:
      shutil.rmtree(workdir / "checkpoints" / str(step))
  return workdir


# --------------------------------------------------------------------------- #
# A full disk
# --------------------------------------------------------------------------- #


def test_a_full_disk_during_a_checkpoint_write_is_one_line_keeping_the_checkpoints(
  data_dir, tmp_path, monkeypatch, capsys
):
  """TensorStore reports ENOSPC as a ValueError (RESOURCE_EXHAUSTED), not an OSError."""
  workdir = str(tmp_path / "full")
  real_save = checkpoints.Checkpointer.save

  def save(self, step, state, meta):
    if step > STEPS_PER_EPOCH:
      raise ValueError(ENOSPC.format(where=f"{workdir}/checkpoints/{step}/state"))
    return real_save(self, step, state, meta)

  monkeypatch.setattr(checkpoints.Checkpointer, "save", save)
  assert train.run(tiny_config(data_dir), workdir) == train.EXIT_ERROR
  assert _only_line(capsys.readouterr().err) == (
    f"train.py: error: No space left on device while writing {workdir}/checkpoints/"
    f"{2 * STEPS_PER_EPOCH}/state; the checkpoints already written are intact: fix this "
    "and run the same command again to resume"
  )
  assert _steps(workdir) == [STEPS_PER_EPOCH]


def test_a_full_disk_during_the_final_model_write_is_one_line(
  finished_run, data_dir, tmp_path, monkeypatch, capsys
):
  workdir = _resumable_copy(finished_run, tmp_path, _steps(finished_run[0]))
  real_save_model = checkpoints.save_model

  def save_model(path, variables):
    if path.endswith("final_model"):
      raise ValueError(ENOSPC.format(where=path))
    return real_save_model(path, variables)

  monkeypatch.setattr(checkpoints, "save_model", save_model)
  assert train.run(tiny_config(data_dir), str(workdir)) == train.EXIT_ERROR
  line = _only_line(capsys.readouterr().err)
  assert line.startswith(f"train.py: error: No space left on device while writing {workdir}/")
  assert line.endswith(
    "the checkpoints already written are intact: fix this and run the same command again to resume"
  )


def _with_file_size_limit(command, kib):
  """``command`` where a file cannot grow past ``kib`` KiB: its writes fail as on a full disk."""
  return ["bash", "-c", f"trap '' XFSZ; ulimit -f {kib}; exec \"$@\"", "bash", *map(str, command)]


@pytest.mark.slow  # a train.py process: 12 s each
@pytest.mark.parametrize("what", ["checkpoint", "final_model"])
def test_a_write_that_really_fails_is_only_one_line_on_stderr(
  finished_run, data_dir, tmp_path, what
):
  """A real TensorStore write error: no orbax log, asyncio traceback or shutdown noise."""
  keep = [DENSE_END + STEPS_PER_EPOCH] if what == "checkpoint" else _steps(finished_run[0])
  workdir = _resumable_copy(finished_run, tmp_path, keep)
  result = _run(_with_file_size_limit(tiny_command(data_dir, workdir), 20))
  assert result.returncode == train.EXIT_ERROR, result.stderr[-3000:]
  line = _only_line(result.stderr)
  assert line.startswith("train.py: error: File too large while writing "), line
  assert line.endswith(
    "the checkpoints already written are intact: fix this and run the same command again to resume"
  )
  assert _steps(workdir) == keep


# --------------------------------------------------------------------------- #
# Damaged checkpoints: the reason is one readable line
# --------------------------------------------------------------------------- #


def test_a_zero_byte_data_file_in_every_checkpoint_is_one_line_without_reprs(
  finished_run, data_dir, tmp_path
):
  workdir = _resumable_copy(finished_run, tmp_path, _steps(finished_run[0]))
  for step in _steps(workdir):
    directory = workdir / "checkpoints" / str(step) / "state" / "ocdbt.process_0" / "d"
    biggest = max(directory.iterdir(), key=lambda path: path.stat().st_size)
    biggest.write_bytes(b"")
  result = _run(tiny_command(data_dir, workdir))
  line = _only_line(result.stderr)
  assert line.startswith("train.py: error: "), line
  for noise in ("pybind11", "<bound method", "TensorStore({", " at 0x"):
    assert noise not in line and noise not in result.stdout, noise


def test_a_printed_reason_loses_the_pybind11_repr_tensorstore_appends():
  """What orbax's restore of a zero-byte file raised before the reason named its cause."""
  reason = (
    "step 40: Exception: Encountered error while reading array index: (slice(0, 300, 1),). "
    "See full TensorStore details: <bound method pybind11_detail_function_record_v1_system_"
    "libstdcpp_gxx_abi_1xxx_use_cxx11_abi_1.spec of TensorStore({\n  'base': {\n    'driver': "
    "'zarr',\n  },\n})>; step 32: <tensorstore.Future object at 0x7f49a4c1e0b0> failed)"
  )
  assert train_lib.one_line(reason) == (
    "step 40: Exception: Encountered error while reading array index: (slice(0, 300, 1),).; "
    "step 32: failed)"
  )


# --------------------------------------------------------------------------- #
# Flags and config values
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
  "config_flag", [[], ["--config=configs/default.py"]], ids=["default", "given"]
)
def test_a_misspelled_field_is_one_line_naming_it_and_its_close_match(tmp_path, config_flag):
  workdir = tmp_path / "never_created"
  result = _run(
    [
      sys.executable,
      "train.py",
      *config_flag,
      f"--workdir={workdir}",
      "--config.gsm.compresion=30",
    ],
    timeout=120,
  )
  assert result.returncode == train.EXIT_ERROR
  assert _only_line(result.stderr) == (
    "train.py: error: --config.gsm.compresion: the config has no field gsm.compresion (did you "
    "mean --config.compression?); docs/TRAINING.md lists the fields"
  )
  assert not workdir.exists()


def test_a_value_that_does_not_parse_is_one_line(tmp_path):
  result = _run(
    [sys.executable, "train.py", f"--workdir={tmp_path / 'w'}", "--config.gsm.learning_rate=abc"],
    timeout=120,
  )
  assert result.returncode == train.EXIT_ERROR
  assert _only_line(result.stderr) == (
    "train.py: error: flag --config.gsm.learning_rate=abc: could not convert string to float: "
    "'abc'; python train.py --helpfull lists the flags"
  )


NUMERIC_FIELDS = [
  ("learning_rate", math.inf),
  ("learning_rate", math.nan),
  ("weight_decay", math.inf),
  ("momentum", math.nan),
  ("decay_factor", math.inf),
  ("warmup_epochs", math.inf),
  ("boundaries", (1, math.inf)),
  ("b1", math.nan),
  ("b2", math.inf),
  ("eps", math.inf),
  ("clip_norm", math.nan),
]


@pytest.mark.parametrize("section", ["dense", "gsm"])
@pytest.mark.parametrize(("name", "value"), NUMERIC_FIELDS)
def test_a_non_finite_section_value_is_refused_by_validation(section, name, value):
  config = tiny_config("/nonexistent")
  with config.unlocked():
    config[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=rf"^config\.{section}\.{name} must be "):
    train_lib.validate_config(config)


@pytest.mark.parametrize("name", ["rho", "rho_growth"])
def test_a_non_finite_admm_value_is_refused_by_validation(name):
  config = tiny_config("/nonexistent")
  config.method = "admm"
  config.admm[name] = math.inf
  with pytest.raises(config_lib.ConfigError, match=rf"^config\.admm\.{name} must be a finite "):
    train_lib.validate_config(config)


def test_infinite_warmup_is_a_config_error_before_the_workdir_is_created(data_dir, tmp_path):
  config = tiny_config(data_dir)
  config.dense.warmup_epochs = math.inf
  workdir = tmp_path / "never_created"
  with pytest.raises(config_lib.ConfigError, match="finite"):
    train_lib.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()

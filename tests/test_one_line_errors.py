"""Every failure train.py expects is one ``train.py:`` line on stderr, with nothing else.

Real processes and real files where the behaviour needs them: a write that
really fails (``ulimit -f`` makes TensorStore's writes fail as a full disk does,
without root), damaged checkpoint files, misspelled flags. Every run trains
LeNet-300-100 on the synthetic IDX data of ``test_train.py``.
"""

import math
import os
import shutil
import signal
import subprocess
import sys
import time

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
from training import data  # noqa: E402
from training import strict_json  # noqa: E402
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


@pytest.mark.slow  # a train.py process each: 7 s, 20 s on a loaded machine
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


# --------------------------------------------------------------------------- #
# Signals during startup and during the exit path
# --------------------------------------------------------------------------- #

# train.py in a real process, where the first call of a function is announced on stdout and
# paused, so that a signal sent on the announcement lands there every time. A pause "in __del__"
# runs in the destructor of an object dropped at once: where Python swallows what a signal
# handler raises, as in a garbage collector callback.
_PAUSING = """
import runpy, sys, time
sys.path.insert(0, {root!r})

def announce_and_sleep(name, seconds):
  print("PAUSED", name, flush=True)
  time.sleep(seconds)

class Dropped:
  def __init__(self, name, seconds):
    self.name, self.seconds = name, seconds
  def __del__(self):
    announce_and_sleep(self.name, self.seconds)

def pausing(real, name, seconds, in_del):
  calls = []
  def paused(*args, **kwargs):
    if not calls:
      calls.append(None)
      if in_del:
        Dropped(name + " in __del__", seconds)  # dropped at once
      else:
        announce_and_sleep(name, seconds)
    return real(*args, **kwargs)
  return paused

for module, owner, name, seconds, in_del in {pauses!r}:
  holder = __import__(module, fromlist=["_"])
  for part in filter(None, owner.split(".")):
    holder = getattr(holder, part)
  setattr(holder, name, pausing(getattr(holder, name), name, seconds, in_del))
sys.argv = [{train!r}, *sys.argv[1:]]
runpy.run_path({train!r}, run_name="__main__")
"""

READ_IDX = ("training.data", "", "read_idx", 30, False)


def _start_pausing(command, *pauses):
  """``command`` (a train.py command line) with ``pauses``: (module, owner, name, seconds,
  in __del__)."""
  code = _PAUSING.format(root=ROOT, pauses=list(pauses), train=os.path.join(ROOT, "train.py"))
  return _popen([sys.executable, "-c", code, *command[2:]])


def _popen(command):
  return subprocess.Popen(
    command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )


def _wait_for_line(process, prefix):
  """Reads stdout until a line starts with ``prefix``; fails with stderr if the process ends."""
  for line in process.stdout:
    if line.startswith(prefix):
      return
  pytest.fail(f"train.py ended before {prefix!r}: {process.communicate()[1][-3000:]}")


def _intact(steps):
  listed = ", ".join(str(step) for step in steps)
  return f"nothing is lost: the checkpoints of steps {listed} are intact; run the same command again to resume"


def test_a_signal_while_loading_the_data_names_the_checkpoints_the_workdir_holds(
  finished_run, data_dir, tmp_path, monkeypatch
):
  workdir = _resumable_copy(finished_run, tmp_path, _steps(finished_run[0]))
  real_load = data.load_dataset

  def load_with_ctrl_c(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(1.0)  # the handler raises here
    return real_load(*args, **kwargs)

  monkeypatch.setattr(data, "load_dataset", load_with_ctrl_c)
  with pytest.raises(train_lib.TrainingInterrupted) as err:
    train_lib.train_and_evaluate(tiny_config(data_dir), str(workdir))
  assert str(err.value) == f"interrupted while loading the data; {_intact(_steps(workdir))}"


RESTORE = ("training.checkpoints", "Checkpointer", "restore_latest", 30, False)
STARTUP_POINTS = {
  # (pause, signal, checkpoints in the workdir, where the line says the signal came)
  "loading the data, SIGTERM": (READ_IDX, signal.SIGTERM, True, "while loading the data"),
  "loading the data, SIGINT": (READ_IDX, signal.SIGINT, False, "while loading the data"),
  "restoring, SIGTERM": (RESTORE, signal.SIGTERM, True, "while restoring the latest checkpoint"),
  # Swallowed where it was raised (it was lost: a run resumed at its end finished with exit 0):
  # the run stops at its next step.
  "in a __del__, SIGTERM": (
    READ_IDX[:-1] + (True,),
    signal.SIGTERM,
    False,
    "while checking the config against the data and the model",
  ),
}


@pytest.mark.parametrize("point", STARTUP_POINTS)
def test_a_real_signal_during_startup_is_one_line_with_its_exit_code(
  finished_run, data_dir, tmp_path, point
):
  """Before, the handlers came after the data: SIGTERM killed the process without a word,
  Ctrl-C said "aborted by a second signal"; before the restore, "no checkpoint yet"."""
  pause, sig, copy, where = STARTUP_POINTS[point]
  if copy:
    workdir = _resumable_copy(finished_run, tmp_path, _steps(finished_run[0]))
    expected = f"train.py: interrupted {where}; {_intact(_steps(workdir))}"
  else:
    workdir = tmp_path / "fresh"
    expected = (
      f"train.py: interrupted {where}; no checkpoint yet: run the same command again to start"
    )
  process = _start_pausing(tiny_command(data_dir, workdir), pause)
  _wait_for_line(process, f"PAUSED {pause[2]}")
  process.send_signal(sig)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 128 + sig, stderr[-3000:]
  assert _only_line(stderr) == expected


@pytest.mark.slow  # four train.py processes each: 11 s
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_right_after_the_data_line_is_one_line_naming_the_checkpoints(
  finished_run, data_dir, tmp_path, sig
):
  """Model init, compilation, the restore: it segfaulted (exit -11) or said "no checkpoint yet"."""
  for delay in (0.0, 0.3, 0.6, 1.0):
    workdir = _resumable_copy(finished_run, tmp_path / str(delay), _steps(finished_run[0]))
    process = _popen(tiny_command(data_dir, workdir))
    _wait_for_line(process, "data:")
    time.sleep(delay)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + sig, (delay, stderr[-3000:])
    line = _only_line(stderr)
    assert line.startswith("train.py: interrupted "), line
    assert line.endswith(
      (
        _intact(_steps(finished_run[0])),
        "holds all training so far; run the same command again to resume",
      )
    ), line


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_ctrl_c_while_exiting_is_still_one_line_and_exit_130(data_dir, tmp_path, first):
  """The second Ctrl-C lands while train.py words the first one's line, after train_lib's handler
  is gone: it printed a KeyboardInterrupt traceback or died of SIGINT (-2)."""
  exiting = ("training.train_lib", "TrainingInterrupted", "__str__", 2, False)
  process = _start_pausing(tiny_command(data_dir, tmp_path / "w"), READ_IDX, exiting)
  _wait_for_line(process, "PAUSED read_idx")
  process.send_signal(first)
  _wait_for_line(process, "PAUSED __str__")
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 130, stderr[-3000:]
  assert _only_line(stderr).startswith("train.py: interrupted"), stderr


# --------------------------------------------------------------------------- #
# Symbolic links in the workdir
# --------------------------------------------------------------------------- #

# What train.py writes in its workdir, as a file or a directory.
WRITTEN = {
  ".lock": "file",
  "config.json.tmp": "file",
  "metrics.jsonl": "file",
  "summary.json.tmp": "file",
  "curves.png": "file",
  "tensorboard": "directory",
  "checkpoints": "directory",
  "final_model": "directory",
}


def _outside(tmp_path, kind):
  """A file or a directory outside the workdir, with content that must survive."""
  if kind == "file":
    target = tmp_path / "precious.txt"
    target.write_text("precious\n")
  else:
    target = tmp_path / "precious"
    target.mkdir()
    (target / "keep.txt").write_text("precious\n")
  return target


def _snapshot(target):
  paths = [target, *sorted(target.rglob("*"))] if target.is_dir() else [target]
  return [(str(p), p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in paths]


@pytest.mark.parametrize("name", WRITTEN)
def test_a_symlink_in_the_workdir_is_refused_before_anything_is_written(
  data_dir, tmp_path, capsys, name
):
  """It was followed: .lock truncated its target, metrics.jsonl replaced it."""
  target = _outside(tmp_path, WRITTEN[name])
  before = _snapshot(target)
  workdir = tmp_path / "workdir"
  workdir.mkdir()
  (workdir / name).symlink_to(target)
  assert train.run(tiny_config(data_dir), str(workdir)) == train.EXIT_ERROR
  assert _only_line(capsys.readouterr().err) == (
    f"train.py: error: workdir {workdir}: {name} is a symbolic link (to {target}); train.py "
    "writes no file through a link: replace it with the file or directory itself, or use a "
    "new --workdir"
  )
  assert _snapshot(target) == before
  assert sorted(os.listdir(workdir)) == [name]  # nothing else was written


def test_files_are_opened_without_following_a_link_made_after_the_check(tmp_path):
  """O_NOFOLLOW: a link that appears while train.py runs is an error, not a write through it."""
  target = _outside(tmp_path, "file")
  link = tmp_path / "metrics.jsonl"
  link.symlink_to(target)
  for mode in ("w", "a", "a+"):
    with pytest.raises(OSError):
      strict_json.open_nofollow(str(link), mode)
  (tmp_path / "summary.json.tmp").symlink_to(target)
  with pytest.raises(OSError):
    strict_json.write_json(str(tmp_path / "summary.json"), {"accuracy": 1.0})
  assert target.read_text() == "precious\n"

"""Trains a dense model, prunes it with config.method (GSM by default) and evaluates the result.

Usage:
  python train.py [--config configs/<name>.py] [--config.key=value ...] --workdir DIR

Without --config, configs/default.py is used (LeNet-300-100 on Fashion-MNIST,
GSM to C = 60, about 4 minutes on 2 CPU cores). Re-running with the same
--workdir resumes from its latest checkpoint. Ctrl-C or SIGTERM saves a
checkpoint after the current step and exits with 128 + the signal (130, 143);
a bad config, data or workdir is one error line (exit 1); a diverged run stops
with exit 3, keeping the last good checkpoint. The fields, the workdir and
summary.json: docs/TRAINING.md.
"""

import difflib
import logging as std_logging
import os
import re
import runpy
import signal
import sys


class _Signals:
  """SIGINT and SIGTERM while train_lib's handler is not installed: before the run and after it.

  Installed before the slow imports. Before the run a signal stops at once
  (nothing was read or written). Once the run's line is printed, a further
  signal is ignored while the process exits. In between, train_lib's handler
  is installed, but for a few bytecodes at its start and end: there a signal
  stops at once too.
  """

  phase = "starting"  # then "running", then "exiting"

  @classmethod
  def handle(cls, signum: int, frame) -> None:
    del frame
    if cls.phase == "exiting":
      return
    if cls.phase == "starting":
      line = "interrupted while starting, before reading or writing the workdir"
    else:
      line = "interrupted; the checkpoints already written are intact"
    try:
      sys.stdout.flush()
    except (OSError, RuntimeError, ValueError):  # the main thread was writing to it
      pass
    os.write(2, f"train.py: {line}: run the same command again\n".encode())
    os._exit(128 + signum)


if __name__ == "__main__":
  for _signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_signum, _Signals.handle)

from absl import app  # noqa: E402  (after the handlers: importing jax takes seconds)
from absl import flags
from absl import logging
from ml_collections import config_flags

from training import checkpoints
from training import config as config_lib
from training import data
from training import distributed
from training import train_lib

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")

_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints and outputs.")
_DISTRIBUTED = flags.DEFINE_enum(
  "distributed",
  "auto",
  ["auto", "on", "off"],
  "jax.distributed.initialize for a multi-process run: auto = when the environment (or the "
  "flags below) describes one.",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0, where the environment does not give it."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")

EXIT_ERROR = 1  # a bad config, missing or corrupt data, an unusable workdir, a full disk
EXIT_DIVERGED = 3  # non-finite loss or scores; the last good checkpoint is kept
# A signal (Ctrl-C: SIGINT, preemption: SIGTERM) exits with 128 + its number: 130, 143.

_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=\s]+)")


def _config_spec(argv: list[str]) -> str:
  """What ``--config`` says in ``argv`` (``file`` or ``file:argument``), else the default file."""
  for i, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return _DEFAULT_CONFIG


def _load_config(spec: str):
  """``get_config()`` of the config file ``spec`` names, as ml_collections calls it."""
  path, _, argument = spec.partition(":")
  get_config = runpy.run_path(path)["get_config"]
  return get_config(argument) if argument else get_config()


def _overrides(argv: list[str]) -> list[str]:
  """The field paths of the ``--config.<path>=...`` overrides in ``argv``."""
  matches = (_OVERRIDE.match(arg) for arg in argv)
  return [match.group(1).split("[")[0] for match in matches if match]


def _has_field(config, path: str) -> bool:
  try:
    config_lib.get_field(config, path)
  except config_lib.ConfigError:
    return False
  return True


def _close_fields(path: str, fields: list[str]) -> list[str]:
  """Fields spelled like ``path``, or whose last name is spelled like its last name."""
  close = difflib.get_close_matches(path, fields, n=3, cutoff=0.8)
  if close:
    return close
  leaves = {field: field.split(".")[-1] for field in fields}
  near = difflib.get_close_matches(path.split(".")[-1], set(leaves.values()), n=1, cutoff=0.8)
  return [field for field, leaf in leaves.items() if leaf in near][:3]


def _unknown_field(argv: list[str]) -> str | None:
  """The first ``--config.<path>`` of ``argv`` naming no field of the config, with close matches."""
  try:
    config = _load_config(_config_spec(argv))
  except Exception:  # noqa: BLE001  (a config file that does not load: absl's error says why)
    return None
  unknown = [path for path in _overrides(argv) if not _has_field(config, path)]
  if not unknown:
    return None
  path = unknown[0]
  close = _close_fields(path, list(config_lib.flatten_config(config.to_dict())))
  hint = f" (did you mean {' or '.join(f'--config.{field}' for field in close)}?)" if close else ""
  return f"--config.{path}: the config has no field {path}{hint}; docs/TRAINING.md lists the fields"


def _flag_error(argv: list[str], err: Exception) -> str:
  """One line for a flag or config override that absl or ml_collections refused."""
  unknown = _unknown_field(argv)
  if unknown:
    return unknown
  lines = [line.strip() for line in str(err).splitlines() if line.strip()]
  return f"{lines[-1] if lines else type(err).__name__}; python train.py --helpfull lists the flags"


def _say(line: str) -> None:
  """Prints the one line of this run on stderr; a later signal only waits for the exit."""
  _Signals.phase = "exiting"
  print(f"train.py: {line}", file=sys.stderr)


def _exit_with_flag_error(argv: list[str], err: Exception) -> None:
  _say(f"error: {_flag_error(argv, err)}")
  sys.exit(EXIT_ERROR)


def _define_config_flag():
  """--config; parsing the default file applies the overrides, so a misspelled one fails here."""
  try:
    return config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG, "Config file (configs/<name>.py).", lock_config=True
    )
  except (AttributeError, KeyError) as err:
    if __name__ != "__main__":
      raise
    _exit_with_flag_error(sys.argv, err)


_CONFIG = _define_config_flag()


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; a flag or config override it refuses is one error line (exit 1)."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as err:
    _exit_with_flag_error(argv, err)


_LOCAL_FILE = re.compile(r'local file "([^"]+?)/?(?:ocdbt\.process_\d+/?)?"')


def _storage_error(err: BaseException) -> str | None:
  """What a failed TensorStore write or read says (a ValueError holding the OS error), else None.

  orbax writes through TensorStore, which reports a full disk as
  ``ValueError: RESOURCE_EXHAUSTED: ... [os_error_code='28']``, not as an OSError.
  """
  for link in checkpoints.exception_chain(err):
    code = checkpoints.os_error_code(link)
    if isinstance(link, ValueError) and code is not None:
      text = str(link)
      where = _LOCAL_FILE.search(text)
      verb = "reading" if "Error reading" in text else "writing"
      reason = os.strerror(code)
      return f"{reason} while {verb} {where.group(1)}" if where else reason
  return None


def _checkpoints_intact(reason: str) -> str:
  return (
    f"error: {reason}; the checkpoints already written are intact: fix this and run the same "
    "command again to resume"
  )


def run(config, workdir: str) -> int:
  """Trains and reports; every expected failure is one ``train.py: ...`` line and an exit code."""
  try:
    train_lib.train_and_evaluate(config, workdir)
  except (train_lib.ConfigError, data.DataError, checkpoints.CheckpointError) as err:
    _say(f"error: {train_lib.one_line(str(err))}")
    return EXIT_ERROR
  except train_lib.TrainingDiverged as err:
    _say(f"error: {train_lib.one_line(str(err))}")
    return EXIT_DIVERGED
  except train_lib.TrainingInterrupted as err:
    _say(str(err))
    return 128 + err.signum
  except KeyboardInterrupt:
    _say("aborted by a second signal; the checkpoints already written are intact")
    return 128 + signal.SIGINT
  except OSError as err:
    where = f": {err.filename}" if err.filename else ""
    _say(_checkpoints_intact(f"{err.strerror or err}{where}"))
    return EXIT_ERROR
  except ValueError as err:
    reason = _storage_error(err)
    if reason is None:
      raise
    _say(_checkpoints_intact(reason))
    return EXIT_ERROR
  return 0


_LIBRARY_FILES = (f"{os.sep}orbax{os.sep}", f"{os.sep}asyncio{os.sep}")


def _from_io_library(filename: str) -> bool:
  return any(part in filename for part in _LIBRARY_FILES)


class _QuietLibraryErrors(std_logging.Filter):
  """Drops the error logs of orbax and asyncio: train.py's one error line says what failed."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno < std_logging.ERROR or not _from_io_library(record.pathname)


def _left_by_io_library(unraisable) -> bool:
  """Whether an exception Python could not raise comes from orbax's or asyncio's code."""
  files = []
  tb = unraisable.exc_traceback
  while tb is not None:
    files.append(tb.tb_frame.f_code.co_filename)
    tb = tb.tb_next
  code = getattr(unraisable.object, "cr_code", None)
  files.append(code.co_filename if code else "")
  return any(_from_io_library(name) for name in files)


def _quiet_unraisable(unraisable) -> None:
  """Drops, of the exceptions Python cannot raise, those that need no word.

  A signal's exception raised inside a garbage collector callback (the run
  stops at its next step, ``_StopRequest.at``), and what orbax's background
  reads and writes leave behind after a failure (the error line says why).
  """
  if isinstance(unraisable.exc_value, KeyboardInterrupt) or _left_by_io_library(unraisable):
    return
  sys.__unraisablehook__(unraisable)


def _exit_now(code: int) -> None:
  """Exits without the interpreter's shutdown, where orbax's leftover threads make noise.

  After a signal that stopped an XLA compilation, that shutdown segfaulted.
  """
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # a closed pipe: nothing more can be said
      pass
  os._exit(code)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
    for handler in std_logging.getLogger().handlers:  # absl's, which asyncio's logger reaches too
      handler.addFilter(_QuietLibraryErrors())
  sys.unraisablehook = _quiet_unraisable
  try:
    distributed.initialize(
      _DISTRIBUTED.value,
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  except (ValueError, RuntimeError) as err:
    _say(f"error: jax.distributed.initialize failed: {train_lib.one_line(str(err))}")
    return EXIT_ERROR
  try:
    _CONFIG.value.keys()
  except OSError as err:  # ml_collections' stand-in for a config file that did not load
    _exit_with_flag_error(argv, err)
  _Signals.phase = "running"
  code = run(_CONFIG.value, _WORKDIR.value)
  _Signals.phase = "exiting"
  if code:
    _exit_now(code)
  return code


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)

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

import os
import signal
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from training import checkpoints
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
_CONFIG = config_flags.DEFINE_config_file(
  "config", _DEFAULT_CONFIG, "Config file (configs/<name>.py).", lock_config=True
)


EXIT_ERROR = 1  # a bad config, missing or corrupt data, an unusable workdir, a full disk
EXIT_DIVERGED = 3  # non-finite loss or scores; the last good checkpoint is kept
# A signal (Ctrl-C: SIGINT, preemption: SIGTERM) exits with 128 + its number: 130, 143.


def run(config, workdir: str) -> int:
  """Trains and reports; every expected failure is one ``train.py: ...`` line and an exit code."""
  try:
    train_lib.train_and_evaluate(config, workdir)
  except (train_lib.ConfigError, data.DataError, checkpoints.CheckpointError) as err:
    print(f"train.py: error: {err}", file=sys.stderr)
    return EXIT_ERROR
  except train_lib.TrainingDiverged as err:
    print(f"train.py: error: {err}", file=sys.stderr)
    return EXIT_DIVERGED
  except train_lib.TrainingInterrupted as err:
    print(f"train.py: {err}", file=sys.stderr)
    return 128 + err.signum
  except KeyboardInterrupt:
    print(
      "train.py: aborted by a second signal; the checkpoints already written are intact",
      file=sys.stderr,
    )
    return 128 + signal.SIGINT
  except OSError as err:
    where = f": {err.filename}" if err.filename else ""
    print(
      f"train.py: error: {err.strerror or err}{where}; the checkpoints already written are "
      "intact: fix this and run the same command again to resume",
      file=sys.stderr,
    )
    return EXIT_ERROR
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
  try:
    distributed.initialize(
      _DISTRIBUTED.value,
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  except (ValueError, RuntimeError) as err:
    print(f"train.py: error: jax.distributed.initialize failed: {err}", file=sys.stderr)
    return EXIT_ERROR
  return run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)

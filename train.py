"""Trains a dense model, prunes it with config.method (GSM by default) and evaluates the result.

Usage:
  python train.py [--config configs/<name>.py] [--config.key=value ...] --workdir DIR

Without --config, configs/default.py is used (LeNet-300-100 on Fashion-MNIST,
GSM to C = 60, about 4 minutes on 2 CPU cores). Re-running with the same
--workdir resumes from its latest checkpoint; Ctrl-C saves a checkpoint and
exits (code 130); a bad config is one error line (code 1). The fields, the
workdir and summary.json: docs/TRAINING.md.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from training import data
from training import train_lib

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")

_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints and outputs.")
_CONFIG = config_flags.DEFINE_config_file(
  "config", _DEFAULT_CONFIG, "Config file (configs/<name>.py).", lock_config=True
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
  try:
    train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (train_lib.ConfigError, data.DataNotFoundError) as err:
    print(f"train.py: error: {err}", file=sys.stderr)
    return 1
  except train_lib.TrainingInterrupted as err:
    print(f"train.py: {err}", file=sys.stderr)
    return 130
  except KeyboardInterrupt:
    print("train.py: interrupted (the latest checkpoint, if any, is intact)", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  app.run(main)

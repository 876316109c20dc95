"""Config checks of the training program: fields, values, workdirs.

``validate_common`` checks the fields every method reads; each method of
``training.stages`` checks its own section with ``check`` and
``check_sgd_section``. All errors are ``ConfigError`` with a one-line message
naming the field, the value and what is allowed, raised before anything is
loaded or trained. The fields are documented in ``configs/default.py`` and
``docs/TRAINING.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Mapping
import hashlib
import json
import math
import os
from typing import Any

import ml_collections
import numpy as np

from training import strict_json

# Fields that may differ between a workdir's checkpoint and the config resuming
# it: where the data comes from, the eval batching and the logging.
HARMLESS_FIELDS = frozenset(
  {
    "data_dir",
    "download",
    "eval_batch_size",
    "log_every_steps",
    "checkpoint_keep",
    "checkpoint_every_steps",
    "progress_bar",
    "plots",
    "fsdp",  # a checkpoint restores onto any mesh; the global batch is batch_size
  }
)

# The fields of every SGD section (`sgd_section` in configs/default.py).
SGD_FIELDS = (
  "epochs",
  "learning_rate",
  "momentum",
  "nesterov",
  "weight_decay",
  "boundaries",
  "decay_factor",
  "warmup_epochs",
)

# Optional fields of every optimizer section (absent: SGD with a piecewise-constant rate, as
# before they existed); docs/TRAINING.md documents them.
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("piecewise", "cosine")
OPTIMIZER_DEFAULTS = {
  "optimizer": "sgd",
  "b1": 0.9,
  "b2": 0.999,
  "eps": 1e-8,
  "schedule": "piecewise",
  "clip_norm": 0.0,
}
OPTIMIZER_SECTIONS = ("dense", "gsm", "finetune", "gmp", "admm")

_COMMON_FIELDS = (
  "model",
  "dataset",
  "data_dir",
  "download",
  "max_train_examples",
  "max_test_examples",
  "validation_examples",
  "seed",
  "batch_size",
  "eval_batch_size",
  "method",
  "compression",
  "dense_checkpoint",
  "skip_dense",
  "log_every_steps",
  "checkpoint_keep",
  "checkpoint_every_steps",
  "progress_bar",
  "plots",
  "mesh.fsdp",
  *(f"dense.{name}" for name in SGD_FIELDS),
)


class ConfigError(ValueError):
  """A config (or a workdir's config) that cannot be trained; the message is one line."""


def is_number(x: Any) -> bool:
  """A real Python or NumPy number, not a bool."""
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def is_finite(x: Any) -> bool:
  """A number (``is_number``) that is neither NaN nor infinite."""
  return is_number(x) and math.isfinite(x)


def is_int(x: Any) -> bool:
  """A Python or NumPy integer, not a bool."""
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def get_field(config: Any, dotted: str) -> Any:
  """``config.a.b`` for ``dotted = "a.b"``; raises ``ConfigError`` when absent."""
  value = config
  try:
    for key in dotted.split("."):
      value = value[key]
  except (KeyError, AttributeError):
    raise ConfigError(f"config lacks the field {dotted}") from None
  return value


def check(config: Any, name: str, ok: Callable[[Any], bool], allowed: str) -> None:
  """Raises ``ConfigError`` unless ``ok(config.<name>)``."""
  value = get_field(config, name)
  if not ok(value):
    raise ConfigError(f"config.{name} must be {allowed}, got {value!r}")


def _is_boundaries(x: Any) -> bool:
  return (
    isinstance(x, (list, tuple))
    and all(is_finite(b) and b > 0 for b in x)
    and all(a < b for a, b in zip(x, x[1:]))
  )


def check_sgd_section(config: Any, section: str) -> None:
  """Checks the SGD fields of ``config.<section>`` (epochs, learning rate, ...)."""
  if section not in config:
    raise ConfigError(f"config.method={config.method!r} needs the section config.{section}")
  rules = {
    "epochs": (lambda x: is_int(x) and x >= 0, "an integer >= 0"),
    "learning_rate": (lambda x: is_finite(x) and x > 0, "a finite number > 0"),
    "momentum": (lambda x: is_number(x) and 0 <= x < 1, "in [0, 1)"),
    "nesterov": (lambda x: isinstance(x, bool), "True or False"),
    "weight_decay": (lambda x: is_finite(x) and x >= 0, "a finite number >= 0"),
    "boundaries": (_is_boundaries, "a strictly increasing sequence of finite epochs > 0"),
    "decay_factor": (lambda x: is_finite(x) and x > 0, "a finite number > 0"),
    "warmup_epochs": (lambda x: is_finite(x) and x >= 0, "a finite number >= 0"),
  }
  for name in SGD_FIELDS:
    check(config, f"{section}.{name}", *rules[name])
  cfg = config[section]
  optional = {
    "optimizer": (lambda x: x in OPTIMIZERS, "'sgd' or 'adamw'"),
    "b1": (lambda x: is_number(x) and 0 <= x < 1, "in [0, 1)"),
    "b2": (lambda x: is_number(x) and 0 <= x < 1, "in [0, 1)"),
    "eps": (lambda x: is_finite(x) and x >= 0, "a finite number >= 0"),
    "schedule": (lambda x: x in SCHEDULES, "'piecewise' or 'cosine'"),
    "clip_norm": (
      lambda x: is_finite(x) and x >= 0,
      "a finite number >= 0 (0: no gradient clipping)",
    ),
  }
  for name, rule in optional.items():
    if name in cfg:
      check(config, f"{section}.{name}", *rule)


def validate_common(
  config: ml_collections.ConfigDict,
  *,
  models: Collection[str],
  datasets: Collection[str],
  methods: Collection[str],
) -> None:
  """Checks the fields every method reads (the method's own checks come after)."""
  for name in _COMMON_FIELDS:
    get_field(config, name)
  if config.model not in models:
    raise ConfigError(
      f"unknown model {config.model!r} (config.model); choose one of {', '.join(sorted(models))}"
    )
  if config.dataset not in datasets:
    raise ConfigError(
      f"unknown dataset {config.dataset!r} (config.dataset); choose one of {', '.join(datasets)}"
    )
  if config.method not in methods:
    raise ConfigError(
      f"unknown method {config.method!r} (config.method); choose one of {', '.join(methods)}"
    )
  compression = config.compression
  if not is_number(compression) or not math.isfinite(compression) or compression < 1:
    raise ConfigError(
      f"config.compression must be a number >= 1 (pool size / weights kept), got {compression!r}"
    )
  positive_int = (lambda x: is_int(x) and x > 0), "a positive integer"
  for name in ("batch_size", "eval_batch_size", "log_every_steps", "checkpoint_keep"):
    check(config, name, *positive_int)
  check(config, "mesh.fsdp", lambda x: is_int(x) and x >= 1, "a positive integer")
  for name in ("seed", "checkpoint_every_steps"):
    check(config, name, lambda x: is_int(x) and x >= 0, "an integer >= 0")
  for name in ("max_train_examples", "max_test_examples"):
    check(config, name, lambda x: x is None or (is_int(x) and x > 0), "None or a positive integer")
  check(config, "validation_examples", lambda x: is_int(x) and x >= 0, "an integer >= 0")
  limit = config.max_train_examples
  if limit is not None and config.validation_examples >= limit:
    raise ConfigError(
      f"config.validation_examples={config.validation_examples} leaves no training examples "
      f"of config.max_train_examples={limit}"
    )
  for name in ("download", "skip_dense", "progress_bar", "plots"):
    check(config, name, lambda x: isinstance(x, bool), "True or False")
  check_sgd_section(config, "dense")
  check(config, "data_dir", lambda x: x is None or isinstance(x, str), "None or a directory")
  check(
    config, "dense_checkpoint", lambda x: x is None or isinstance(x, str), "None or a directory"
  )
  if config.dense_checkpoint:
    if config.skip_dense:
      raise ConfigError(
        "config.skip_dense and config.dense_checkpoint exclude each other: "
        "the dense phase is either skipped or loaded"
      )
    if not os.path.isdir(config.dense_checkpoint):
      raise ConfigError(
        f"config.dense_checkpoint={config.dense_checkpoint!r} is not a directory "
        "(give a dense_model/ directory or the workdir of an earlier run)"
      )


def flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten_config(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON data (what ``config.json`` holds)."""
  return json.loads(config.to_json())


# Fields added since workdirs were first written, with the value that means "as before":
# a config.json without them resumes as if it held that value.
ADDED_FIELDS = {
  "validation_examples": 0,
  "gsm.ramp_epochs": 0.0,
  "gsm.score_ema": 0.0,
  "gsm.passive_decay_growth": 0.0,
  "gsm.passive_decay_horizon_epochs": 1.0,
  "gsm.finetune": False,
  "channels.axis": -1,
  "nm.n": 2,
  "nm.m": 4,
  "nm.axis": -2,
  "channels.score": "sum",
  "channels.layers": "",
  "channels.groups": "",
  "nm.layers": "",
  "pool.include": [],
  "pool.exclude": [],
  "gsm.passive_shrink": 10.0,
  "gsm.passive_rule": "decay",
  "compute_dtype": "float32",
  **{
    f"{s}.{name}": value for s in OPTIMIZER_SECTIONS for name, value in OPTIMIZER_DEFAULTS.items()
  },
}


def config_differences(stored: Mapping[str, Any], config: ml_collections.ConfigDict) -> list[str]:
  """The fields (outside ``HARMLESS_FIELDS``) where a stored config.json differs."""
  stored_flat = {**ADDED_FIELDS, **flatten_config(stored)}
  current = {**ADDED_FIELDS, **flatten_config(config_json(config))}
  return [
    f"{key}: {stored_flat.get(key, '<absent>')!r} there, {current.get(key, '<absent>')!r} here"
    for key in sorted(set(stored_flat) | set(current))
    if key.split(".")[-1] not in HARMLESS_FIELDS and stored_flat.get(key) != current.get(key)
  ]


def read_workdir_config(workdir: str) -> dict[str, Any] | None:
  """The workdir's config.json, or None when it has none."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as err:
    raise ConfigError(
      f"workdir {workdir}: config.json is not valid JSON ({err}); restore it, or use a new "
      "--workdir"
    ) from None


# The workdir's identity: the fingerprint of the config that started it, written before
# anything else and never rewritten.
FINGERPRINT_FILE = "config_fingerprint"
# What a run of one config leaves for the next run in its workdir to reuse.
_REUSED = ("checkpoints", "initial_model", "dense_model", "final_model")


def _canonical(value: Any) -> Any:
  """A JSON value compared by meaning: every number a float, lists and dicts recursively."""
  if is_number(value):
    return float(value)
  if isinstance(value, Mapping):
    return {key: _canonical(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_canonical(item) for item in value]
  return value


def fingerprint(stored: Mapping[str, Any]) -> str:
  """The identity of a config.json, ``sha256:<hex>``.

  The fields outside ``HARMLESS_FIELDS``, leaving out those of ``ADDED_FIELDS``
  at their default: a config.json written before a field existed has the
  fingerprint of a config holding its default.
  """
  identity = {
    key: _canonical(value)
    for key, value in flatten_config(stored).items()
    if key.split(".")[-1] not in HARMLESS_FIELDS
    and not (key in ADDED_FIELDS and _canonical(value) == _canonical(ADDED_FIELDS[key]))
  }
  text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
  return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def read_fingerprint(workdir: str) -> str | None:
  """The workdir's ``FINGERPRINT_FILE``, or None when it has none."""
  try:
    with open(os.path.join(workdir, FINGERPRINT_FILE)) as f:
      found = f.read().strip()
  except (FileNotFoundError, NotADirectoryError):
    return None
  if not found.startswith("sha256:"):
    raise ConfigError(
      f"workdir {workdir}: {FINGERPRINT_FILE} is not a fingerprint written by train.py; "
      "restore it, or use a new --workdir"
    )
  return found


def check_workdir(config: ml_collections.ConfigDict, workdir: str, has_checkpoint: bool) -> None:
  """Refuses a workdir started by a different config (its fingerprint, else its config.json).

  Raises:
    ConfigError: one line listing the fields that differ (fields in
      ``HARMLESS_FIELDS`` may differ), or naming what the workdir holds
      without saying which config wrote it.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} is a file, not a directory")
  found, stored = read_fingerprint(workdir), read_workdir_config(workdir)
  if found is None and stored is None:
    held = [f"{name}/" for name in _REUSED if os.path.isdir(os.path.join(workdir, name))]
    if has_checkpoint or "initial_model/" in held:
      raise ConfigError(
        f"workdir {workdir} holds {', '.join(held)} but no config.json; "
        "use a new --workdir or delete this one"
      )
    return
  diffs = [] if stored is None else config_differences(stored, config)
  if found == fingerprint(config_json(config)) or (found is None and not diffs):
    return
  started = "holds a checkpoint of" if has_checkpoint else "was started by"
  detail = "; ".join(diffs) or f"its {FINGERPRINT_FILE} is another config's"
  raise ConfigError(
    f"workdir {workdir} {started} a different config ({detail}); resume with the same "
    "config, or use a new --workdir"
  )


def claim_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the workdir's fingerprint, before anything else, unless it has this config's.

  Called under the workdir lock: a run that started on this workdir between
  ``check_workdir`` and the lock is caught here.

  Raises:
    ConfigError: the workdir holds another config's fingerprint.
  """
  mine = fingerprint(config_json(config))
  found = read_fingerprint(workdir)
  if found == mine:
    return
  if found is not None:
    check_workdir(config, workdir, has_checkpoint=False)  # raises: another config's
  path = os.path.join(workdir, FINGERPRINT_FILE)
  with strict_json.open_nofollow(f"{path}.tmp", "w") as f:  # no link followed, as every write
    f.write(mine + "\n")
  os.replace(f"{path}.tmp", path)

"""The one JSON writer of the project: strict JSON, non-finite numbers as null.

``json.dump`` writes NaN and Infinity, which are not JSON (most parsers other
than Python's refuse them). The training program (summary.json, config.json,
metrics.jsonl) and every benchmark write through these functions. Standard
library only, so that any module can import it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import math
import os
from typing import Any


def finite_json(obj: Any) -> Any:
  """``obj`` with every non-finite float replaced by None: JSON has no NaN or inf."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, Mapping):
    return {key: finite_json(value) for key, value in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite_json(value) for value in obj]
  return obj


def dumps(obj: Any, indent: int | None = None) -> str:
  """``obj`` as strict JSON text (non-finite numbers as null)."""
  return json.dumps(finite_json(obj), indent=indent, allow_nan=False)


def json_line(row: Mapping[str, Any]) -> str:
  """One line of a JSON Lines file (metrics.jsonl): strict JSON and a newline."""
  return dumps(row) + "\n"


_WRITE_FLAGS = {
  "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
  "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
  "a+": os.O_RDWR | os.O_CREAT | os.O_APPEND,
}


def open_nofollow(path: str, mode: str = "w"):
  """``open(path, mode)`` for writing ("w", "a", "a+"), refusing a symbolic link at ``path``.

  O_NOFOLLOW: a link there is an OSError (ELOOP) instead of a write to where it points.
  """
  return os.fdopen(os.open(path, _WRITE_FLAGS[mode] | os.O_NOFOLLOW, 0o666), mode)


def write_json(path: str, obj: Any, indent: int = 2) -> None:
  """Writes strict JSON atomically (a temporary file, then a rename; no link followed)."""
  tmp = path + ".tmp"
  with open_nofollow(tmp, "w") as f:
    f.write(dumps(obj, indent) + "\n")
  os.replace(tmp, path)

"""The machine's load around a timing benchmark, recorded with every result.

Timings from a machine that other jobs are loading are not results (these
2-core machines are shared). Every benchmark takes a ``LoadWatch`` when it
starts and writes its ``record()`` into its JSON and its ``note()`` under its
table: the 1-, 5- and 15-minute load averages before and after, the core
count, and ``machine_busy`` when the 1-minute load at the start was above
``BUSY_LOAD_PER_CORE`` per core (the benchmark's own load shows only after).
A busy run is written, marked as not a result.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

BUSY_LOAD_PER_CORE = 0.25


def load_average() -> list[float]:
  """The 1, 5 and 15 minute load averages (empty where the OS has none)."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return []


@dataclasses.dataclass
class LoadWatch:
  """The load when a benchmark started; ``record()`` adds the load when it ended."""

  before: list[float] = dataclasses.field(default_factory=load_average)
  cpus: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)

  @property
  def busy(self) -> bool:
    """Whether other jobs ran when the benchmark started (1-minute load per core)."""
    return bool(self.before) and self.before[0] > BUSY_LOAD_PER_CORE * self.cpus

  def record(self) -> dict[str, Any]:
    """The JSON fields: ``load_before``, ``load_after``, ``cpus``, ``machine_busy``."""
    return {
      "load_before": self.before,
      "load_after": load_average(),
      "cpus": self.cpus,
      "machine_busy": self.busy,
    }

  def note(self, record: dict[str, Any]) -> str:
    """One Markdown paragraph saying the load, and that busy timings are not a result."""
    text = (
      f"Load average (1, 5, 15 min) before {record['load_before']}, after "
      f"{record['load_after']}, on {record['cpus']} cores."
    )
    if record["machine_busy"]:
      text += (
        " **The machine was busy when this run started (1-minute load above "
        f"{BUSY_LOAD_PER_CORE} per core): these timings are not a result; rerun on an idle "
        "machine.**"
      )
    return text

"""benchmarks/machine.py: every timing result says the machine's load, and a busy run is marked."""

import os

import pytest

from benchmarks import bench_update
from benchmarks import machine


@pytest.mark.parametrize(
  "one_minute, busy", [(0.1, False), (0.5, False), (0.51, True), (3.0, True)]
)
def test_a_run_started_above_a_quarter_load_per_core_is_marked_busy(monkeypatch, one_minute, busy):
  monkeypatch.setattr(os, "getloadavg", lambda: (one_minute, 0.2, 0.1))
  watch = machine.LoadWatch(cpus=2)
  record = watch.record()
  assert record["machine_busy"] is busy and record["load_before"] == [one_minute, 0.2, 0.1]
  assert ("not a result" in watch.note(record)) is busy


def test_write_results_puts_the_load_in_the_json_and_under_the_table(monkeypatch, tmp_path):
  monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.0, 0.5))
  watch = machine.LoadWatch(cpus=2)
  results = {"ratio": 1.25}
  bench_update.write_results(str(tmp_path), "x", results, "| a |", watch)
  text = (tmp_path / "x.md").read_text()
  assert text.startswith("| a |") and "before [1.5, 1.0, 0.5]" in text and "not a result" in text
  assert '"machine_busy": true' in (tmp_path / "x.json").read_text()


def test_a_machine_without_load_averages_is_not_called_busy(monkeypatch):
  def unavailable():
    raise OSError("no load average here")

  monkeypatch.setattr(os, "getloadavg", unavailable)
  watch = machine.LoadWatch(cpus=2)
  assert watch.record()["load_before"] == [] and not watch.busy

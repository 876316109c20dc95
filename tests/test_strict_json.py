"""One JSON writer: the training program and every benchmark write strict JSON (no NaN)."""

import ast
import json
import math
import pathlib

import pytest

from benchmarks import bench_update
from benchmarks import evidence
from training import report
from training import strict_json

ROOT = pathlib.Path(__file__).resolve().parent.parent
NON_FINITE = {"loss": math.nan, "rows": [math.inf, 1.5, (-math.inf, 2)], "n": 3, "name": "x"}
STRICT = {"loss": None, "rows": [None, 1.5, [None, 2]], "n": 3, "name": "x"}


def _strict_load(path):
  """json.load that refuses NaN and Infinity, as parsers other than Python's do."""

  def refuse(token):
    raise ValueError(f"not JSON: {token}")

  with open(path) as f:
    return json.load(f, parse_constant=refuse)


def test_non_finite_numbers_are_written_as_null(tmp_path):
  strict_json.write_json(str(tmp_path / "a.json"), NON_FINITE)
  assert _strict_load(tmp_path / "a.json") == STRICT
  assert json.loads(strict_json.json_line(NON_FINITE)) == STRICT
  assert strict_json.json_line(NON_FINITE).count("\n") == 1
  assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file, renamed


def test_the_training_program_uses_the_same_writer():
  assert report.write_json is strict_json.write_json
  assert report.json_line is strict_json.json_line


@pytest.mark.parametrize("writer", ["evidence", "bench_update"])
def test_benchmark_outputs_are_strict_json(writer, tmp_path):
  if writer == "evidence":
    evidence.write_json(str(tmp_path / "raw.json"), NON_FINITE)
    path = tmp_path / "raw.json"
  else:
    bench_update.write_results(str(tmp_path), "bench", NON_FINITE, "table")
    path = tmp_path / "bench.json"
  assert _strict_load(path) == STRICT


def _json_file_writes(path: pathlib.Path) -> list[int]:
  """Lines of `path` that call json.dump (a JSON file written without the strict writer)."""
  lines = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
      target = node.func
      if target.attr == "dump" and getattr(target.value, "id", None) == "json":
        lines.append(node.lineno)
  return lines


def test_no_benchmark_writes_a_json_file_but_through_the_strict_writer():
  found = {
    str(path.relative_to(ROOT)): lines
    for path in sorted((ROOT / "benchmarks").glob("*.py"))
    if (lines := _json_file_writes(path))
  }
  assert found == {}, f"json.dump outside training/strict_json.py: {found}"

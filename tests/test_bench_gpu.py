"""benchmarks/bench_gpu.py on the CPU at its quick sizes: the table it writes, not the timings."""

import json
import os

from benchmarks import bench_gpu


def test_quick_run_times_both_steps_in_both_dtypes_and_writes_json_and_markdown(tmp_path):
  results = bench_gpu.main(
    ["--quick", "--models", "lenet5", "--chain", "1", "--repeats", "1"]
    + ["--out", str(tmp_path), "--stem", "gpu"]
  )
  rows = results["rows"]
  assert [(row["name"], row["compute_dtype"]) for row in rows] == [
    ("lenet5", "float32"),
    ("lenet5", "bfloat16"),
  ]
  for row in rows:
    assert row["plain_ms"] > 0 and row["ratio"] == row["gsm_ms"] / row["plain_ms"]
  with open(tmp_path / "gpu.json") as f:
    saved = json.load(f)
  assert saved["device"]["backend"] == "cpu" and len(saved["load_before"]) == 3
  assert saved["command"].startswith("python benchmarks/bench_gpu.py --quick")
  table = (tmp_path / "gpu.md").read_text()
  assert "| lenet5 | 32 | bfloat16 |" in table and "Load average (1, 5, 15 min) before" in table
  assert os.path.exists(tmp_path / "gpu.md")


def test_the_gsm_step_of_the_gpt_is_gsm_adamw_and_of_the_cnns_the_paper_rule():
  plain, gsm, spec = bench_gpu.sections(bench_gpu.Case(model="gpt"))
  assert (plain.optimizer, gsm.optimizer, gsm.passive_rule) == ("adamw", "adamw", "shrink")
  assert spec is not None  # the GPT's attention and MLP kernels
  plain, gsm, spec = bench_gpu.sections(bench_gpu.Case(model="resnet56"))
  assert (plain.optimizer, gsm.optimizer, gsm.passive_rule, spec) == ("sgd", "sgd", "decay", None)

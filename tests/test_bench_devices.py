"""benchmarks/bench_devices.py: the HLO all-gather parser, and ``--quick`` end to end.

The quick run (LeNet-300-100, batch 16, 1 and 2 forced CPU devices, 2 steps)
starts a child process per device count; about 20 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import bench_devices  # noqa: E402

HLO = """\
HloModule jit_train_step, is_scheduled=true

ENTRY %main.1 (p0: f32[3,3,16,8], p1: f32[64,5]) -> f32[] {
  %p0 = f32[3,3,16,8]{3,2,1,0} parameter(0)
  %p1 = f32[64,5]{1,0} parameter(1)
  %all-gather = f32[3,3,16,16]{3,1,0,2} all-gather(%p0), channel_id=3, dimensions={3}, \
metadata={op_name="jit(train_step)/jvp()/conv_general_dilated" stack_frame_id=47}
  %all-gather.2 = f32[3,3,16,16]{3,1,0,2} all-gather(%p0), channel_id=8, dimensions={3}, \
metadata={op_name="jit(train_step)/transpose(jvp())/conv_general_dilated"}
  %all-gather.1 = (f32[64,10]{1,0}, s32[8]{0}) all-gather(%p1, %c), channel_id=4, dimensions={1}
  %ags = ((f32[4,4]{1,0}), f32[8,4]{1,0}) all-gather-start(%x), channel_id=5, dimensions={0}
  %agd = f32[8,4]{1,0} all-gather-done(%ags)
  %all-reduce = f32[4096]{0} all-reduce(%h), channel_id=6, to_apply=%add
  %fusion = f32[3,3,16,16]{3,2,1,0} fusion(%all-gather, %all-gather.1), kind=kLoop
  %scalar = f32[] all-gather(%s), channel_id=7, dimensions={0}
  ROOT %r = f32[] reduce(%fusion, %z), dimensions={0,1,2,3}, to_apply=%add
}
"""


def test_all_gathers_gives_the_result_shapes_in_order():
  assert bench_devices.all_gathers(HLO) == [
    (3, 3, 16, 16),
    (3, 3, 16, 16),
    (64, 10),
    (8,),
    (8, 4),
    (),
  ]


def test_all_gather_ops_name_the_pass_that_gathers():
  ops = bench_devices.all_gather_ops(HLO)
  passes = [bench_devices.pass_of(name) for _, name in ops]
  assert passes == ["forward", "backward", "other", "other", "other", "other"]
  assert ops[0][1] == "jit(train_step)/jvp()/conv_general_dilated"


def test_all_gathers_of_text_without_gathers_is_empty():
  assert bench_devices.all_gathers("%a = f32[8]{0} all-reduce(%x), to_apply=%add") == []


def test_pool_sized_keeps_gathers_as_large_as_the_smallest_kernel():
  shapes = bench_devices.all_gathers(HLO)
  assert bench_devices.pool_sized(shapes, 640) == [(3, 3, 16, 16), (3, 3, 16, 16), (64, 10)]
  assert bench_devices.shape_counts(shapes[:3]) == {"3x3x16x16": 2, "64x10": 1}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  """(results JSON, Markdown text) of one ``--quick`` run into a temporary directory."""
  out = tmp_path_factory.mktemp("bench_devices")
  assert bench_devices.main(["--quick", "--force-cpu", "--out", str(out)]) == 0
  with open(out / "bench_devices_quick.json") as f:
    results = json.load(f)
  return results, (out / "bench_devices_quick.md").read_text()


@pytest.mark.slow  # the benchmark's quick run: 16 s
def test_quick_run_writes_a_row_per_layout_and_device_count(quick):
  results, _ = quick
  assert results["model"] == "lenet_300_100"
  assert results["batch_size"] == 16
  assert results["machine"]["forced_cpu_devices"] is True
  assert results["machine"]["cpu_count"] == os.cpu_count()
  assert "bench_devices.py --quick" in results["command"]
  keys = {"layout", "devices", "mesh_shape", "ms_per_step", "examples_per_s", "speedup"}
  keys |= {"pool_sized_all_gathers", "largest_all_gather", "all_gathers", "compile_s"}
  rows = {(r["layout"], r["devices"]): r for r in results["rows"]}
  assert set(rows) == {("data", 1), ("data", 2), ("fsdp", 1), ("fsdp", 2)}
  for row in rows.values():
    assert keys <= set(row)
    assert row["ms_per_step"] > 0 and row["examples_per_s"] > 0
  assert rows[("data", 1)]["speedup"] == 1.0
  assert rows[("fsdp", 2)]["mesh_shape"] == {"data": 1, "fsdp": 2}
  # Replicated params: no gather as large as a kernel. Split params: the
  # forward pass gathers them, the largest being the 784 x 300 kernel.
  assert rows[("data", 2)]["pool_sized_all_gathers"] == 0
  assert rows[("fsdp", 2)]["largest_all_gather"] == [784, 300]
  assert rows[("fsdp", 2)]["pool_sized_all_gathers_by_pass"]["other"] == 0


@pytest.mark.slow  # shares the quick run
def test_quick_run_writes_a_markdown_table(quick):
  _, text = quick
  lines = text.splitlines()
  header = next(i for i, line in enumerate(lines) if line.startswith("| layout | devices"))
  assert lines[header + 1].startswith("|---|")
  table = [line for line in lines[header + 2 :] if line.startswith("|")]
  assert len(table) == 4
  assert "forced CPU devices" in text and "Command: `python benchmarks/bench_devices.py" in text

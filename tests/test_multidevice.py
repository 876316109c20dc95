"""GSM on 8 (simulated CPU) devices: sharded params, compiled HLO, pmap.

The device count is fixed when JAX starts, so tests/multidevice_check.py runs
in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 and
prints a JSON report (the `multidevice_report` fixture of conftest.py starts
it at collection time, so it runs alongside the other tests); each test below
asserts on one part of it.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def report(multidevice_report):
  return multidevice_report  # tests/conftest.py runs the script


def test_eight_devices_are_simulated(report):
  assert report["sharded"]["num_devices"] == 8


# (Q, whether the sampled bracket decides): the small pool takes the radix
# select; the large-pool path, forced on 287,744 weights, is decided by its bracket.
PATHS = {"sharded": (230, False), "sharded_large_pool_path": (14387, True)}


@pytest.mark.parametrize("path", list(PATHS))
def test_sharded_update_equals_single_device_update_exactly(report, path):
  sharded = report[path]
  keep, sampled = PATHS[path]
  assert sharded["equal_every_step"] == [True] * len(sharded["equal_every_step"])
  assert max(sharded["max_abs_diff"]) == 0.0
  assert sharded["sampled_decides"] == [sampled] * len(sharded["stats"])
  for step, stats in enumerate(sharded["stats"]):
    assert stats["sharded"] == stats["single"], f"step {step}"
    assert stats["sharded"]["num_active"] == sharded["keep"] == keep
    assert stats["sharded"]["step"] == step + 1
  # The updated kernels keep their sharding along the mesh axis.
  assert sharded["kernels_stay_sharded"] == [True, True, True]


@pytest.mark.parametrize(
  "path, sizes", [("hlo", [192, 576, 1536]), ("hlo_large_pool_path", [9216, 16384, 262144])]
)
def test_compiled_sharded_update_gathers_no_pool_sized_array(report, path, sizes):
  hlo = report[path]
  assert hlo["pooled_leaf_sizes"] == sizes
  assert hlo["pool_size"] == sum(sizes)
  gathers = hlo["pool_sized_all_gathers"]
  assert not gathers, (
    "the sharded update all-gathers arrays as large as a pooled leaf: "
    f"{gathers}; collectives: {hlo['ops']}"
  )
  # Counts cross devices as reductions (histograms of fixed size), and no
  # other collective moves as much data as a pooled leaf.
  assert "all-reduce" in hlo["ops"], hlo["collectives"]
  for c in hlo["collectives"]:
    if c["op"] != "all-reduce":
      assert c["elements"] < min(hlo["pooled_leaf_sizes"]), c


def test_pmap_with_pmean_gives_every_device_the_single_device_update(report):
  for step, result in enumerate(report["pmap"]["steps"]):
    assert result["pmean_is_the_mean"], step
    assert result["same_params_on_every_device"], step
    assert result["same_state_on_every_device"], step
    assert result["threshold"] == [result["numpy_threshold"]] * 8, step
    assert result["num_active"] == [230] * 8
    assert result["single_num_active"] == 230
    assert result["equals_single_device"], (step, result["max_abs_diff"])

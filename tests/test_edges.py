"""Edge cases of the library: low-precision params, invalid traced compressions,
the k of the k-th largest, empty pools, and Q for a float64 vs a float32 C.

Each test states the behaviour exactly (counts, messages, NumPy references).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsm_optax

# ----------------------------------------------------------------------------
# The k of global_kth_largest / global_kth_largest_magnitude.
# ----------------------------------------------------------------------------

KTH = [gsm_optax.global_kth_largest, gsm_optax.global_kth_largest_magnitude]
KTH_IDS = ["kth_largest", "kth_largest_magnitude"]
_TREE = {"a": jnp.arange(10.0), "b": jnp.arange(9.0).reshape(3, 3) - 20.0}  # 19 elements


@pytest.mark.parametrize("fn", KTH, ids=KTH_IDS)
@pytest.mark.parametrize(
  "k,kind",
  [
    (True, "bool"),
    (np.bool_(True), "dtype bool"),
    (jnp.asarray(True), "dtype bool"),
    (2.5, "float"),
    (3.0, "float"),
    (np.float32(3.0), "dtype float32"),
    (jnp.asarray(3.0), "dtype float32"),
    ("3", "str"),
    (None, "NoneType"),
  ],
  ids=repr,
)
def test_kth_largest_rejects_a_k_that_is_not_an_integer(fn, k, kind):
  with pytest.raises(TypeError) as error:
    fn(_TREE, k)
  assert str(error.value) == f"k must be an integer (the rank from the top), got {k!r} ({kind})."


@pytest.mark.parametrize("fn", KTH, ids=KTH_IDS)
@pytest.mark.parametrize(
  "k", [np.int64(0), np.int32(20), jnp.int32(100), jnp.asarray(-1), np.asarray(0)], ids=repr
)
def test_kth_largest_rejects_a_concrete_integer_k_out_of_range(fn, k):
  with pytest.raises(ValueError) as error:
    fn(_TREE, k)
  assert str(error.value) == f"k must be in [1, 19] (the number of elements), got {k}."


@pytest.mark.parametrize("fn", KTH, ids=KTH_IDS)
def test_kth_largest_rejects_a_k_that_is_not_a_scalar(fn):
  with pytest.raises(ValueError, match=r"^k must be a scalar, got shape \(2,\)\.$"):
    fn(_TREE, jnp.asarray([1, 2]))


def test_a_traced_k_is_clipped_and_a_traced_float_k_is_rejected():
  values = np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(_TREE)])
  kth = jax.jit(gsm_optax.global_kth_largest)
  kth_mag = jax.jit(gsm_optax.global_kth_largest_magnitude)
  for k, rank in [(0, 1), (-5, 1), (7, 7), (19, 19), (100, 19)]:
    assert float(kth(_TREE, k)) == np.sort(values)[-rank]
    assert float(kth_mag(_TREE, k)) == np.sort(np.abs(values))[-rank]
  with pytest.raises(TypeError, match=r"k must be an integer .* \(dtype float32\)\."):
    kth(_TREE, 3.0)
  with pytest.raises(TypeError, match=r"k must be an integer .* \(dtype bool\)\."):
    kth_mag(_TREE, True)


# ----------------------------------------------------------------------------
# sparsity_report of a pool whose leaves are all empty.
# ----------------------------------------------------------------------------


def test_sparsity_report_of_an_empty_pool_has_density_0_and_infinite_compression():
  params = {"k": np.zeros((0, 4), np.float32), "c": np.zeros((3, 0, 2), np.float32)}
  report = gsm_optax.sparsity_report(params)
  assert [(r.path, r.size, r.nonzeros, r.density) for r in report.rows] == [
    ("['c']", 0, 0, 0.0),
    ("['k']", 0, 0, 0.0),
  ]
  assert (report.total_size, report.total_nonzeros) == (0, 0)
  assert report.density == 0.0
  assert report.compression == float("inf")
  lines = str(report).splitlines()
  assert lines[-2].split() == ["total", "0", "0", "0.00%"]
  assert lines[-1] == "compression infx (0 / 0)"
  as_dict = report.to_dict()
  assert (as_dict["density"], as_dict["compression"]) == (0.0, float("inf"))
  assert json.loads(json.dumps(as_dict)) == as_dict
  assert gsm_optax.SparsityReport(rows=()).density == 0.0

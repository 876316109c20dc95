"""Final pruning (global magnitude cut) and the sparsity report, against NumPy."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsm_optax

KERNELS = ["['conv']['kernel']", "['mlp']['dense1']['kernel']", "['mlp']['dense2']['kernel']"]


def _flat_with_paths(tree):
  return [
    (jax.tree_util.keystr(p), np.asarray(x))
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]


def _numpy_magnitude_masks(params, pooled_paths, keep):
  """Reference: the `keep` largest |w| over the pooled leaves, by sorting."""
  flat = _flat_with_paths(params)
  pooled = np.concatenate(
    [np.abs(x.astype(np.float32)).ravel() for p, x in flat if p in pooled_paths]
  )
  threshold = np.sort(pooled)[-keep]
  return {
    p: (
      (np.abs(x.astype(np.float32)) >= threshold) & (x != 0)
      if p in pooled_paths
      else np.ones(x.shape, bool)
    )
    for p, x in flat
  }


@pytest.mark.parametrize(
  "compression,use_jit",
  [(1.0, False), (2.5, False), (10.0, False), (138.0, False), (10.0, True)],
  ids=["nojit-C1", "nojit-C2.5", "nojit-C10", "nojit-C138", "jit-C10"],
)
def test_prune_keeps_exactly_the_q_largest_magnitudes_of_the_pool(
  compression, use_jit, rng, params_factory
):
  # (Under jit one C suffices: each C is another compile, seconds on CPU.)
  params = jax.tree.map(jnp.asarray, params_factory(rng))
  keep = int(138 / compression)
  prune = functools.partial(gsm_optax.prune, compression=compression)
  magnitude_mask = functools.partial(gsm_optax.global_magnitude_mask, compression=compression)
  if use_jit:  # (the mask is checked eagerly: one compile is enough)
    prune = jax.jit(prune)
  pruned = prune(params)
  masks = magnitude_mask(params)

  expected_masks = _numpy_magnitude_masks(params, KERNELS, keep)
  original = dict(_flat_with_paths(params))
  for (path, got), (_, mask) in zip(_flat_with_paths(pruned), _flat_with_paths(masks)):
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, expected_masks[path], err_msg=path)
    np.testing.assert_array_equal(
      got, np.where(expected_masks[path], original[path], 0), err_msg=path
    )
    if path not in KERNELS:  # outside the pool: untouched
      np.testing.assert_array_equal(got, original[path])
  assert sum(np.count_nonzero(x) for p, x in _flat_with_paths(pruned) if p in KERNELS) == keep
  assert gsm_optax.keep_count(params, compression) == keep


def test_prune_with_a_custom_pool_cuts_only_that_pool(rng, params_factory):
  params = jax.tree.map(jnp.asarray, params_factory(rng))
  pool = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731
    lambda path, x: x.ndim >= 2 and "dense1" not in jax.tree_util.keystr(path), p
  )
  pooled = ["['conv']['kernel']", "['mlp']['dense2']['kernel']"]
  pruned = gsm_optax.prune(params, 5.0, pool=pool)
  expected = _numpy_magnitude_masks(params, pooled, int(90 / 5.0))
  original = dict(_flat_with_paths(params))
  for path, got in _flat_with_paths(pruned):
    np.testing.assert_array_equal(got, np.where(expected[path], original[path], 0), err_msg=path)
  np.testing.assert_array_equal(
    pruned["mlp"]["dense1"]["kernel"], params["mlp"]["dense1"]["kernel"]
  )
  assert gsm_optax.pool_size(params, pool) == 90


def test_magnitude_ties_are_all_kept_and_zeros_never_are(params_factory, rng):
  params = jax.tree.map(np.zeros_like, params_factory(rng))
  a = params["mlp"]["dense2"]["kernel"]
  a[0] = [3.0, -2.0, 2.0]
  a[1] = [0.0, 1.0, -0.0]
  b = params["mlp"]["dense1"]["kernel"]
  b[0, :2] = [2.0, 0.5]
  b[1, 0] = -2.0
  params["conv"]["bias"][:] = 9.0  # outside the pool
  params = jax.tree.map(jnp.asarray, params)
  # |pool| = 138, C = 69 -> Q = 2: 3.0, then 2.0 tied four times: 5 kept.
  masks = gsm_optax.global_magnitude_mask(params, 69.0)
  np.testing.assert_array_equal(masks["mlp"]["dense2"]["kernel"], np.abs(a) >= 2.0)
  np.testing.assert_array_equal(masks["mlp"]["dense1"]["kernel"], np.abs(b) >= 2.0)
  assert sum(int(np.sum(m)) for m in jax.tree.leaves(masks)) == 5 + 13  # + biases
  # C = 12 -> Q = 11, but only 6 pooled weights are non-zero: zeros stay pruned.
  masks = gsm_optax.global_magnitude_mask(params, 12.0)
  np.testing.assert_array_equal(masks["mlp"]["dense2"]["kernel"], a != 0)
  np.testing.assert_array_equal(masks["mlp"]["dense1"]["kernel"], b != 0)
  assert not np.any(masks["conv"]["kernel"])


def test_apply_mask_zeroes_exactly_the_false_entries():
  params = {"w": jnp.arange(1.0, 19.0).reshape(6, 3), "b": jnp.asarray([5.0, 6.0, 7.0])}
  mask = {
    "w": jnp.asarray(np.arange(18).reshape(6, 3) % 4 == 0),
    "b": jnp.asarray([False, True, False]),
  }
  out = gsm_optax.apply_mask(params, mask)
  np.testing.assert_array_equal(
    out["w"], np.where(np.arange(18).reshape(6, 3) % 4 == 0, np.arange(1.0, 19.0).reshape(6, 3), 0)
  )
  np.testing.assert_array_equal(out["b"], [0.0, 6.0, 0.0])


@pytest.mark.parametrize(
  "compression,error,words",
  [
    (0.5, ValueError, "finite and >= 1"),
    (float("nan"), ValueError, "finite and >= 1"),
    (139.0, ValueError, "keeps Q = int(138 / 139.0) = 0"),
    ("10", TypeError, "must be a number"),
  ],
)
def test_prune_rejects_bad_compression(compression, error, words, rng, params_factory):
  params = jax.tree.map(jnp.asarray, params_factory(rng))
  with pytest.raises(error) as info:
    gsm_optax.prune(params, compression)
  assert words in str(info.value)


# ----------------------------------------------------------------------------
# Sparsity report.
# ----------------------------------------------------------------------------


def _params_with_known_zeros(rng, params_factory):
  params = params_factory(rng)
  conv = params["conv"]["kernel"].ravel()
  conv[10:] = 0.0  # 10 non-zeros of 72
  params["conv"]["kernel"] = conv.reshape(3, 3, 2, 4)
  params["mlp"]["dense1"]["kernel"][:] = 0.0  # 0 of 48
  params["mlp"]["dense2"]["kernel"][0, :] = -0.0  # 15 of 18 (-0.0 is zero)
  params["conv"]["bias"][:] = 0.0  # outside the pool: not reported
  return params


def test_sparsity_report_counts_every_pooled_leaf(rng, params_factory):
  report = gsm_optax.sparsity_report(_params_with_known_zeros(rng, params_factory))
  assert [r.path for r in report.rows] == KERNELS
  assert [r.shape for r in report.rows] == [(3, 3, 2, 4), (8, 6), (6, 3)]
  assert [r.size for r in report.rows] == [72, 48, 18]
  assert [r.nonzeros for r in report.rows] == [10, 0, 15]
  assert [r.density for r in report.rows] == [10 / 72, 0.0, 15 / 18]
  assert report.total_size == 138
  assert report.total_nonzeros == 25
  assert report.density == 25 / 138
  assert report.compression == 138 / 25


def test_sparsity_report_table_shows_every_path_and_the_total(rng, params_factory):
  report = gsm_optax.sparsity_report(_params_with_known_zeros(rng, params_factory))
  text = str(report)
  lines = text.splitlines()
  for path in KERNELS:
    assert sum(path in line for line in lines) == 1
  total = [line for line in lines if line.startswith("total")]
  assert len(total) == 1
  assert total[0].split()[1:] == ["138", "25", f"{100 * 25 / 138:.2f}%"]
  assert f"{138 / 25:.2f}x" in text
  assert "bias" not in text


def test_sparsity_report_to_dict_round_trips_through_json(rng, params_factory):
  report = gsm_optax.sparsity_report(_params_with_known_zeros(rng, params_factory))
  as_dict = report.to_dict()
  assert json.loads(json.dumps(as_dict)) == as_dict
  assert as_dict["total_size"] == 138
  assert as_dict["total_nonzeros"] == 25
  assert as_dict["density"] == report.density
  assert as_dict["compression"] == report.compression
  rebuilt = gsm_optax.SparsityReport(
    rows=tuple(
      gsm_optax.LeafSparsity(
        path=r["path"], shape=tuple(r["shape"]), size=r["size"], nonzeros=r["nonzeros"]
      )
      for r in as_dict["leaves"]
    )
  )
  assert rebuilt == report
  assert [r["density"] for r in as_dict["leaves"]] == [r.density for r in report.rows]


def test_sparsity_report_of_an_all_zero_pool_has_infinite_compression():
  report = gsm_optax.sparsity_report(
    {"k": np.zeros((4, 4), np.float32), "b": np.ones((4,), np.float32)}
  )
  assert report.total_nonzeros == 0
  assert report.density == 0.0
  assert report.compression == float("inf")
  assert "inf" in str(report)


@pytest.mark.parametrize("compression", [2.0, 7.5, 46.0])
def test_report_after_prune_shows_the_requested_compression(compression, rng, params_factory):
  params = jax.tree.map(jnp.asarray, params_factory(rng))
  report = gsm_optax.sparsity_report(gsm_optax.prune(params, compression))
  keep = int(138 / compression)
  assert report.total_nonzeros == keep
  assert report.compression == pytest.approx(138 / keep)
  assert report.compression >= compression

"""Tests of gsm_optax.diagnostics against NumPy references."""

from __future__ import annotations

from conftest import POOL_SIZE
import jax
import numpy as np
import pytest

import gsm_optax


def _pooled(tree):
  """The kernels (ndim >= 2) of a params-shaped tree, in tree order."""
  return [x for x in jax.tree.leaves(tree) if np.ndim(x) >= 2]


@pytest.mark.parametrize("compression", [1.5, 7.0, 40.0])
def test_taylor_mask_keeps_the_top_q_scores_of_the_pool(rng, params_factory, use_jit, compression):
  params = params_factory(rng)
  grads = params_factory(rng)
  fn = lambda g, p: gsm_optax.taylor_mask(g, p, compression)
  mask = (jax.jit(fn) if use_jit else fn)(grads, params)

  scores = np.concatenate([np.abs(g * w).ravel() for g, w in zip(_pooled(grads), _pooled(params))])
  keep = int(POOL_SIZE / compression)
  threshold = np.sort(scores)[::-1][keep - 1]
  expected = scores >= threshold
  got = np.concatenate([np.asarray(m).ravel() for m in _pooled(mask)])
  np.testing.assert_array_equal(got, expected)
  assert got.sum() == keep  # random normal scores: no ties
  for leaf in jax.tree.leaves(mask):
    if np.ndim(leaf) < 2:
      assert np.all(leaf)


def test_taylor_mask_is_the_mask_that_gsm_applies(rng, params_factory):
  params = params_factory(rng)
  grads = params_factory(rng)
  tx = gsm_optax.mask_by_global_taylor(10.0)
  masked, _ = tx.update(grads, tx.init(params), params)
  mask = gsm_optax.taylor_mask(grads, params, 10.0)
  jax.tree.map(
    lambda m, g, b: np.testing.assert_array_equal(m, np.where(b, g, 0.0)), masked, grads, mask
  )


def test_taylor_mask_never_keeps_a_zero_score_below_full_keep(rng, params_factory):
  params = params_factory(rng)
  grads = jax.tree.map(np.zeros_like, params)
  grads["mlp"]["dense1"]["kernel"][0, :3] = 1.0  # 3 positive scores, Q > 3
  mask = gsm_optax.taylor_mask(grads, params, 2.0)
  assert sum(int(np.sum(m)) for m in _pooled(mask)) == 3


def test_taylor_mask_with_compression_one_keeps_every_weight(rng, params_factory):
  params = params_factory(rng)
  grads = jax.tree.map(np.zeros_like, params)  # every score is 0
  mask = gsm_optax.taylor_mask(grads, params, 1.0)
  assert all(np.all(m) for m in jax.tree.leaves(mask))


def test_mask_overlap_counts_kept_and_shared_weights(rng, params_factory):
  params = params_factory(rng)
  mask_a = jax.tree.map(lambda p: p > 0.3, params)
  mask_b = jax.tree.map(lambda p: p < 1.0, params)
  rows = gsm_optax.mask_overlap(mask_a, mask_b)

  paths = ["['conv']['kernel']", "['mlp']['dense1']['kernel']", "['mlp']['dense2']['kernel']"]
  assert list(rows) == paths + ["total"]
  a = np.concatenate([m.ravel() for m in _pooled(mask_a)])
  b = np.concatenate([m.ravel() for m in _pooled(mask_b)])
  total = rows["total"]
  assert (total.size, total.kept_a, total.kept_b, total.both) == (
    POOL_SIZE,
    a.sum(),
    b.sum(),
    np.sum(a & b),
  )
  assert total.jaccard == pytest.approx(np.sum(a & b) / np.sum(a | b))
  assert total.fraction_of_a_in_b == pytest.approx(np.sum(a & b) / a.sum())
  first = rows[paths[0]]
  ka = np.asarray(mask_a["conv"]["kernel"])
  kb = np.asarray(mask_b["conv"]["kernel"])
  assert (first.kept_a, first.kept_b, first.both) == (ka.sum(), kb.sum(), np.sum(ka & kb))


def test_mask_overlap_of_a_mask_with_itself_is_one(rng, params_factory):
  mask = jax.tree.map(lambda p: p > 0, params_factory(rng))
  assert gsm_optax.mask_overlap(mask, mask)["total"].jaccard == 1.0


def test_mask_overlap_uses_a_given_pool(rng, params_factory):
  params = params_factory(rng)
  mask = jax.tree.map(lambda p: p > 0, params)
  pool = jax.tree.map(lambda p: np.ndim(p) == 1, params)  # the biases
  rows = gsm_optax.mask_overlap(mask, mask, pool=pool)
  assert rows["total"].size == 4 + 6 + 3


def test_mask_overlap_rejects_different_structures(rng, params_factory):
  mask = jax.tree.map(lambda p: p > 0, params_factory(rng))
  with pytest.raises(ValueError, match="tree structures"):
    gsm_optax.mask_overlap(mask, mask["mlp"])


@pytest.mark.parametrize("nesterov", [False, True])
def test_passive_decay_matches_the_momentum_recursion(nesterov):
  alpha, eta, beta, steps = 3e-2, 5e-4, 0.99, 5000
  w, z = 1.0, 0.0
  for _ in range(steps):  # GSM's update of a weight whose gradient is masked
    z = beta * z + eta * w
    w = w - alpha * ((eta * w + beta * z) if nesterov else z)
  predicted = gsm_optax.passive_decay(alpha, eta, beta, steps, nesterov=nesterov)
  # The settled rate; starting from z = 0 lags it by a constant factor.
  assert np.log(w) == pytest.approx(np.log(predicted), rel=0.05)


def test_passive_decay_is_the_papers_estimate_for_small_steps():
  alpha, eta, beta = 1e-4, 1e-4, 0.9
  assert gsm_optax.passive_decay(alpha, eta, beta) == pytest.approx(
    1 - alpha * eta / (1 - beta), rel=1e-9
  )


def test_passive_decay_rejects_momentum_one():
  with pytest.raises(ValueError, match="momentum"):
    gsm_optax.passive_decay(1e-2, 5e-4, 1.0)

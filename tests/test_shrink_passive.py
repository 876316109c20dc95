"""shrink_passive / gsm_sgd_shrink against a NumPy implementation of docs/METHOD.md.

The reference (`NumpyGsmSgdShrink`) implements, with NumPy sorting:

    T = |g * w| on the pool (float32), t = the Q-th greatest (argsort), Q = int(|pool| / C),
    B = (T >= t) & (T > 0)        (B = 1 everywhere when Q = |pool|; NaN never active)
    d = B * g + eta * w           (eta * w on pooled leaves only)
    z <- beta z + d,   u = -alpha z   (nesterov: u = -alpha (d + beta z))
    u = -r w where pooled and B = 0;  w <- w + u
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_gsm_adamw import _one_winner_problem  # noqa: E402  (the shared problem)

import gsm_optax
from gsm_optax import gsm_sgd_shrink
from gsm_optax import shrink_passive

LR, WD, MOMENTUM, SHRINK, C = 0.05, 5e-3, 0.9, 0.05, 4.0
POOL_SIZE = 138  # conftest.PARAM_SHAPES' three kernels
# Against the reference: w and z are sums of O(1) float32 terms, and XLA may round a fused
# multiply-add differently, so where they cancel the error is a few ulp of 1, not of w.
REF_TOL = dict(rtol=2e-5, atol=2e-6)


def _value_at(hyperparam, step: int) -> float:
  """A number, or a schedule at the step as optax counts it (an int32 array)."""
  return float(hyperparam(jnp.int32(step))) if callable(hyperparam) else float(hyperparam)


def numpy_mask(grads, weights, pool, keep):
  """B per pooled leaf index and (Q, t, num_active), by sorting the pool's scores."""
  pooled = [i for i, p in enumerate(pool) if p]
  scores = {i: np.abs(grads[i].astype(np.float32) * weights[i].astype(np.float32)) for i in pooled}
  ranked = np.concatenate([scores[i].ravel() for i in pooled])
  ranked = np.where(np.isnan(ranked), np.float32(0), ranked)
  threshold = ranked[np.argsort(ranked, kind="stable")[-keep]]
  keep_all = keep == ranked.size
  masks = {i: (s >= threshold) & ((s > 0) | keep_all) for i, s in scores.items()}
  return masks, (keep, threshold, sum(int(m.sum()) for m in masks.values()))


class NumpyGsmSgdShrink:
  """The paper's momentum SGD with passive weights shrinking, in NumPy float32."""

  def __init__(self, params, pool, *, lr, compression, shrink, wd, momentum, nesterov):
    self.w = [np.array(p) for p in jax.tree.leaves(params)]
    self.z = [np.zeros_like(w) for w in self.w]
    self.treedef = jax.tree.structure(params)
    self.pool = list(jax.tree.leaves(pool))
    self.lr, self.compression, self.shrink, self.wd = lr, compression, shrink, wd
    self.momentum, self.nesterov = momentum, nesterov
    self.t = 0
    self.size = sum(w.size for w, p in zip(self.w, self.pool) if p)

  def params(self):
    return jax.tree.unflatten(self.treedef, self.w)

  def trace(self):
    return jax.tree.unflatten(self.treedef, self.z)

  def step(self, grads):
    g = [np.asarray(x, np.float32) for x in jax.tree.leaves(grads)]
    keep = int(self.size / _value_at(self.compression, self.t))
    masks, stats = numpy_mask(g, self.w, self.pool, keep)
    f32 = np.float32
    lr, r = f32(_value_at(self.lr, self.t)), f32(_value_at(self.shrink, self.t))
    wd, beta = f32(self.wd), f32(self.momentum)
    for i, w in enumerate(self.w):
      active = masks.get(i, np.ones(w.shape, bool))
      d = np.where(active, g[i], f32(0))
      if self.pool[i]:
        d = d + wd * w
      self.z[i] = beta * self.z[i] + d
      direction = d + beta * self.z[i] if self.nesterov else self.z[i]
      u = -lr * direction
      if self.pool[i]:
        u = np.where(active, u, -r * w)
      self.w[i] = w + u
    self.t += 1
    return stats


def _run(tx, params, grads_seq, use_jit):
  """Applies tx to each gradient in turn; returns the params and states after each step."""
  update = jax.jit(tx.update) if use_jit else tx.update
  state = tx.init(params)
  history = []
  for grads in grads_seq:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append((params, state))
  return history


def _grads_seq(rng, params_factory, steps):
  return [params_factory(rng) for _ in range(steps)]


def _assert_trees_close(got, expected, **tol):
  for (path, g), e in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(expected)):
    np.testing.assert_allclose(
      np.asarray(g), np.asarray(e), err_msg=jax.tree_util.keystr(path), **tol
    )


# ----------------------------------------------------------------------------
# gsm_sgd_shrink against the reference.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy_ball", "nesterov"])
@pytest.mark.parametrize("pool_name", ["default", "mlp_only"])
def test_matches_numpy_reference_at_every_step(nesterov, pool_name, use_jit, rng, params_factory):
  params = params_factory(rng)
  # mlp_only: the conv kernel is left out of the pool (no decay, never passive).
  pool = None if pool_name == "default" else gsm_optax.path_pool(["^mlp/"])
  flags = gsm_optax.resolve_pool(params, pool)
  lr = optax.piecewise_constant_schedule(LR, {3: 0.5})
  compression = optax.linear_schedule(2.0, C, 3)
  shrink = optax.piecewise_constant_schedule(SHRINK, {2: 2.0})
  tx = gsm_sgd_shrink(
    lr,
    compression,
    passive_shrink=shrink,
    momentum=MOMENTUM,
    weight_decay=WD,
    nesterov=nesterov,
    pool=pool,
  )
  reference = NumpyGsmSgdShrink(
    params,
    flags,
    lr=lr,
    compression=compression,
    shrink=shrink,
    wd=WD,
    momentum=MOMENTUM,
    nesterov=nesterov,
  )
  grads_seq = _grads_seq(rng, params_factory, 6)
  for step, (got, state) in enumerate(_run(tx, params, grads_seq, use_jit)):
    keep, threshold, num_active = reference.step(grads_seq[step])
    _assert_trees_close(got, reference.params(), **REF_TOL)
    _assert_trees_close(state.base[1].trace, reference.trace(), **REF_TOL)
    stats = gsm_optax.gsm_stats(state)
    assert int(stats["keep"]) == keep
    assert int(stats["num_active"]) == num_active == keep  # tie-free data
    assert math.isclose(float(stats["threshold"]), threshold, rel_tol=1e-5)


def test_ties_zero_and_nan_scores_follow_the_reference(use_jit, rng, params_factory):
  params = jax.tree.map(lambda p: np.round(p).astype(np.float32), params_factory(rng))
  params["mlp"]["dense1"]["kernel"][0, :3] = 0.0  # zero scores
  grads_seq = [
    jax.tree.map(lambda p: np.round(p).astype(np.float32), params_factory(rng)) for _ in range(3)
  ]
  for grads in grads_seq:
    grads["conv"]["kernel"][0, 0, 0, 0] = np.nan  # a NaN score: never active
  pool = gsm_optax.default_pool(params)
  tx = gsm_sgd_shrink(LR, C, passive_shrink=SHRINK, momentum=MOMENTUM, weight_decay=WD)
  reference = NumpyGsmSgdShrink(
    params, pool, lr=LR, compression=C, shrink=SHRINK, wd=WD, momentum=MOMENTUM, nesterov=False
  )
  for step, (got, state) in enumerate(_run(tx, params, grads_seq, use_jit)):
    keep, threshold, num_active = reference.step(grads_seq[step])
    _assert_trees_close(got, reference.params(), **REF_TOL)
    stats = gsm_optax.gsm_stats(state)
    assert int(stats["num_active"]) == num_active
    if step == 0:  # integer scores: ties at t, all kept
      assert num_active > keep and float(stats["threshold"]) == threshold
    assert int(stats["num_nonfinite"]) == 1
    assert np.isnan(jax.tree.leaves(got)[0]).sum() == 0  # the NaN weight only shrank


# ----------------------------------------------------------------------------
# Passive weights, C = 1.
# ----------------------------------------------------------------------------


def test_passive_weights_shrink_to_exp_minus_kappa_over_the_budget(use_jit, rng, params_factory):
  steps, kappa = 5, 1.0
  params, pool, grads_seq = _one_winner_problem(rng, params_factory, steps)
  lr = optax.linear_schedule(LR, LR / 4, steps)
  shrink = gsm_optax.budget_shrink_rate(lr, steps, kappa)
  tx = gsm_sgd_shrink(lr, 18.0, passive_shrink=shrink, momentum=MOMENTUM, pool=pool)
  w0 = params["mlp"]["dense2"]["kernel"]
  passive = np.ones(w0.shape, bool)
  passive[0, 0] = False
  factor = 1.0
  for k, (got, state) in enumerate(_run(tx, params, grads_seq, use_jit)):
    factor *= 1 - _value_at(shrink, k)
    w = np.asarray(got["mlp"]["dense2"]["kernel"])
    np.testing.assert_allclose(w[passive], w0[passive] * factor, rtol=1e-6 * (k + 1))
    assert int(gsm_optax.gsm_stats(state)["num_active"]) == 1
  squares = sum(_value_at(shrink, k) ** 2 for k in range(steps))  # r <= 1/2: the bound holds
  assert math.exp(-kappa - squares) <= factor <= math.exp(-kappa) * (1 + 1e-6)
  assert abs(w[0, 0] - w0[0, 0]) > 100 * LR  # the active weight took the momentum steps


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy_ball", "nesterov"])
def test_compression_one_is_the_papers_gsm(nesterov, use_jit, rng, params_factory):
  params = params_factory(rng)
  grads_seq = _grads_seq(rng, params_factory, 4)
  grads_seq[1]["mlp"]["dense1"]["kernel"][:2] = 0.0  # zero scores are active at C = 1
  kwargs = dict(momentum=MOMENTUM, weight_decay=WD, nesterov=nesterov)
  tx = gsm_sgd_shrink(LR, 1.0, passive_shrink=SHRINK, **kwargs)
  paper = gsm_optax.gsm(LR, 1.0, **kwargs)
  for (got, state), (expected, _) in zip(
    _run(tx, params, grads_seq, use_jit), _run(paper, params, grads_seq, use_jit)
  ):
    _assert_trees_close(got, expected, rtol=0, atol=0)
    assert int(gsm_optax.gsm_stats(state)["num_active"]) == POOL_SIZE


# ----------------------------------------------------------------------------
# shrink_passive around any base.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "base",
  [optax.sgd(0.1), optax.scale(-0.1)],
  ids=["sgd_extra_args", "scale_plain"],
)
def test_around_a_base_passive_pooled_weights_take_minus_r_w(base, use_jit, rng, params_factory):
  params = params_factory(rng)
  grads_seq = _grads_seq(rng, params_factory, 3)
  tx = shrink_passive(base, C, passive_shrink=SHRINK)
  update = jax.jit(tx.update) if use_jit else tx.update
  pool = jax.tree.leaves(gsm_optax.default_pool(params))
  state = tx.init(params)
  for grads in grads_seq:
    g, w = jax.tree.leaves(grads), [np.asarray(x) for x in jax.tree.leaves(params)]
    masks, _ = numpy_mask(g, w, pool, int(POOL_SIZE / C))
    updates, state = update(grads, state, params, loss=jnp.float32(1.0))  # an extra arg
    for i, u in enumerate(jax.tree.leaves(updates)):
      expected = np.where(masks[i], -0.1 * g[i], -SHRINK * w[i]) if pool[i] else -0.1 * g[i]
      np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-6, atol=1e-8)
    assert int(gsm_optax.gsm_stats(state)["num_active"]) == int(POOL_SIZE / C)
    params = optax.apply_updates(params, updates)


def test_state_is_arrays_abstract_init_and_inject_hyperparams(rng, params_factory):
  params = params_factory(rng)
  grads_seq = _grads_seq(rng, params_factory, 3)
  tx = gsm_sgd_shrink(LR, C, passive_shrink=SHRINK, momentum=MOMENTUM, weight_decay=WD)
  state = tx.init(params)
  assert isinstance(state, gsm_optax.ShrinkPassiveState)
  assert gsm_optax.GsmAdamWState is gsm_optax.ShrinkPassiveState
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  assert jax.tree.structure(tx.init(abstract)) == jax.tree.structure(state)
  injected = optax.inject_hyperparams(gsm_sgd_shrink, static_args=("pool", "nesterov"))(
    learning_rate=LR, compression=C, passive_shrink=SHRINK, momentum=MOMENTUM, weight_decay=WD
  )
  got = _run(injected, params, grads_seq, True)
  expected = _run(tx, params, grads_seq, True)
  for (g, s), (e, _) in zip(got, expected):
    _assert_trees_close(g, e, rtol=2e-5, atol=1e-7)
    assert int(gsm_optax.gsm_stats(s)["keep"]) == int(POOL_SIZE / C)


def test_update_requires_params(rng, params_factory):
  params = params_factory(rng)
  tx = shrink_passive(optax.sgd(0.1), C, passive_shrink=SHRINK)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, tx.init(params))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(compression=0.5), "compression must be finite and >= 1"),
    (dict(compression=math.nan), "compression must be finite and >= 1"),
    (dict(passive_shrink=1.0), r"passive_shrink must be in \[0.0, 1.0\)"),
    (dict(passive_shrink=-0.1), r"passive_shrink must be in \[0.0, 1.0\)"),
    (dict(momentum=1.0), r"momentum must be in \[0.0, 1.0\)"),
    (dict(weight_decay=-5e-4), r"weight_decay must be in \[0.0, inf\)"),
  ],
)
def test_gsm_sgd_shrink_rejects_bad_arguments(kwargs, match):
  args = dict(learning_rate=LR, compression=C, passive_shrink=SHRINK) | kwargs
  with pytest.raises(ValueError, match=match):
    gsm_sgd_shrink(**args)


@pytest.mark.parametrize(
  "compression, passive_shrink, error, match",
  [
    (0.5, SHRINK, ValueError, "compression must be finite and >= 1"),
    ("high", SHRINK, TypeError, "compression must be a number >= 1 or an optax schedule"),
    (C, 1.0, ValueError, r"passive_shrink must be in \[0.0, 1.0\)"),
    (C, "fast", TypeError, "passive_shrink must be a number"),
  ],
)
def test_shrink_passive_rejects_bad_arguments(compression, passive_shrink, error, match):
  with pytest.raises(error, match=match):
    shrink_passive(optax.sgd(0.1), compression, passive_shrink=passive_shrink)

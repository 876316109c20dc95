"""gsm_adamw / budget_shrink_rate against a NumPy implementation of docs/METHOD.md.

The reference (`NumpyGsmAdamW`) implements, with NumPy sorting:

    T = |g * w| on the pool (float32), t = the Q-th greatest (argsort), Q = int(|pool| / C),
    B = (T >= t) & (T > 0)        (B = 1 everywhere when Q = |pool|; NaN never active)
    g^ = B * g on the pool, g elsewhere
    m <- b1 m + (1 - b1) g^,  v <- b2 v + (1 - b2) g^2
    u = -lr (m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd w [decayed leaf])
    u = -r w where pooled and B = 0;  w <- w + u
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gsm_optax
from gsm_optax import budget_shrink_rate
from gsm_optax import gsm_adamw

LR, WD, SHRINK, C = 0.01, 0.1, 0.05, 4.0
POOL_SIZE = 138  # conftest.PARAM_SHAPES' three kernels


def _value_at(hyperparam, step: int) -> float:
  """A number, or a schedule at the step as optax counts it (an int32 array: float32
  values, also with x64 on)."""
  return float(hyperparam(jnp.int32(step))) if callable(hyperparam) else float(hyperparam)


class NumpyGsmAdamW:
  """GSM with AdamW in NumPy, in the params' dtype, written from docs/METHOD.md."""

  def __init__(self, params, pool, decay, *, lr, compression, shrink, wd, b1=0.9, b2=0.999):
    self.w = [np.array(p) for p in jax.tree.leaves(params)]
    self.m = [np.zeros_like(w) for w in self.w]
    self.v = [np.zeros_like(w) for w in self.w]
    self.treedef = jax.tree.structure(params)
    self.pool, self.decay = list(jax.tree.leaves(pool)), list(jax.tree.leaves(decay))
    self.lr, self.compression, self.shrink, self.wd = lr, compression, shrink, wd
    self.b1, self.b2, self.eps = b1, b2, 1e-8
    self.t = 0
    self.size = sum(w.size for w, p in zip(self.w, self.pool) if p)

  def params(self):
    return jax.tree.unflatten(self.treedef, self.w)

  def _mask(self, grads):
    """B per pooled leaf and (Q, t, num_active) by sorting the pool's scores."""
    pooled = [i for i, p in enumerate(self.pool) if p]
    scores = {i: np.abs(grads[i].astype(np.float32) * self.w[i].astype(np.float32)) for i in pooled}
    ranked = np.concatenate([scores[i].ravel() for i in pooled])
    ranked = np.where(np.isnan(ranked), np.float32(0), ranked)
    keep = int(self.size / _value_at(self.compression, self.t))
    threshold = ranked[np.argsort(ranked, kind="stable")[-keep]]
    keep_all = keep == self.size
    masks = {i: (s >= threshold) & ((s > 0) | keep_all) for i, s in scores.items()}
    return masks, (keep, threshold, sum(int(m.sum()) for m in masks.values()))

  def step(self, grads):
    g = [np.asarray(x, w.dtype) for x, w in zip(jax.tree.leaves(grads), self.w)]
    masks, stats = self._mask(g)
    dtype = self.w[0].dtype
    lr, r = dtype.type(_value_at(self.lr, self.t)), dtype.type(_value_at(self.shrink, self.t))
    b1, b2, wd = dtype.type(self.b1), dtype.type(self.b2), dtype.type(self.wd)
    count = self.t + 1
    for i, w in enumerate(self.w):
      active = masks.get(i, np.ones(w.shape, bool))
      g_hat = np.where(active, g[i], dtype.type(0))
      self.m[i] = b1 * self.m[i] + (1 - b1) * g_hat
      self.v[i] = b2 * self.v[i] + (1 - b2) * g_hat * g_hat
      m_hat = self.m[i] / (1 - b1**count)
      v_hat = self.v[i] / (1 - b2**count)
      u = -lr * (m_hat / (np.sqrt(v_hat) + dtype.type(self.eps)) + wd * w * self.decay[i])
      self.w[i] = w + np.where(active, u, -r * w)
    self.t += 1
    return stats


def _update_fn(tx, use_jit):
  return jax.jit(tx.update) if use_jit else tx.update


def _run(tx, params, grads_seq, use_jit):
  """Applies tx to each gradient in turn; returns the params and states after each step."""
  update = _update_fn(tx, use_jit)
  state = tx.init(params)
  history = []
  for grads in grads_seq:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append((params, state))
  return history


def _grads_seq(rng, params_factory, steps, dtype=np.float32):
  return [params_factory(rng, dtype=dtype) for _ in range(steps)]


def _precision(dtype):
  if dtype == np.float64:
    return jax.enable_x64(True), dict(rtol=1e-12, atol=1e-14)
  return contextlib.nullcontext(), dict(rtol=2e-5, atol=1e-7)


def _same_as_optax(use_jit):
  """Eagerly the same ops run one by one: bit for bit. Under jit, XLA may fuse a
  multiply-add into one rounding differently in two programs: one ulp."""
  return dict(rtol=1e-6, atol=1e-9) if use_jit else dict(rtol=0, atol=0)


def _assert_trees_close(got, expected, **tol):
  for (path, g), e in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(g), e, err_msg=jax.tree_util.keystr(path), **tol)


# ----------------------------------------------------------------------------
# Against the reference.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_matches_numpy_reference_at_every_step(dtype, use_jit, rng, params_factory):
  context, tol = _precision(dtype)
  with context:
    params = params_factory(rng, dtype=dtype)
    pool = gsm_optax.default_pool(params)
    # A schedule whose float32 values jit and eager compute alike (a linear one's can
    # differ by an ulp under jit, which float64 params would show).
    lr = optax.piecewise_constant_schedule(LR, {3: 0.5})
    compression = optax.linear_schedule(2.0, C, 3)
    tx = gsm_adamw(lr, compression, passive_shrink=SHRINK, weight_decay=WD)
    reference = NumpyGsmAdamW(
      params, pool, pool, lr=lr, compression=compression, shrink=SHRINK, wd=WD
    )
    grads_seq = _grads_seq(rng, params_factory, 6, dtype)
    for step, (got, state) in enumerate(_run(tx, params, grads_seq, use_jit)):
      keep, threshold, num_active = reference.step(grads_seq[step])
      _assert_trees_close(got, reference.params(), **tol)
      stats = gsm_optax.gsm_stats(state)
      assert int(stats["keep"]) == keep
      assert int(stats["num_active"]) == num_active == keep  # tie-free data
      assert math.isclose(float(stats["threshold"]), threshold, rel_tol=1e-5)
      assert jax.tree.leaves(got)[0].dtype == dtype


def test_ties_zero_and_nan_scores_follow_the_reference(use_jit, rng, params_factory):
  params = jax.tree.map(lambda p: np.round(p).astype(np.float32), params_factory(rng))
  params["mlp"]["dense1"]["kernel"][0, :3] = 0.0  # zero scores
  grads_seq = [
    jax.tree.map(lambda p: np.round(p).astype(np.float32), params_factory(rng)) for _ in range(3)
  ]
  for grads in grads_seq:
    grads["conv"]["kernel"][0, 0, 0, 0] = np.nan  # a NaN score: never active
  pool = gsm_optax.default_pool(params)
  tx = gsm_adamw(LR, C, passive_shrink=SHRINK, weight_decay=WD)
  reference = NumpyGsmAdamW(params, pool, pool, lr=LR, compression=C, shrink=SHRINK, wd=WD)
  for step, (got, state) in enumerate(_run(tx, params, grads_seq, use_jit)):
    keep, threshold, num_active = reference.step(grads_seq[step])
    _assert_trees_close(got, reference.params(), rtol=2e-5, atol=1e-7)
    stats = gsm_optax.gsm_stats(state)
    assert int(stats["num_active"]) == num_active
    if step == 0:  # integer scores: ties at t, all kept
      assert num_active > keep and float(stats["threshold"]) == threshold
    assert math.isclose(float(stats["threshold"]), threshold, rel_tol=1e-5)
    assert int(stats["num_nonfinite"]) == 1
    assert np.isnan(jax.tree.leaves(got)[0]).sum() == 0


# ----------------------------------------------------------------------------
# Passive, non-pooled and C = 1 weights.
# ----------------------------------------------------------------------------


def _one_winner_problem(rng, params_factory, steps):
  """Pool = dense2's kernel (18 weights), C = 18 (Q = 1): weight [0, 0] has the
  greatest |g * w| at every step, the other 17 are passive throughout."""
  params = params_factory(rng)
  pool = jax.tree.map(lambda _: False, params)
  pool["mlp"]["dense2"]["kernel"] = True
  grads_seq = []
  for _ in range(steps):
    grads = params_factory(rng)
    grads["mlp"]["dense2"]["kernel"][0, 0] = 1e4
    grads_seq.append(grads)
  return params, pool, grads_seq


def test_passive_weights_shrink_by_one_minus_r_per_step(use_jit, rng, params_factory):
  steps = 5
  params, pool, grads_seq = _one_winner_problem(rng, params_factory, steps)
  tx = gsm_adamw(LR, 18.0, passive_shrink=SHRINK, weight_decay=WD, pool=pool)
  w0 = params["mlp"]["dense2"]["kernel"]
  passive = np.ones(w0.shape, bool)
  passive[0, 0] = False
  for k, (got, state) in enumerate(_run(tx, params, grads_seq, use_jit), start=1):
    w = np.asarray(got["mlp"]["dense2"]["kernel"])
    np.testing.assert_allclose(w[passive], w0[passive] * (1 - SHRINK) ** k, rtol=1e-6 * k)
    assert int(gsm_optax.gsm_stats(state)["num_active"]) == 1
  # An active weight took Adam's first step: -lr * (sign(g) + wd * w).
  assert abs(w[0, 0] - w0[0, 0]) > 0.5 * LR


def test_leaves_outside_the_pool_take_optax_adamw(use_jit, rng, params_factory):
  params, pool, grads_seq = _one_winner_problem(rng, params_factory, 4)
  decay = gsm_optax.default_pool(params)  # decays the two kernels outside the pool too
  tx = gsm_adamw(LR, 18.0, passive_shrink=SHRINK, weight_decay=WD, pool=pool)
  adamw = optax.adamw(LR, weight_decay=WD, mask=decay)
  got = _run(tx, params, grads_seq, use_jit)[-1][0]
  expected = _run(adamw, params, grads_seq, use_jit)[-1][0]
  for g, e, flag in zip(jax.tree.leaves(got), jax.tree.leaves(expected), jax.tree.leaves(pool)):
    if not flag:
      np.testing.assert_allclose(np.asarray(g), np.asarray(e), **_same_as_optax(use_jit))


def test_compression_one_is_optax_adamw(use_jit, rng, params_factory):
  params = params_factory(rng)
  grads_seq = _grads_seq(rng, params_factory, 4)
  grads_seq[1]["mlp"]["dense1"]["kernel"][:2] = 0.0  # zero scores are active at C = 1
  decay = gsm_optax.default_pool(params)
  tx = gsm_adamw(LR, 1.0, passive_shrink=SHRINK, weight_decay=WD)
  adamw = optax.adamw(LR, weight_decay=WD, mask=decay)
  for (got, state), (expected, _) in zip(
    _run(tx, params, grads_seq, use_jit), _run(adamw, params, grads_seq, use_jit)
  ):
    _assert_trees_close(got, jax.tree.map(np.asarray, expected), **_same_as_optax(use_jit))
    assert int(gsm_optax.gsm_stats(state)["num_active"]) == POOL_SIZE


def test_weight_decay_mask_selects_the_decayed_leaves(rng, params_factory):
  params, pool, grads_seq = _one_winner_problem(rng, params_factory, 2)
  decay = jax.tree.map(lambda p: p.ndim == 1, params)  # only the biases
  tx = gsm_adamw(
    LR, 18.0, passive_shrink=SHRINK, weight_decay=WD, weight_decay_mask=decay, pool=pool
  )
  reference = NumpyGsmAdamW(params, pool, decay, lr=LR, compression=18.0, shrink=SHRINK, wd=WD)
  for step, (got, _) in enumerate(_run(tx, params, grads_seq, True)):
    reference.step(grads_seq[step])
    _assert_trees_close(got, reference.params(), rtol=2e-5, atol=1e-7)


# ----------------------------------------------------------------------------
# In optax.
# ----------------------------------------------------------------------------


def test_inside_a_chain_after_clip_by_global_norm(rng, params_factory):
  params = params_factory(rng)
  grads_seq = _grads_seq(rng, params_factory, 3)
  clip = optax.clip_by_global_norm(1.0)
  chained = optax.chain(clip, gsm_adamw(LR, C, passive_shrink=SHRINK, weight_decay=WD))
  clipped = [clip.update(g, clip.init(params))[0] for g in grads_seq]
  plain = gsm_adamw(LR, C, passive_shrink=SHRINK, weight_decay=WD)
  got = _run(chained, params, grads_seq, True)
  expected = _run(plain, params, clipped, True)
  for (g, state), (e, _) in zip(got, expected):
    _assert_trees_close(g, jax.tree.map(np.asarray, e), rtol=1e-6, atol=1e-8)
    assert int(gsm_optax.gsm_stats(state)["num_active"]) == int(POOL_SIZE / C)


def test_inject_hyperparams_under_jit_matches_plain(rng, params_factory):
  params = params_factory(rng)
  grads_seq = _grads_seq(rng, params_factory, 3)
  injected = optax.inject_hyperparams(gsm_adamw, static_args=("pool", "weight_decay_mask"))(
    learning_rate=LR, compression=C, passive_shrink=SHRINK, weight_decay=WD
  )
  plain = gsm_adamw(LR, C, passive_shrink=SHRINK, weight_decay=WD)
  got = _run(injected, params, grads_seq, True)
  expected = _run(plain, params, grads_seq, True)
  for (g, state), (e, _) in zip(got, expected):
    # inject_hyperparams stores b1 and b2 as float32 (1 - b2 is then off by 1e-5 relative).
    _assert_trees_close(g, jax.tree.map(np.asarray, e), rtol=2e-5, atol=1e-7)
    assert int(gsm_optax.gsm_stats(state)["keep"]) == int(POOL_SIZE / C)


def test_with_a_path_pool_and_a_shrink_schedule(rng, params_factory):
  params = params_factory(rng)
  grads_seq = _grads_seq(rng, params_factory, 3)
  pool = gsm_optax.path_pool(["^mlp/"])
  shrink = budget_shrink_rate(optax.linear_schedule(LR, 0.0, 10), 10, kappa=1.0)
  tx = gsm_adamw(LR, C, passive_shrink=shrink, weight_decay=WD, pool=pool)
  flags = pool(params)
  reference = NumpyGsmAdamW(
    params, flags, gsm_optax.default_pool(params), lr=LR, compression=C, shrink=shrink, wd=WD
  )
  for step, (got, state) in enumerate(_run(tx, params, grads_seq, True)):
    reference.step(grads_seq[step])
    _assert_trees_close(got, reference.params(), rtol=2e-5, atol=1e-7)
    assert int(gsm_optax.gsm_stats(state)["keep"]) == int((48 + 18) / C)


def test_state_is_arrays_init_takes_abstract_params_and_round_trips(rng, params_factory):
  params = params_factory(rng)
  tx = gsm_adamw(LR, C, passive_shrink=SHRINK, weight_decay=WD)
  state = tx.init(params)
  assert isinstance(state, gsm_optax.GsmAdamWState)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  abstract_state = tx.init(abstract)
  assert jax.tree.structure(abstract_state) == jax.tree.structure(state)
  assert [(jnp.shape(a), jnp.result_type(a)) for a in jax.tree.leaves(abstract_state)] == [
    (x.shape, x.dtype) for x in jax.tree.leaves(state)
  ]
  update = jax.jit(tx.update)
  grads = params_factory(rng)
  state = update(grads, state, params)[1]
  # Sharding specs as optax builds them: Adam's m and v are params-shaped, the rest not.
  specs = jax.tree.map(lambda p: f"spec{p.shape}", params)
  mapped = optax.tree_utils.tree_map_params(
    tx, lambda _, spec: spec, state, specs, transform_non_params=lambda _: None
  )
  adam_state = mapped.base[0]
  assert adam_state.mu == specs and adam_state.nu == specs
  assert all(x is None for x in jax.tree.leaves(mapped.taylor, is_leaf=lambda x: x is None))
  restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state)
  a = update(grads, state, params)[0]
  b = update(grads, restored, params)[0]
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_update_requires_params(rng, params_factory):
  params = params_factory(rng)
  tx = gsm_adamw(LR, C, passive_shrink=SHRINK)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, tx.init(params))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(compression=0.5), "compression must be finite and >= 1"),
    (dict(compression=math.nan), "compression must be finite and >= 1"),
    (dict(passive_shrink=1.0), r"passive_shrink must be in \[0.0, 1.0\)"),
    (dict(passive_shrink=-0.1), r"passive_shrink must be in \[0.0, 1.0\)"),
    (dict(b1=1.0), r"b1 must be in \[0.0, 1.0\)"),
    (dict(b2=-0.5), r"b2 must be in \[0.0, 1.0\)"),
    (dict(eps=-1e-8), r"eps must be in \[0.0, inf\)"),
    (dict(weight_decay=-0.1), r"weight_decay must be in \[0.0, inf\)"),
  ],
)
def test_construction_rejects_bad_arguments(kwargs, match):
  args = dict(learning_rate=LR, compression=C, passive_shrink=SHRINK) | kwargs
  with pytest.raises(ValueError, match=match):
    gsm_adamw(**args)


def test_construction_rejects_arguments_that_are_not_numbers():
  with pytest.raises(TypeError, match="passive_shrink must be a number"):
    gsm_adamw(LR, C, passive_shrink="fast")
  with pytest.raises(TypeError, match="compression must be a number >= 1 or an optax schedule"):
    gsm_adamw(LR, "high", passive_shrink=SHRINK)


# ----------------------------------------------------------------------------
# budget_shrink_rate.
# ----------------------------------------------------------------------------

STEPS, KAPPA = 1000, 10.0


@pytest.mark.parametrize(
  "learning_rate",
  [
    1e-3,
    optax.constant_schedule(1e-3),
    optax.warmup_cosine_decay_schedule(0.0, 1e-3, 100, STEPS, end_value=1e-5),
    optax.linear_schedule(1e-3, 0.0, STEPS),
  ],
  ids=["float", "constant", "warmup_cosine", "linear_to_zero"],
)
def test_budget_shrink_rate_sums_to_kappa_over_the_budget(learning_rate):
  rate = budget_shrink_rate(learning_rate, STEPS, KAPPA)
  r = np.asarray(jax.vmap(rate)(jnp.arange(STEPS)), np.float64)
  assert math.isclose(r.sum(), KAPPA, rel_tol=1e-5)
  log_product = np.log1p(-r).sum()
  assert -KAPPA - np.sum(r**2) - 1e-4 <= log_product <= -KAPPA + 1e-4
  assert math.isclose(math.exp(log_product), math.exp(-KAPPA), rel_tol=0.1)
  lr = np.array([_value_at(learning_rate, s) for s in range(STEPS)])
  np.testing.assert_allclose(r, KAPPA * lr / lr.sum(), rtol=1e-5, atol=1e-9)  # the schedule's shape
  assert float(rate(5 * STEPS)) == float(rate(STEPS - 1))  # past the budget: the last rate


def test_budget_shrink_rate_of_a_constant_lr_is_kappa_over_steps():
  assert math.isclose(float(budget_shrink_rate(3e-4, 500, 5.0)(7)), 5.0 / 500, rel_tol=1e-7)


@pytest.mark.parametrize(
  "args, match",
  [
    ((1e-3, 0), "total_steps must be an int >= 1"),
    ((1e-3, 10.5), "total_steps must be an int >= 1"),
    ((1e-3, True), "total_steps must be an int >= 1"),
    ((1e-3, 100, 0.0), "kappa must be a finite number > 0"),
    ((1e-3, 100, math.inf), "kappa must be a finite number > 0"),
    ((0.0, 100), "the learning rate sums to 0.0 over 100 steps"),
    ((optax.linear_schedule(1e-3, -1e-3, 100), 100), "finite and >= 0 at every step"),
    ((1e-3, 5, 10.0), r"reaches 2 >= 1 \(kappa = 10.0, 5 steps\)"),
  ],
)
def test_budget_shrink_rate_rejects_bad_arguments(args, match):
  with pytest.raises(ValueError, match=match):
    budget_shrink_rate(*args)

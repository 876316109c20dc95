"""gsm / mask_by_global_taylor against a NumPy implementation of the paper.

The reference (`NumpyGSM`) implements docs/METHOD.md's update with NumPy sorting:

    T = |g * w| on the pool, t = sort(T)[-Q], Q = int(|pool| / C),
    B = (T >= t) & (T > 0)                     (B = 1 everywhere when Q = |pool|)
    z <- beta z + eta w + B g  on the pool,    z <- beta z + g  off the pool
    w <- w - alpha z          (Nesterov: w <- w - alpha (eta w + B g + beta z))

in float32, with the operations in the order optax applies them, so that the
comparison can be tight. Under `jax.jit`, XLA fuses each `a * b + c` of the
update into one fused multiply-add (a single rounding); the reference then
does the same (`fused=True`), eagerly it rounds twice like NumPy.
"""

from __future__ import annotations

import fractions
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gsm_optax
from gsm_optax import _checks
from gsm_optax import _pool
from gsm_optax import baselines

LR, BETA, ETA = 0.05, 0.9, 1e-2


# ----------------------------------------------------------------------------
# The reference.
# ----------------------------------------------------------------------------


def _value_at(hyperparam, step: int) -> float:
  """A hyperparameter (number or schedule) at `step`, as a Python float."""
  return float(hyperparam(step)) if callable(hyperparam) else float(hyperparam)


def _muladd(a, b, c, fused: bool) -> np.ndarray:
  """a * b + c in float32: rounded once (fused multiply-add) or twice."""
  a, b, c = np.float32(a), np.float32(b), np.float32(c)
  if fused:  # the float64 product of two float32 is exact
    return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32)
  return a * b + c


class NumpyGSM:
  """Global Sparse Momentum SGD in NumPy (float32), written from docs/METHOD.md."""

  def __init__(
    self,
    params,
    pool_flags,
    *,
    learning_rate,
    compression,
    momentum,
    weight_decay,
    nesterov,
    fused=False,
  ):
    self.w = [np.array(p, np.float32) for p in jax.tree.leaves(params)]
    self.z = [np.zeros_like(w) for w in self.w]
    self.treedef = jax.tree.structure(params)
    self.pool = list(pool_flags)
    self.learning_rate, self.compression = learning_rate, compression
    self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov
    self.fused = fused
    self.step_count = 0
    self.pool_size = sum(w.size for w, p in zip(self.w, self.pool) if p)

  def params(self):
    return jax.tree.unflatten(self.treedef, self.w)

  def step(self, grads):
    """One update; returns the reference stats and the mask of every leaf."""
    t = self.step_count
    g = [np.asarray(x, np.float32) for x in jax.tree.leaves(grads)]
    alpha = np.float32(_value_at(self.learning_rate, t))
    eta = np.float32(_value_at(self.weight_decay, t))
    beta = np.float32(self.momentum)
    keep = int(self.pool_size / _value_at(self.compression, t))

    pooled = [i for i, p in enumerate(self.pool) if p]
    scores = {i: np.abs(g[i] * self.w[i]) for i in pooled}
    ranked = np.concatenate([scores[i].ravel() for i in pooled])
    ranked = np.where(np.isnan(ranked), np.float32(0), ranked)  # NaN never wins
    threshold = np.sort(ranked)[-keep]

    masks = []
    fused = self.fused
    for i in range(len(self.w)):
      if self.pool[i]:
        s = scores[i]
        mask = (s >= threshold) & ((s > 0) | (keep == self.pool_size))
        u = _muladd(eta, self.w[i], np.where(mask, g[i], np.float32(0)), fused)
      else:
        mask = np.ones(g[i].shape, bool)
        u = g[i]
      self.z[i] = _muladd(beta, self.z[i], u, fused)
      direction = _muladd(beta, self.z[i], u, fused) if self.nesterov else self.z[i]
      self.w[i] = _muladd(direction, -alpha, self.w[i], fused)
      masks.append(mask)
    self.step_count += 1
    stats = dict(
      keep=keep,
      threshold=threshold,
      num_active=sum(int(masks[i].sum()) for i in pooled),
      num_nonfinite=int(sum(np.sum(~np.isfinite(scores[i])) for i in pooled)),
    )
    return stats, jax.tree.unflatten(self.treedef, masks)


def _pool_flags_of_shared_problem(params):
  """Kernels (ndim >= 2) are pooled, biases not: written out, not computed."""
  del params
  return {
    "conv": {"bias": False, "kernel": True},
    "mlp": {"dense1": {"bias": False, "kernel": True}, "dense2": {"bias": False, "kernel": True}},
  }


def _as_jax(tree):
  return jax.tree.map(jnp.asarray, tree)


_STEPPERS = {}


def _stepper(use_jit: bool, **config):
  """(params, state, grads) -> (params, state); cached so tests share compiles."""
  key = (use_jit, repr(sorted(config.items())))
  if key not in _STEPPERS:
    opt = gsm_optax.gsm(**config)

    def step(params, state, grads):
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    _STEPPERS[key] = opt, (jax.jit(step) if use_jit else step)
  return _STEPPERS[key]


def _main_config(compression, nesterov, **overrides):
  config = dict(
    learning_rate=LR, compression=compression, momentum=BETA, weight_decay=ETA, nesterov=nesterov
  )
  config.update(overrides)
  return config


def _assert_tree_close(got, expected, *, rtol=1e-6, atol=1e-7, msg=""):
  for (path, g), e in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(expected)):
    np.testing.assert_allclose(
      np.asarray(g), e, rtol=rtol, atol=atol, err_msg=f"{msg} {jax.tree_util.keystr(path)}"
    )


def _assert_stats_equal(stats, ref_stats, step):
  assert int(stats["step"]) == step + 1
  assert int(stats["keep"]) == ref_stats["keep"], f"step {step}"
  np.testing.assert_allclose(
    float(stats["threshold"]), ref_stats["threshold"], rtol=1e-6, err_msg=f"step {step}"
  )
  assert int(stats["num_active"]) == ref_stats["num_active"], f"step {step}"
  assert int(stats["num_nonfinite"]) == ref_stats["num_nonfinite"], f"step {step}"


def _run_against_reference(params, grads_fn, num_steps, use_jit, *, pool_flags=None, **config):
  """Drives gsm and NumpyGSM side by side; compares everything every step."""
  opt, step = _stepper(use_jit, **config)
  pool_flags = pool_flags or _pool_flags_of_shared_problem(params)
  ref_config = {k: v for k, v in config.items() if k != "pool"}
  ref = NumpyGSM(params, jax.tree.leaves(pool_flags), fused=use_jit, **ref_config)
  params = _as_jax(params)
  state = opt.init(params)
  history = []
  for t in range(num_steps):
    grads = grads_fn(t, ref)
    params, state = step(params, state, _as_jax(grads))
    ref_stats, ref_masks = ref.step(grads)
    _assert_tree_close(params, ref.w, msg=f"step {t}")
    _assert_stats_equal(gsm_optax.gsm_stats(state), ref_stats, t)
    history.append((ref_stats, ref_masks, jax.tree.map(np.asarray, params)))
  return params, state, history


# ----------------------------------------------------------------------------
# The paper's update, step by step.
# ----------------------------------------------------------------------------


def _cases(jitted_compressions):
  """(compression, nesterov, use_jit): every C eagerly; under jit only some,
  as each jitted configuration costs a compile (seconds on CPU) and C is only
  a constant of the compiled program."""
  cases = []
  for use_jit in (False, True):
    for compression in (1.5, 4.0, 20.0):
      for nesterov in (False, True):
        if use_jit and compression not in jitted_compressions:
          continue
        cases.append(
          pytest.param(
            compression,
            nesterov,
            use_jit,
            id=f"{'jit' if use_jit else 'nojit'}-C{compression:g}-"
            f"{'nesterov' if nesterov else 'heavyball'}",
          )
        )
  return cases


@pytest.mark.parametrize("compression,nesterov,use_jit", _cases([4.0]))
def test_gsm_matches_numpy_reference_at_every_step(
  compression, nesterov, use_jit, rng, params_factory
):
  params = params_factory(rng)
  grad_rng = np.random.default_rng(7)

  def grads_fn(t, ref):
    del t, ref
    return params_factory(grad_rng)  # fresh random gradients every step

  _, _, history = _run_against_reference(
    params, grads_fn, 100, use_jit, **_main_config(compression, nesterov)
  )
  # Some pooled weight changes from active to passive and back over the run.
  masks = np.stack([np.concatenate([m.ravel() for m in jax.tree.leaves(h[1])]) for h in history])
  assert (masks[1:] & ~masks[:-1]).any() and (~masks[1:] & masks[:-1]).any()


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavyball", "nesterov"])
def test_gsm_matches_numpy_reference_with_slowly_changing_gradients(nesterov, rng, params_factory):
  # Gradients that barely change from step to step, as late in training: the
  # threshold moves slowly and the active set changes by a few weights.
  params = params_factory(rng)
  base = params_factory(np.random.default_rng(3), scale=1e-2)
  noise_rng = np.random.default_rng(4)

  def grads_fn(t, ref):
    del ref
    noise = params_factory(noise_rng, scale=1e-6)
    return jax.tree.map(
      lambda b, n: (b * np.float32(1 + 1e-3 * t) + n).astype(np.float32), base, noise
    )

  _run_against_reference(params, grads_fn, 110, True, **_main_config(4.0, nesterov))


@pytest.mark.parametrize(
  "nesterov,use_jit",
  [(False, False), (True, False), (True, True)],
  ids=["nojit-heavyball", "nojit-nesterov", "jit-nesterov"],
)
def test_compression_one_is_exactly_sgd_with_weight_decay_on_the_pool(
  nesterov, use_jit, rng, params_factory
):
  params = _as_jax(params_factory(rng))
  pool = _pool_flags_of_shared_problem(params)
  gsm_opt, gsm_step = _stepper(use_jit, **_main_config(1.0, nesterov))
  sgd_opt = optax.chain(
    optax.add_decayed_weights(ETA, mask=pool), optax.sgd(LR, momentum=BETA, nesterov=nesterov)
  )

  def sgd_step(params, state, grads):
    updates, state = sgd_opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  if use_jit:
    sgd_step = jax.jit(sgd_step)
  gsm_params, gsm_state = params, gsm_opt.init(params)
  sgd_params, sgd_state = params, sgd_opt.init(params)
  grad_rng = np.random.default_rng(11)
  for t in range(40):
    grads = _as_jax(params_factory(grad_rng))
    gsm_params, gsm_state = gsm_step(gsm_params, gsm_state, grads)
    sgd_params, sgd_state = sgd_step(sgd_params, sgd_state, grads)
    for a, b in zip(jax.tree.leaves(gsm_params), jax.tree.leaves(sgd_params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), f"step {t}")
    assert int(gsm_optax.gsm_stats(gsm_state)["num_active"]) == 138


# ----------------------------------------------------------------------------
# Passive weights: decay, momentum, reactivation.
# ----------------------------------------------------------------------------


def _passive_problem():
  """Shared shapes; C = 4 keeps Q = 34 of 138: the first 34 entries of the
  conv kernel always score highest, the other 104 pooled weights are passive."""
  sign_rng = np.random.default_rng(5)

  def signed(shape):
    return (sign_rng.choice([-1.0, 1.0], shape) * sign_rng.uniform(0.5, 1.5, shape)).astype(
      np.float32
    )

  params = {
    "conv": {"kernel": signed((3, 3, 2, 4)), "bias": signed((4,))},
    "mlp": {
      "dense1": {"kernel": signed((8, 6)), "bias": signed((6,))},
      "dense2": {"kernel": signed((6, 3)), "bias": signed((3,))},
    },
  }
  passive = {
    "conv": {"kernel": np.arange(72).reshape(3, 3, 2, 4) >= 34, "bias": np.zeros((4,), bool)},
    "mlp": {
      "dense1": {"kernel": np.ones((8, 6), bool), "bias": np.zeros((6,), bool)},
      "dense2": {"kernel": np.ones((6, 3), bool), "bias": np.zeros((3,), bool)},
    },
  }
  unit_grads = jax.tree.map(lambda p: np.sign(signed(p.shape)), params)

  def grads_fn(t, ref):
    # Active: -1000 sign(w) pushes |w| up, so |g w| >= 500 for ever.
    # Passive: a gradient of +-1 on |w| <= 1.5: score <= 1.5, never selected.
    del t
    return jax.tree.map(
      lambda wi, u, p: np.where(p, u, -1000.0 * np.sign(wi)).astype(np.float32),
      ref.params(),
      unit_grads,
      passive,
    )

  return params, passive, grads_fn


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavyball", "nesterov"])
def test_passive_weight_decays_geometrically(nesterov):
  params, passive, grads_fn = _passive_problem()
  num_steps = 150
  _, _, history = _run_against_reference(
    params, grads_fn, num_steps, True, **_main_config(4.0, nesterov)
  )
  for stats, masks, _ in history:
    assert stats["keep"] == stats["num_active"] == 34
    for m, p in zip(jax.tree.leaves(masks), jax.tree.leaves(passive)):
      np.testing.assert_array_equal(m[p], False)

  # Momentum with weight decay only, in float64: [w, z] <- M [w, z].
  alpha, eta, beta = LR, ETA, BETA
  if nesterov:  # z' = b z + e w;  w' = w - a (e w + b z')
    m = np.array([[1 - alpha * eta * (1 + beta), -alpha * beta * beta], [eta, beta]])
  else:  # z' = b z + e w;  w' = w - a z'
    m = np.array([[1 - alpha * eta, -alpha * beta], [eta, beta]])
  w0 = np.concatenate(
    [np.asarray(p)[q] for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(passive))]
  )
  trajectory = [np.stack([w0, np.zeros_like(w0)])]
  for _ in range(num_steps):
    trajectory.append(m @ trajectory[-1])

  def passive_weights(tree):
    return np.concatenate(
      [np.asarray(p)[q] for p, q in zip(jax.tree.leaves(tree), jax.tree.leaves(passive))]
    )

  got = np.stack([passive_weights(h[2]) for h in history])
  np.testing.assert_allclose(got, np.stack(trajectory[1:])[:, 0], rtol=2e-5)

  # Asymptotically |w| shrinks by the dominant eigenvalue of M per step,
  # which is about 1 - alpha eta / (1 - beta) (docs/METHOD.md).
  rate = np.max(np.abs(np.linalg.eigvals(m)))
  np.testing.assert_allclose(got[-1] / got[-2], rate, rtol=1e-5)
  np.testing.assert_allclose(rate, 1 - alpha * eta / (1 - beta), rtol=1e-3)
  assert np.all(np.abs(got[-1]) < 0.5 * np.abs(w0))  # 0.99475^150 = 0.45


def test_passive_weight_becomes_active_again_when_its_score_rises(rng, params_factory):
  params = params_factory(rng)
  grad_rng = np.random.default_rng(8)
  index = (0, 0)  # dense2 kernel[0, 0]

  def grads_fn(t, ref):
    del ref
    grads = params_factory(grad_rng)
    # Steps 0-19: a tiny gradient, never among the Q = 34 greatest scores.
    # Steps 20-29: a huge one, the greatest score of the pool.
    grads["mlp"]["dense2"]["kernel"][index] = 1e-6 if t < 20 else 1e4
    return grads

  opt, step = _stepper(True, **_main_config(4.0, False))
  ref = NumpyGSM(
    params,
    jax.tree.leaves(_pool_flags_of_shared_problem(params)),
    fused=True,
    **_main_config(4.0, False),
  )
  params, state = _as_jax(params), opt.init(_as_jax(params))
  weights, active = [], []
  for t in range(30):
    grads = grads_fn(t, ref)
    trace_before = _trace(state)["mlp"]["dense2"]["kernel"][index]
    w_before = params["mlp"]["dense2"]["kernel"][index]
    params, state = step(params, state, _as_jax(grads))
    ref_stats, ref_masks = ref.step(grads)
    _assert_tree_close(params, ref.w, msg=f"step {t}")
    _assert_stats_equal(gsm_optax.gsm_stats(state), ref_stats, t)
    # z_new - beta z - eta w is the masked gradient B g of that weight.
    masked_grad = (
      _trace(state)["mlp"]["dense2"]["kernel"][index] - BETA * trace_before - ETA * w_before
    )
    active.append(bool(ref_masks["mlp"]["dense2"]["kernel"][index]))
    assert float(masked_grad) == pytest.approx(
      grads["mlp"]["dense2"]["kernel"][index] if active[-1] else 0.0, rel=1e-4, abs=1e-6
    )
    weights.append(float(params["mlp"]["dense2"]["kernel"][index]))
  assert active == [False] * 20 + [True] * 10
  # While passive it only decays towards zero, without changing sign.
  assert all(abs(b) < abs(a) for a, b in zip(weights[:19], weights[1:20]))
  assert np.sign(weights[19]) == np.sign(weights[0])


def _trace(state):
  traces = [
    s
    for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.TraceState))
    if isinstance(s, optax.TraceState)
  ]
  assert len(traces) == 1
  return traces[0].trace


# ----------------------------------------------------------------------------
# Ties, zero threshold, NaN and inf (mask_by_global_taylor on its own).
# ----------------------------------------------------------------------------

# The shared problem (pool of 138) with every pooled weight zero except the
# first 10 entries of the dense2 kernel, which hold each case's values; the
# other pooled weights get random gradients (score 0). C = 34.5 -> Q = 4.
_TIE_C = 34.5


def _tie_case(name):
  """(weights, gradients, expected active flat indices, expected threshold)."""
  w = np.ones(10, np.float32)
  g = np.zeros(10, np.float32)
  if name == "fewer_positive_than_q":
    # 3 positive scores; zero scores from g = 0 and from w = 0 (g != 0).
    g[:3] = [3.0, 2.0, 1.0]
    g[3:] = 5.0
    w[3:] = 0.0
    return w, g, [0, 1, 2], 0.0
  if name == "all_scores_zero":
    g[:] = 7.0
    w[:] = 0.0
    return w, g, [], 0.0
  if name == "ties_at_positive_threshold":
    g[:] = [5, 4, 4, 4, 4, 1, 1, 2, 0.5, 0.25]
    return w, g, [0, 1, 2, 3, 4], 4.0
  if name == "negative_values_and_signed_zero":
    w[:] = [-1, 1, -1, 1, -1, 1, -1, -0.0, 1, -1]
    g[:] = [2, -3, -0.0, 6, -1, 0.5, -4, 9, 0.0, 0.25]
    return w, g, [1, 3, 6, 0], 2.0
  if name == "nan_scores_are_never_active":
    g[:] = [np.nan, 9, 8, np.nan, 7, 6, 5, 1, 1, 1]
    return w, g, [1, 2, 4, 5], 6.0
  if name == "nan_from_zero_times_inf":
    g[:] = [np.inf, 9, 8, 7, 6, 5, 1, 1, 1, 1]
    w[0] = 0.0
    return w, g, [1, 2, 3, 4], 6.0
  if name == "inf_scores_are_active":
    g[:] = [np.inf, -np.inf, 9, 8, 7, 6, 5, 1, 1, 1]
    return w, g, [0, 1, 2, 3], 8.0
  if name == "more_inf_scores_than_q":
    g[:] = [np.inf] * 6 + [9, 8, 7, 6]
    return w, g, [0, 1, 2, 3, 4, 5], np.inf
  raise ValueError(name)


_TIE_CASES = [
  "fewer_positive_than_q",
  "all_scores_zero",
  "ties_at_positive_threshold",
  "negative_values_and_signed_zero",
  "nan_scores_are_never_active",
  "nan_from_zero_times_inf",
  "inf_scores_are_active",
  "more_inf_scores_than_q",
]

_tie_mask = gsm_optax.mask_by_global_taylor(_TIE_C)
_tie_update_jit = jax.jit(_tie_mask.update)


def _embed_in_dense2(params_factory, rng, w, g):
  params = jax.tree.map(np.zeros_like, params_factory(rng))
  grads = params_factory(rng)
  for tree, values in ((params, w), (grads, g)):
    flat = tree["mlp"]["dense2"]["kernel"].ravel()
    flat[:10] = values
    tree["mlp"]["dense2"]["kernel"] = flat.reshape(6, 3)
  grads["mlp"]["dense1"]["bias"][1] = np.nan  # outside the pool: untouched
  return params, grads


@pytest.mark.parametrize("case", _TIE_CASES)
def test_mask_ties_zeros_nan_and_inf(case, use_jit, rng, params_factory):
  w, g, expected_active, expected_threshold = _tie_case(case)
  params, grads = _embed_in_dense2(params_factory, rng, w, g)
  update = _tie_update_jit if use_jit else _tie_mask.update
  state = _tie_mask.init(_as_jax(params))
  expected = np.zeros(18, np.float32)
  expected[expected_active] = g[expected_active]
  with np.errstate(invalid="ignore"):
    scores = np.abs(g * w)
  # Applied twice: the second update starts from the first one's state.
  for repeat in range(2):
    masked, state = update(_as_jax(grads), state, _as_jax(params))
    np.testing.assert_array_equal(np.asarray(masked["mlp"]["dense2"]["kernel"]).ravel(), expected)
    for name in ("conv", "dense1"):  # score 0: never active
      kernel = masked[name] if name == "conv" else masked["mlp"][name]
      np.testing.assert_array_equal(kernel["kernel"], 0.0)
      bias = grads[name] if name == "conv" else grads["mlp"][name]
      np.testing.assert_array_equal(kernel["bias"], bias["bias"])
    stats = gsm_optax.gsm_stats(state)
    assert int(stats["step"]) == repeat + 1
    assert int(stats["keep"]) == 4
    assert int(stats["num_active"]) == len(expected_active)
    assert float(stats["threshold"]) == expected_threshold
    assert int(stats["num_nonfinite"]) == int(np.sum(~np.isfinite(scores)))
    # Never the whole pool, however few scores are positive.
    assert len(expected_active) < 10


def test_nan_score_is_not_active_even_at_compression_one(rng, params_factory):
  params = params_factory(rng)
  grads = params_factory(rng)
  kernel_w, kernel_g = params["mlp"]["dense2"]["kernel"], grads["mlp"]["dense2"]["kernel"]
  kernel_g[0, :2] = [np.nan, np.inf]
  kernel_w[1, 0] = 0.0  # score 0: active at C = 1, where Q = |pool|
  mask = gsm_optax.mask_by_global_taylor(1.0)
  masked, state = mask.update(_as_jax(grads), mask.init(_as_jax(params)), _as_jax(params))
  expected = kernel_g.copy()
  expected[0, 0] = 0.0
  np.testing.assert_array_equal(masked["mlp"]["dense2"]["kernel"], expected)
  np.testing.assert_array_equal(masked["conv"]["kernel"], grads["conv"]["kernel"])
  stats = gsm_optax.gsm_stats(state)
  assert int(stats["keep"]) == 138
  assert int(stats["num_active"]) == 137  # every non-NaN score, zero included
  assert int(stats["num_nonfinite"]) == 2


def _mixed_dtypes(tree):
  """conv in bfloat16, dense1 in float16, dense2 in float32."""
  return {
    "conv": jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree["conv"]),
    "mlp": {
      "dense1": jax.tree.map(lambda x: x.astype(np.float16), tree["mlp"]["dense1"]),
      "dense2": tree["mlp"]["dense2"],
    },
  }


def test_mask_keeps_top_q_taylor_scores_for_every_float_dtype(rng, params_factory):
  # Scores are computed in float32, where the product of two half-precision
  # values is exact, so the reference mask is exact too. (Pure float32 pools
  # are checked everywhere else; here bfloat16, float16 and float32 leaves
  # share one pool.)
  params = _mixed_dtypes(params_factory(rng))
  grads = _mixed_dtypes(params_factory(rng))
  mask = gsm_optax.mask_by_global_taylor(4.0)
  masked, state = mask.update(_as_jax(grads), mask.init(_as_jax(params)), _as_jax(params))

  pool = jax.tree.leaves(_pool_flags_of_shared_problem(params))
  dtypes = [x.dtype for x in jax.tree.leaves(params)]
  flat_w = [np.asarray(x, np.float32) for x in jax.tree.leaves(params)]
  flat_g = [np.asarray(x, np.float32) for x in jax.tree.leaves(grads)]
  scores = np.concatenate([np.abs(g * w).ravel() for g, w, p in zip(flat_g, flat_w, pool) if p])
  threshold = np.sort(scores)[-34]
  for got, g, w, p, dtype in zip(jax.tree.leaves(masked), flat_g, flat_w, pool, dtypes):
    assert got.dtype == dtype
    expected = np.where(np.abs(g * w) >= threshold, g, 0) if p else g
    np.testing.assert_array_equal(np.asarray(got, np.float32), expected)
  stats = gsm_optax.gsm_stats(state)
  assert float(stats["threshold"]) == threshold
  assert int(stats["num_active"]) == int(np.sum(scores >= threshold))

  # The whole optimizer keeps every leaf's dtype.
  opt = gsm_optax.gsm(LR, 4.0, momentum=BETA, weight_decay=ETA)
  updates, state = opt.update(_as_jax(grads), opt.init(_as_jax(params)), _as_jax(params))
  for u, dtype in zip(jax.tree.leaves(updates), dtypes):
    assert u.dtype == dtype
    assert np.all(np.isfinite(np.asarray(u, np.float32)))
  assert int(gsm_optax.gsm_stats(state)["num_active"]) == 34


# ----------------------------------------------------------------------------
# Schedules and inject_hyperparams.
# ----------------------------------------------------------------------------


def test_compression_schedule_sets_q_every_step(rng, params_factory):
  # C(t) = 1 -> 20 over 10 steps; 138 / C(t) stays away from integers, so
  # the float32 and float64 quotients have the same integer part.
  schedule = optax.linear_schedule(1.0, 20.0, 10)
  params = params_factory(rng)
  grad_rng = np.random.default_rng(12)
  _, _, history = _run_against_reference(
    params, lambda t, ref: params_factory(grad_rng), 14, False, **_main_config(schedule, False)
  )
  expected_keep = [int(138 / float(schedule(t))) for t in range(14)]
  assert [h[0]["keep"] for h in history] == expected_keep
  assert expected_keep[0] == 138 and expected_keep[-1] == 6


def test_learning_rate_and_weight_decay_schedules_follow_the_step(rng, params_factory):
  learning_rate = optax.piecewise_constant_schedule(0.1, {4: 0.5, 8: 0.1})
  weight_decay = lambda t: jnp.where(t < 6, 1e-2, 5e-2)  # noqa: E731
  params = params_factory(rng)
  grad_rng = np.random.default_rng(13)
  _run_against_reference(
    params,
    lambda t, ref: params_factory(grad_rng),
    12,
    False,
    **_main_config(4.0, True, learning_rate=learning_rate, weight_decay=weight_decay),
  )


def test_inject_hyperparams_under_jit_gives_the_same_params_as_plain_gsm(rng, params_factory):
  injected = optax.inject_hyperparams(gsm_optax.gsm)(
    learning_rate=LR, compression=4.0, momentum=BETA, weight_decay=ETA
  )
  plain, plain_step = _stepper(True, **_main_config(4.0, False))

  @jax.jit
  def injected_step(params, state, grads):
    updates, state = injected.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = _as_jax(params_factory(rng))
  a_params, a_state = params, plain.init(params)
  b_params, b_state = params, injected.init(params)
  grad_rng = np.random.default_rng(14)
  for t in range(25):
    grads = _as_jax(params_factory(grad_rng))
    a_params, a_state = plain_step(a_params, a_state, grads)
    b_params, b_state = injected_step(b_params, b_state, grads)
    for a, b in zip(jax.tree.leaves(a_params), jax.tree.leaves(b_params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), f"step {t}")
    for key in ("keep", "threshold", "num_active"):
      assert gsm_optax.gsm_stats(a_state)[key] == gsm_optax.gsm_stats(b_state)[key]

  # A hyperparameter changed in the state takes effect at the next update.
  b_state.hyperparams["compression"] = jnp.asarray(8.0, jnp.float32)
  _, b_state = injected_step(b_params, b_state, grads)
  assert int(gsm_optax.gsm_stats(b_state)["keep"]) == 17


def test_inject_hyperparams_with_a_compression_schedule(rng, params_factory):
  schedule = optax.piecewise_constant_schedule(1.0, {2: 2.0, 4: 3.0})
  opt = optax.inject_hyperparams(gsm_optax.gsm)(
    learning_rate=optax.constant_schedule(LR), compression=schedule, momentum=BETA, weight_decay=ETA
  )
  params = _as_jax(params_factory(rng))
  state = opt.init(params)
  update = opt.update  # eager; the jitted path is checked above
  grad_rng = np.random.default_rng(15)
  keeps = []
  for t in range(6):
    _, state = update(_as_jax(params_factory(grad_rng)), state, params)
    # The state shows the hyperparameters this update used.
    np.testing.assert_allclose(state.hyperparams["compression"], float(schedule(t)))
    keeps.append(int(gsm_optax.gsm_stats(state)["keep"]))
  assert keeps == [int(138 / float(schedule(t))) for t in range(6)]
  assert keeps == [138, 138, 69, 69, 23, 23]


def test_gsm_stats_finds_the_state_in_any_nesting(params_factory, rng):
  params = _as_jax(params_factory(rng))
  nested = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.inject_hyperparams(gsm_optax.gsm)(learning_rate=LR, compression=4.0),
  )
  multi = optax.multi_transform(
    {"gsm": gsm_optax.gsm(LR, 4.0), "sgd": optax.sgd(LR)}, {"conv": "sgd", "mlp": "gsm"}
  )
  for opt in (gsm_optax.gsm(LR, 4.0), gsm_optax.mask_by_global_taylor(4.0), nested, multi):
    state = opt.init(params)
    stats = gsm_optax.gsm_stats(state)
    assert set(stats) >= {"step", "keep", "threshold", "num_active", "num_nonfinite"}
    assert int(stats["step"]) == 0
  assert int(gsm_optax.gsm_stats(nested.init(params))["keep"]) == 34
  assert int(gsm_optax.gsm_stats(multi.init(params))["keep"]) == 16  # 66 / 4


def test_gsm_stats_raises_without_exactly_one_gsm_state(params_factory, rng):
  params = _as_jax(params_factory(rng))
  with pytest.raises(ValueError, match="MaskByGlobalTaylorState.*found 0"):
    gsm_optax.gsm_stats(optax.sgd(0.1, momentum=0.9).init(params))
  twice = optax.chain(gsm_optax.mask_by_global_taylor(2.0), gsm_optax.gsm(LR, 4.0))
  with pytest.raises(ValueError, match="found 2"):
    gsm_optax.gsm_stats(twice.init(params))


# ----------------------------------------------------------------------------
# Pools.
# ----------------------------------------------------------------------------


def test_default_pool_is_every_floating_leaf_with_at_least_two_dims():
  params = {
    "dense": np.zeros((3, 2), np.float32),
    "conv": np.zeros((2, 2, 1, 3), np.float32),
    "half": np.zeros((2, 2), jnp.bfloat16),
    "bias": np.zeros((3,), np.float32),
    "scalar": np.float32(1.0),
    "embedding_ids": np.zeros((4, 2), np.int32),
    "nested": [np.zeros((1, 1), np.float16), np.zeros((5,), np.float16)],
  }
  expected = {
    "dense": True,
    "conv": True,
    "half": True,
    "bias": False,
    "scalar": False,
    "embedding_ids": False,
    "nested": [True, False],
  }
  assert gsm_optax.default_pool(params) == expected
  assert gsm_optax.resolve_pool(params) == expected
  assert gsm_optax.pool_size(params) == 6 + 12 + 4 + 1
  assert gsm_optax.keep_count(params, 2.0) == 11


def _custom_pool_as_tree(params):
  # conv kernel and dense2 *bias* pooled; dense1 and dense2 kernels not.
  del params
  return {
    "conv": {"bias": False, "kernel": True},
    "mlp": {"dense1": {"bias": False, "kernel": False}, "dense2": {"bias": True, "kernel": False}},
  }


@pytest.mark.parametrize("pool_kind", ["bool_tree", "callable"])
def test_custom_pool_masks_and_decays_only_its_leaves(pool_kind, rng, params_factory):
  params = params_factory(rng)
  pool = _custom_pool_as_tree(params) if pool_kind == "bool_tree" else _custom_pool_as_tree
  grad_rng = np.random.default_rng(16)
  _, _, history = _run_against_reference(
    params,
    lambda t, ref: params_factory(grad_rng),
    6,
    False,
    pool_flags=_custom_pool_as_tree(params),
    **_main_config(4.0, False, pool=pool),
  )
  assert history[0][0]["keep"] == int((72 + 3) / 4)
  # Leaves outside this pool (the dense kernels) keep every gradient entry.
  for _, masks, _ in history:
    assert masks["mlp"]["dense1"]["kernel"].all()


def test_leaves_outside_the_pool_get_their_gradient_unchanged(rng, params_factory):
  params = _as_jax(params_factory(rng))
  grads = _as_jax(params_factory(rng))
  opt = gsm_optax.gsm(1.0, 20.0, momentum=0.0, weight_decay=0.5)
  updates, _ = opt.update(grads, opt.init(params), params)
  for name in ("conv", "mlp"):
    biases = (
      [("conv", "bias")]
      if name == "conv"
      else [("mlp", "dense1", "bias"), ("mlp", "dense2", "bias")]
    )
    for path in biases:
      u, g = updates, grads
      for key in path:
        u, g = u[key], g[key]
      np.testing.assert_array_equal(u, -g)  # no mask, no decay, lr = 1


# ----------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "compression",
  [0.5, 0.0, -3.0, math.nan, math.inf, jnp.asarray(0.99)],
  ids=["half", "zero", "negative", "nan", "inf", "array"],
)
def test_gsm_rejects_compression_below_one_or_not_finite(compression):
  with pytest.raises(ValueError, match=r"compression must be finite and >= 1"):
    gsm_optax.gsm(LR, compression)
  with pytest.raises(ValueError, match=r"compression must be finite and >= 1"):
    gsm_optax.mask_by_global_taylor(compression)


@pytest.mark.parametrize("compression", ["4", None, True], ids=["string", "none", "bool"])
def test_gsm_rejects_compression_that_is_not_a_number(compression):
  with pytest.raises(TypeError, match="compression must be a number"):
    gsm_optax.gsm(LR, compression)


def _gsm(learning_rate, momentum, weight_decay):
  return gsm_optax.gsm(learning_rate, 4.0, momentum=momentum, weight_decay=weight_decay)


def _gsm_channels(learning_rate, momentum, weight_decay):
  return gsm_optax.gsm_channels(learning_rate, 2.0, momentum=momentum, weight_decay=weight_decay)


def _gsm_nm(learning_rate, momentum, weight_decay):
  return gsm_optax.gsm_nm(learning_rate, 1, 2, momentum=momentum, weight_decay=weight_decay)


def _gsm_sgd_shrink(learning_rate, momentum, weight_decay):
  return gsm_optax.gsm_sgd_shrink(
    learning_rate, 4.0, passive_shrink=0.1, momentum=momentum, weight_decay=weight_decay
  )


# Every transform whose momentum SGD takes (learning_rate, momentum, weight_decay).
_MOMENTUM_SGD_BUILDERS = {
  "gsm": _gsm,
  "gsm_channels": _gsm_channels,
  "gsm_nm": _gsm_nm,
  "gsm_sgd_shrink": _gsm_sgd_shrink,
}


@pytest.mark.parametrize("builder", list(_MOMENTUM_SGD_BUILDERS))
@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(learning_rate="a"), TypeError, "learning_rate must be a number or an optax schedule"),
    (dict(learning_rate=math.nan), ValueError, r"learning_rate must be in \[0.0, inf\)"),
    (dict(learning_rate=-0.1), ValueError, r"learning_rate must be in \[0.0, inf\)"),
    (dict(momentum=1.5), ValueError, r"momentum must be in \[0.0, 1.0\), got 1.5"),
    (dict(momentum=math.nan), ValueError, r"momentum must be in \[0.0, 1.0\), got nan"),
    (dict(momentum="0.9"), TypeError, "momentum must be a number"),
    (dict(weight_decay=math.inf), ValueError, r"weight_decay must be in \[0.0, inf\)"),
  ],
  ids=[
    "lr_string",
    "lr_nan",
    "lr_negative",
    "momentum_1.5",
    "momentum_nan",
    "momentum_string",
    "wd_inf",
  ],
)
def test_momentum_sgd_arguments_are_checked_when_built(builder, kwargs, error, match):
  args = dict(learning_rate=LR, momentum=0.9, weight_decay=5e-4) | kwargs
  with pytest.raises(error, match=match):
    _MOMENTUM_SGD_BUILDERS[builder](**args)


@pytest.mark.parametrize("builder", list(_MOMENTUM_SGD_BUILDERS))
def test_schedules_and_injected_hyperparams_are_still_accepted(builder, rng, params_factory):
  schedule = optax.linear_schedule(0.0, LR, 10)
  _MOMENTUM_SGD_BUILDERS[builder](learning_rate=schedule, momentum=0.9, weight_decay=schedule)
  opt = optax.inject_hyperparams(_MOMENTUM_SGD_BUILDERS[builder])(
    learning_rate=LR, momentum=0.9, weight_decay=5e-4
  )
  params = _as_jax(params_factory(rng))
  state = opt.init(params)
  jax.jit(opt.update)(params, state, params)  # traced hyperparams: not checkable, not refused


def test_gsm_adamw_checks_its_learning_rate_when_built():
  with pytest.raises(TypeError, match="learning_rate must be a number or an optax schedule"):
    gsm_optax.gsm_adamw("a", 4.0, passive_shrink=0.1)
  with pytest.raises(ValueError, match=r"learning_rate must be in \[0.0, inf\)"):
    gsm_optax.gsm_adamw(math.inf, 4.0, passive_shrink=0.1)


def test_a_traced_compression_in_prune_says_to_make_it_static(rng, params_factory):
  params = _as_jax(params_factory(rng))
  for fn in (gsm_optax.prune, gsm_optax.global_magnitude_mask, gsm_optax.prune_channels):
    with pytest.raises(TypeError, match="got a traced value: make it static") as info:
      jax.jit(fn)(params, 4.0)
    assert "schedule" not in str(info.value)
    jax.jit(fn, static_argnames="compression")(params, 4.0)


@pytest.mark.parametrize("compression", ["4", None], ids=["string", "none"])
def test_prune_takes_no_schedule_and_says_so(compression, rng, params_factory):
  params = _as_jax(params_factory(rng))
  with pytest.raises(TypeError, match=r"compression must be a number >= 1, got") as info:
    gsm_optax.prune(params, compression)
  assert "schedule" not in str(info.value)


def test_a_pool_of_zero_size_leaves_is_refused_as_holding_no_weights():
  params = {"a": jnp.zeros((0, 4)), "b": jnp.zeros((3, 0))}
  for fn in (
    lambda: gsm_optax.prune(params, 2.0),
    lambda: gsm_optax.keep_count(params, 1.0),
    lambda: gsm_optax.gsm(LR, 2.0).init(params),
  ):
    with pytest.raises(ValueError, match="the pool holds no weights") as info:
      fn()
    assert "compression <=" not in str(info.value)
  with pytest.raises(ValueError, match="the pool holds no channels"):
    gsm_optax.prune_channels({"a": jnp.zeros((4, 0))}, 2.0)


def test_init_rejects_a_pool_without_floating_leaves():
  opt = gsm_optax.gsm(LR, 2.0)
  with pytest.raises(ValueError, match="pool selects no leaf"):
    opt.init({"bias": jnp.zeros((4,)), "ids": jnp.zeros((3, 3), jnp.int32)})
  opt = gsm_optax.gsm(LR, 2.0, pool=lambda p: jax.tree.map(lambda _: False, p))
  with pytest.raises(ValueError, match="pool selects no leaf"):
    opt.init({"kernel": jnp.zeros((4, 4))})


def test_init_rejects_compression_that_keeps_no_weight(rng, params_factory):
  params = _as_jax(params_factory(rng))
  with pytest.raises(ValueError, match=r"keeps Q = int\(138 / 139.0\) = 0"):
    gsm_optax.gsm(LR, 139.0).init(params)
  gsm_optax.gsm(LR, 138.0).init(params)  # Q = 1 is fine


def test_update_requires_params(rng, params_factory):
  params = _as_jax(params_factory(rng))
  opt = gsm_optax.gsm(LR, 4.0)
  state = opt.init(params)
  with pytest.raises(ValueError, match="needs params"):
    opt.update(params, state)
  with pytest.raises(ValueError, match="needs params"):
    opt.update(params, state, None)
  with pytest.raises(ValueError, match="needs the params"):
    opt.init(None)


def test_pool_and_params_tree_mismatch_is_rejected(rng, params_factory):
  params = _as_jax(params_factory(rng))
  bad_pool = {"conv": {"kernel": True}, "mlp": True}
  with pytest.raises(ValueError, match="same tree structure as params"):
    gsm_optax.gsm(LR, 4.0, pool=bad_pool).init(params)
  opt = gsm_optax.gsm(LR, 4.0)
  state = opt.init(params)
  grads = dict(params)
  grads["extra"] = jnp.zeros((2, 2))
  with pytest.raises(ValueError, match="different tree structures"):
    opt.update(grads, state, params)


def test_pool_with_a_traced_or_array_flag_is_rejected():
  params = {"k": jnp.zeros((2, 2))}
  with pytest.raises(ValueError, match=r"\['k'\] must be a Python bool"):
    gsm_optax.gsm(LR, 2.0, pool={"k": jnp.asarray(True)}).init(params)


def test_integer_leaf_in_the_pool_is_a_type_error_naming_the_leaf():
  params = {"layer": {"kernel": jnp.zeros((3, 3), jnp.int32), "w": jnp.zeros((3, 3))}}
  pool = {"layer": {"kernel": True, "w": True}}
  with pytest.raises(TypeError, match=r"\['layer'\]\['kernel'\].*int32"):
    gsm_optax.gsm(LR, 2.0, pool=pool).init(params)
  with pytest.raises(TypeError, match=r"\['layer'\]\['kernel'\]"):
    gsm_optax.mask_by_global_taylor(2.0, pool=pool).update(params, None, params)


# ----------------------------------------------------------------------------
# Checkpointable states.
# ----------------------------------------------------------------------------


def _optimizers_for_state_checks():
  schedule = optax.linear_schedule(1.0, 4.0, 5)
  return {
    "plain": gsm_optax.gsm(LR, 4.0),
    "schedules": gsm_optax.gsm(
      optax.cosine_decay_schedule(LR, 10),
      schedule,
      weight_decay=optax.constant_schedule(ETA),
      nesterov=True,
    ),
    "injected": optax.inject_hyperparams(gsm_optax.gsm)(learning_rate=LR, compression=schedule),
  }


@pytest.mark.parametrize("name", ["plain", "schedules", "injected"])
def test_state_leaves_are_arrays_and_survive_a_numpy_round_trip(name, rng, params_factory):
  opt = _optimizers_for_state_checks()[name]
  params = _as_jax(params_factory(rng))
  grads = _as_jax(params_factory(rng))
  state = opt.init(params)
  _, state = opt.update(grads, state, params)  # not only the initial state
  leaves = jax.tree.leaves(state, is_leaf=lambda x: x is None)
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, jax.Array), type(leaf)
  # As a checkpoint library restores it: plain NumPy arrays.
  restored = jax.tree.map(np.asarray, state)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  u1, s1 = opt.update(grads, state, params)
  u2, s2 = opt.update(grads, restored, params)
  for a, b in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("size", [138, 266_200, 2**24 + 3, 25_502_912, 2**31 - 1])
def test_keep_for_a_traced_compression_is_exactly_floor_of_size_over_c(size, use_jit):
  # Q = floor(|pool| / C) for float32 C from a schedule. Divisors near
  # |pool| / q make the quotient land next to an integer, where float32
  # division rounds to the wrong side.
  rng = np.random.default_rng(size % 1000)
  near_integer = (np.float64(size) / rng.integers(1, size + 1, 200)).astype(np.float32)
  spread = np.exp(rng.uniform(0.0, 25.0, 200)).astype(np.float32)
  divisors = np.concatenate([near_integer, spread, np.float32([1.0, 5.0, 60.0])])
  divisors = divisors[divisors >= 1.0]
  divide = lambda c: _pool.floor_divide_by_float(size, c)  # noqa: E731
  if use_jit:
    divide = jax.jit(divide)
  got = [int(divide(jnp.float32(c))) for c in divisors[:40]]
  got += [int(x) for x in jax.vmap(divide)(jnp.asarray(divisors[40:]))]
  expected = [math.floor(fractions.Fraction(size) / fractions.Fraction(float(c))) for c in divisors]
  assert got == expected


@pytest.mark.parametrize("compression", [1.0, 3.0, 4.0, 7.5, 46.0, 138.0])
def test_every_q_of_the_library_is_int_of_size_over_c(compression, rng, params_factory):
  # Q = floor(|pool| / C) is computed in _pool only: for a Python C
  # (keep_count, gsm, gmp's final count, layer-wise pruning) and for an
  # array C (a schedule's value), with the same result.
  params = _as_jax(params_factory(rng))
  keep = int(138 / compression)
  assert gsm_optax.keep_count(params, compression) == keep
  for c in (compression, jnp.float32(compression), optax.constant_schedule(compression)):
    state = gsm_optax.mask_by_global_taylor(c).init(params)
    assert int(gsm_optax.gsm_stats(state)["keep"]) == keep
  gmp = baselines.gradual_magnitude_pruning(compression, begin_step=0, end_step=0, update_every=1)
  _, state = gmp.update(params, gmp.init(params), params)
  kept = sum(int(np.sum(m)) for m in jax.tree.leaves(state.mask) if np.ndim(m) >= 2)
  assert kept == keep
  if compression <= 18:  # every kernel keeps int(size_i / C) >= 1
    mask = baselines.layerwise_magnitude_mask(params, compression)
    for kernel, size in [
      (mask["conv"]["kernel"], 72),
      (mask["mlp"]["dense1"]["kernel"], 48),
      (mask["mlp"]["dense2"]["kernel"], 18),
    ]:
      assert int(np.sum(kernel)) == int(size / compression)
  assert _pool.floor_keep(138, compression) == keep
  assert int(_pool.checked_traced_keep(138, jnp.float32(compression))[0]) == keep


@pytest.mark.parametrize(
  "value,number,integer",
  [
    (3, True, True),
    (np.int64(3), True, True),
    (np.asarray(3, np.int32), True, True),
    (jnp.asarray(3), True, True),
    (2.5, True, False),
    (np.float32(2.5), True, False),
    (jnp.asarray(2.5), True, False),
    (True, False, False),
    (np.bool_(True), False, False),
    (jnp.asarray(True), False, False),
    ("4", False, False),
    (None, False, False),
    (np.ones(2), False, False),
    ([1], False, False),
  ],
)
def test_one_number_predicate_rejects_bools_strings_and_non_scalars(value, number, integer):
  assert _checks.is_number(value) is number
  assert _checks.is_number(value, integer=True) is integer


def test_a_traced_value_is_not_a_number_known_when_the_transform_is_built():
  assert jax.jit(lambda x: jnp.asarray(_checks.is_number(x)))(2.0).item() is False

"""The baselines (magnitude pruning, GMP, ADMM, lottery tickets) against NumPy.

Every reference is written here from docs/METHOD.md with NumPy sorting
(``np.argsort(-|w|, kind="stable")[:k]``: the k greatest magnitudes, ties to
the lower index, which is also the library's documented tie rule), never with
the code under test.
"""

from __future__ import annotations

import math

from conftest import POOL_SIZE
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gsm_optax
from gsm_optax import baselines

POOL_PATHS = ["['conv']['kernel']", "['mlp']['dense1']['kernel']", "['mlp']['dense2']['kernel']"]
DTYPES = [np.float32, jnp.bfloat16]
DTYPE_IDS = ["float32", "bfloat16"]
# jit compiles the radix select anew for every outer function: bfloat16 (whose
# magnitudes are selected in float32 like float32's) is checked eagerly only.
JIT_DTYPES = [(False, np.float32), (False, jnp.bfloat16), (True, np.float32)]
JIT_DTYPE_IDS = ["nojit-float32", "nojit-bfloat16", "jit-float32"]


# ----------------------------------------------------------------------------
# NumPy references and helpers.
# ----------------------------------------------------------------------------


def _flat_with_paths(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(p), np.asarray(x, np.float32)) for p, x in flat]


def _pooled(tree):
  """The pooled (kernel) leaves as float32 NumPy arrays, in tree order."""
  return [x for path, x in _flat_with_paths(tree) if path in POOL_PATHS]


def _numpy_topk_mask(values: np.ndarray, k: int) -> np.ndarray:
  """The k entries of greatest |value|, ties to the lower index."""
  flat = np.abs(values.ravel())
  mask = np.zeros(flat.size, bool)
  mask[np.argsort(-flat, kind="stable")[:k]] = True
  return mask.reshape(values.shape)


def _numpy_global_topk(leaves, k: int):
  """Top-k of |w| over the concatenation of `leaves`; split back per leaf."""
  flat = np.concatenate([x.ravel() for x in leaves])
  mask = _numpy_topk_mask(flat, k)
  out, start = [], 0
  for x in leaves:
    out.append(mask[start : start + x.size].reshape(x.shape))
    start += x.size
  return out


def _maybe_jit(fn, use_jit: bool):
  return jax.jit(fn) if use_jit else fn


def _as_dtype(tree, dtype):
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


# ----------------------------------------------------------------------------
# One-shot and iterative magnitude pruning, masked fine-tuning.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("use_jit,dtype", JIT_DTYPES, ids=JIT_DTYPE_IDS)
def test_layerwise_mask_keeps_exactly_the_per_leaf_top_k_of_numpy_argsort(
  rng, params_factory, use_jit, dtype
):
  params = _as_dtype(params_factory(rng), dtype)
  compression = 3.0
  mask = _maybe_jit(lambda p: baselines.layerwise_magnitude_mask(p, compression), use_jit)(params)
  values = dict(_flat_with_paths(params))
  for path, got in _flat_with_paths(mask):
    if path in POOL_PATHS:
      k = int(values[path].size / compression)
      np.testing.assert_array_equal(got, _numpy_topk_mask(values[path], k), err_msg=path)
      assert got.sum() == k
    else:
      assert got.all(), f"{path} is outside the pool and must be all True"


def test_ties_at_the_cut_go_to_the_first_entries_and_zeros_are_never_kept():
  w = np.array([[3.0, -2.0, 1.0, 2.0], [2.0, -2.0, 0.0, 0.0]], np.float32)
  params = {"w": w, "b": np.zeros(4, np.float32)}
  keep_counts = {"w": 3, "b": optax.MaskedNode()}
  mask = baselines.topk_mask(params, keep_counts)
  np.testing.assert_array_equal(
    mask["w"], [[True, True, False, True], [False, False, False, False]]
  )
  np.testing.assert_array_equal(mask["b"], True)
  # Seven wanted, six non-zeros: only the non-zeros are kept.
  mask = baselines.topk_mask(params, {"w": 7, "b": optax.MaskedNode()})
  np.testing.assert_array_equal(mask["w"], w != 0)
  z = baselines.admm_project(params, keep_counts)  # the projection keeps 3 too
  np.testing.assert_array_equal(z["w"], np.where(_numpy_topk_mask(w, 3), w, 0))


def test_topk_masks_rank_nan_magnitudes_as_zero_like_the_global_cut():
  # One selection for every k-th greatest |w| (NaN ranked as 0): the k kept
  # are the k greatest finite magnitudes, as in global_magnitude_mask.
  w = np.array([[np.nan, 3.0, -2.0], [1.0, np.nan, 0.5]], np.float32)
  params = {"w": w}
  mask = baselines.topk_mask(params, {"w": 2})
  np.testing.assert_array_equal(mask["w"], [[False, True, True], [False, False, False]])
  mask = baselines.topk_mask(params, {"w": 5})  # more than the 4 non-NaN: NaN is never kept
  np.testing.assert_array_equal(mask["w"], ~np.isnan(w))
  np.testing.assert_array_equal(
    gsm_optax.global_magnitude_mask(params, 3.0)["w"], baselines.topk_mask(params, {"w": 2})["w"]
  )


def test_layerwise_mask_accepts_densities_as_pytree_paths_sequence_or_report(rng, params_factory):
  params = params_factory(rng)
  counts = [7, 11, 5]  # of 72, 48 and 18 weights
  sizes = [72, 48, 18]
  densities = [c / s for c, s in zip(counts, sizes)]
  as_paths = dict(zip(POOL_PATHS, densities))
  as_tree = {
    "conv": {"kernel": densities[0], "bias": optax.MaskedNode()},
    "mlp": {
      "dense1": {"kernel": densities[1], "bias": 1.0},
      "dense2": {"kernel": densities[2], "bias": 0.5},
    },
  }
  expected = [_numpy_topk_mask(x, c) for x, c in zip(_pooled(params), counts)]
  pruned = jax.tree.map(np.array, params)  # a report with these counts
  for leaf, keep in zip(
    [
      pruned["conv"]["kernel"],
      pruned["mlp"]["dense1"]["kernel"],
      pruned["mlp"]["dense2"]["kernel"],
    ],
    expected,
  ):
    leaf[~keep] = 0.0
  report = gsm_optax.sparsity_report(pruned)
  for spec in (densities, as_paths, as_tree, report):
    mask = baselines.layerwise_magnitude_mask(params, spec)
    for got, want in zip(_pooled(mask), expected):
      np.testing.assert_array_equal(got.astype(bool), want)
    keep = baselines.layer_keep_counts_from_density(params, spec)
    assert keep["conv"]["kernel"] == 7 and keep["mlp"]["dense2"]["kernel"] == 5
    assert isinstance(keep["conv"]["bias"], optax.MaskedNode)


def test_layerwise_mask_rejects_compression_below_one_or_emptying_a_leaf(rng, params_factory):
  params = params_factory(rng)
  with pytest.raises(ValueError, match="densities_or_compression"):
    baselines.layerwise_magnitude_mask(params, 0.5)
  with pytest.raises(ValueError, match=r"\['mlp'\]\['dense2'\]\['kernel'\]"):
    baselines.layerwise_magnitude_mask(params, 20.0)  # 18 / 20 -> 0 kept
  with pytest.raises(ValueError, match="densities_or_compression"):
    baselines.layerwise_magnitude_mask(params, {POOL_PATHS[0]: 0.5})
  with pytest.raises(ValueError, match="densities"):
    baselines.layer_keep_counts_from_density(params, [0.5, 1.5, 0.5])


def test_magnitude_prune_zeroes_the_global_or_per_leaf_top_q(rng, params_factory):
  params = params_factory(rng)
  pruned, mask = baselines.magnitude_prune(params, 4.0)
  want = _numpy_global_topk(_pooled(params), POOL_SIZE // 4)
  for got_w, got_m, w, m in zip(_pooled(pruned), _pooled(mask), _pooled(params), want):
    np.testing.assert_array_equal(got_m.astype(bool), m)
    np.testing.assert_array_equal(got_w, np.where(m, w, 0))
  pruned, mask = baselines.magnitude_prune(params, 4.0, layerwise=True)
  for got_m, w in zip(_pooled(mask), _pooled(params)):
    np.testing.assert_array_equal(got_m.astype(bool), _numpy_topk_mask(w, int(w.size / 4)))
  np.testing.assert_array_equal(pruned["conv"]["bias"], params["conv"]["bias"])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_keep_masked_holds_pruned_weights_at_zero_while_the_rest_trains_like_numpy(
  rng, params_factory, use_jit, dtype
):
  lr, beta, steps = 0.05, 0.9, 12
  params = params_factory(rng)
  target = params_factory(rng)
  mask = baselines.layerwise_magnitude_mask(params, 4.0)
  params = _as_dtype(gsm_optax.apply_mask(params, mask), dtype)
  target_j = _as_dtype(target, dtype)
  opt = optax.chain(optax.sgd(lr, momentum=beta), baselines.keep_masked(mask))

  def step(p, s):
    grads = jax.tree.map(lambda w, t: w - t, p, target_j)  # non-zero everywhere
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  step = _maybe_jit(step, use_jit)
  state = opt.init(params)
  # NumPy: momentum SGD on 1/2 ||w - target||^2, updates zeroed off the mask.
  w = [np.asarray(x, np.float32) for x in jax.tree.leaves(params)]
  t = [np.asarray(x, np.float32) for x in jax.tree.leaves(target_j)]
  m = [np.broadcast_to(np.asarray(x), y.shape) for x, y in zip(jax.tree.leaves(mask), w)]
  z = [np.zeros_like(x) for x in w]
  for _ in range(steps):
    params, state = step(params, state)
    for i in range(len(w)):
      z[i] = beta * z[i] + (w[i] - t[i])
      w[i] = np.where(m[i], w[i] - lr * z[i], 0.0)
    for got, mi in zip(jax.tree.leaves(params), m):
      assert np.all(np.asarray(got, np.float32)[~mi] == 0.0)
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=0.1, atol=0.1)
  for got, want in zip(jax.tree.leaves(params), w):
    np.testing.assert_allclose(np.asarray(got, np.float32), want, **tol)
  # The kept weights actually moved toward the target.
  kernel = np.asarray(params["mlp"]["dense1"]["kernel"], np.float32)
  kept = np.asarray(mask["mlp"]["dense1"]["kernel"])
  assert np.all(kernel[kept] != 0.0)


def test_keep_masked_takes_a_callable_mask_and_stores_it_in_its_state(rng, params_factory):
  params = params_factory(rng)
  opt = baselines.keep_masked(lambda p: baselines.ticket_mask(p, 4.0))
  state = opt.init(params)
  assert isinstance(state, baselines.KeepMaskedState)
  expected = _numpy_global_topk(_pooled(params), POOL_SIZE // 4)
  for got, want in zip(_pooled(state.mask), expected):
    np.testing.assert_array_equal(got, want)
  ones = jax.tree.map(np.ones_like, params)
  updates, _ = opt.update(ones, state, params)
  for got, want in zip(_pooled(updates), expected):
    np.testing.assert_array_equal(got, want.astype(np.float32))
  assert baselines.masked_update is baselines.keep_masked


def test_keep_masked_rejects_a_mask_of_wrong_structure_shape_or_dtype(rng, params_factory):
  params = params_factory(rng)
  good = jax.tree.map(lambda x: np.ones(x.shape, bool), params)
  with pytest.raises(ValueError, match="mask must have the tree structure"):
    baselines.keep_masked({"conv": good["conv"]}).init(params)
  bad_shape = jax.tree.map(lambda x: x, good)
  bad_shape["conv"]["kernel"] = np.ones((3, 3), bool)
  with pytest.raises(ValueError, match=r"mask leaf at \['conv'\]\['kernel'\]"):
    baselines.keep_masked(bad_shape).init(params)
  bad_dtype = jax.tree.map(lambda x: x, good)
  bad_dtype["conv"]["bias"] = np.ones((4,), np.float32)
  with pytest.raises(TypeError, match=r"mask leaf at \['conv'\]\['bias'\]"):
    baselines.keep_masked(bad_dtype).init(params)
  with pytest.raises(ValueError, match="mask"):
    baselines.apply_ticket(params, {"conv": good["conv"]})


@pytest.mark.parametrize("compression,rounds", [(60.0, 1), (125.0, 5), (300.0, 4)])
def test_iterative_schedule_is_geometric_and_ends_exactly_at_c(compression, rounds):
  schedule = baselines.iterative_compression_schedule(compression, rounds)
  assert len(schedule) == rounds
  assert schedule[-1] == compression
  np.testing.assert_allclose(
    schedule, [compression ** (r / rounds) for r in range(1, rounds + 1)], rtol=1e-12
  )
  # Every round keeps the same fraction of what the previous round kept.
  ratios = np.diff(np.log(np.concatenate([[1.0], schedule])))
  np.testing.assert_allclose(ratios, math.log(compression) / rounds, rtol=1e-9)
  with pytest.raises(ValueError, match="final_compression"):
    baselines.iterative_compression_schedule(0.9, 3)
  with pytest.raises(ValueError, match="rounds"):
    baselines.iterative_compression_schedule(10.0, 0)


# ----------------------------------------------------------------------------
# Gradual magnitude pruning (Zhu & Gupta 2017).
# ----------------------------------------------------------------------------

GMP = dict(begin_step=2, end_step=14, update_every=3, initial_sparsity=0.1)
GMP_C = 4.0


def _cubic_sparsity(
  t: int, c=GMP_C, begin_step=2, end_step=14, update_every=3, initial_sparsity=0.1
) -> float:
  """docs/METHOD.md's s_t at the last mask update t_k <= t (0 before t0), float64."""
  if t < begin_step:
    return 0.0
  t_k = begin_step + min((t - begin_step) // update_every * update_every, end_step - begin_step)
  s_f, s_i = 1.0 - 1.0 / c, initial_sparsity
  if end_step == begin_step:
    return s_f
  return s_f + (s_i - s_f) * (1.0 - (t_k - begin_step) / (end_step - begin_step)) ** 3


def _target_keep(size: int, t: int) -> int:
  """Kept weights at step t: int(size * (1 - s_t)); Q = int(size / C) at the end."""
  if t >= GMP["end_step"]:
    return int(size / GMP_C)
  value = size * (1.0 - _cubic_sparsity(t))
  assert abs(value - round(value)) > 1e-3, "ambiguous in float32: change the test"
  return int(value)


def test_gmp_sparsity_schedule_matches_the_cubic_formula_at_every_step():
  schedule = baselines.gmp_sparsity_schedule(GMP_C, **GMP)
  jitted = jax.jit(schedule)
  for t in range(0, 20):
    want = _cubic_sparsity(t)
    np.testing.assert_allclose(float(schedule(t)), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(jitted(t)), want, rtol=1e-6, atol=1e-7)
  # At the mask updates t0 + k dt it is the paper's cubic in t itself.
  for t in range(2, 15, 3):
    paper = 0.75 + (0.1 - 0.75) * (1 - (t - 2) / 12) ** 3
    np.testing.assert_allclose(float(schedule(t)), paper, rtol=1e-6)


@pytest.mark.parametrize("layerwise", [False, True], ids=["global", "layerwise"])
def test_gmp_realised_sparsity_equals_the_target_and_masks_change_only_every_dt(
  rng, params_factory, use_jit, layerwise
):
  lr, steps = 0.1, 18
  params = params_factory(rng)
  grads = [params_factory(rng) for _ in range(steps)]  # independent of w
  opt = optax.chain(
    optax.sgd(lr), baselines.gradual_magnitude_pruning(GMP_C, layerwise=layerwise, **GMP)
  )
  step = _maybe_jit(lambda p, g, s: _apply(opt, p, g, s), use_jit)
  state = opt.init(params)
  w = [np.asarray(x, np.float32) for x in jax.tree.leaves(params)]
  pooled_ids = [i for i, (path, _) in enumerate(_flat_with_paths(params)) if path in POOL_PATHS]
  mask = [np.ones(x.shape, bool) for x in w]
  for t in range(steps):
    is_update = t in (2, 5, 8, 11, 14)
    if is_update:  # NumPy: new masks from the current |w|
      kernels = [w[i] for i in pooled_ids]
      if layerwise:
        new = [_numpy_topk_mask(x, _target_keep(x.size, t)) for x in kernels]
      else:
        new = _numpy_global_topk(kernels, _target_keep(POOL_SIZE, t))
      for i, m in zip(pooled_ids, new):
        mask[i] = m
    g = [np.asarray(x, np.float32) for x in jax.tree.leaves(grads[t])]
    w = [np.where(m, x - np.float32(lr) * gi, np.float32(0)) for x, gi, m in zip(w, g, mask)]

    old_mask = jax.tree.leaves(state[1].mask)
    params, state = step(params, grads[t], state)
    gmp_state = state[1]
    got_mask = jax.tree.leaves(gmp_state.mask)
    for got, want in zip(got_mask, mask):
      np.testing.assert_array_equal(got, want, err_msg=f"step {t}")
    if not is_update:
      for got, old in zip(got_mask, old_mask):
        np.testing.assert_array_equal(got, old, err_msg=f"step {t}")
    np.testing.assert_allclose(float(gmp_state.sparsity), _cubic_sparsity(t), rtol=1e-6, atol=1e-7)
    kernels = [np.asarray(x) for x in _pooled(params)]
    if t >= 2:  # realised counts, exactly the target of the mask in force
      if layerwise:
        for x in kernels:
          assert np.count_nonzero(x) == _target_keep(x.size, t)
      else:
        assert sum(map(np.count_nonzero, kernels)) == _target_keep(POOL_SIZE, t)
    for got, want, m in zip(jax.tree.leaves(params), w, mask):
      got = np.asarray(got)
      assert np.all(got[~m] == 0.0), f"a pruned weight is not 0 at step {t}"
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert int(gmp_state.count) == steps


def _apply(opt, params, grads, state):
  updates, state = opt.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def test_gmp_on_bfloat16_params_keeps_exact_counts_despite_ties(rng, params_factory):
  params = _as_dtype(params_factory(rng), jnp.bfloat16)
  bias = np.asarray(params["conv"]["bias"], np.float32)
  opt = baselines.gradual_magnitude_pruning(GMP_C, **GMP)
  state = opt.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  for t in range(15):
    params, state = _apply(opt, params, zero, state)
    assert params["conv"]["kernel"].dtype == jnp.bfloat16
    if t >= 2:
      nonzeros = sum(np.count_nonzero(np.asarray(x, np.float32)) for x in _pooled(params))
      assert nonzeros == _target_keep(POOL_SIZE, t)
  # Leaves outside the pool are never pruned.
  np.testing.assert_array_equal(np.asarray(params["conv"]["bias"], np.float32), bias)


def test_gmp_with_begin_equal_to_end_is_one_shot_pruning_to_q(rng, params_factory):
  params = params_factory(rng)
  initial = _pooled(params)
  opt = baselines.gradual_magnitude_pruning(5.0, begin_step=3, end_step=3, update_every=1)
  state = opt.init(params)
  zero = jax.tree.map(np.zeros_like, params)
  for t in range(6):
    new, state = _apply(opt, params, zero, state)
    if t < 3:
      assert all(np.count_nonzero(x) == x.size for x in _pooled(new))
    params = new
  want = _numpy_global_topk(initial, int(POOL_SIZE / 5.0))  # zero grads: w fixed
  for got, m in zip(_pooled(params), want):
    np.testing.assert_array_equal(got != 0, m)


def test_gmp_state_is_arrays_and_resumes_from_a_numpy_round_trip(rng, params_factory):
  params = params_factory(rng)
  opt = baselines.gradual_magnitude_pruning(GMP_C, **GMP)
  state = opt.init(params)
  zero = jax.tree.map(np.zeros_like, params)
  for _ in range(6):
    params, state = _apply(opt, params, zero, state)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
  restored = jax.tree.map(np.asarray, state)
  a, _ = _apply(opt, params, zero, state)
  b, _ = _apply(opt, params, zero, restored)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize(
  "kwargs,error,match",
  [
    (dict(final_compression=0.5), ValueError, "final_compression"),
    (dict(initial_sparsity=-0.1), ValueError, "initial_sparsity"),
    (dict(initial_sparsity=1.0), ValueError, "initial_sparsity"),
    (dict(initial_sparsity=0.9), ValueError, "initial_sparsity"),
    (dict(initial_sparsity="0.1"), TypeError, "initial_sparsity"),
    (dict(begin_step=20), ValueError, "begin_step"),
    (dict(update_every=0), ValueError, "update_every"),
    (dict(update_every=5), ValueError, "multiple of update_every"),
    (dict(end_step=14.0), TypeError, "end_step"),
  ],
)
def test_gmp_rejects_bad_hyperparameters_naming_the_argument(kwargs, error, match):
  args = dict(final_compression=GMP_C, **GMP)
  args.update(kwargs)
  compression = args.pop("final_compression")
  with pytest.raises(error, match=match):
    baselines.gradual_magnitude_pruning(compression, **args)


def test_gmp_update_requires_params_and_layerwise_leaves_to_keep_a_weight(rng, params_factory):
  params = params_factory(rng)
  opt = baselines.gradual_magnitude_pruning(GMP_C, **GMP)
  state = opt.init(params)
  with pytest.raises(ValueError, match="needs params"):
    opt.update(params, state)
  with pytest.raises(ValueError, match=r"\['mlp'\]\['dense2'\]\['kernel'\]"):
    baselines.gradual_magnitude_pruning(30.0, layerwise=True, **GMP).init(params)


# ----------------------------------------------------------------------------
# ADMM (Zhang et al. 2018).
# ----------------------------------------------------------------------------

COUNTS = [9, 6, 4]  # of 72, 48 and 18 weights


def _keep_counts(params):
  return baselines.layer_keep_counts_from_density(
    params, {p: c / s for p, c, s in zip(POOL_PATHS, COUNTS, [72, 48, 18])}
  )


@pytest.mark.parametrize("use_jit,dtype", JIT_DTYPES, ids=JIT_DTYPE_IDS)
def test_admm_projection_keeps_the_l_largest_magnitudes_of_each_layer(
  rng, params_factory, use_jit, dtype
):
  params = _as_dtype(params_factory(rng), dtype)
  keep_counts = _keep_counts(params)
  z = _maybe_jit(lambda x: baselines.admm_project(x, keep_counts), use_jit)(params)
  assert isinstance(z["conv"]["bias"], optax.MaskedNode)
  kernels = [z["conv"]["kernel"], z["mlp"]["dense1"]["kernel"], z["mlp"]["dense2"]["kernel"]]
  for got, x, k in zip(kernels, _pooled(params), COUNTS):
    assert got.dtype == dtype
    want = np.where(_numpy_topk_mask(x, k), x, 0.0)
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)


def test_admm_init_projects_w_with_zero_dual_and_the_dual_update_adds_w_minus_z(
  rng, params_factory
):
  params = params_factory(rng)
  keep_counts = _keep_counts(params)
  state = baselines.admm_init(params, keep_counts)
  for x, z, u, k in zip(_pooled(params), _pooled(state.z), _pooled(state.u), COUNTS):
    np.testing.assert_array_equal(z, np.where(_numpy_topk_mask(x, k), x, 0.0))
    np.testing.assert_array_equal(u, 0.0)
  w = params_factory(rng)
  u = baselines.admm_dual_update(state.z, w, state.u)  # U = Z, Z = 0 here
  for got, zi, wi in zip(_pooled(u), _pooled(state.z), _pooled(w)):
    np.testing.assert_array_equal(got, zi + wi)
  # admm_step = Z-step on W + U, then the U-step with the new Z.
  state = baselines.ADMMState(z=state.z, u=u)
  new = baselines.admm_step(w, state, keep_counts)
  for x, ui, z, u2, k in zip(_pooled(w), _pooled(u), _pooled(new.z), _pooled(new.u), COUNTS):
    v = x + ui
    np.testing.assert_array_equal(z, np.where(_numpy_topk_mask(v, k), v, 0.0))
    np.testing.assert_allclose(u2, ui + x - z, rtol=1e-6, atol=1e-6)


def test_admm_penalty_gradient_equals_rho_residual_and_jax_grad_of_the_penalty(
  rng, params_factory, use_jit
):
  rho = 0.3
  params = params_factory(rng)
  keep_counts = _keep_counts(params)
  state = baselines.admm_init(params_factory(rng), keep_counts)
  state = state._replace(u=baselines.admm_project(params_factory(rng), keep_counts))

  def penalty(p):  # rho / 2 sum ||W - Z + U||^2, written out per kernel
    total = 0.0
    for w, z, u in [
      (p["conv"]["kernel"], state.z["conv"]["kernel"], state.u["conv"]["kernel"]),
      (
        p["mlp"]["dense1"]["kernel"],
        state.z["mlp"]["dense1"]["kernel"],
        state.u["mlp"]["dense1"]["kernel"],
      ),
      (
        p["mlp"]["dense2"]["kernel"],
        state.z["mlp"]["dense2"]["kernel"],
        state.u["mlp"]["dense2"]["kernel"],
      ),
    ]:
      total = total + 0.5 * rho * jnp.sum((w - z + u) ** 2)
    return total

  got = _maybe_jit(lambda p: baselines.admm_penalty_grads(p, state, rho), use_jit)(params)
  want = jax.grad(penalty)(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)
  for g, w, z, u in zip(_pooled(got), _pooled(params), _pooled(state.z), _pooled(state.u)):
    np.testing.assert_allclose(g, rho * (w - z + u), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(got["conv"]["bias"], 0.0)
  np.testing.assert_allclose(
    baselines.admm_penalty_loss(params, state, rho), penalty(params), rtol=1e-6
  )


def test_add_admm_penalty_feeds_the_optimizer_the_penalised_gradient(rng, params_factory):
  # Before the first Z-step: Z = Pi(W_0) from init, U = 0.
  rho, lr = 0.5, 0.1
  start = params_factory(rng)
  keep_counts = _keep_counts(start)
  params, grads = params_factory(rng), params_factory(rng)
  opt = optax.chain(
    baselines.add_admm_penalty(rho, keep_counts, steps_per_iteration=3), optax.sgd(lr)
  )
  state = opt.init(start)
  updates, state = jax.jit(opt.update)(grads, state, params)
  for u, g, w, w0, k in zip(
    _pooled(updates), _pooled(grads), _pooled(params), _pooled(start), COUNTS
  ):
    z = np.where(_numpy_topk_mask(w0, k), w0, 0.0)
    np.testing.assert_allclose(u, -lr * (g + rho * (w - z)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates["conv"]["bias"], -lr * grads["conv"]["bias"], rtol=1e-6)
  assert int(state[0].count) == 1
  with pytest.raises(ValueError, match="needs params"):
    opt.update(grads, state)


def _numpy_admm(start, target, keep_counts_list, rho, rho_growth, n, lr, steps):
  """ADMM W-steps by SGD on f(W) = 1/2 ||W - A||^2 in NumPy float32, from
  Zhang et al. (2018): Z = Pi(W), U = 0; before step t (t = n, 2n, ...)
  Z = Pi(W + U), U <- U + W - Z; W <- W - lr (W - A + rho_k (W - Z + U)),
  rho_k = rho * rho_growth^(t // n) on the pruned leaves, W - A elsewhere.

  Returns the (W, Z, U) lists after every step.
  """
  w = [x.copy() for x in start]
  proj = [
    lambda x, k=k: x if k is None else np.where(_numpy_topk_mask(x, k), x, 0)
    for k in keep_counts_list
  ]
  z = [p(x) if k is not None else np.zeros_like(x) for p, x, k in zip(proj, w, keep_counts_list)]
  u = [np.zeros_like(x) for x in w]
  history = []
  for t in range(steps):
    if t > 0 and t % n == 0:
      for i, k in enumerate(keep_counts_list):
        if k is not None:
          z[i] = proj[i](w[i] + u[i])
          u[i] = u[i] + (w[i] - z[i])
    rho_k = np.float32(rho) * np.float32(rho_growth) ** np.float32(t // n)
    for i, k in enumerate(keep_counts_list):
      g = w[i] - target[i]
      if k is not None:
        g = g + rho_k * (w[i] - z[i] + u[i])
      w[i] = w[i] - np.float32(lr) * g
    history.append(([x.copy() for x in w], [x.copy() for x in z], [x.copy() for x in u]))
  return history


def test_add_admm_penalty_runs_the_admm_iteration_of_a_numpy_reference(
  rng, params_factory, use_jit
):
  # 30 steps, a Z/U step every 4 (7 of them), rho growing 1.5x per iteration.
  rho, rho_growth, n, lr, steps = 0.3, 1.5, 4, 0.1, 30
  start, target = params_factory(rng), params_factory(rng)
  keep_counts = _keep_counts(start)
  flat_counts = [
    None if isinstance(c, optax.MaskedNode) else c
    for c in jax.tree.leaves(keep_counts, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  ]
  opt = optax.chain(
    baselines.add_admm_penalty(rho, keep_counts, steps_per_iteration=n, rho_growth=rho_growth),
    optax.sgd(lr),
  )

  def step(p, s):
    g = jax.tree.map(lambda w, a: w - a, p, target)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s

  step = _maybe_jit(step, use_jit)
  expected = _numpy_admm(
    [np.asarray(x, np.float32) for x in jax.tree.leaves(start)],
    [np.asarray(x, np.float32) for x in jax.tree.leaves(target)],
    flat_counts,
    rho,
    rho_growth,
    n,
    lr,
    steps,
  )
  params = jax.tree.map(jnp.asarray, start)
  state = opt.init(params)
  for t in range(steps):
    params, state = step(params, state)
    admm = state[0]
    assert int(admm.count) == t + 1
    for got, want in zip((params, admm.z, admm.u), expected[t]):
      for g, e, k in zip(jax.tree.leaves(got), want, flat_counts):
        np.testing.assert_allclose(np.asarray(g), e, rtol=1e-5, atol=1e-5, err_msg=f"step {t}")
  # Z has exactly l_i non-zeros per pruned leaf; Z and U are zero elsewhere.
  for z, u, k in zip(jax.tree.leaves(state[0].z), jax.tree.leaves(state[0].u), flat_counts):
    if k is None:
      assert not np.any(np.asarray(z)) and not np.any(np.asarray(u))
    else:
      assert np.count_nonzero(np.asarray(z)) == k


def _old_admm_w_step(rho, rho_growth, keep_counts, steps_per_iteration):
  """The W-step of training/methods.py before it moved into the library
  (a verbatim copy of its algorithm): the new transform must match it bit for bit."""
  flags = [
    not isinstance(c, optax.MaskedNode)
    for c in jax.tree.leaves(keep_counts, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  ]

  def to_full(params, tree):
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    return jax.tree.unflatten(
      jax.tree.structure(params),
      [
        leaf if flag else jnp.zeros_like(p)
        for leaf, flag, p in zip(leaves, flags, jax.tree.leaves(params))
      ],
    )

  def to_admm(params, tree):
    treedef = jax.tree.structure(params)
    return jax.tree.unflatten(
      treedef,
      [
        leaf if flag else optax.MaskedNode()
        for leaf, flag in zip(treedef.flatten_up_to(tree), flags)
      ],
    )

  def init_fn(params):
    state = baselines.admm_init(params, keep_counts)
    return (jnp.zeros([], jnp.int32), to_full(params, state.z), to_full(params, state.u))

  def update_fn(updates, state, params=None):
    count, z, u = state
    admm = baselines.ADMMState(z=to_admm(params, z), u=to_admm(params, u))
    due = (count > 0) & (count % steps_per_iteration == 0)
    z, u = jax.lax.cond(
      due, lambda: tuple(baselines.admm_step(params, admm, keep_counts)), lambda: (admm.z, admm.u)
    )
    admm = baselines.ADMMState(z=z, u=u)
    iteration = (count // steps_per_iteration).astype(jnp.float32)
    rho_k = rho * jnp.power(jnp.float32(rho_growth), iteration)
    penalty = baselines.admm_penalty_grads(params, admm, rho_k)
    updates = jax.tree.map(lambda g, p: g + p.astype(g.dtype), updates, penalty)
    return updates, (optax.safe_increment(count), to_full(params, z), to_full(params, u))

  return optax.GradientTransformation(init_fn, update_fn)


def test_add_admm_penalty_is_bit_identical_to_the_former_training_w_step(rng, params_factory):
  # Jitted, as the training program runs it (eagerly, the old code compiled
  # its cond anew at every step).
  rho, rho_growth, n = 1e-2, 1.3, 3
  params = jax.tree.map(jnp.asarray, params_factory(rng))
  keep_counts = _keep_counts(params)
  sgd = optax.sgd(0.05, momentum=0.9)
  new = optax.chain(
    baselines.add_admm_penalty(rho, keep_counts, steps_per_iteration=n, rho_growth=rho_growth), sgd
  )
  old = optax.chain(_old_admm_w_step(rho, rho_growth, keep_counts, n), sgd)
  new_update, old_update = jax.jit(new.update), jax.jit(old.update)
  p_new, s_new, p_old, s_old = params, new.init(params), params, old.init(params)
  grad_rng = np.random.default_rng(5)
  for t in range(20):
    grads = jax.tree.map(jnp.asarray, params_factory(grad_rng))
    u_new, s_new = new_update(grads, s_new, p_new)
    u_old, s_old = old_update(grads, s_old, p_old)
    p_new, p_old = optax.apply_updates(p_new, u_new), optax.apply_updates(p_old, u_old)
    for a, b in zip(jax.tree.leaves((p_new, s_new)), jax.tree.leaves((p_old, s_old))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"step {t}")
  assert int(s_new[0].count) == 20


def test_admm_on_a_quadratic_converges_to_the_sparse_projection_of_its_minimum(rng, params_factory):
  # f(W) = 1/2 ||W - A||^2: the best W with card(W_i) <= l_i keeps the l_i
  # largest |A_i| (A's values there), which ADMM must find from W = 0 + noise.
  target = params_factory(rng)
  params = jax.tree.map(lambda a: 0.1 * a, params_factory(rng))
  keep_counts = _keep_counts(params)
  opt = optax.chain(
    baselines.add_admm_penalty(1.0, keep_counts, steps_per_iteration=20), optax.sgd(0.2)
  )

  @jax.jit
  def train(p, s):
    def one(_, carry):
      p, s = carry
      g = jax.tree.map(lambda w, a: w - a, p, target)
      u, s = opt.update(g, s, p)
      return optax.apply_updates(p, u), s

    return jax.lax.fori_loop(0, 620, one, (p, s))  # 30 Z/U steps, then 20 W-steps

  params, opt_state = train(params, opt.init(params))
  pruned, mask = baselines.admm_hard_prune(params, keep_counts)
  for got_m, got_w, z, a, k in zip(
    _pooled(mask), _pooled(pruned), _pooled(opt_state[0].z), _pooled(target), COUNTS
  ):
    support = _numpy_topk_mask(a, k)
    np.testing.assert_array_equal(got_m.astype(bool), support)
    assert np.count_nonzero(got_w) == k
    np.testing.assert_allclose(got_w, np.where(support, a, 0.0), atol=1e-3)
    np.testing.assert_allclose(z, np.where(support, a, 0.0), atol=1e-3)
  np.testing.assert_allclose(pruned["conv"]["bias"], target["conv"]["bias"], atol=1e-4)


def test_keep_counts_default_to_the_per_layer_densities_of_a_gsm_report(rng, params_factory):
  params = params_factory(rng)
  gsm_like = jax.tree.map(np.array, params)
  gsm_like["conv"]["kernel"][0] = 0.0  # 24 zeros of 72
  gsm_like["mlp"]["dense2"]["kernel"][:, 1:] = 0.0  # 12 zeros of 18
  report = gsm_optax.sparsity_report(gsm_like)
  counts = baselines.layer_keep_counts_from_density(params, report)
  assert counts["conv"]["kernel"] == 48
  assert counts["mlp"]["dense1"]["kernel"] == 48
  assert counts["mlp"]["dense2"]["kernel"] == 6
  assert isinstance(counts["mlp"]["dense2"]["bias"], optax.MaskedNode)


def test_lenet5_admm_setting_keeps_6050_weights_for_71x():
  shapes = {"conv1": (5, 5, 1, 20), "conv2": (5, 5, 20, 50), "fc1": (800, 500), "fc2": (500, 10)}
  params = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
  setting = baselines.LENET5_ADMM_SETTING
  assert tuple(sorted(shapes)) == setting.layers  # tree order = layer order
  counts = baselines.layer_keep_counts_from_density(params, setting.densities)
  assert [counts[n] for n in setting.layers] == [100, 2000, 3600, 350]
  assert 430_500 / 6050 == pytest.approx(setting.compression, rel=1e-3)


def test_admm_functions_reject_keep_counts_that_do_not_fit_the_params(rng, params_factory):
  params = params_factory(rng)
  with pytest.raises(ValueError, match="keep_counts"):
    baselines.admm_init(params, {"conv": {"kernel": 3}})
  bad = _keep_counts(params)
  bad["conv"]["kernel"] = 73
  with pytest.raises(ValueError, match=r"keep_counts at \['conv'\]\['kernel'\]"):
    baselines.admm_project(params, bad)


@pytest.mark.parametrize(
  "kwargs,error,message",
  [
    (dict(rho=-1.0), ValueError, "rho must be finite and >= 0, got -1.0"),
    (dict(rho=math.inf), ValueError, "rho must be finite and >= 0, got inf"),
    (dict(rho="1e-4"), TypeError, "rho must be a number >= 0, got '1e-4'"),
    (dict(rho_growth=0.5), ValueError, "rho_growth must be finite and >= 1, got 0.5"),
    (dict(rho_growth=None), TypeError, "rho_growth must be a number >= 1, got None"),
    (dict(steps_per_iteration=0), ValueError, "steps_per_iteration must be a positive int, got 0"),
    (dict(steps_per_iteration=2.0), TypeError, "steps_per_iteration must be a positive int"),
    (dict(steps_per_iteration=True), TypeError, "steps_per_iteration must be a positive int"),
  ],
  ids=[
    "negative_rho",
    "inf_rho",
    "string_rho",
    "small_growth",
    "none_growth",
    "zero_steps",
    "float_steps",
    "bool_steps",
  ],
)
def test_add_admm_penalty_rejects_bad_hyperparameters_when_built(kwargs, error, message):
  args = dict(rho=1e-4, rho_growth=1.0, steps_per_iteration=10) | kwargs
  rho = args.pop("rho")
  with pytest.raises(error) as info:
    baselines.add_admm_penalty(rho, {"w": 1}, **args)
  assert message in str(info.value)


# ----------------------------------------------------------------------------
# Lottery tickets (Frankle & Carbin 2019, protocol of Ding et al.).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("compression", [4.0])  # the C of the other tests: one compile
def test_ticket_is_the_global_top_q_of_trained_weights_applied_to_the_init(
  rng, params_factory, use_jit, compression
):
  init = params_factory(rng)
  trained = params_factory(rng)
  mask = _maybe_jit(lambda p: baselines.ticket_mask(p, compression), use_jit)(trained)
  ticket = baselines.apply_ticket(init, mask)
  want = _numpy_global_topk(_pooled(trained), int(POOL_SIZE / compression))
  for got_m, got_t, m, w0 in zip(_pooled(mask), _pooled(ticket), want, _pooled(init)):
    np.testing.assert_array_equal(got_m.astype(bool), m)
    np.testing.assert_array_equal(got_t, np.where(m, w0, 0.0))
  np.testing.assert_array_equal(ticket["conv"]["bias"], init["conv"]["bias"])
  # Retraining the ticket with keep_masked leaves its pruned weights at 0.
  opt = optax.chain(optax.sgd(0.1, momentum=0.9), baselines.keep_masked(mask))
  state = opt.init(ticket)
  for _ in range(3):
    ticket, state = _apply(opt, ticket, params_factory(rng), state)
  for got, m in zip(_pooled(ticket), want):
    assert np.all(got[~m] == 0.0)

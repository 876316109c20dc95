"""Channel GSM and N:M GSM against NumPy references written here.

Channel rule: S_j = sum over channel j of |g * w|, t = sort(S)[-Q] over all
pooled channels, Q = int(#channels / C), B_j = (S_j >= t) & (S_j > 0).
N:M rule: in each group of M along the axis, the N entries first in a stable
sort of -|g * w| are active. Both followed by

    z <- beta z + eta w + B g  on the pool,   z <- beta z + g  off the pool
    w <- w - alpha z

in float32, in optax's order (decay, trace, scale, apply).
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import gsm_optax

LR, BETA, ETA = 0.05, 0.9, 0.05
STEPS = 120
SHAPES = {"conv": {"kernel": (3, 3, 8, 4), "bias": (4,)}, "dense": {"kernel": (8, 6)}}
POOLED = (("conv", "kernel"), ("dense", "kernel"))  # the default pool, tree order


def _params(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {
    layer: {name: rng.normal(size=shape).astype(np.float32) for name, shape in leaves.items()}
    for layer, leaves in SHAPES.items()
  }


def _pooled(tree) -> list[np.ndarray]:
  return [np.asarray(tree[layer][name]) for layer, name in POOLED]


def _others(a: np.ndarray, axis: int) -> tuple[int, ...]:
  return tuple(i for i in range(a.ndim) if i != axis % a.ndim)


# ----------------------------------------------------------------------------
# References.
# ----------------------------------------------------------------------------


def ref_channel_scores(tensors, axis: int = -1, how: str = "sum") -> list[np.ndarray]:
  """Per tensor, the sum (or mean) of |x| over each channel along axis."""
  sums = [np.abs(x).sum(axis=_others(x, axis)) for x in tensors]
  return sums if how == "sum" else [s / (x.size // s.size) for s, x in zip(sums, tensors)]


def ref_channel_mask(grads, weights, keep: int, axis: int = -1, how: str = "sum") -> list:
  """Per pooled leaf, the bool mask of its active channels (a vector)."""
  scores = ref_channel_scores([g * w for g, w in zip(grads, weights)], axis, how)
  flat = np.concatenate(scores)
  threshold = np.sort(flat)[-keep]
  keep_all = keep == flat.size
  return [(s >= threshold) & ((s > 0) | keep_all) for s in scores]


def ref_nm_mask(score: np.ndarray, n: int, m: int, axis: int = -2) -> np.ndarray:
  """Rank < n in each group of m along axis, ranks from a stable argsort of -score."""
  s = np.moveaxis(score, axis, -1)
  groups = s.reshape(*s.shape[:-1], -1, m)
  order = np.argsort(-groups, axis=-1, kind="stable")
  rank = np.argsort(order, axis=-1, kind="stable")
  return np.moveaxis((rank < n).reshape(s.shape), -1, axis)


def _along(vector: np.ndarray, ndim: int, axis: int) -> np.ndarray:
  shape = [1] * ndim
  shape[axis] = -1
  return vector.reshape(shape)


def ref_gsm_step(params: dict, trace: dict, target: dict, masks: dict):
  """One GSM step in float32; `masks` holds a full-shape bool mask per pooled leaf."""
  new_params, new_trace = {}, {}
  for layer, leaves in params.items():
    new_params[layer], new_trace[layer] = {}, {}
    for name, w in leaves.items():
      g = w - target[layer][name]
      if (layer, name) in masks:
        g = np.where(masks[layer, name], g, np.float32(0)) + np.float32(ETA) * w
      z = g + np.float32(BETA) * trace[layer][name]
      new_trace[layer][name] = z
      new_params[layer][name] = w + np.float32(-LR) * z
  return new_params, new_trace


def _grads(params, target) -> dict:
  return jax.tree.map(lambda w, t: np.asarray(w) - t, params, target)


def _maybe_jit(fn, use_jit: bool):
  return jax.jit(fn) if use_jit else fn


def _run(opt, mask_transform, ref_masks, use_jit: bool):
  """Runs `opt` and the NumPy reference for STEPS steps; checks the mask of
  every step exactly (on the library's weights) and returns both weights."""
  params, target = _params(0), _params(1)
  ref_params, ref_trace = params, jax.tree.map(np.zeros_like, params)
  state, mask_state = opt.init(params), mask_transform.init(params)
  update = _maybe_jit(opt.update, use_jit)
  mask_update = _maybe_jit(mask_transform.update, use_jit)
  for _ in range(STEPS):
    grads = _grads(params, target)
    masked, mask_state = mask_update(grads, mask_state, params)
    for (layer, name), b in zip(POOLED, ref_masks(_pooled(grads), _pooled(params))):
      expected = np.where(b, grads[layer][name], 0)
      np.testing.assert_array_equal(np.asarray(masked[layer][name]), expected)
    np.testing.assert_array_equal(masked["conv"]["bias"], grads["conv"]["bias"])
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    ref_grads = _grads(ref_params, target)
    full = dict(zip(POOLED, ref_masks(_pooled(ref_grads), _pooled(ref_params))))
    ref_params, ref_trace = ref_gsm_step(ref_params, ref_trace, target, full)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6),
    params,
    ref_params,
  )
  return params, mask_state


# ----------------------------------------------------------------------------
# Channel GSM.
# ----------------------------------------------------------------------------

COMPRESSION = 2.5  # 10 pooled channels (4 + 6): Q = 4


@pytest.mark.parametrize("how", ["sum", "mean"])
@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
def test_gsm_channels_matches_reference(use_jit, how):
  def masks(grads, weights):
    vectors = ref_channel_mask(grads, weights, keep=4, how=how)
    return [np.broadcast_to(_along(v, w.ndim, -1), w.shape) for v, w in zip(vectors, weights)]

  opt = gsm_optax.gsm_channels(LR, COMPRESSION, momentum=BETA, weight_decay=ETA, channel_score=how)
  mask = gsm_optax.mask_by_global_channel_taylor(COMPRESSION, channel_score=how)
  params, state = _run(opt, mask, masks, use_jit)
  assert int(state.keep) == 4 and int(state.num_active) == 4 and int(state.count) == STEPS

  # The final cut: exactly Q channels, those of greatest sum (mean) |w|.
  pruned = gsm_optax.prune_channels(params, COMPRESSION, channel_score=how)
  scores = np.concatenate(ref_channel_scores(_pooled(params), -1, how))
  kept = np.zeros(10, bool)
  kept[np.argsort(-scores, kind="stable")[:4]] = True
  alive = np.concatenate([np.any(w != 0, axis=_others(w, -1)) for w in _pooled(pruned)])
  np.testing.assert_array_equal(alive, kept)
  np.testing.assert_array_equal(pruned["conv"]["bias"], params["conv"]["bias"])

  report = gsm_optax.channel_report(pruned)
  assert [r.channels for r in report.rows] == [4, 6]
  assert [r.channels_kept for r in report.rows] == [int(kept[:4].sum()), int(kept[4:].sum())]
  nonzeros = sum(int(np.count_nonzero(w)) for w in _pooled(pruned))
  assert report.total_nonzeros == nonzeros and report.total_size == 336
  assert report.channel_compression == 2.5
  assert report.compression == pytest.approx(336 / nonzeros)
  assert "channel compression 2.50x (10 / 4)" in str(report)


def test_channel_mask_ties_zeros_and_nan():
  params = {"a": np.ones((2, 3), np.float32), "b": np.ones((4, 2), np.float32)}
  grads = {
    "a": np.array([[1, 2, 0], [1, 2, 0]], np.float32),  # scores 2, 4, 0
    "b": np.array([[1, np.nan], [1, 0], [0, 0], [0, 0]], np.float32),  # scores 2, nan
  }
  mask = gsm_optax.mask_by_global_channel_taylor(5 / 2)  # 5 channels: Q = 2
  out, state = mask.update(grads, mask.init(params), params)
  # t = 2 (NaN ranks as 0): the three channels scoring >= 2 are active.
  assert int(state.num_active) == 3 and float(state.threshold) == 2.0
  np.testing.assert_array_equal(out["a"], grads["a"])
  np.testing.assert_array_equal(out["b"], np.array([[1, 0], [1, 0], [0, 0], [0, 0]]))
  mask = gsm_optax.mask_by_global_channel_taylor(1.0)  # C = 1: all but NaN
  out, state = mask.update(grads, mask.init(params), params)
  assert int(state.num_active) == 4
  mask = gsm_optax.mask_by_global_channel_taylor(lambda step: 1.0 + 4.0 * step)  # a schedule
  state = mask.init(params)
  keeps = []
  for _ in range(3):
    _, state = mask.update(grads, state, params)
    keeps.append(int(state.keep))
  assert keeps == [5, 1, 1] and int(state.num_invalid_compression) == 1  # C = 9 > 5 clamped


def test_channel_axis_pytree_and_chain():
  params = _params(2)
  grads = _grads(params, _params(3))
  axes = {"conv": {"kernel": 2, "bias": 0}, "dense": {"kernel": 0}}  # 8 + 8 channels
  mask = gsm_optax.mask_by_global_channel_taylor(4.0, channel_axis=lambda p: axes)
  opt = optax.chain(optax.scale(2.0), mask)
  out, state = jax.jit(opt.update)(grads, opt.init(params), params)
  weights = _pooled(params)
  scores = [
    np.abs(2 * g * w).sum(axis=_others(w, a)) for g, w, a in zip(_pooled(grads), weights, (2, 0))
  ]
  threshold = np.sort(np.concatenate(scores))[-4]
  for (layer, name), s, w, a in zip(POOLED, scores, weights, (2, 0)):
    b = _along(s >= threshold, w.ndim, a)
    np.testing.assert_array_equal(out[layer][name], np.where(b, 2 * grads[layer][name], 0))
  assert int(state[1].num_active) == 4


def test_global_channel_mask_breaks_ties_by_pool_order():
  params = {"a": np.ones((2, 3), np.float32), "b": np.ones((2, 3), np.float32)}
  mask = gsm_optax.global_channel_mask(params, 2.0)  # 6 equal channels, keep 3
  np.testing.assert_array_equal(mask["a"], np.ones((2, 3), bool))
  np.testing.assert_array_equal(mask["b"], np.zeros((2, 3), bool))


# ----------------------------------------------------------------------------
# N:M GSM.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_gsm_nm_matches_reference(n, m, use_jit):
  def masks(grads, weights):
    return [ref_nm_mask(np.abs(g * w), n, m) for g, w in zip(grads, weights)]

  opt = gsm_optax.gsm_nm(LR, n, m, momentum=BETA, weight_decay=ETA)
  params, state = _run(opt, gsm_optax.mask_by_nm_taylor(n, m), masks, use_jit)
  assert int(state.num_active) == 336 * n // m

  pruned = gsm_optax.prune_nm(params, n, m)
  for w, p in zip(_pooled(params), _pooled(pruned)):
    np.testing.assert_array_equal(p, np.where(ref_nm_mask(np.abs(w), n, m), w, 0))
    per_group = np.count_nonzero(np.moveaxis(p, -2, -1).reshape(-1, m), axis=-1)
    np.testing.assert_array_equal(per_group, n)
  np.testing.assert_array_equal(pruned["conv"]["bias"], params["conv"]["bias"])

  report = gsm_optax.nm_report(pruned, n, m)
  assert report.conforms and [r.groups for r in report.rows] == [288 // m, 48 // m]
  assert [r.nonzeros for r in report.rows] == [288 * n // m, 48 * n // m]
  dense = gsm_optax.nm_report(params, n, m)
  over = [
    int(np.sum(np.count_nonzero(np.moveaxis(w, -2, -1).reshape(-1, m), axis=-1) > n))
    for w in _pooled(params)
  ]
  assert [r.groups_over for r in dense.rows] == over
  assert dense.conforms == (n == m or sum(over) == 0)
  assert f"{n}:{m} sparsity: the pool conforms" in str(report)


def test_nm_ties_go_to_the_lower_index():
  params = {"k": np.ones((8, 2), np.float32)}
  mask = gsm_optax.nm_mask(params, 2, 4)
  expected = np.array([1, 1, 0, 0, 1, 1, 0, 0], bool)[:, None].repeat(2, axis=1)
  np.testing.assert_array_equal(mask["k"], expected)
  weights = {"k": np.array([[0], [1], [1], [0]], np.float32).repeat(2, axis=1)}
  grads = {"k": np.array([[5], [np.nan], [3], [7]], np.float32).repeat(2, axis=1)}
  transform = gsm_optax.mask_by_nm_taylor(2, 4)
  out, state = transform.update(grads, transform.init(weights), weights)
  # Scores 0, NaN, 3, 0: 3 first, then the first 0; NaN last.
  np.testing.assert_array_equal(out["k"][:, 0], [5, 0, 3, 0])
  assert int(state.num_active) == 4


# ----------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------


def test_bad_input_raises():
  params = _params(0)
  with pytest.raises(ValueError, match=r"integers 1 <= n <= m, got n=5, m=4"):
    gsm_optax.mask_by_nm_taylor(5, 4)
  with pytest.raises(ValueError, match=r"integers 1 <= n <= m, got n=0, m=4"):
    gsm_optax.gsm_nm(0.1, 0, 4)
  with pytest.raises(ValueError, match=r"m=3 does not divide the size 8 .*\['conv'\]\['kernel'\]"):
    gsm_optax.mask_by_nm_taylor(1, 3).init(params)
  with pytest.raises(
    ValueError, match=r"axis=-3 does not exist .*\['dense'\]\['kernel'\] of shape \(8, 6\).*-2\.\.1"
  ):
    gsm_optax.gsm_nm(0.1, 2, 4, axis=-3).init(params)
  with pytest.raises(ValueError, match=r"channel_axis=2 does not exist .*\['dense'\]\['kernel'\]"):
    gsm_optax.gsm_channels(0.1, 2.0, channel_axis=2).init(params)
  with pytest.raises(ValueError, match=r"compression must be finite and >= 1"):
    gsm_optax.gsm_channels(0.1, 0.5)
  with pytest.raises(ValueError, match=r"channel_score='max': use 'sum' .* or 'mean'"):
    gsm_optax.gsm_channels(0.1, 2.0, channel_score="max")
  with pytest.raises(ValueError, match=r"channel_score='l2': use 'sum'"):
    gsm_optax.prune_channels(params, 2.0, channel_score="l2")
  with pytest.raises(ValueError, match=r"keeps Q = int\(10 / 11.0\) = 0 of 10 pooled channels"):
    gsm_optax.mask_by_global_channel_taylor(11.0).init(params)
  with pytest.raises(ValueError, match=r"keeps Q = int\(10 / 11.0\) = 0 of 10 pooled channels"):
    gsm_optax.prune_channels(params, 11)
  with pytest.raises(ValueError, match=r"m=3 does not divide"):
    gsm_optax.nm_report(params, 1, 3)


def test_inject_hyperparams_needs_static_shape_args():
  params = _params(0)
  opt = optax.inject_hyperparams(gsm_optax.gsm_channels, static_args=("channel_axis",))(
    learning_rate=LR, compression=COMPRESSION
  )
  _, state = jax.jit(opt.update)(params, opt.init(params), params)
  assert int(state.inner_state[0].keep) == 4
  opt = optax.inject_hyperparams(gsm_optax.gsm_channels)(learning_rate=LR, compression=2.5)
  with pytest.raises(ValueError, match=r"static_args=\('channel_axis',\)"):
    jax.jit(opt.update)(params, opt.init(params), params)
  opt = optax.inject_hyperparams(gsm_optax.gsm_nm, static_args=("axis",))(LR, 2, 4)
  with pytest.raises(ValueError, match=r"static_args=\('n',\)"):
    jax.jit(opt.update)(params, opt.init(params), params)
  opt = optax.inject_hyperparams(gsm_optax.gsm_nm, static_args=("n", "m", "axis"))(LR, 2, 4)
  _, state = jax.jit(opt.update)(params, opt.init(params), params)
  assert int(state.inner_state[0].num_active) == 168


def test_stats_find_the_mask_state_in_any_nesting():
  params = _params(0)
  grads = _grads(params, _params(1))
  opt = optax.chain(optax.identity(), gsm_optax.gsm_channels(LR, COMPRESSION))
  state = opt.update(grads, opt.init(params), params)[1]
  stats = gsm_optax.channel_stats(state)
  assert (int(stats["step"]), int(stats["keep"]), int(stats["num_active"])) == (1, 4, 4)
  nm = optax.inject_hyperparams(gsm_optax.gsm_nm, static_args=("n", "m"))(LR, n=2, m=4)
  nm_state = nm.update(grads, nm.init(params), params)[1]
  assert int(gsm_optax.nm_stats(nm_state)["num_active"]) == (3 * 3 * 8 * 4 + 8 * 6) // 2
  with pytest.raises(
    ValueError, match="channel_stats expects exactly one MaskByGlobalChannelTaylorState .* found 0"
  ):
    gsm_optax.channel_stats(optax.sgd(0.1).init(params))
  with pytest.raises(ValueError, match="nm_stats expects exactly one MaskByNMTaylorState"):
    gsm_optax.nm_stats(state)

"""global_kth_largest against NumPy sorting: every k, every supported dtype.

The reference is always ``np.sort(np.concatenate([leaf.ravel() ...]))[-k]``
computed in float32 (every float16/bfloat16 value is exact in float32).
"""

from __future__ import annotations

import math

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsm_optax
from gsm_optax import selection

DTYPES = [np.float32, jnp.bfloat16, np.float16]
DTYPE_IDS = ["float32", "bfloat16", "float16"]

# Under jit, one compiled program checks several trees at once, each with its
# own traced k: XLA:CPU compiles slowly, and a program per tree would dominate
# the time of this file.
_jit_kth_many = jax.jit(
    lambda trees, ks: [gsm_optax.global_kth_largest(t, k)
                       for t, k in zip(trees, ks)])

# Small leaf shapes, shared by the tests below so that compiled primitives are
# reused: XLA compiles every new shape anew, which dominates the test time.
_SHAPES = [(1,), (3,), (2, 2)]


def _numpy_descending(tree) -> np.ndarray:
  """The reference: all values in float32, sorted descending (NaN first)."""
  flat = np.concatenate(
      [np.asarray(leaf, np.float32).ravel() for leaf in jax.tree.leaves(tree)])
  return np.sort(flat)[::-1]  # np.sort puts NaN last: [::-1][k-1] == [-k]


def _assert_every_k_matches_numpy(trees, use_jit: bool, dtypes) -> None:
  """global_kth_largest(tree, k) == NumPy's for every tree and every k."""
  expected = [_numpy_descending(tree) for tree in trees]
  for k in range(1, max(e.size for e in expected) + 1):
    ks = [min(k, e.size) for e in expected]
    if use_jit:
      got = _jit_kth_many(trees, ks)
    else:
      got = [gsm_optax.global_kth_largest(tree, k)
             for tree, k in zip(trees, ks)]
    for g, e, k_tree, dtype in zip(got, expected, ks, dtypes):
      assert g.shape == ()
      assert g.dtype == dtype
      np.testing.assert_array_equal(  # NaN == NaN and 0.0 == -0.0 here
          np.asarray(g, np.float32), e[k_tree - 1],
          err_msg=f"k={k_tree} dtype={np.dtype(dtype).name}")


def _special_tree(dtype):
  """Ties, +-0, negatives, single-element leaves, +-inf and NaN, nested; plus
  values that share the high 16 bits of their float32 key (1.0 and its
  neighbours), so that the second radix pass decides between them."""
  one = np.float32(1.0)
  return {
      "a": np.array([[1.5, -2.0], [1.5, 0.0]], np.float32).astype(dtype),
      "b": np.array([-0.0], np.float32).astype(dtype),
      "nested": {
          "c": np.array([np.inf, -np.inf, 1.5], np.float32).astype(dtype),
          "d": np.array([np.nan, -2.0, 3.25], np.float32).astype(dtype),
          "e": np.array([1.0], np.float32).astype(dtype),
      },
      "close": np.array([[1.0, np.nextafter(one, np.float32(2))],
                         [np.float32(1.0 + 2.0 ** -10),
                          np.nextafter(one, np.float32(0))]],
                        np.float32).astype(dtype),
      "ties": np.array([1.0 + 2.0 ** -7, 0.0, -1.0], np.float32).astype(dtype),
  }


def _large_random_tree():
  # Random normals over a few hundred elements: many keys share their high
  # 16 bits, so the second radix pass decides.
  rng = np.random.default_rng(1)
  return {"kernel": jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32),
          "dense": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32),
          "bias": jnp.asarray(rng.standard_normal((6,)), jnp.float32)}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kth_largest_equals_numpy_sort_for_every_k_with_ties_and_special_values(
    dtype):
  tree = jax.tree.map(jnp.asarray, _special_tree(dtype))
  _assert_every_k_matches_numpy([tree], False, [dtype])


def test_kth_largest_under_jit_equals_numpy_sort_for_every_k_and_dtype():
  # One program: the special-value tree in each dtype, plus a larger tree of
  # random float32 normals; every k of each (k is traced).
  trees = [jax.tree.map(jnp.asarray, _special_tree(d)) for d in DTYPES]
  trees.append(_large_random_tree())
  _assert_every_k_matches_numpy(trees, True, DTYPES + [np.float32])


def test_kth_largest_of_mixed_half_precision_leaves_is_float32():
  tree = [jnp.asarray([1.0], jnp.bfloat16),
          jnp.asarray([2.0, -1.0, 3.0], jnp.float16)]
  got = gsm_optax.global_kth_largest(tree, 2)
  assert got.dtype == jnp.float32
  assert float(got) == 2.0
  assert float(gsm_optax.global_kth_largest(tree, 3)) == 1.0


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16],
                         ids=["float32", "bfloat16"])
def test_kth_largest_orders_subnormals_like_numpy(dtype):
  # np.sort orders subnormals (float32/bfloat16: 1e-45 .. 1.2e-38) between 0
  # and the normal numbers. (float16 subnormals are normal in float32.)
  values = np.array([1e-39, 0.0, -1e-39, 5e-40, -3e-39, 1.0, -0.0],
                    np.float32).astype(dtype)
  tree = [jnp.asarray(values[:3]), jnp.asarray(values[3:].reshape(2, 2))]
  expected = _numpy_descending(tree)
  got = np.array([gsm_optax.global_kth_largest(tree, k)
                  for k in range(1, values.size + 1)], np.float32)
  np.testing.assert_array_equal(got, expected)


# ----------------------------------------------------------------------------
# Property test: random lists of small arrays, values with many duplicates.
# ----------------------------------------------------------------------------

_SPECIAL_VALUES = [0.0, -0.0, 1.0, -1.0, 1.5, -2.0, 65504.0, 3e38, -3e38,
                   float(np.nextafter(np.float32(1), np.float32(2))),
                   math.inf, -math.inf, math.nan]


@st.composite
def _trees(draw):
  dtype_index = draw(st.integers(0, len(DTYPES) - 1))
  shapes = draw(st.lists(st.sampled_from(_SHAPES), min_size=1, max_size=3))
  # A small per-example pool of values, drawn from again: duplicates are common.
  value = st.one_of(st.sampled_from(_SPECIAL_VALUES),
                    st.floats(width=32, allow_subnormal=False))
  pool = draw(st.lists(value, min_size=1, max_size=6))
  leaves = []
  for shape in shapes:
    values = draw(st.lists(st.sampled_from(pool), min_size=math.prod(shape),
                           max_size=math.prod(shape)))
    with np.errstate(over="ignore"):  # 3e38 -> inf in float16
      leaf = np.asarray(values, np.float32).reshape(shape).astype(
          DTYPES[dtype_index])
    leaves.append(jnp.asarray(leaf))
  return DTYPES[dtype_index], leaves


@hypothesis.settings(max_examples=20, deadline=None, database=None,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(_trees())
def test_kth_largest_property_equals_numpy_sort(dtype_and_leaves):
  dtype, leaves = dtype_and_leaves
  _assert_every_k_matches_numpy([leaves], False, [dtype])


# ----------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, -1, 20])
@pytest.mark.parametrize("static_jit", [False, True], ids=["nojit", "jit_static_k"])
def test_kth_largest_rejects_k_out_of_range(k, static_jit):
  tree = jax.tree.map(jnp.asarray, _special_tree(np.float32))  # 19 elements
  fn = gsm_optax.global_kth_largest
  if static_jit:
    fn = jax.jit(fn, static_argnums=1)
  with pytest.raises(ValueError, match=r"k must be in \[1, 19\]"):
    fn(tree, k)


@pytest.mark.parametrize("tree", [{}, [], (), {"a": {}}], ids=str)
def test_kth_largest_rejects_an_empty_tree(tree):
  with pytest.raises(ValueError, match="at least one leaf"):
    gsm_optax.global_kth_largest(tree, 1)


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.uint32, np.bool_],
                         ids=["int32", "int8", "uint32", "bool"])
def test_kth_largest_rejects_non_float_leaves(dtype):
  tree = {"w": jnp.ones((2, 2), np.float32), "steps": jnp.zeros((3,), dtype)}
  with pytest.raises(TypeError, match=f"dtype {np.dtype(dtype).name}"):
    gsm_optax.global_kth_largest(tree, 1)


# ----------------------------------------------------------------------------
# The GSM score selection (transform.py uses it): the sampled bracket path.
#
# Pools of 2^22 weights or more first bracket the k-th score from a strided
# 1/16 sample, then count exactly; a missed bracket falls back to the radix
# select. The size limit is lowered here so that small pools take that path.
# ----------------------------------------------------------------------------


def _numpy_score_selection(scores, k):
  flat = np.concatenate([np.asarray(s, np.float32).ravel() for s in scores])
  threshold = np.sort(np.where(np.isnan(flat), np.float32(0), flat))[-k]
  with np.errstate(invalid="ignore"):
    return dict(threshold=threshold,
                num_at_least=int(np.sum(flat >= threshold)),
                num_zero=int(np.sum(flat == 0)),
                num_nonfinite=int(np.sum(~np.isfinite(flat))))


def _score_case(name):
  rng = np.random.default_rng(21)
  big = rng.uniform(1.0, 1.02, (64, 64)).astype(np.float32)
  small = rng.uniform(1.0, 1.02, (16, 8)).astype(np.float32)
  if name == "narrow":  # within a few high 16-bit bins: the bracket holds
    pass
  elif name == "narrow_with_ties_nan_inf_zero":
    big[5, :20] = big[5, 0]  # 20 ties
    big[7, :3] = np.nan
    small[3, :5] = np.inf
    big[9, :] = 0.0
  elif name == "wide":  # spans many high bins: the bracket is too wide
    big = np.abs(rng.standard_normal((64, 64))).astype(np.float32)
  elif name == "sample_misleads":  # the sampled rows (0, 16, 32, 48) are small
    big *= 1000.0
    big[::16] /= 1000.0
  elif name == "mostly_zero":
    big[:] = 0.0
    small[:, 4:] = 0.0
  else:
    raise ValueError(name)
  return [jnp.asarray(big), jnp.asarray(small)]


_SAMPLED_SELECT = []


@pytest.fixture
def sampled_select(monkeypatch):
  """select_score_threshold, jitted, with the sampled path for every size."""
  monkeypatch.setattr(selection, "_SAMPLED_MIN_SIZE", 0)
  if not _SAMPLED_SELECT:  # a new function: no trace cached without the patch
    _SAMPLED_SELECT.append(
        jax.jit(lambda s, k: selection.select_score_threshold(s, k)))
  return _SAMPLED_SELECT[0]


@pytest.mark.parametrize("case", ["narrow", "narrow_with_ties_nan_inf_zero",
                                  "wide", "sample_misleads", "mostly_zero"])
def test_sampled_score_selection_equals_numpy_sort(case, sampled_select):
  select = sampled_select
  scores = _score_case(case)
  paths = []
  for k in [1, 3, 100, 421, 2000, 4000, 4224]:
    got = select(scores, k)
    expected = _numpy_score_selection(scores, k)
    assert float(got.threshold) == expected["threshold"], k
    assert int(got.num_at_least) == expected["num_at_least"], k
    assert int(got.num_nonfinite) == expected["num_nonfinite"], k
    if expected["threshold"] == 0:
      assert int(got.num_zero) == expected["num_zero"], k
    paths.append(bool(got.sampled))
  if case == "narrow":
    assert all(paths)  # the sampled path really ran
  if case == "sample_misleads":
    assert not paths[4]  # k = 2000: bracket missed, exact fallback


@pytest.mark.slow
def test_gsm_mask_on_a_pool_of_four_million_weights_equals_numpy():
  # The real sampled path (pool >= 2^22), through mask_by_global_taylor.
  rng = np.random.default_rng(22)
  params = {"k": rng.standard_normal((2048, 2048)).astype(np.float32),
            "c": rng.standard_normal((3, 3, 8, 16)).astype(np.float32)}
  grads = {"k": rng.standard_normal((2048, 2048)).astype(np.float32),
           "c": rng.standard_normal((3, 3, 8, 16)).astype(np.float32)}
  grads["k"][0, :7] = np.nan
  grads["k"][1, :3] = np.inf
  mask = gsm_optax.mask_by_global_taylor(25.0)
  update = jax.jit(mask.update)
  masked, state = update(jax.tree.map(jnp.asarray, grads),
                         mask.init(params), jax.tree.map(jnp.asarray, params))
  scores = {n: np.abs(grads[n] * params[n]) for n in params}
  expected = _numpy_score_selection(list(scores.values()),
                                    int((2048 * 2048 + 1152) / 25.0))
  stats = gsm_optax.gsm_stats(state)
  assert float(stats["threshold"]) == expected["threshold"]
  assert int(stats["num_active"]) == expected["num_at_least"]
  assert int(stats["num_nonfinite"]) == 10
  for n in params:
    with np.errstate(invalid="ignore"):
      np.testing.assert_array_equal(
          masked[n], np.where(scores[n] >= expected["threshold"], grads[n], 0))

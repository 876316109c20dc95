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
  lambda trees, ks: [gsm_optax.global_kth_largest(t, k) for t, k in zip(trees, ks)]
)

# Small leaf shapes, shared by the tests below so that compiled primitives are
# reused: XLA compiles every new shape anew, which dominates the test time.
_SHAPES = [(1,), (3,), (2, 2)]


def _numpy_descending(tree) -> np.ndarray:
  """The reference: all values in float32, sorted descending (NaN first)."""
  flat = np.concatenate([np.asarray(leaf, np.float32).ravel() for leaf in jax.tree.leaves(tree)])
  return np.sort(flat)[::-1]  # np.sort puts NaN last: [::-1][k-1] == [-k]


def _assert_every_k_matches_numpy(trees, use_jit: bool, dtypes) -> None:
  """global_kth_largest(tree, k) == NumPy's for every tree and every k."""
  expected = [_numpy_descending(tree) for tree in trees]
  for k in range(1, max(e.size for e in expected) + 1):
    ks = [min(k, e.size) for e in expected]
    if use_jit:
      got = _jit_kth_many(trees, ks)
    else:
      got = [gsm_optax.global_kth_largest(tree, k) for tree, k in zip(trees, ks)]
    for g, e, k_tree, dtype in zip(got, expected, ks, dtypes):
      assert g.shape == ()
      assert g.dtype == dtype
      np.testing.assert_array_equal(  # NaN == NaN and 0.0 == -0.0 here
        np.asarray(g, np.float32), e[k_tree - 1], err_msg=f"k={k_tree} dtype={np.dtype(dtype).name}"
      )


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
    "close": np.array(
      [
        [1.0, np.nextafter(one, np.float32(2))],
        [np.float32(1.0 + 2.0**-10), np.nextafter(one, np.float32(0))],
      ],
      np.float32,
    ).astype(dtype),
    "ties": np.array([1.0 + 2.0**-7, 0.0, -1.0], np.float32).astype(dtype),
  }


def _large_random_tree():
  # Random normals over a few hundred elements: many keys share their high
  # 16 bits, so the second radix pass decides.
  rng = np.random.default_rng(1)
  return {
    "kernel": jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32),
    "dense": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32),
    "bias": jnp.asarray(rng.standard_normal((6,)), jnp.float32),
  }


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kth_largest_equals_numpy_sort_for_every_k_with_ties_and_special_values(dtype):
  tree = jax.tree.map(jnp.asarray, _special_tree(dtype))
  _assert_every_k_matches_numpy([tree], False, [dtype])


def test_kth_largest_under_jit_equals_numpy_sort_for_every_k_and_dtype():
  # One program: the special-value tree in each dtype, plus a larger tree of
  # random float32 normals; every k of each (k is traced).
  trees = [jax.tree.map(jnp.asarray, _special_tree(d)) for d in DTYPES]
  trees.append(_large_random_tree())
  _assert_every_k_matches_numpy(trees, True, DTYPES + [np.float32])


def test_kth_largest_of_mixed_half_precision_leaves_is_float32():
  tree = [jnp.asarray([1.0], jnp.bfloat16), jnp.asarray([2.0, -1.0, 3.0], jnp.float16)]
  got = gsm_optax.global_kth_largest(tree, 2)
  assert got.dtype == jnp.float32
  assert float(got) == 2.0
  assert float(gsm_optax.global_kth_largest(tree, 3)) == 1.0


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_kth_largest_orders_subnormals_like_numpy(dtype):
  # np.sort orders subnormals (float32/bfloat16: 1e-45 .. 1.2e-38) between 0
  # and the normal numbers. (float16 subnormals are normal in float32.)
  values = np.array([1e-39, 0.0, -1e-39, 5e-40, -3e-39, 1.0, -0.0], np.float32).astype(dtype)
  tree = [jnp.asarray(values[:3]), jnp.asarray(values[3:].reshape(2, 2))]
  expected = _numpy_descending(tree)
  got = np.array(
    [gsm_optax.global_kth_largest(tree, k) for k in range(1, values.size + 1)], np.float32
  )
  np.testing.assert_array_equal(got, expected)


# ----------------------------------------------------------------------------
# The k-th greatest |x|: the score radix select (31-bit keys, NaN ranked as 0).
# ----------------------------------------------------------------------------


def _numpy_magnitudes_descending(tree) -> np.ndarray:
  flat = np.concatenate([np.asarray(leaf, np.float32).ravel() for leaf in jax.tree.leaves(tree)])
  magnitudes = np.abs(flat)
  return np.sort(np.where(np.isnan(magnitudes), np.float32(0), magnitudes))[::-1]


@pytest.mark.parametrize("use_jit", [False, True], ids=["nojit", "jit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kth_largest_magnitude_equals_numpy_sort_of_abs_with_nan_as_zero(dtype, use_jit):
  tree = jax.tree.map(jnp.asarray, _special_tree(dtype))  # 19 values, 1 NaN
  expected = _numpy_magnitudes_descending(tree)
  fn = gsm_optax.global_kth_largest_magnitude
  if use_jit:
    fn = jax.jit(fn)
  got = [fn(tree, k) for k in range(1, expected.size + 1)]
  for k, g in enumerate(got, start=1):
    assert g.shape == () and g.dtype == dtype
    assert float(g) == expected[k - 1], f"k={k}"
  # NaN ranks as 0: the last two ranks are the zeros (0.0 and -0.0 count) and NaN.
  assert expected[-4:].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_kth_largest_magnitude_of_random_normals_equals_the_signed_selection_of_abs():
  tree = _large_random_tree()
  magnitudes = jax.tree.map(jnp.abs, tree)
  for k in [1, 2, 17, 60, 100, 126]:
    assert float(gsm_optax.global_kth_largest_magnitude(tree, k)) == float(
      gsm_optax.global_kth_largest(magnitudes, k)
    )


@pytest.mark.parametrize("k", [0, 20])
def test_kth_largest_magnitude_rejects_k_out_of_range_and_non_float_leaves(k):
  tree = jax.tree.map(jnp.asarray, _special_tree(np.float32))
  with pytest.raises(ValueError, match=r"k must be in \[1, 19\]"):
    gsm_optax.global_kth_largest_magnitude(tree, k)
  with pytest.raises(TypeError, match="global_kth_largest_magnitude supports.*int32"):
    gsm_optax.global_kth_largest_magnitude({"w": jnp.zeros((2,), jnp.int32)}, 1)


def test_every_kth_largest_goes_through_the_one_radix_select(monkeypatch):
  # Shapes no other test uses, so that every function below is traced anew.
  calls = []
  radix_select = selection.radix_select

  def recording(keys, k, digits=selection._KEY_DIGITS, *, nan_as_zero=False):
    calls.append((tuple(digits), nan_as_zero))
    return radix_select(keys, k, digits, nan_as_zero=nan_as_zero)

  monkeypatch.setattr(selection, "radix_select", recording)
  rng = np.random.default_rng(4)

  def tree(i):  # a new shape per call: no compiled program is reused
    return {"a": jnp.asarray(rng.standard_normal((13, 11 + i)), jnp.float32)}

  score_path = ((16, 15), True)
  checks = [
    (lambda: gsm_optax.global_kth_largest(tree(0), 3), ((16, 16), False)),
    (lambda: gsm_optax.global_kth_largest_magnitude(tree(1), 3), score_path),
    (lambda: gsm_optax.global_magnitude_mask(tree(2), 3.0), score_path),
    (lambda: gsm_optax.baselines.topk_mask(tree(3), {"a": 5}), score_path),
    (lambda: gsm_optax.baselines.magnitude_prune(tree(4), 3.0, layerwise=True), score_path),
    (lambda: gsm_optax.taylor_mask(tree(5), tree(5), 3.0), score_path),
  ]
  for fn, path in checks:
    calls.clear()
    jax.block_until_ready(fn())
    assert calls == [path], calls


# ----------------------------------------------------------------------------
# Property test: random lists of small arrays, values with many duplicates.
# ----------------------------------------------------------------------------

_SPECIAL_VALUES = [
  0.0,
  -0.0,
  1.0,
  -1.0,
  1.5,
  -2.0,
  65504.0,
  3e38,
  -3e38,
  float(np.nextafter(np.float32(1), np.float32(2))),
  math.inf,
  -math.inf,
  math.nan,
]


@st.composite
def _trees(draw):
  dtype_index = draw(st.integers(0, len(DTYPES) - 1))
  shapes = draw(st.lists(st.sampled_from(_SHAPES), min_size=1, max_size=3))
  # A small per-example pool of values, drawn from again: duplicates are common.
  value = st.one_of(st.sampled_from(_SPECIAL_VALUES), st.floats(width=32, allow_subnormal=False))
  pool = draw(st.lists(value, min_size=1, max_size=6))
  leaves = []
  for shape in shapes:
    values = draw(
      st.lists(st.sampled_from(pool), min_size=math.prod(shape), max_size=math.prod(shape))
    )
    with np.errstate(over="ignore"):  # 3e38 -> inf in float16
      leaf = np.asarray(values, np.float32).reshape(shape).astype(DTYPES[dtype_index])
    leaves.append(jnp.asarray(leaf))
  return DTYPES[dtype_index], leaves


@hypothesis.settings(
  max_examples=20,
  deadline=None,
  database=None,
  suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
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


@pytest.mark.parametrize(
  "dtype", [np.int32, np.int8, np.uint32, np.bool_], ids=["int32", "int8", "uint32", "bool"]
)
def test_kth_largest_rejects_non_float_leaves(dtype):
  tree = {"w": jnp.ones((2, 2), np.float32), "steps": jnp.zeros((3,), dtype)}
  with pytest.raises(TypeError, match=f"dtype {np.dtype(dtype).name}"):
    gsm_optax.global_kth_largest(tree, 1)


# ----------------------------------------------------------------------------
# The GSM score selection (transform.py uses it) for large pools: a sampled
# bracket, then block summaries of the bracket's keys (selection.py explains).
# ----------------------------------------------------------------------------


def _numpy_score_selection(scores, k):
  flat = np.concatenate([np.asarray(s, np.float32).ravel() for s in scores])
  threshold = np.sort(np.where(np.isnan(flat), np.float32(0), flat))[-k]
  with np.errstate(invalid="ignore"):
    return dict(
      threshold=threshold,
      num_at_least=int(np.sum(flat >= threshold)),
      num_zero=int(np.sum(flat == 0)),
      num_nonfinite=int(np.sum(~np.isfinite(flat))),
    )


def _assert_selection_equals_numpy(got, scores, k):
  expected = _numpy_score_selection(scores, k)
  assert float(got.threshold) == expected["threshold"], k
  assert int(got.num_at_least) == expected["num_at_least"], k
  assert int(got.num_nonfinite) == expected["num_nonfinite"], k
  if expected["threshold"] == 0:
    assert int(got.num_zero) == expected["num_zero"], k


def _decoded_blocks(summary, values_of_block):
  """NumPy multisets of each block's values, decoded from its summary."""
  fields = [np.asarray(x) for x in summary]
  count, largest, second, smallest, total = fields
  fourth = total - largest - second - smallest
  return [
    sorted(
      v
      for v, present in zip(
        (largest[b], second[b], smallest[b], fourth[b]),
        (count[b] >= 1, count[b] >= 2, count[b] >= 3, count[b] == 4),
      )
      if present
    )
    for b in range(values_of_block)
  ]


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
def test_block_summaries_hold_up_to_four_values_exactly(use_jit):
  # Small integers, so blocks hold ties; 0 to 8 valid values per block.
  rng = np.random.default_rng(3)
  values = rng.integers(0, 6, (512, 8)).astype(np.int32)
  valid = rng.random((512, 8)) < rng.random((512, 1))
  valid[:9] = np.arange(8)[None, :] < np.arange(9)[:, None]  # counts 0..8

  def summarize(values, valid):
    _, level1 = selection._reduce_blocks((), selection._singletons(values, valid), 1)
    rest = selection._summary_in_blocks(selection._without_largest(level1))
    _, level2 = selection._reduce_blocks((), rest, 1)
    return level1, level2

  fn = jax.jit(summarize) if use_jit else summarize
  level1, level2 = fn(jnp.asarray(values), jnp.asarray(valid))
  expected = [sorted(values[b][valid[b]]) for b in range(512)]
  counts = valid.sum(axis=1)
  np.testing.assert_array_equal(level1.count, counts)
  for b, got in enumerate(_decoded_blocks(level1, 512)):
    if counts[b] <= 4:
      assert got == expected[b], b
  # Level 2: the values of 8 blocks but each block's largest.
  rest = [sorted(v for b in range(g * 8, g * 8 + 8) for v in expected[b][:-1]) for g in range(64)]
  np.testing.assert_array_equal(level2.count, [len(r) for r in rest])
  for g, got in enumerate(_decoded_blocks(level2, 64)):
    if len(rest[g]) <= 4:
      assert got == rest[g], g


_CASE_SHAPES = ((512, 448), (128, 256))  # 2^18 scores: the sample (1/16) brackets finely


def _score_case(name):
  """Pools of 2^18 scores (the sampled path is forced for every size), in
  which the sampled bracket decides some k and must fall back for others."""
  rng = np.random.default_rng(21)
  narrow = [rng.uniform(1.0, 1.02, s).astype(np.float32) for s in _CASE_SHAPES]
  spread = [np.exp2(rng.uniform(-2.0, 2.0, s)).astype(np.float32) for s in _CASE_SHAPES]
  (big, small), (spread_big, spread_small) = narrow, spread
  if name == "narrow":
    pass
  elif name == "narrow_with_ties_nan_inf_zero":
    big[7, 1:4] = np.nan  # off the sampled rows and columns
    small[3, 1:6] = np.inf
    big[9, :] = 0.0
    tie = np.sort(np.nan_to_num(np.concatenate([big.ravel(), small.ravel()]), nan=0.0))[-2000]
    for row in range(20, 40):  # 50 ties from rank 2000 on, 1 to 4 in a block of 8
      big[row, 1 : 2 + row % 4] = tie
  elif name == "wide":  # 120 octaves: 32 bins of the bracket hold a few keys
    big, small = (np.exp2(rng.uniform(-60.0, 60.0, s)).astype(np.float32) for s in _CASE_SHAPES)
  elif name == "sample_misleads":  # big's unsampled rows (all but 0, 16, ...) are 1000x larger
    big, small = spread_big * 1000.0, spread_small
    big[::16] /= 1000.0
  elif name == "mostly_zero":  # 97 % of big and all of small but 4 columns
    big[rng.random(big.shape) < 0.97] = 0.0
    small[:, 4:] = 0.0
  elif name == "odd_shapes":  # last axes not divisible by 8: padded blocks
    big, small = spread_big[:511, :445], spread_small[:, :250]
  else:
    raise ValueError(name)
  return [jnp.asarray(big), jnp.asarray(small)]


# (k the sampled bracket decides, k it must hand to the radix select), n = pool size.
_SAMPLED_DECISIONS = {
  # 2^18 keys in 5 bins: a small k's bracket is the top bin's thin part (a few %
  # of the keys, at most 4 in a block); a large k's holds whole bins (> 4 per block).
  "narrow": (lambda n: [1, 3, 100, 421, 2000], lambda n: [n // 5, n // 2, n - 200, n]),
  # The 5 infs are the top 5: the bracket ends below +inf. The ties (<= 4 per
  # block) are decided by the block summaries.
  "narrow_with_ties_nan_inf_zero": (lambda n: [100, 421, 2000, 2020], lambda n: [1, 3]),
  # The ranks around k span hundreds of bins, more than the bracket's 32.
  "wide": (lambda n: [], lambda n: [421, 2000, n // 5, n // 2]),
  # The sample sees none of the large scores: its bracket lies below them, so
  # more than k keys are above it for every k up to their number.
  "sample_misleads": (lambda n: [], lambda n: [1, 3, 100, 421, 2000, n // 5, n // 2]),
  # Past the 7,520 non-zero scores the k-th is 0, which no bracket holds.
  "mostly_zero": (lambda n: [1, 3, 100, 421, 2000], lambda n: [n // 5, n // 2, n - 200, n]),
  # Log-uniform scores, ~250 keys per bin: near either end the bracket holds a
  # few % of the keys. (In the middle it holds ~4 %, where a block of 8 or 64
  # keys may hold too many of them: the path pays off from 2^22 keys.)
  "odd_shapes": (lambda n: [1, 3, 100, 421, 2000, n - 200, n], lambda n: []),
}


_SAMPLED_SELECT = []


@pytest.fixture
def sampled_select(monkeypatch):
  """select_score_threshold, jitted, with the sampled path for every size."""
  monkeypatch.setattr(selection, "_SAMPLED_MIN_SIZE", 0)
  if not _SAMPLED_SELECT:  # a new function: no trace cached without the patch
    _SAMPLED_SELECT.append(jax.jit(lambda s, k: selection.select_score_threshold(s, k)))
  return _SAMPLED_SELECT[0]


@pytest.mark.parametrize("case", list(_SAMPLED_DECISIONS))
def test_sampled_score_selection_equals_numpy_sort(case, sampled_select):
  scores = _score_case(case)
  size = sum(s.size for s in scores)
  decided, falls_back = (ks(size) for ks in _SAMPLED_DECISIONS[case])
  for k in sorted({1, 3, 100, 421, 2000, size // 5, size // 2, size - 200, size, *decided}):
    got = sampled_select(scores, k)
    _assert_selection_equals_numpy(got, scores, k)
    if k in decided:
      assert bool(got.sampled), f"the sampled bracket should decide k = {k}"
    if k in falls_back:
      assert not bool(got.sampled), f"k = {k} should fall back to the radix select"


def _million_scores(seed: int, copies=(1, 2, 3, 4)):
  """2^20 Taylor-like scores |a * b| in two leaves, the last axis of one not
  divisible by 8. Block i of 8 (one per summary at every level) holds
  copies[i] copies of the 1/5-quantile score and nothing else of the bracket.
  """
  rng = np.random.default_rng(seed)
  a = rng.standard_normal(1 << 20, dtype=np.float32)
  b = rng.standard_normal(1 << 20, dtype=np.float32)
  flat = np.abs(a * b)
  quantile = np.sort(flat)[-(flat.size // 5)]
  for block, num in enumerate(copies):
    start = block * 8**5
    flat[start : start + 8] = 0.0
    flat[start : start + num] = quantile
  return [
    jnp.asarray(flat[: (1 << 20) - 4000].reshape(-1, 96)),
    jnp.asarray(flat[(1 << 20) - 4000 :].reshape(-1, 125)),
  ]


_MILLION_SELECT = jax.jit(lambda s, k: selection.select_score_threshold(s, k))


@pytest.mark.parametrize("seed", [0, 1])
def test_block_summary_path_decides_exactly_on_a_million_scores(seed, monkeypatch):
  # 2^20 weights is below the path's size limit (it pays off from 2^22 on
  # CPU), lowered here; the scores are those of a large pool: bracket keys
  # are sparse, and blocks with 2-4 of them are decided by their summaries.
  monkeypatch.setattr(selection, "_SAMPLED_MIN_SIZE", 1 << 20)
  scores = _million_scores(seed)
  size = 1 << 20
  for k in [size // 2, size // 5, size // 50, 1000]:
    got = _MILLION_SELECT(scores, k)
    _assert_selection_equals_numpy(got, scores, k)
    if k >= size // 50:
      assert bool(got.sampled), k  # the block summaries decided


def test_block_with_five_bracket_keys_falls_back_to_the_radix_select(monkeypatch):
  monkeypatch.setattr(selection, "_SAMPLED_MIN_SIZE", 1 << 20)
  scores = _million_scores(0, copies=(5,))
  k = (1 << 20) // 5
  got = _MILLION_SELECT(scores, k)
  _assert_selection_equals_numpy(got, scores, k)
  assert not bool(got.sampled)


@pytest.mark.slow
def test_gsm_mask_on_a_pool_of_four_million_weights_equals_numpy():
  # The real sampled path (pool >= 2^22), through mask_by_global_taylor.
  rng = np.random.default_rng(22)
  params = {
    "k": rng.standard_normal((2048, 2048)).astype(np.float32),
    "c": rng.standard_normal((3, 3, 8, 16)).astype(np.float32),
  }
  grads = {
    "k": rng.standard_normal((2048, 2048)).astype(np.float32),
    "c": rng.standard_normal((3, 3, 8, 16)).astype(np.float32),
  }
  grads["k"][0, :7] = np.nan
  grads["k"][1, :3] = np.inf
  mask = gsm_optax.mask_by_global_taylor(25.0)
  update = jax.jit(mask.update)
  masked, state = update(
    jax.tree.map(jnp.asarray, grads), mask.init(params), jax.tree.map(jnp.asarray, params)
  )
  scores = {n: np.abs(grads[n] * params[n]) for n in params}
  expected = _numpy_score_selection(list(scores.values()), int((2048 * 2048 + 1152) / 25.0))
  stats = gsm_optax.gsm_stats(state)
  assert float(stats["threshold"]) == expected["threshold"]
  assert int(stats["num_active"]) == expected["num_at_least"]
  assert int(stats["num_nonfinite"]) == 10
  for n in params:
    with np.errstate(invalid="ignore"):
      np.testing.assert_array_equal(
        masked[n], np.where(scores[n] >= expected["threshold"], grads[n], 0)
      )

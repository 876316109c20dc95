"""Exact global k-th largest selection over a pytree, without sorting.

IEEE floats map to unsigned integers whose order is the float order ("sortable
keys"), so the k-th largest value is found digit by digit with histograms
(radix select): two passes of 16-bit digits for 32-bit keys. Each pass works
leaf by leaf and only adds up the per-leaf counts, so the pytree is never
concatenated and, under SPMD, only the 65,536-bin counts cross devices.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

_DIGIT_BITS = 16
_NUM_BINS = 1 << _DIGIT_BITS
_SIGN_BIT = jnp.uint32(1 << 31)
_SUPPORTED_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


def sortable_key(x: jax.Array) -> jax.Array:
  """Maps floats to uint32 keys with key order == float order (same shape).

  -0.0 is mapped like +0.0 and every NaN like +NaN, which sorts after +inf
  (NumPy's order).
  """
  x = jnp.asarray(x).astype(jnp.float32)
  x = jnp.where(x == 0, jnp.float32(0), x)
  x = jnp.where(jnp.isnan(x), jnp.float32(jnp.nan), x)
  bits = lax.bitcast_convert_type(x, jnp.uint32)
  negative = bits >= _SIGN_BIT
  return jnp.where(negative, ~bits, bits | _SIGN_BIT)


def key_to_float(key: jax.Array) -> jax.Array:
  """Inverse of `sortable_key` (float32)."""
  bits = jnp.where(key >= _SIGN_BIT, key & ~_SIGN_BIT, ~key)
  return lax.bitcast_convert_type(bits, jnp.float32)


def _digit_histogram(keys: Sequence[jax.Array], shift: int,
                     prefix: jax.Array | None) -> jax.Array:
  """Counts of the 16-bit digit at `shift` among keys whose higher bits equal
  `prefix` (all keys when `prefix` is None), summed over leaves."""
  hist = jnp.zeros((_NUM_BINS,), jnp.int32)
  for key in keys:
    digit = ((key >> shift) & (_NUM_BINS - 1)).astype(jnp.int32)
    if prefix is not None:
      matches = (key >> (shift + _DIGIT_BITS)) == prefix
      digit = jnp.where(matches, digit, _NUM_BINS)  # out of range: dropped
    hist = hist.at[digit].add(1, mode="drop")
  return hist


def _kth_largest_bin(hist: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The bin holding the k-th largest element, and its rank inside that bin."""
  at_least = jnp.cumsum(hist[::-1])[::-1]  # at_least[d] = #elements in bins >= d
  digit = jnp.sum(at_least >= k) - 1
  above = at_least[digit] - hist[digit]
  return digit, k - above


def select_kth_largest_key(keys: Sequence[jax.Array], k: jax.Array) -> jax.Array:
  """Exact k-th largest of uint32 keys spread over several arrays (radix select).

  Two histogram passes: the high 16 bits, then the low 16 bits of the keys
  that share the high digit found first. Requires 1 <= k <= total size.
  """
  k = jnp.asarray(k, jnp.int32)
  high, rank = _kth_largest_bin(_digit_histogram(keys, _DIGIT_BITS, None), k)
  high = high.astype(jnp.uint32)
  low, _ = _kth_largest_bin(_digit_histogram(keys, 0, high), rank)
  return (high << _DIGIT_BITS) | low.astype(jnp.uint32)


def _check_leaves(leaves: Sequence[Any]) -> None:
  if not leaves:
    raise ValueError("global_kth_largest needs a pytree with at least one leaf.")
  for leaf in leaves:
    dtype = jnp.asarray(leaf).dtype
    if not any(dtype == d for d in _SUPPORTED_DTYPES):
      raise TypeError(
          f"global_kth_largest supports float16, bfloat16 and float32 leaves; "
          f"got a leaf of dtype {dtype}.")


def global_kth_largest(tree: Any, k: int | jax.Array) -> jax.Array:
  """The k-th greatest value over all leaves of `tree` (k = 1 is the maximum).

  Equals ``np.sort(np.concatenate([leaf.ravel() ...]))[-k]`` exactly, NaN
  sorting last as in NumPy, but needs no sort and no concatenation: an exact
  two-pass 16-bit radix select on the float bit patterns.

  Args:
    tree: a pytree of float16, bfloat16 or float32 arrays.
    k: rank from the top, 1 <= k <= total number of elements. A Python int is
      checked; a traced k must be in range (it is clipped).

  Returns:
    A scalar of the leaves' common dtype.
  """
  leaves = jax.tree.leaves(tree)
  _check_leaves(leaves)
  size = sum(jnp.size(leaf) for leaf in leaves)
  if isinstance(k, int) and not 1 <= k <= size:
    raise ValueError(f"k must be in [1, {size}] (the number of elements), got {k}.")
  k = jnp.clip(jnp.asarray(k, jnp.int32), 1, size)
  key = select_kth_largest_key([sortable_key(leaf) for leaf in leaves], k)
  dtype = jnp.result_type(*[jnp.asarray(leaf).dtype for leaf in leaves])
  return key_to_float(key).astype(dtype)


def kth_largest_score(scores: Sequence[jax.Array], k: jax.Array) -> jax.Array:
  """Exact k-th greatest of non-negative scores (float32), NaN ranked as 0."""
  keys = [sortable_key(jnp.where(jnp.isnan(s), jnp.float32(0), s))
          for s in scores]
  return key_to_float(select_kth_largest_key(keys, k))




# --------------------------------------------------------------------------
# Taylor-score selection for the GSM mask.
#
# Non-negative float32 scores sort like their int32 bit patterns. For large
# pools a strided sample (1/16) first gives a 16-bit high bin just below the
# answer; one full pass then histograms the keys in the 4 high bins from there
# at full resolution and counts those above. A sample that misses (rare, and
# detected exactly) falls back to the two-pass radix select.

_INF_KEY = 0x7F800000            # +inf; NaN bit patterns are greater
_SAMPLE_STRIDE = 16
_SAMPLED_MIN_SIZE = 1 << 22      # below this the two-pass radix select is as cheap
_BRACKET_BINS = 4                # high bins a bracket may span
_FINE = _BRACKET_BINS << _DIGIT_BITS
_ABOVE, _INF, _NAN = _FINE, _FINE + 1, _FINE + 2


class ScoreSelection(NamedTuple):
  """The k-th greatest score and the counts the GSM state reports."""
  threshold: jax.Array       # float32; NaN ranks as 0
  num_at_least: jax.Array    # non-NaN scores >= threshold
  num_zero: jax.Array        # scores == 0 (valid when threshold == 0)
  num_nonfinite: jax.Array   # NaN or inf scores
  sampled: jax.Array         # the sampled bracket held the answer


def _score_keys(scores: Sequence[jax.Array]) -> list[jax.Array]:
  return [lax.bitcast_convert_type(s.astype(jnp.float32), jnp.int32) for s in scores]


def _strided_sample(key: jax.Array) -> jax.Array:
  """Every 16th entry along the longest axis (keeps the other axes' layout)."""
  if key.ndim == 0:
    return key
  axis = max(range(key.ndim), key=lambda a: key.shape[a])
  return lax.slice_in_dim(key, 0, key.shape[axis], _SAMPLE_STRIDE, axis=axis)


def _sample_low_bin(keys, k, size):
  """A high bin at or just below the k-th greatest key, from a 1/16 sample."""
  samples = [_strided_sample(key) for key in keys]
  sample_size = sum(x.size for x in samples)
  clean = [jnp.where(x > _INF_KEY, 0, x) for x in samples]  # NaN ranks as 0
  hist = _digit_histogram([x.astype(jnp.uint32) for x in clean], _DIGIT_BITS, None)
  rank = jnp.clip(k.astype(jnp.float32) * (sample_size / size), 0.0, sample_size)
  spread = 6.0 * jnp.sqrt(rank * jnp.maximum(1.0 - rank / sample_size, 0.0)) + 16.0
  low_rank = jnp.clip(jnp.ceil(rank + spread), 1, sample_size).astype(jnp.int32)
  low_bin, _ = _kth_largest_bin(hist, low_rank)
  return jnp.maximum(low_bin, 0)


def _bracket_histogram(keys, base):
  """One pass: keys in [base, base + 4 * 2^16) at full resolution, plus counts
  above the bracket, of +inf and of NaN; keys below are dropped."""
  hists = []
  for key in keys:
    offset = key - base
    index = jnp.where(offset < _FINE, offset, _ABOVE)
    index = jnp.where(key == _INF_KEY, _INF, jnp.where(key > _INF_KEY, _NAN, index))
    index = jnp.where(offset < 0, _NAN + 1, index)  # out of range: dropped
    hists.append(jnp.zeros((_NAN + 1,), jnp.int32).at[index].add(1, mode="drop"))
  return functools.reduce(jnp.add, hists)


def _select_sampled(keys, k, size):
  base = _sample_low_bin(keys, k, size).astype(jnp.int32) << _DIGIT_BITS
  hist = _bracket_histogram(keys, base)
  fine = hist[:_FINE]
  above = hist[_ABOVE] + hist[_INF]
  at_least = jnp.cumsum(fine[::-1])[::-1]
  inf_is_kth = k <= hist[_INF]
  found = ((above < k) & (above + at_least[0] >= k)) | inf_is_kth
  offset = jnp.clip(jnp.sum(at_least >= k - above) - 1, 0, _FINE - 1)
  threshold_key = jnp.where(inf_is_kth, _INF_KEY, base + offset)
  selection = ScoreSelection(
      threshold=lax.bitcast_convert_type(threshold_key, jnp.float32),
      num_at_least=jnp.where(inf_is_kth, hist[_INF], above + at_least[offset]),
      num_zero=jnp.where(base == 0, fine[0], 0),
      num_nonfinite=hist[_INF] + hist[_NAN],
      sampled=jnp.asarray(True))
  return selection, found


def _select_radix(scores, keys, k):
  """Two-pass radix select with NaN ranked as 0, and the counts."""
  clean = [jnp.where(key > _INF_KEY, 0, key).astype(jnp.uint32) for key in keys]
  k = jnp.asarray(k, jnp.int32)
  high_hist = _digit_histogram(clean, _DIGIT_BITS, None)
  high, rank = _kth_largest_bin(high_hist, k)
  high = high.astype(jnp.uint32)
  low_hist = _digit_histogram(clean, 0, high)
  low, _ = _kth_largest_bin(low_hist, rank)
  threshold_key = (high << _DIGIT_BITS) | low.astype(jnp.uint32)
  above_high = jnp.sum(jnp.where(jnp.arange(_NUM_BINS) > high, high_hist, 0))
  low_at_least = jnp.sum(jnp.where(jnp.arange(_NUM_BINS) >= low, low_hist, 0))
  num_nan = sum(jnp.sum(jnp.isnan(s), dtype=jnp.int32) for s in scores)
  num_inf = sum(jnp.sum(jnp.isinf(s), dtype=jnp.int32) for s in scores)
  threshold = lax.bitcast_convert_type(threshold_key, jnp.float32)
  # NaN keys were counted as 0: remove them when the threshold is 0.
  num_at_least = above_high + low_at_least - jnp.where(threshold == 0, num_nan, 0)
  return ScoreSelection(
      threshold=threshold,
      num_at_least=num_at_least,
      num_zero=jnp.where(high == 0, low_hist[0] - num_nan, 0),
      num_nonfinite=num_nan + num_inf,
      sampled=jnp.asarray(False))


def select_score_threshold(scores: Sequence[jax.Array], k: jax.Array) -> ScoreSelection:
  """Exact k-th greatest of non-negative scores (NaN ranked as 0), and counts.

  Pools of 2^22 weights or more first bracket the answer from a 1/16 strided
  sample, so one full histogram pass usually suffices; whenever the bracket
  misses, the exact two-pass radix select runs instead (`lax.cond`). Both
  paths return the same threshold and counts.
  """
  keys = _score_keys(scores)
  size = sum(key.size for key in keys)
  k = jnp.clip(jnp.asarray(k, jnp.int32), 1, size)
  if size < _SAMPLED_MIN_SIZE:
    return _select_radix(scores, keys, k)
  sampled, found = _select_sampled(keys, k, size)
  return lax.cond(found, lambda: sampled, lambda: _select_radix(scores, keys, k))

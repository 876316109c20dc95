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
  """Maps floats to uint32 keys with key order == float order (flattened).

  -0.0 is mapped like +0.0 and every NaN like +NaN, which sorts after +inf
  (NumPy's order).
  """
  x = jnp.ravel(x).astype(jnp.float32)
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


# Bins of the one-pass windowed histogram used by `select_score_threshold`.
_WINDOW = _NUM_BINS
_BELOW, _ABOVE, _INF, _NAN = 0, _WINDOW + 1, _WINDOW + 2, _WINDOW + 3
_INF_KEY = 0x7F800000  # bit pattern of +inf; non-negative floats sort as int32


class ScoreSelection(NamedTuple):
  """Result of `select_score_threshold`."""
  threshold: jax.Array      # the k-th greatest score (float32)
  num_at_least: jax.Array   # scores >= threshold (NaN excluded)
  num_zero: jax.Array       # scores == 0
  num_nonfinite: jax.Array  # NaN or inf scores
  used_window: jax.Array    # whether the one-pass window path sufficed


def _window_histogram(keys: Sequence[jax.Array], base: jax.Array) -> jax.Array:
  """One pass: counts below/inside/above [base, base + 2^16) plus inf and NaN.

  Each leaf gets its own histogram (independent scatters run in parallel);
  they are summed at the end.
  """
  hists = []
  for key in keys:
    offset = jnp.clip(key - base, -1, _WINDOW) + 1
    index = jnp.where(key == _INF_KEY, _INF, jnp.where(key > _INF_KEY, _NAN, offset))
    hists.append(jnp.zeros((_NAN + 1,), jnp.int32).at[index].add(
        1, mode="promise_in_bounds"))
  return functools.reduce(jnp.add, hists)


def _select_in_window(keys, k, base):
  """Tries the window around `base`; returns (ScoreSelection, found)."""
  hist = _window_histogram(keys, base)
  window = hist[_BELOW + 1:_ABOVE]
  above = hist[_INF] + hist[_ABOVE]  # inf is the greatest score
  inf_is_kth = k <= hist[_INF]
  found = (above < k) & (above + jnp.sum(window) >= k)
  at_least = jnp.cumsum(window[::-1])[::-1]
  offset = jnp.sum(at_least >= k - above) - 1
  offset = jnp.clip(offset, 0, _WINDOW - 1)
  threshold_key = jnp.where(inf_is_kth, _INF_KEY, base + offset)
  num_at_least = jnp.where(inf_is_kth, hist[_INF], above + at_least[offset])
  zero_in_window = (base <= 0) & (0 < base + _WINDOW)
  num_zero = jnp.where(zero_in_window, window[jnp.clip(-base, 0, _WINDOW - 1)], 0)
  # A window that does not hold key 0 cannot count zeros; only needed when
  # the threshold itself is 0, which then lies in the window.
  result = ScoreSelection(
      threshold=lax.bitcast_convert_type(threshold_key, jnp.float32),
      num_at_least=num_at_least,
      num_zero=num_zero,
      num_nonfinite=hist[_INF] + hist[_NAN],
      used_window=jnp.asarray(True))
  return result, found | inf_is_kth


def _select_by_radix(scores, k):
  """Exact fallback: full radix select and explicit counts."""
  threshold = kth_largest_score(scores, k)
  num_at_least = sum(jnp.sum(s >= threshold, dtype=jnp.int32) for s in scores)
  num_zero = sum(jnp.sum(s == 0, dtype=jnp.int32) for s in scores)
  num_nonfinite = sum(jnp.sum(~jnp.isfinite(s), dtype=jnp.int32) for s in scores)
  return ScoreSelection(threshold, num_at_least, num_zero, num_nonfinite,
                        jnp.asarray(False))


def select_score_threshold(scores: Sequence[jax.Array], k: jax.Array,
                           hint: jax.Array) -> ScoreSelection:
  """Exact k-th greatest of non-negative scores, with NaN ranked as 0.

  One histogram pass over a window of 2^16 consecutive float values starting
  just below `hint` (the previous step's threshold: it moves slowly) finds the
  exact answer whenever it lies in that window; otherwise a full two-pass
  radix select runs (`lax.cond`). Both give the same, exact, result.
  """
  keys = [lax.bitcast_convert_type(jnp.ravel(s).astype(jnp.float32), jnp.int32)
          for s in scores]
  hint_key = lax.bitcast_convert_type(jnp.asarray(hint, jnp.float32), jnp.int32)
  base = jnp.clip(hint_key - _WINDOW // 2, 0, _INF_KEY - _WINDOW)
  windowed, found = _select_in_window(keys, jnp.asarray(k, jnp.int32), base)
  return lax.cond(found, lambda: windowed,
                  lambda: _select_by_radix(list(scores), k))

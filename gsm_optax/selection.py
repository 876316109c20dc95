"""Exact global k-th largest selection over a pytree, without sorting.

IEEE floats map to unsigned integers whose order is the float order ("sortable
keys"), so the k-th largest value is found digit by digit with histograms
(radix select): two passes of 16-bit digits for 32-bit keys. Each pass
works leaf by leaf and only adds up the per-leaf counts, so the pytree is never
concatenated and, under SPMD, only the small histograms cross devices.

`radix_select` is the one radix select: `global_kth_largest` runs it on 32-bit
keys of any float; every k-th greatest of non-negative values (GSM's Taylor
scores, |w| for `global_kth_largest_magnitude`, `global_magnitude_mask` and the
baselines' top-k masks) runs it on 31-bit keys with NaN ranked as 0.

GSM's score selection (`select_threshold`) has three exact paths, picked at
trace time by `choose_selection`: "radix", "sampled" (a sampled bracket with
the radix select as fallback) and "top_k" (the concatenated keys and
`lax.top_k`).
"""

from __future__ import annotations

from typing import Any
from typing import Callable
from typing import NamedTuple
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from gsm_optax import _checks

_SIGN_BIT = np.uint32(1 << 31)  # NumPy: importing the library must not start a backend
_INF_BITS = np.uint32(0x7F800000)
_SUPPORTED_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)
# Digit widths of the radix select, from the most significant: two passes over
# the data (65,536-bin histograms, scanned in two levels) measured faster on
# CPU than three passes with 2,048 bins, from 0.27M to 0.85M weights.
_KEY_DIGITS = (16, 16)  # 32-bit sortable keys


def sortable_key(x: jax.Array) -> jax.Array:
  """Maps floats to uint32 keys with key order == float order (same shape).

  -0.0 is mapped like +0.0 and every NaN like +NaN, which sorts after +inf
  (NumPy's order). Integer operations only: subnormals keep their order even
  where the CPU flushes them to zero in float arithmetic.
  """
  bits = lax.bitcast_convert_type(jnp.asarray(x).astype(jnp.float32), jnp.uint32)
  magnitude = bits & ~_SIGN_BIT
  bits = jnp.where(magnitude == 0, jnp.uint32(0), bits)  # -0.0
  bits = jnp.where(magnitude > _INF_BITS, jnp.uint32(0x7FC00000), bits)  # NaN
  negative = bits >= _SIGN_BIT
  return jnp.where(negative, ~bits, bits | _SIGN_BIT)


def key_to_float(key: jax.Array) -> jax.Array:
  """Inverse of `sortable_key` (float32)."""
  bits = jnp.where(key >= _SIGN_BIT, key & ~_SIGN_BIT, ~key)
  return lax.bitcast_convert_type(bits, jnp.float32)


def _histogram_add(hist: jax.Array, value: jax.Array, valid: jax.Array) -> jax.Array:
  """Adds 1 at each valid `value` (an index into `hist`)."""
  index = jnp.where(valid, value, hist.shape[0])  # out of range: dropped
  return hist.at[index].add(1, mode="drop")


def _digit_histogram(
  keys: Sequence[jax.Array], shift: int, width: int, prefix: jax.Array | None
) -> jax.Array:
  """Counts of the `width`-bit digit at `shift` among the keys whose higher
  bits equal `prefix` (all keys when `prefix` is None), summed over leaves.

  Keys keep their shapes (no reshape, so sharded leaves stay sharded); each
  leaf only adds its counts into the histogram.
  """
  num_bins = 1 << width
  hist = jnp.zeros((num_bins,), jnp.int32)
  for key in keys:
    digit = ((key >> shift) & (num_bins - 1)).astype(jnp.int32)
    matches = True if prefix is None else (key >> (shift + width)) == prefix
    hist = _histogram_add(hist, digit, matches)
  return hist


def _kth_largest_bin(hist: jax.Array, k: jax.Array):
  """(bin holding the k-th largest element, its rank in the bin, count above).

  Two levels (rows of ~sqrt(bins) bins, then one row) instead of a cumulative
  sum over every bin, which is slow on CPU for large histograms.
  """
  num_bins = hist.shape[0]
  cols = 1 << ((num_bins.bit_length() - 1) // 2)
  rows = num_bins // cols
  table = hist[: rows * cols].reshape(rows, cols)
  row_totals = jnp.sum(table, axis=1)
  rest = jnp.sum(hist[rows * cols :])  # bins past the table (the greatest)
  row_at_least = jnp.cumsum(row_totals[::-1])[::-1] + rest
  if rows * cols < num_bins:
    # k-th largest among the trailing bins: handled as a last "row".
    tail = hist[rows * cols :]
    tail_at_least = jnp.cumsum(tail[::-1])[::-1]
    in_tail = k <= rest
    tail_bin = jnp.clip(jnp.sum(tail_at_least >= k) - 1, 0, tail.shape[0] - 1)
    tail_above = tail_at_least[tail_bin] - tail[tail_bin]
  row = jnp.clip(jnp.sum(row_at_least >= k) - 1, 0, rows - 1)
  above_row = row_at_least[row] - row_totals[row]
  counts = lax.dynamic_index_in_dim(table, row, keepdims=False)
  at_least = jnp.cumsum(counts[::-1])[::-1] + above_row
  col = jnp.clip(jnp.sum(at_least >= k) - 1, 0, cols - 1)
  digit = row * cols + col
  above = at_least[col] - counts[col]
  if rows * cols < num_bins:
    digit = jnp.where(in_tail, rows * cols + tail_bin, digit)
    above = jnp.where(in_tail, tail_above, above)
  return digit, k - above, above


class RadixSelection(NamedTuple):
  """The result of `radix_select`."""

  key: jax.Array  # the k-th largest key (uint32)
  num_at_least: jax.Array  # keys >= it (with nan_as_zero, NaN keys not counted)
  digits: tuple[jax.Array, ...]  # the digit found by each pass (uint32)
  histograms: tuple[jax.Array, ...]  # each pass's digit counts, as counted


def radix_select(
  keys: Sequence[jax.Array],
  k: jax.Array,
  digits: Sequence[int] = _KEY_DIGITS,
  *,
  nan_as_zero: bool = False,
) -> RadixSelection:
  """Exact k-th largest of unsigned keys of ``sum(digits)`` bits spread over
  several arrays: the one radix select of the library.

  One histogram pass per digit, most significant first; each pass counts only
  the keys that share the digits found so far. Requires 1 <= k <= total size.

  With `nan_as_zero`, the greatest key (all ``sum(digits)`` bits set, where
  the caller maps NaN) ranks as the key 0: it must be alone in the top bin of
  the first pass, whose count is moved to bin 0 (and into bin 0 of the later
  passes while the digits found are 0). Such keys are not in `num_at_least`.
  """
  rank = jnp.asarray(k, jnp.int32)
  prefix, above_total, shift = None, None, sum(digits)
  found, histograms = [], []
  for width in digits:
    shift -= width
    hist = _digit_histogram(keys, shift, width, prefix)
    histograms.append(hist)
    if nan_as_zero and prefix is None:
      num_nan = hist[-1]
      hist = hist.at[0].add(num_nan).at[-1].set(0)
    elif nan_as_zero:
      hist = hist.at[0].add(jnp.where(prefix == 0, num_nan, 0))
    digit, rank, above = _kth_largest_bin(hist, rank)
    above_total = above if above_total is None else above_total + above
    index = digit
    digit = digit.astype(jnp.uint32)
    found.append(digit)
    prefix = digit if prefix is None else (prefix << width) | digit
  num_at_least = above_total + hist[index]
  if nan_as_zero:
    num_at_least = num_at_least - jnp.where(prefix == 0, num_nan, 0)
  return RadixSelection(prefix, num_at_least, tuple(found), tuple(histograms))


def _check_tree(tree: Any, k: Any, name: str) -> tuple[list[Any], Any]:
  """(the leaves, their common dtype); checks the dtypes and a concrete k."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError(f"{name} needs a pytree with at least one leaf.")
  dtypes = [_checks.leaf_dtype(leaf) for leaf in leaves]
  for dtype in dtypes:
    if not any(dtype == d for d in _SUPPORTED_DTYPES):
      raise TypeError(
        f"{name} supports float16, bfloat16 and float32 leaves; got a leaf of dtype {dtype}."
      )
  _check_k(k, sum(_checks.leaf_size(leaf) for leaf in leaves))
  return leaves, jnp.result_type(*dtypes)


def _check_k(k: Any, size: int) -> None:
  """k must be an integer scalar (its dtype is known even when traced); a
  concrete k must be in [1, size]. A traced k cannot be checked."""
  dtype = getattr(k, "dtype", None)
  integer = isinstance(k, int) and not isinstance(k, bool)
  if dtype is not None:
    integer = jnp.issubdtype(dtype, jnp.integer)
  if not integer:
    kind = f"dtype {np.dtype(dtype).name}" if dtype is not None else type(k).__name__
    raise TypeError(f"k must be an integer (the rank from the top), got {k!r} ({kind}).")
  if jnp.ndim(k) != 0:
    raise ValueError(f"k must be a scalar, got shape {jnp.shape(k)}.")
  if not isinstance(k, jax.core.Tracer) and not 1 <= int(k) <= size:
    raise ValueError(f"k must be in [1, {size}] (the number of elements), got {k}.")


def global_kth_largest(tree: Any, k: int | jax.Array) -> jax.Array:
  """The k-th greatest value over all leaves of `tree` (k = 1 is the maximum).

  Equals ``np.sort(np.concatenate([leaf.ravel() ...]))[-k]`` exactly, NaN
  sorting last as in NumPy, but needs no sort and no concatenation: an exact
  two-pass 16-bit radix select on the float bit patterns.

  Args:
    tree: a pytree of float16, bfloat16 or float32 arrays.
    k: rank from the top, an integer in [1, total number of elements]: a
      Python int or an integer scalar array. A bool or a float k raises a
      TypeError, a concrete k out of range a ValueError; a traced k (under
      `jax.jit`) cannot be checked and is clipped to the range.

  Returns:
    A scalar of the leaves' common dtype.
  """
  leaves, dtype = _check_tree(tree, k, "global_kth_largest")
  return _kth_largest_value(leaves, jnp.asarray(k, jnp.int32)).astype(dtype)


@jax.jit
def _kth_largest_value(leaves: Sequence[jax.Array], k: jax.Array) -> jax.Array:
  # One compiled program (inlined when the caller is jitted): op by op, the
  # radix select would compile dozens of small XLA programs on first use.
  size = sum(jnp.size(leaf) for leaf in leaves)
  k = jnp.clip(k, 1, size)
  return key_to_float(radix_select([sortable_key(x) for x in leaves], k).key)


def global_kth_largest_magnitude(tree: Any, k: int | jax.Array) -> jax.Array:
  """The k-th greatest |x| over all leaves of `tree` (k = 1 is the greatest).

  Equals ``np.sort(np.abs(np.concatenate([leaf.ravel() ...])))[-k]`` exactly,
  with NaN ranked as 0: the radix select of GSM's Taylor scores
  (`kth_largest_score`), which `global_magnitude_mask` and the baselines' top-k
  masks use too. Prefer it to ``global_kth_largest(jnp.abs(...))`` for
  magnitudes: non-negative keys need one bit less.

  Args:
    tree: a pytree of float16, bfloat16 or float32 arrays.
    k: rank from the top, an integer in [1, total number of elements]: a
      Python int or an integer scalar array. A bool or a float k raises a
      TypeError, a concrete k out of range a ValueError; a traced k (under
      `jax.jit`) cannot be checked and is clipped to the range.

  Returns:
    A scalar of the leaves' common dtype.
  """
  leaves, dtype = _check_tree(tree, k, "global_kth_largest_magnitude")
  return kth_largest_magnitude(leaves, jnp.asarray(k, jnp.int32)).astype(dtype)


@jax.jit
def kth_largest_magnitude(leaves: Sequence[jax.Array], k: jax.Array) -> jax.Array:
  """The k-th greatest |x| of float arrays (float32; k clipped to [1, size]).

  One compiled program when called eagerly, inlined in jitted callers.
  """
  size = sum(jnp.size(leaf) for leaf in leaves)
  k = jnp.clip(k, 1, size)
  return kth_largest_score([jnp.abs(jnp.asarray(x).astype(jnp.float32)) for x in leaves], k)


def kth_largest_score(scores: Sequence[jax.Array], k: jax.Array) -> jax.Array:
  """Exact k-th greatest of scores >= 0 (e.g. from `jnp.abs`), NaN ranked as 0;
  1 <= k <= total size."""
  return _select_radix(_score_keys(scores), k).threshold


# --------------------------------------------------------------------------
# Taylor-score selection for the GSM mask.
#
# Non-negative float32 scores sort like their int32 bit patterns (31 bits).
# Pools below 2^22 weights use the two-pass radix select. On XLA:CPU each of
# its passes is a scatter over the whole pool (~4 ns per weight), so larger
# pools take a path with one cheap pass and scatters over 1/8 of the pool:
#
#   1. A strided 1/16 sample brackets the k-th greatest key in [lo, hi): the
#      sample ranks +- 6 sigma, rounded out to 2^15-key bins.
#   2. One pass over the pool counts the keys above the bracket and, per block
#      of 8 keys, summarizes those inside it as (count, largest, second
#      largest, smallest, sum): that holds up to 4 values exactly.
#   3. The blocks' largest values are histogrammed at full resolution; the
#      rarer extra values of blocks holding 2 to 4 bracket keys are summarized
#      again, 8 blocks at a time, until few are left.
#
# A bracket that misses the k-th key, that reaches 0 or +inf, or a block with
# more than 4 bracket keys is detected exactly from the counts and falls back
# to the radix select (`lax.cond`), so both paths give the same result.

_INF_KEY = 0x7F800000  # +inf; NaN bit patterns are greater
_NAN_KEY = 0x7FFFFFFF  # every NaN, in the radix select
_LOW_BITS = 15  # radix select: high 16 bits, then low 15
_SCORE_DIGITS = (31 - _LOW_BITS, _LOW_BITS)
_SAMPLE_STRIDE = 16
_SAMPLED_MIN_SIZE = 1 << 22  # below this the radix select is as cheap
_SAMPLE_BIN_BITS = 15  # the sample brackets in bins of 2^15 keys
_MAX_BRACKET = 1 << 20  # at most 32 such bins (the histogram's size)
_BLOCK = 8  # keys per block summary
_BLOCK_CAPACITY = 4  # values a block summary determines exactly
_EMPTY_LARGEST = -1
_EMPTY_SMALLEST = 2**31 - 1


class ScoreSelection(NamedTuple):
  """The k-th greatest score and the counts the GSM state reports."""

  threshold: jax.Array  # float32; NaN ranks as 0
  num_at_least: jax.Array  # non-NaN scores >= threshold
  num_zero: jax.Array  # scores == 0 (valid when threshold == 0)
  num_nonfinite: jax.Array  # NaN or inf scores
  sampled: jax.Array  # the sampled bracket held the answer


def _score_keys(scores: Sequence[jax.Array]) -> list[jax.Array]:
  return [lax.bitcast_convert_type(s.astype(jnp.float32), jnp.int32) for s in scores]


def _nan_as_zero(key: jax.Array) -> jax.Array:
  return jnp.where(key > _INF_KEY, 0, key).astype(jnp.uint32)


def _strided_sample(key: jax.Array) -> jax.Array:
  """Every 16th entry along the longest axis (keeps the other axes' layout)."""
  if key.ndim == 0:
    return key
  axis = max(range(key.ndim), key=lambda a: key.shape[a])
  return lax.slice_in_dim(key, 0, key.shape[axis], _SAMPLE_STRIDE, axis=axis)


def _sample_bracket(keys, k, size):
  """[lo, hi): keys likely to hold the k-th greatest, from a 1/16 sample."""
  samples = [_nan_as_zero(_strided_sample(key)) for key in keys]
  sample_size = sum(x.size for x in samples)
  hist = _digit_histogram(samples, _SAMPLE_BIN_BITS, 31 - _SAMPLE_BIN_BITS, None)
  rank = jnp.clip(k.astype(jnp.float32) * (sample_size / size), 0.0, sample_size)
  spread = 5.0 * jnp.sqrt(rank * jnp.maximum(1.0 - rank / sample_size, 0.0)) + 16.0

  def bin_at(sample_rank):
    sample_rank = jnp.clip(sample_rank, 1, sample_size).astype(jnp.int32)
    return _kth_largest_bin(hist, sample_rank)[0].astype(jnp.int32)

  hi = (bin_at(jnp.floor(rank - spread)) + 1) << _SAMPLE_BIN_BITS
  lo = jnp.maximum(bin_at(jnp.ceil(rank + spread)) << _SAMPLE_BIN_BITS, hi - _MAX_BRACKET)
  return lo, hi


class _BlockSummary(NamedTuple):
  """Per block: how many values, and the values' largest, second largest,
  smallest and sum (integers), which give up to 4 values exactly."""

  count: jax.Array
  largest: jax.Array
  second: jax.Array
  smallest: jax.Array
  total: jax.Array


def _merge_summaries(a, b):
  """Summary of the union of two multisets (exact while it holds <= 4)."""
  return (
    a[0] + b[0],
    jnp.maximum(a[1], b[1]),
    jnp.maximum(jnp.minimum(a[1], b[1]), jnp.maximum(a[2], b[2])),
    jnp.minimum(a[3], b[3]),
    a[4] + b[4],
  )


def _singletons(values: jax.Array, valid: jax.Array) -> _BlockSummary:
  """Each valid value as a summary of one value, the others as empty ones."""
  return _BlockSummary(
    count=valid.astype(jnp.int32),
    largest=jnp.where(valid, values, _EMPTY_LARGEST),
    second=jnp.full_like(values, _EMPTY_LARGEST),
    smallest=jnp.where(valid, values, _EMPTY_SMALLEST),
    total=jnp.where(valid, values, 0),
  )


def _reduce_blocks(sums, summary: _BlockSummary, axis: int):
  """One variadic reduction over `axis`: the sums of the arrays in `sums`,
  and the merged summaries."""
  num_sums = len(sums)
  init = tuple(
    jnp.int32(v) for v in (0,) * num_sums + (0, _EMPTY_LARGEST, _EMPTY_LARGEST, _EMPTY_SMALLEST, 0)
  )

  def reducer(a, b):
    return (
      *(x + y for x, y in zip(a[:num_sums], b[:num_sums])),
      *_merge_summaries(a[num_sums:], b[num_sums:]),
    )

  out = lax.reduce((*sums, *summary), init, reducer, (axis,))
  return out[:num_sums], _BlockSummary(*out[num_sums:])


def _fourth(summary: _BlockSummary) -> jax.Array:
  """The third largest value of a block holding exactly 4."""
  return summary.total - summary.largest - summary.second - summary.smallest


def _without_largest(summary: _BlockSummary) -> _BlockSummary:
  """Summaries of the blocks' values other than their largest (elementwise)."""
  count = summary.count
  return _BlockSummary(
    count=jnp.maximum(count - 1, 0),
    largest=jnp.where(count >= 2, summary.second, _EMPTY_LARGEST),
    second=jnp.where(
      count >= 4, _fourth(summary), jnp.where(count == 3, summary.smallest, _EMPTY_LARGEST)
    ),
    smallest=jnp.where(count >= 2, summary.smallest, _EMPTY_SMALLEST),
    total=jnp.where(count >= 2, summary.total - summary.largest, 0),
  )


def _in_blocks(x: jax.Array, block: int, fill) -> jax.Array:
  """`x` with its last axis split into (n / block, block) when divisible
  (sharded leaves stay sharded), else flattened and padded with `fill`."""
  if x.ndim >= 1 and x.shape[-1] % block == 0:
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
  flat = x.reshape(-1)
  flat = jnp.pad(flat, (0, (-flat.size) % block), constant_values=fill)
  return flat.reshape(-1, block)


def _summary_in_blocks(summary: _BlockSummary) -> _BlockSummary:
  empty = _BlockSummary(0, _EMPTY_LARGEST, _EMPTY_LARGEST, _EMPTY_SMALLEST, 0)
  return _BlockSummary(*[_in_blocks(x, _BLOCK, e) for x, e in zip(summary, empty)])


def _block_total(x: jax.Array) -> jax.Array:
  """Sum of an int32 array by blocks of 8: XLA:CPU runs a full reduction as
  one serial chain (~2 ns per element); block sums stay vectorized."""
  while x.size > 64:
    x = jnp.sum(_in_blocks(lax.optimization_barrier(x), _BLOCK, 0), axis=-1)
  return jnp.sum(x)


def _overflowing(summary: _BlockSummary) -> jax.Array:
  return (summary.count > _BLOCK_CAPACITY).astype(jnp.int32)


def _leaf_summaries(key, lo, hi):
  """One pass over a leaf's keys, by blocks of 8 keys (level 1) and of 8 such
  blocks (level 2): (level-1 summaries, level-2 summaries of the values
  other than each level-1 block's largest, packed counts per level-2 block).

  The counts are packed by 8 bits: keys in the bracket, keys above it (up to
  +inf), NaN or inf keys, and level-1 blocks holding more than 4 bracket
  keys. At level 1 they ride in the summaries' count (one operand less).
  """
  blocks = _in_blocks(key, _BLOCK, -1)  # -1: below any bracket
  inside = (blocks >= lo) & (blocks < hi)
  singletons = _singletons(blocks - lo, inside)
  packed = (
    singletons.count
    | ((blocks >= hi) & (blocks <= _INF_KEY)).astype(jnp.int32) << 8
    | (blocks >= _INF_KEY).astype(jnp.int32) << 16
  )
  _, level1 = _reduce_blocks((), singletons._replace(count=packed), blocks.ndim - 1)
  packed = level1.count
  level1 = level1._replace(count=packed & 0xFF)
  packed += _overflowing(level1) << 24
  rest = _summary_in_blocks(_without_largest(level1))
  (packed,), level2 = _reduce_blocks((_in_blocks(packed, _BLOCK, 0),), rest, rest.count.ndim - 1)
  return level1, level2, packed


def _select_sampled(keys, k, size):
  """(ScoreSelection from the sampled bracket, whether it holds the answer)."""
  lo, hi = _sample_bracket(keys, k, size)
  hist = jnp.zeros((_MAX_BRACKET,), jnp.int32)
  counts, level2 = [], []
  for key in keys:
    leaf_level1, leaf_level2, leaf_counts = _leaf_summaries(key, lo, hi)
    hist = _histogram_add(hist, leaf_level1.largest, leaf_level1.count >= 1)
    counts.append(leaf_counts.reshape(-1))
    level2.append(leaf_level2)
  counts = jnp.concatenate(counts)
  # Levels 2 and up, over all leaves at once (1/64 of the pool and less).
  summary = _BlockSummary(
    *[
      jnp.concatenate([s[i].reshape(-1) for s in level2]) for i in range(len(_BlockSummary._fields))
    ]
  )
  overflow = _block_total(counts >> 24)
  while True:
    overflow += _block_total(_overflowing(summary))
    hist = _histogram_add(hist, summary.largest, summary.count >= 1)
    if summary.count.size <= _BLOCK:
      break
    rest = _summary_in_blocks(_without_largest(summary))
    _, summary = _reduce_blocks((), rest, rest.count.ndim - 1)
  for value, valid in (
    (summary.second, summary.count >= 2),
    (summary.smallest, summary.count >= 3),
    (_fourth(summary), summary.count == 4),
  ):
    hist = _histogram_add(hist, value, valid)
  inside = _block_total(counts & 0xFF)
  above = _block_total((counts >> 8) & 0xFF)
  nonfinite = _block_total((counts >> 16) & 0xFF)
  found = (above < k) & (k <= above + inside) & (overflow == 0) & (lo > 0) & (hi <= _INF_KEY)
  offset, _, above_in_bracket = _kth_largest_bin(hist, jnp.maximum(k - above, 1))
  selection = ScoreSelection(
    threshold=lax.bitcast_convert_type(lo + offset, jnp.float32),
    num_at_least=above + above_in_bracket + hist[offset],
    num_zero=jnp.zeros([], jnp.int32),  # the threshold is > 0 here
    num_nonfinite=nonfinite,
    sampled=jnp.asarray(True),
  )
  return selection, found


def _select_radix(keys, k):
  """`radix_select` over the 31-bit score keys (high 16, low 15 bits).

  NaN keys become 0x7FFFFFFF, alone in the top high bin (and +inf alone in
  bin 0xFF00), so the first histogram also counts them; they are ranked with
  the zeros (``nan_as_zero``).
  """
  keys = [jnp.where(key > _INF_KEY, _NAN_KEY, key).astype(jnp.uint32) for key in keys]
  found = radix_select(keys, k, _SCORE_DIGITS, nan_as_zero=True)
  high_hist, low_hist = found.histograms
  num_inf, num_nan = high_hist[_INF_KEY >> _LOW_BITS], high_hist[-1]
  return ScoreSelection(
    threshold=lax.bitcast_convert_type(found.key, jnp.float32),
    num_at_least=found.num_at_least,
    num_zero=jnp.where(found.digits[0] == 0, low_hist[0], 0),
    num_nonfinite=num_inf + num_nan,
    sampled=jnp.asarray(False),
  )


def _kth_greatest_key(flat: jax.Array, k: int | jax.Array) -> jax.Array:
  """The k-th greatest of a 1D int32 array: `lax.top_k` for a static k (of
  ~x, the reversed order, when k is past the middle), a sort for a traced k."""
  size = flat.shape[0]
  if not isinstance(k, int):
    return lax.dynamic_index_in_dim(jnp.sort(flat), size - k, keepdims=False)
  if 2 * k <= size + 1:
    return lax.top_k(flat, k)[0][k - 1]
  return ~lax.top_k(~flat, size - k + 1)[0][-1]


def _count(condition: jax.Array) -> jax.Array:
  return jnp.sum(condition, dtype=jnp.int32)


def _select_top_k(keys: Sequence[jax.Array], k: int | jax.Array) -> ScoreSelection:
  """t = the k-th greatest of the concatenated score keys (NaN ranked as 0),
  and the counts of `_select_radix` by comparison with t."""
  flat = jnp.concatenate([key.reshape(-1) for key in keys])
  key = _kth_greatest_key(jnp.where(flat > _INF_KEY, 0, flat), k)
  return ScoreSelection(
    threshold=lax.bitcast_convert_type(key, jnp.float32),
    num_at_least=_count((flat >= key) & (flat <= _INF_KEY)),
    num_zero=jnp.where(key == 0, _count(flat == 0), 0),
    num_nonfinite=_count(flat >= _INF_KEY),
    sampled=jnp.asarray(False),
  )


# --------------------------------------------------------------------------
# Which path selects: chosen at trace time from the backend and the shardings.

SELECTIONS = ("auto", "radix", "sampled", "top_k")


def check_selection(selection: Any) -> str:
  """`selection` if it names a path of `SELECTIONS`; a ValueError otherwise."""
  if not isinstance(selection, str) or selection not in SELECTIONS:
    allowed = ", ".join(repr(name) for name in SELECTIONS)
    raise ValueError(f"selection must be one of {allowed}; got {selection!r}.")
  return selection


def resolve_selection(selection: str, backend: str, sharded: bool, size: int) -> str:
  """The path that runs: "auto" is, on the CPU, "radix" below 2^22 scores and
  "sampled" from there; on any other backend "radix" for a sharded pool (only
  histograms cross devices), else "top_k". Other names are kept."""
  if check_selection(selection) != "auto":
    return selection
  if backend == "cpu":
    return "radix" if size < _SAMPLED_MIN_SIZE else "sampled"
  return "radix" if sharded else "top_k"


def _split_over_devices(x: Any) -> bool:
  """Whether `x` is split over more than one device, as far as JAX tells.

  An array: its sharding is not fully replicated. A tracer: its type's mesh
  has an explicit axis of size > 1 in its spec, or an automatic axis of size
  > 1 (its split is left to XLA: counted as split). Manual axes (`pmap`,
  `shard_map`) and an empty mesh (jit of unsharded inputs) are not.
  """
  if not isinstance(x, jax.core.Tracer):
    sharding = getattr(x, "sharding", None)  # NumPy arrays have none
    return sharding is not None and not sharding.is_fully_replicated
  mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
  if mesh is None or mesh.empty:
    return False
  spec = jax.typeof(x).sharding.spec
  named = {a for entry in spec for a in (entry if isinstance(entry, tuple) else (entry,))}
  for name, kind in zip(mesh.axis_names, mesh.axis_types):
    split = kind == jax.sharding.AxisType.Auto or (
      kind == jax.sharding.AxisType.Explicit and name in named
    )
    if split and mesh.shape[name] > 1:
      return True
  return False


def is_sharded(leaves: Sequence[Any]) -> bool:
  """Whether any leaf is split over more than one device (`_split_over_devices`)."""
  return any(_split_over_devices(x) for x in leaves)


def _backend(leaves: Sequence[Any]) -> str:
  """The platform of the first concrete JAX array's devices, else JAX's default."""
  for x in leaves:
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
      return next(iter(x.devices())).platform
  return jax.default_backend()


def choose_selection(selection: str, operands: Sequence[Sequence[Any]]) -> str:
  """`resolve_selection` for the pool whose leaves are ``operands[0][i]``
  (with ``operands[j][i]`` of the same shape): their backend and shardings."""
  if check_selection(selection) != "auto":
    return selection
  leaves = [x for arrays in operands for x in arrays]
  size = sum(int(np.size(x)) for x in operands[0])
  return resolve_selection(selection, _backend(leaves), is_sharded(leaves), size)


def select_threshold(
  operands: Sequence[Sequence[jax.Array]],
  score_fn: Callable[..., jax.Array],
  k: int | jax.Array,
  selection: str = "auto",
) -> ScoreSelection:
  """Exact k-th greatest score, NaN ranked as 0, and counts, where leaf i's
  scores are ``score_fn(*(leaves[i] for leaves in operands)) >= 0``.

  `selection` (`choose_selection`; every path gives the same result):
  "radix" computes the scores inside each pass and never stores them;
  "sampled" brackets the answer from a 1/16 strided sample and summarizes the
  bracket's keys in one pass (see above), and runs the radix select instead
  whenever that cannot decide (`lax.cond`, which gets the operands rather
  than the scores); "top_k" concatenates the keys and takes the k-th greatest
  with `lax.top_k` for a Python int k, with a sort for a traced k.
  """

  def keys_of(operands):
    return _score_keys([score_fn(*leaf) for leaf in zip(*operands)])

  size = sum(leaf.size for leaf in operands[0])
  method = choose_selection(selection, operands)
  if method == "top_k":
    if isinstance(k, int):
      return _select_top_k(keys_of(operands), min(max(k, 1), size))
    return _select_top_k(keys_of(operands), jnp.clip(jnp.asarray(k, jnp.int32), 1, size))
  k = jnp.clip(jnp.asarray(k, jnp.int32), 1, size)
  if method == "radix":
    return _select_radix(keys_of(operands), k)
  sampled, found = _select_sampled(keys_of(operands), k, size)
  return lax.cond(found, lambda _: sampled, lambda ops: _select_radix(keys_of(ops), k), operands)


def select_score_threshold(
  scores: Sequence[jax.Array], k: int | jax.Array, selection: str = "auto"
) -> ScoreSelection:
  """Exact k-th greatest of non-negative scores (NaN ranked as 0), and counts."""
  return select_threshold((list(scores),), lambda score: score, k, selection)

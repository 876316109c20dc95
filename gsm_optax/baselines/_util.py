"""Shared helpers of the baselines: masks, per-leaf targets, exact top-k."""

from __future__ import annotations

import collections.abc
import math
from typing import Any
from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from gsm_optax import _checks
from gsm_optax import _pool
from gsm_optax import report as report_lib
from gsm_optax import selection


def path_name(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def floor_count(size: int, fraction: float) -> int:
  """floor(size * fraction), with the product rounded to 6 decimals first so
  that a fraction read from counts (e.g. 29 / 100) gives the count back."""
  return int(math.floor(round(size * fraction, 6)))


# ----------------------------------------------------------------------------
# Masks.


def check_mask(params: Any, mask: Any, name: str = "mask") -> Any:
  """Validates `mask` against `params` and returns it as bool arrays.

  A mask leaf is a bool array of the leaf's shape or a scalar bool (the whole
  leaf). Raises ValueError on a structure or shape mismatch and TypeError on a
  non-bool leaf, naming the argument and the leaf.
  """
  params_def = jax.tree.structure(params)
  mask_def = jax.tree.structure(mask)
  if params_def != mask_def:
    raise ValueError(
      f"{name} must have the tree structure of the params; params: "
      f"{params_def}, {name}: {mask_def}."
    )
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for (path, leaf), flag in zip(flat, jax.tree.leaves(mask)):
    if not isinstance(flag, (jax.core.Tracer, jax.ShapeDtypeStruct)):
      flag = jnp.asarray(flag)
    if flag.dtype != jnp.bool_:
      raise TypeError(f"{name} leaf at {path_name(path)} must be bool, got dtype {flag.dtype}.")
    if flag.shape not in ((), jnp.shape(leaf)):
      raise ValueError(
        f"{name} leaf at {path_name(path)} has shape {flag.shape}; expected "
        f"the param's shape {jnp.shape(leaf)} or () (the whole leaf)."
      )
    out.append(flag)
  return jax.tree.unflatten(params_def, out)


def topk_leaf_masks(magnitudes: Sequence[jax.Array], k: Any) -> list[jax.Array]:
  """Masks of exactly the k greatest magnitudes over all `magnitudes` together.

  t = the k-th greatest magnitude (`selection.kth_largest_score`, NaN ranked
  as 0); every magnitude > t is kept, and of those equal to t the first ones
  in tree then row-major order, so that exactly k are kept. A zero magnitude
  is never kept unless k covers every entry (then all are).
  `k` may be an int or a traced integer (clipped to [0, size]).

  Args:
    magnitudes: non-negative float32 arrays.
    k: how many to keep.

  Returns:
    One bool array per magnitude array, same shapes.
  """
  magnitudes = list(magnitudes)
  size = sum(int(m.size) for m in magnitudes)
  if _checks.is_number(k, integer=True):
    if k <= 0:
      return [jnp.zeros(m.shape, bool) for m in magnitudes]
    if k >= size:
      return [jnp.ones(m.shape, bool) for m in magnitudes]
  # One compiled function per layout of `magnitudes` and not per k: eager
  # callers would otherwise dispatch (and compile) the radix select op by op.
  return _topk_masks_jit(magnitudes, jnp.asarray(k, jnp.int32))


def layerwise_topk_masks(magnitudes: Sequence[jax.Array], ks: Sequence[Any]) -> list[jax.Array]:
  """`topk_leaf_masks` of every array on its own, k_i for array i, in one
  compiled call."""
  magnitudes = list(magnitudes)
  out: list[Any] = [None] * len(magnitudes)
  todo = []
  for i, (m, k) in enumerate(zip(magnitudes, ks)):
    if _checks.is_number(k, integer=True) and (k <= 0 or k >= m.size):
      out[i] = topk_leaf_masks([m], k)[0]
    else:
      todo.append(i)
  if todo:
    ks = jnp.stack([jnp.asarray(ks[i], jnp.int32) for i in todo])
    masks = _layerwise_masks_jit([magnitudes[i] for i in todo], ks)
    for i, mask in zip(todo, masks):
      out[i] = mask
  return out


def _topk_masks(magnitudes: list[jax.Array], k: jax.Array) -> list[jax.Array]:
  size = sum(int(m.size) for m in magnitudes)
  k = jnp.clip(k, 0, size)
  threshold = selection.kth_largest_score(magnitudes, jnp.maximum(k, 1))
  num_above = sum(jnp.sum(m > threshold, dtype=jnp.int32) for m in magnitudes)
  room = k - num_above  # how many ties at the threshold are kept
  keep_all = k >= size
  offset = jnp.zeros([], jnp.int32)
  masks = []
  for m in magnitudes:
    tie = m == threshold
    tie_rank = jnp.cumsum(tie.ravel(), dtype=jnp.int32).reshape(m.shape) - 1
    keep = (m > threshold) | (tie & (tie_rank + offset < room))
    masks.append(keep & ((m > 0) | keep_all))
    offset = offset + jnp.sum(tie, dtype=jnp.int32)
  return masks


_topk_masks_jit = jax.jit(_topk_masks)


@jax.jit
def _layerwise_masks_jit(magnitudes: list[jax.Array], ks: jax.Array):
  return [_topk_masks([m], ks[i])[0] for i, m in enumerate(magnitudes)]


def magnitude(x: jax.Array) -> jax.Array:
  return jnp.abs(jnp.asarray(x).astype(jnp.float32))


# ----------------------------------------------------------------------------
# Per-leaf targets.


def pooled_leaves_with_paths(params: Any, pool: _pool.Pool):
  """[(path string, leaf, in_pool)] in tree order, and the params' treedef."""
  pool_mask = _pool.resolve_pool(params, pool)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  infos = [
    (path_name(path), leaf, bool(flag))
    for (path, leaf), flag in zip(flat, jax.tree.leaves(pool_mask))
  ]
  return infos, treedef


def _check_density(value: Any, where: str, name: str) -> float:
  if not _checks.is_number(value):
    raise TypeError(f"{name} at {where} must be a number in [0, 1], got {value!r}.")
  density = float(value)
  if not math.isfinite(density) or not 0.0 <= density <= 1.0:
    raise ValueError(f"{name} at {where} must be a density in [0, 1], got {value!r}.")
  return density


def keep_counts_pytree(treedef, counts: Sequence[int | None]) -> Any:
  """The keep-count pytree: ints on pooled leaves, MaskedNode elsewhere."""
  leaves = [optax.MaskedNode() if c is None else int(c) for c in counts]
  return jax.tree.unflatten(treedef, leaves)


def per_leaf_densities(
  params: Any, densities: Any, pool: _pool.Pool, name: str = "densities"
) -> tuple[Any, list, list]:
  """Resolves a per-leaf target specification to keep counts.

  `densities` may be: one density for every pooled leaf; a SparsityReport
  (its non-zero counts are used exactly); a pytree with the params' structure
  (values of leaves outside the pool are ignored and may be MaskedNode); a
  dict from path strings (``jax.tree_util.keystr``, as in SparsityReport) to
  densities covering exactly the pooled leaves; or a sequence of densities of
  the pooled leaves in tree order.

  Returns:
    (treedef, infos, counts): counts[i] is None for leaves outside the pool.
  """
  infos, treedef = pooled_leaves_with_paths(params, pool)
  pooled = [(path, leaf) for path, leaf, flag in infos if flag]
  values = None  # density per pooled leaf, or counts (SparsityReport)
  if isinstance(densities, report_lib.SparsityReport):
    rows = {row.path: row for row in densities.rows}
    _check_paths(set(rows), [p for p, _ in pooled], name)
    counts = []
    for path, leaf in pooled:
      row = rows[path]
      if row.size != _checks.leaf_size(leaf):
        raise ValueError(
          f"{name} (a SparsityReport) has size {row.size} at {path}, but "
          f"the param there has {_checks.leaf_size(leaf)} entries."
        )
      counts.append(row.nonzeros)
    return treedef, infos, _spread(infos, counts)
  if _checks.is_number(densities):
    values = [_check_density(densities, path, name) for path, _ in pooled]
  else:
    try:
      by_leaf = treedef.flatten_up_to(densities)
    except (ValueError, TypeError):
      by_leaf = None
    if by_leaf is not None:
      values = [_check_density(v, path, name) for (path, _, flag), v in zip(infos, by_leaf) if flag]
    elif isinstance(densities, collections.abc.Mapping):
      _check_paths(set(densities), [p for p, _ in pooled], name)
      values = [_check_density(densities[path], path, name) for path, _ in pooled]
    elif isinstance(densities, collections.abc.Sequence) and not isinstance(densities, str):
      if len(densities) != len(pooled):
        raise ValueError(
          f"{name} as a sequence needs one density per pooled leaf in tree "
          f"order ({len(pooled)}: {[p for p, _ in pooled]}), got "
          f"{len(densities)}."
        )
      values = [_check_density(v, path, name) for (path, _), v in zip(pooled, densities)]
    else:
      raise TypeError(
        f"{name} must be a density, a SparsityReport, a pytree with the "
        "params' structure, a dict from leaf paths to densities or a "
        f"sequence in pool order; got {type(densities).__name__}."
      )
  counts = [floor_count(_checks.leaf_size(leaf), d) for (_, leaf), d in zip(pooled, values)]
  return treedef, infos, _spread(infos, counts)


def _spread(infos, pooled_counts: list[int]) -> list[int | None]:
  it = iter(pooled_counts)
  return [next(it) if flag else None for _, _, flag in infos]


def _check_paths(given: set, expected: list[str], name: str) -> None:
  missing = [p for p in expected if p not in given]
  extra = sorted(given - set(expected))
  if missing or extra:
    raise ValueError(
      f"{name} must name exactly the pooled leaves {expected}; missing "
      f"{missing}, not pooled or unknown {extra}."
    )


def resolve_keep_counts(
  params: Any, keep_counts: Any, name: str = "keep_counts"
) -> tuple[Any, list, list]:
  """Checks a keep-count pytree against params.

  Returns:
    (treedef of params, flat params leaves, flat counts with None where the
    keep-count pytree holds MaskedNode).
  """
  params_leaves, params_def = jax.tree.flatten(params)
  counts_leaves, counts_def = jax.tree.flatten(keep_counts, is_leaf=_checks.is_masked_node)
  if counts_def.num_leaves != params_def.num_leaves:
    counts_def = None
  else:
    try:
      counts_def.flatten_up_to(params)
    except (ValueError, TypeError):
      counts_def = None
  if counts_def is None:
    raise ValueError(
      f"{name} must have the params' tree structure (ints on pooled leaves, "
      f"optax.MaskedNode elsewhere); params: {params_def}, {name}: "
      f"{jax.tree.structure(keep_counts, is_leaf=_checks.is_masked_node)}."
    )
  flat = []
  paths = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for path, leaf, count in zip(paths, params_leaves, counts_leaves):
    if _checks.is_masked_node(count):
      flat.append(None)
      continue
    if _checks.is_number(count, integer=True):
      size = _checks.leaf_size(leaf)
      if not 0 <= int(count) <= size:
        raise ValueError(f"{name} at {path} must be in [0, {size}] (the leaf's size), got {count}.")
      flat.append(int(count))
    elif (
      isinstance(count, jax.core.Tracer)
      and count.ndim == 0
      and jnp.issubdtype(count.dtype, jnp.integer)
    ):
      flat.append(count)  # traced count: clipped when used
    else:
      raise TypeError(f"{name} at {path} must be an int or optax.MaskedNode, got {count!r}.")
  return params_def, params_leaves, flat

"""Pools: which leaves of a parameter pytree GSM may prune.

A pool follows `optax.masked`'s convention: a bool pytree with the structure of
the params, or a callable ``params -> bool pytree``. ``None`` selects every
floating leaf with ``ndim >= 2`` (dense and conv kernels), as the reference code
of Ding et al. (2019) does.
"""

from __future__ import annotations

import math
from typing import Any
from typing import Callable
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

Pool = Union[None, Any, Callable[[Any], Any]]


def default_pool(params: Any) -> Any:
  """Every floating leaf with ``ndim >= 2``: dense and convolution kernels."""
  return jax.tree.map(
    lambda x: bool(jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) and jnp.ndim(x) >= 2), params
  )


def _path_name(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def resolve_pool(params: Any, pool: Pool = None) -> Any:
  """Returns the pool as a bool pytree with exactly the structure of `params`.

  Raises:
    ValueError: the pool's structure differs from the params', a pool leaf is
      not a Python/NumPy bool, or the pool selects no leaf.
    TypeError: the pool selects a non-floating leaf.
  """
  if params is None:
    raise ValueError("resolve_pool needs params, got None.")
  if pool is None:
    mask = default_pool(params)
  elif callable(pool):
    mask = pool(params)
  else:
    mask = pool
  params_def = jax.tree.structure(params)
  mask_def = jax.tree.structure(mask)
  if params_def != mask_def:
    raise ValueError(
      f"pool must have the same tree structure as params; params: {params_def}, pool: {mask_def}."
    )
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  flags = jax.tree.leaves(mask)
  any_selected = False
  for (path, leaf), flag in zip(flat, flags):
    if not isinstance(flag, (bool, np.bool_)):
      raise ValueError(
        f"pool leaf at {_path_name(path)} must be a Python bool, got "
        f"{type(flag).__name__}; a pool is static (known when the "
        "optimizer is built), not a traced array."
      )
    if flag:
      dtype = jnp.asarray(leaf).dtype
      if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
          f"pool selects the leaf {_path_name(path)} of dtype {dtype}; "
          "only floating leaves can be pruned."
        )
      any_selected = True
  if not any_selected:
    raise ValueError(
      "the pool selects no leaf: GSM needs at least one floating leaf to "
      "prune (the default pool takes floating leaves with ndim >= 2)."
    )
  return jax.tree.unflatten(params_def, [bool(f) for f in flags])


def pool_leaves(params: Any, pool_mask: Any) -> list[jax.Array]:
  """The pooled leaves of `params`, in tree order."""
  return [p for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(pool_mask)) if m]


def pool_size(params: Any, pool: Pool = None) -> int:
  """|Theta|: the number of prunable weights in the pool."""
  mask = resolve_pool(params, pool)
  return sum(math.prod(jnp.shape(p)) for p in pool_leaves(params, mask))


def validate_compression(compression: float, name: str = "compression") -> float:
  """Checks a constant compression ratio C: finite and >= 1."""
  if isinstance(compression, (str, bytes, bool)):  # float("4") would pass
    raise TypeError(f"{name} must be a number >= 1 or an optax schedule, got {compression!r}.")
  try:
    value = float(compression)
  except (TypeError, ValueError):
    raise TypeError(
      f"{name} must be a number >= 1 or an optax schedule, got {compression!r}."
    ) from None
  if not math.isfinite(value) or value < 1:
    raise ValueError(
      f"{name} must be finite and >= 1 (C = |pool| / kept weights), got {compression!r}."
    )
  return value


def keep_count_for_size(size: int, compression: float) -> int:
  """Q = int(|Theta| / C), the reference code's rounding; raises if Q < 1."""
  value = validate_compression(compression)
  keep = int(size / value)
  if keep < 1:
    raise ValueError(
      f"compression {compression!r} keeps Q = int({size} / {value}) = 0 of "
      f"{size} pooled weights; use compression <= {size}."
    )
  return keep


def keep_count(params: Any, compression: float, *, pool: Pool = None) -> int:
  """Q = int(|Theta| / C): how many pooled weights stay non-zero."""
  return keep_count_for_size(pool_size(params, pool), compression)

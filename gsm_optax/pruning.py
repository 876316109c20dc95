"""Final pruning: the global magnitude cut over the pool (Ding et al. 2019)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gsm_optax import _pool
from gsm_optax import selection


def global_magnitude_mask(params: Any, compression: float, *, pool: _pool.Pool = None) -> Any:
  """Keeps the Q = int(|pool| / C) pooled weights of greatest |w|.

  mask(w) = |w| >= t, t the Q-th greatest |w| over the whole pool; ties at t
  are all kept and a zero weight is never counted as kept (when fewer than Q
  weights are non-zero, only those are kept). Leaves outside the pool are all
  True.

  Returns:
    A pytree of bool arrays with the structure of `params`.
  """
  mask = _pool.resolve_pool(params, pool)
  keep = _pool.keep_count(params, compression, pool=mask)
  threshold = selection.kth_largest_magnitude(_pool.pool_leaves(params, mask), keep)

  def leaf_mask(p, in_pool):
    if not in_pool:
      return jnp.ones(jnp.shape(p), bool)
    magnitude = jnp.abs(jnp.asarray(p).astype(jnp.float32))
    return (magnitude >= threshold) & (magnitude > 0)

  return jax.tree.map(leaf_mask, params, mask)


def apply_mask(params: Any, mask: Any) -> Any:
  """Zeroes the entries of `params` where the bool pytree `mask` is False."""
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, mask)


def prune(params: Any, compression: float, *, pool: _pool.Pool = None) -> Any:
  """Global magnitude pruning to compression C; leaves outside the pool untouched."""
  return apply_mask(params, global_magnitude_mask(params, compression, pool=pool))

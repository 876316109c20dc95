"""Predicates shared by the library: numbers, MaskedNode leaves, abstract params.

Params may be arrays, `jax.ShapeDtypeStruct` leaves (abstract params, as
optax's own transforms accept them) or the stand-in pytree that
`optax.tree_utils.tree_map_params` passes to ``init``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:  # the stand-in params of optax.tree_utils.tree_map_params
  from optax.tree_utils._state_utils import _ParamsPlaceholder
except ImportError:  # pragma: no cover - a future optax without it
  _ParamsPlaceholder = None


def is_number(x: Any, *, integer: bool = False) -> bool:
  """A concrete real number, not a bool: a Python or NumPy scalar or a 0-d
  array; with `integer`, an integer one. Tracers are not numbers (unknown)."""
  if isinstance(x, (bool, np.bool_, jax.core.Tracer)):
    return False
  kinds = (jnp.integer,) if integer else (jnp.integer, jnp.floating)
  if isinstance(x, (np.ndarray, jax.Array)):
    return x.ndim == 0 and any(jnp.issubdtype(x.dtype, kind) for kind in kinds)
  if integer:
    return isinstance(x, (int, np.integer))
  return isinstance(x, (int, float, np.integer, np.floating))


def is_masked_node(x: Any) -> bool:
  """Whether `x` is ``optax.MaskedNode()`` (a leaf a transform leaves alone)."""
  return isinstance(x, optax.MaskedNode)


def is_placeholder(params: Any) -> bool:
  """Whether `params` is the stand-in `optax.tree_utils.tree_map_params`
  passes to ``init`` to find the params-shaped parts of a state."""
  return _ParamsPlaceholder is not None and isinstance(params, _ParamsPlaceholder)


def is_abstract(tree: Any) -> bool:
  """Whether some leaf of `tree` is a `jax.ShapeDtypeStruct` (no values)."""
  return any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(tree))


def leaf_dtype(x: Any) -> np.dtype:
  """The dtype of an array, a `jax.ShapeDtypeStruct` or a Python scalar."""
  dtype = getattr(x, "dtype", None)
  return np.dtype(dtype) if dtype is not None else jnp.asarray(x).dtype


def leaf_size(x: Any) -> int:
  """The number of entries of an array or a `jax.ShapeDtypeStruct`."""
  return math.prod(jnp.shape(x))

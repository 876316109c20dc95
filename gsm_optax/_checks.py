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


def check_number_in(name: str, value: Any, low: float, high: float, high_open: bool) -> None:
  """A concrete number must be in [low, high) or [low, high] (NaN never is); a
  traced one (`optax.inject_hyperparams` under jit) cannot be checked."""
  if isinstance(value, jax.core.Tracer):
    return
  if not is_number(value):
    raise TypeError(f"{name} must be a number, got {value!r}.")
  x = float(value)
  inside = low <= x < high if high_open else low <= x <= high
  if not inside:
    bracket = ")" if high_open else "]"
    raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}.")


def check_schedule_or_number(
  name: str, value: Any, low: float, high: float, high_open: bool
) -> None:
  """A schedule (its values are known at run time only) or a number in range."""
  if callable(value):
    return
  if not isinstance(value, jax.core.Tracer) and not is_number(value):
    raise TypeError(f"{name} must be a number or an optax schedule, got {value!r}.")
  check_number_in(name, value, low, high, high_open)


def check_sgd_args(learning_rate: Any, momentum: Any, weight_decay: Any) -> None:
  """Checks the momentum SGD arguments of the GSM transforms when they are built:
  alpha and eta finite and >= 0 (or schedules), beta in [0, 1)."""
  check_schedule_or_number("learning_rate", learning_rate, 0.0, math.inf, True)
  check_number_in("momentum", momentum, 0.0, 1.0, True)
  check_schedule_or_number("weight_decay", weight_decay, 0.0, math.inf, True)


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

"""Pools: which leaves of a parameter pytree GSM may prune.

A pool follows `optax.masked`'s convention: a bool pytree with the structure of
the params, or a callable ``params -> bool pytree``. ``None`` selects every
floating leaf with ``ndim >= 2`` (dense and conv kernels), as the reference code
of Ding et al. (2019) does. Params may be arrays or `jax.ShapeDtypeStruct`s.

Q = floor(|pool| / C), the number of pooled weights kept at compression C, is
computed here only: `floor_keep` (and `checked_number_keep` for a schedule's
value) for a Python or NumPy float64 number C (``int(|pool| / C)`` in float64,
the reference code's rounding), `checked_traced_keep` for a JAX array or
traced C (exactly floor(|pool| / C) for its float32 value; see `keep_count`
for when the two differ).
"""

from __future__ import annotations

import math
from typing import Any
from typing import Callable
from typing import Union

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from gsm_optax import _checks

Pool = Union[None, Any, Callable[[Any], Any]]


def default_pool(params: Any) -> Any:
  """Every floating leaf with ``ndim >= 2``: dense and convolution kernels."""
  return jax.tree.map(
    lambda x: bool(jnp.issubdtype(_checks.leaf_dtype(x), jnp.floating) and jnp.ndim(x) >= 2), params
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
      dtype = _checks.leaf_dtype(leaf)
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


def pooled_size(params: Any, pool_mask: Any) -> int:
  """|Theta| for a resolved pool (a bool pytree)."""
  return sum(_checks.leaf_size(p) for p in pool_leaves(params, pool_mask))


def pool_size(params: Any, pool: Pool = None) -> int:
  """|Theta|: the number of prunable weights in the pool."""
  return pooled_size(params, resolve_pool(params, pool))


def validate_compression(
  compression: float, name: str = "compression", *, schedule_ok: bool = False
) -> float:
  """Checks a constant compression ratio C: a number, finite and >= 1; the
  error names schedules only where the caller (`schedule_ok`) takes them."""
  if isinstance(compression, jax.core.Tracer):
    raise TypeError(
      f"{name} must be a concrete number >= 1, got a traced value: make it static "
      f"(e.g. jax.jit(f, static_argnames='{name}'))."
    )
  if not _checks.is_number(compression):
    kinds = "a number >= 1 or an optax schedule" if schedule_ok else "a number >= 1"
    raise TypeError(f"{name} must be {kinds}, got {compression!r}.")
  value = float(compression)
  if not math.isfinite(value) or value < 1:
    raise ValueError(
      f"{name} must be finite and >= 1 (C = |pool| / kept weights), got {compression!r}."
    )
  return value


def floor_keep(size: int, compression: float) -> int:
  """Q = int(|Theta| / C) for a Python number C >= 1, the reference code's
  rounding; 0 when C > |Theta| (callers raise their own error)."""
  return int(size / compression)


def floor_divide_by_float(size: int, divisor: jax.Array) -> jax.Array:
  """floor(size / c) exactly, for an int 0 <= size < 2^31 and float32 c >= 1.

  Float32 division rounds (int(n / C) could be one too many near an
  integer), so this divides by c = m * 2^e in integers: by m << e when
  e >= 0, else n // m and then one binary digit of the remainder per bit of
  -e (at most 23). A non-finite c gives 0.
  """
  bits = lax.bitcast_convert_type(jnp.asarray(divisor, jnp.float32), jnp.int32)
  exponent = ((bits >> 23) & 0xFF) - 150  # c = mantissa * 2^exponent
  mantissa = (bits & 0x7FFFFF) | 0x800000
  n = jnp.int32(size)
  whole = n // (mantissa << jnp.clip(exponent, 0, 7))
  quotient, remainder = n // mantissa, n % mantissa
  for bit in range(23):
    active = bit < -exponent
    twice = remainder * 2
    digit = (twice >= mantissa).astype(jnp.int32)
    remainder = jnp.where(active, twice - digit * mantissa, remainder)
    quotient = jnp.where(active, quotient * 2 + digit, quotient)
  return jnp.where(exponent >= 8, 0, jnp.where(exponent >= 0, whole, quotient))


def checked_traced_keep(size: int, compression: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(Q, invalid) for an array (e.g. traced) C, which cannot raise under jit.

  Q = floor(|Theta| / C) exactly for C's float32 value
  (`floor_divide_by_float`), clamped: C < 1 (-inf included) keeps all
  |Theta| weights, NaN, +inf and C > |Theta| keep one. `invalid` (a bool
  scalar) says C was not finite, < 1, or kept 0 weights before clamping.
  """
  value = jnp.asarray(compression, jnp.float32)
  floor = floor_divide_by_float(size, jnp.maximum(value, 1.0))
  invalid = ~jnp.isfinite(value) | (value < 1) | (floor < 1)
  return jnp.clip(floor, 1, size), invalid


def checked_number_keep(size: int, compression: float) -> tuple[int, bool]:
  """(Q, invalid) for a number C known only at run time (a schedule's Python
  value): Q = int(|Theta| / C) in float64 (`floor_keep`), clamped and flagged
  as `checked_traced_keep` does."""
  value = float(compression)
  if math.isnan(value):
    return 1, True
  if value < 1:
    return size, True
  keep = floor_keep(size, value)  # 0 for C > |Theta| and C = inf
  return max(keep, 1), keep < 1


def keep_count_for_size(size: int, compression: float) -> int:
  """Q = int(|Theta| / C) (`floor_keep`) for a number C; raises if Q < 1."""
  value = validate_compression(compression)
  if size == 0:
    raise ValueError("the pool holds no weights (every pooled leaf has size 0): nothing to prune.")
  keep = floor_keep(size, value)
  if keep < 1:
    raise ValueError(
      f"compression {compression!r} keeps Q = int({size} / {value}) = 0 of "
      f"{size} pooled weights; use compression <= {size}."
    )
  return keep


def keep_count(params: Any, compression: float, *, pool: Pool = None) -> int:
  """Q = int(|Theta| / C): how many pooled weights stay non-zero.

  C is a number, divided in float64 (Python's ``int(size / C)``, the
  reference code's rounding). `mask_by_global_taylor` computes the same Q for
  a Python or NumPy float64 C, also from a schedule; for a JAX array C
  (float32: a schedule's traced value, `optax.inject_hyperparams`) it takes
  floor(|Theta| / C) exactly for the float32 value, which is
  ``keep_count(params, float(np.float32(C)))``. Both agree unless rounding C
  to float32 crosses |Theta| / q for an integer q: C = 133.1 over 266,200
  weights keeps 2000 here and 1999 as float32 (133.1000061...).
  """
  return keep_count_for_size(pool_size(params, pool), compression)

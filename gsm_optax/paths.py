"""Pools by key path: which leaves GSM may prune, named by regular expressions.

A leaf's path is its key path written with "/" between keys (`key_path_name`):
``blocks/3/attn/query/kernel``. `path_pool` returns a callable
``params -> bool pytree``, a pool as `optax.masked` and every ``pool=`` of this
library take it.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import re
from typing import Any

import jax
import jax.numpy as jnp

from gsm_optax import _checks

_SHOWN_PATHS = 8


def _key_name(key: Any) -> str:
  """One key of a key path: a dict key, a sequence index or an attribute name."""
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def key_path_name(path: Sequence[Any]) -> str:
  """The key path as "k1/k2/...": dict keys as str, indices as ints, attribute names.

  A final ``.value`` attribute (how a `flax.nnx.Variable` flattens) is dropped,
  so that an ``nnx.State`` and the same params as nested dicts name a leaf
  alike: ``blocks/0/attn/query/kernel``.
  """
  keys = list(path)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys.pop()
  return "/".join(_key_name(key) for key in keys)


def _compile(patterns: Sequence[str], name: str) -> tuple[re.Pattern, ...]:
  """The patterns as compiled regular expressions; a ValueError names a bad one."""
  if isinstance(patterns, str) or not isinstance(patterns, Sequence):
    raise TypeError(
      f"{name} must be a sequence of regular expressions, got {patterns!r}; "
      f"for one pattern write {name}=({patterns!r},)."
    )
  compiled = []
  for pattern in patterns:
    if not isinstance(pattern, str):
      raise TypeError(f"{name} patterns must be str, got {pattern!r}.")
    try:
      compiled.append(re.compile(pattern))
    except re.error as error:
      raise ValueError(f"{name} pattern {pattern!r} is not a valid regular expression: {error}.")
  return tuple(compiled)


def _available(paths: list[str]) -> str:
  """A few of the paths, for error messages."""
  shown = ", ".join(paths[:_SHOWN_PATHS])
  more = f", ... ({len(paths)} leaves)" if len(paths) > _SHOWN_PATHS else ""
  return f"available paths: {shown}{more}"


def _check_every_pattern_matches(patterns: tuple[re.Pattern, ...], paths: list[str], name: str):
  for pattern in patterns:
    if not any(pattern.search(path) for path in paths):
      raise ValueError(f"{name} pattern {pattern.pattern!r} matches no leaf; {_available(paths)}.")


def _is_prunable(leaf: Any, min_ndim: int) -> bool:
  """A floating leaf with ndim >= min_ndim (arrays or `jax.ShapeDtypeStruct`)."""
  floating = jnp.issubdtype(_checks.leaf_dtype(leaf), jnp.floating)
  return bool(floating and len(jnp.shape(leaf)) >= min_ndim)


def path_pool(
  include: Sequence[str] = (),
  exclude: Sequence[str] = (),
  *,
  min_ndim: int = 2,
) -> Callable[[Any], Any]:
  """A pool by key path: leaf in pool = floating & ndim >= min_ndim & (some include
  matches) & (no exclude matches).

  Patterns are Python regular expressions matched with `re.search` against the
  leaf's path (`key_path_name`), so ``"attn"`` matches anywhere in it: anchor
  with ``^`` and ``$`` when needed (``"kernel$"``, ``"^head/"``). An empty
  `include` takes every leaf; `exclude` wins over `include`.

  Returns:
    A callable ``params -> bool pytree`` (params may be arrays or
    `jax.ShapeDtypeStruct` leaves), for any ``pool=`` of this library and for
    `optax.masked`.

  Raises:
    ValueError: a pattern is not a valid regular expression (here); when the
      callable is applied, an include or exclude pattern matches no leaf, or
      nothing is pooled.
    TypeError: `include` or `exclude` is a single str (write ``("...",)``),
      or `min_ndim` is not an int >= 0.
  """
  includes = _compile(include, "include")
  excludes = _compile(exclude, "exclude")
  if not _checks.is_number(min_ndim, integer=True) or min_ndim < 0:
    raise TypeError(f"min_ndim must be an int >= 0, got {min_ndim!r}.")

  def pool(params: Any) -> Any:
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [key_path_name(path) for path, _ in flat]
    _check_every_pattern_matches(includes, paths, "include")
    _check_every_pattern_matches(excludes, paths, "exclude")
    flags = [
      _is_prunable(leaf, min_ndim)
      and (not includes or any(p.search(path) for p in includes))
      and not any(p.search(path) for p in excludes)
      for path, (_, leaf) in zip(paths, flat)
    ]
    if not any(flags):
      raise ValueError(
        f"path_pool(include={list(include)!r}, exclude={list(exclude)!r}, min_ndim={min_ndim}) "
        f"pools no leaf (only floating leaves with ndim >= {min_ndim} are pooled); "
        f"{_available(paths)}."
      )
    return jax.tree.unflatten(treedef, flags)

  return pool

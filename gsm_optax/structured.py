"""Structured GSM: whole output channels (filters), and N:M groups.

Channel GSM scores output channel j of a pooled kernel with the sum of the
Taylor scores of its weights, S_j = sum |g * w|, keeps the loss gradient of the
Q = int(#pooled channels / C) channels of greatest S_j over the whole pool,
and decays every pooled weight (Ding et al. 2019's rule with channels for
weights):

    z <- beta * z + eta * w + B_channel * dL/dw
    w <- w - alpha * z

N:M GSM keeps, in every group of M consecutive weights along one axis, the
loss gradient of the N weights of greatest |g * w| (a per-group rule, not a
global one), so the decayed weights leave an N:M pattern.

Axes: `channel_axis` (default -1, the output features of Flax `nnx.Linear`
(in, out) and `nnx.Conv` (h, w, in, out) kernels) and the N:M `axis` (default
-2, their input features) are an int for every pooled leaf, or a pytree of ints
with the structure of the params (values outside the pool ignored), or a
callable ``params -> such a pytree``, as the pool is.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any
from typing import Callable
from typing import NamedTuple
from typing import Union

import jax
import jax.numpy as jnp
import optax

from gsm_optax import _checks
from gsm_optax import _pool
from gsm_optax import pruning
from gsm_optax import selection
from gsm_optax import transform

Axis = Union[int, Any, Callable[[Any], Any]]


# --------------------------------------------------------------------------
# Checks: axes, N:M, channel compression.


def _pooled_paths(params: Any, pool_mask: Any) -> list[tuple[str, tuple[int, ...]]]:
  """(path, shape) of every pooled leaf, in tree order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return [
    (jax.tree_util.keystr(path) or "<root>", tuple(jnp.shape(leaf)))
    for (path, leaf), in_pool in zip(flat, jax.tree.leaves(pool_mask))
    if in_pool
  ]


def _check_static(value: Any, name: str) -> None:
  """Axes, N and M set shapes: they must be known when the update is traced."""
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
      f"{name} is traced, but it must be a static int (it sets the shape of the mask); under "
      f"optax.inject_hyperparams pass static_args=({name!r},)."
    )


def _axis_values(params: Any, pool_mask: Any, axis: Axis, name: str) -> list[Any]:
  """The axis given for every pooled leaf, in tree order (not yet checked)."""
  _check_static(axis, name)
  if _checks.is_number(axis, integer=True):
    return [axis] * sum(jax.tree.leaves(pool_mask))
  tree = axis(params) if callable(axis) else axis
  if jax.tree.structure(tree) != jax.tree.structure(params):
    raise ValueError(
      f"{name} must be an int, or a pytree of ints with the structure of params (or a callable "
      f"params -> such a pytree); got the structure {jax.tree.structure(tree)}, params have "
      f"{jax.tree.structure(params)}."
    )
  return [a for a, m in zip(jax.tree.leaves(tree), jax.tree.leaves(pool_mask)) if m]


def resolve_axes(params: Any, pool_mask: Any, axis: Axis, name: str) -> tuple[int, ...]:
  """The non-negative axis of every pooled leaf (tree order); raises a ValueError
  for an axis that a pooled leaf does not have."""
  axes = []
  for (path, shape), a in zip(
    _pooled_paths(params, pool_mask), _axis_values(params, pool_mask, axis, name)
  ):
    ndim = len(shape)
    if not _checks.is_number(a, integer=True) or not -ndim <= int(a) < ndim:
      raise ValueError(
        f"{name}={a!r} does not exist in the pooled leaf {path} of shape {shape}: "
        f"allowed are the integers {-ndim}..{ndim - 1}."
      )
    axes.append(int(a) % ndim)
  return tuple(axes)


def _check_nm(n: int, m: int) -> None:
  """N and M are integers with 1 <= N <= M."""
  _check_static(n, "n")
  _check_static(m, "m")
  ok = _checks.is_number(n, integer=True) and _checks.is_number(m, integer=True)
  if not ok or not 1 <= int(n) <= int(m):
    raise ValueError(f"N:M sparsity needs integers 1 <= n <= m, got n={n!r}, m={m!r}.")


def _check_groups(params: Any, pool_mask: Any, axes: tuple[int, ...], m: int, name: str) -> None:
  """M divides the size of `axis` of every pooled leaf."""
  for (path, shape), a in zip(_pooled_paths(params, pool_mask), axes):
    if shape[a] % m:
      raise ValueError(
        f"m={m} does not divide the size {shape[a]} of {name}={a} of the pooled leaf {path} "
        f"of shape {shape}: m must divide that axis in every pooled leaf (or leave the leaf "
        "out of the pool)."
      )


def _nm_axes(params: Any, pool_mask: Any, n: int, m: int, axis: Axis) -> tuple[int, ...]:
  axes = resolve_axes(params, pool_mask, axis, "axis")
  _check_groups(params, pool_mask, axes, m, "axis")
  return axes


def _num_channels(params: Any, pool_mask: Any, axes: tuple[int, ...]) -> int:
  return sum(shape[a] for (_, shape), a in zip(_pooled_paths(params, pool_mask), axes))


def channel_keep_count(num_channels: int, compression: float) -> int:
  """Q = int(#channels / C) for a number C >= 1; raises a ValueError if Q < 1."""
  value = _pool.validate_compression(compression)
  if num_channels == 0:
    raise ValueError("the pool holds no channels (every pooled leaf has size 0): nothing to prune.")
  keep = _pool.floor_keep(num_channels, value)
  if keep < 1:
    raise ValueError(
      f"compression {compression!r} keeps Q = int({num_channels} / {value}) = 0 of "
      f"{num_channels} pooled channels; use 1 <= compression <= {num_channels} (C counts "
      "channels)."
    )
  return keep


# --------------------------------------------------------------------------
# Scores and masks.


def _broadcast_along(vector: jax.Array, ndim: int, axis: int) -> jax.Array:
  shape = [1] * ndim
  shape[axis] = -1
  return vector.reshape(shape)


CHANNEL_SCORES = ("sum", "mean")


def _check_channel_score(channel_score: str) -> None:
  if channel_score not in CHANNEL_SCORES:
    raise ValueError(
      f"channel_score={channel_score!r}: use 'sum' (S_j = sum over the channel's weights) "
      "or 'mean' (S_j / the channel's number of weights)."
    )


def reduce_channels(score: jax.Array, axis: int, channel_score: str = "sum") -> jax.Array:
  """S_j = sum of `score` over channel j's entries ('sum'), or that / their number ('mean')."""
  total = jnp.sum(score, axis=tuple(a for a in range(score.ndim) if a != axis))
  if channel_score == "mean":
    return total / (score.size // score.shape[axis])
  return total


def channel_scores(
  grad: jax.Array, param: jax.Array, axis: int, channel_score: str = "sum"
) -> jax.Array:
  """S_j = sum (or mean) over channel j's weights of |g * w| (float32), j along `axis`."""
  return reduce_channels(transform.taylor_score(grad, param), axis, channel_score)


def nm_top(score: jax.Array, n: int, m: int, axis: int) -> jax.Array:
  """B = rank < N in each group of M consecutive entries along `axis`, rank the
  position in a stable sort of -score (ties to the lower index; NaN last)."""
  s = jnp.moveaxis(jnp.where(jnp.isnan(score), -jnp.inf, score), axis, -1)
  groups = s.reshape(*s.shape[:-1], s.shape[-1] // m, m)
  mine, other = groups[..., :, None], groups[..., None, :]
  index = jnp.arange(m)
  before = (other > mine) | ((other == mine) & (index[None, :] < index[:, None]))
  rank = jnp.sum(before, axis=-1)
  return jnp.moveaxis((rank < n).reshape(s.shape), -1, axis)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _mask_channels(grads, weights, keep, axes, channel_score):
  """(masked grads, B per leaf, threshold, num_active) of channel GSM over the pool."""
  scores = [channel_scores(g, w, a, channel_score) for g, w, a in zip(grads, weights, axes)]
  size = sum(s.size for s in scores)
  threshold = selection.select_score_threshold(scores, keep).threshold
  keep_all = keep >= size
  masked, actives, num_active = [], [], jnp.zeros([], jnp.int32)
  for g, s, a in zip(grads, scores, axes):
    # As the per-weight rule: ties at t kept, NaN never, 0 only when C = 1.
    active = (s >= threshold) & ((s > 0) | keep_all)
    num_active += jnp.sum(active, dtype=jnp.int32)
    active = _broadcast_along(active, g.ndim, a)
    masked.append(jnp.where(active, g, jnp.zeros_like(g)))
    actives.append(jnp.broadcast_to(active, g.shape))
  return masked, actives, threshold, num_active


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _mask_nm(grads, weights, n, m, axes):
  """(masked grads, B per leaf, num_active) of N:M GSM."""
  masked, actives, num_active = [], [], jnp.zeros([], jnp.int32)
  for g, w, a in zip(grads, weights, axes):
    active = nm_top(transform.taylor_score(g, w), n, m, a)
    num_active += jnp.sum(active, dtype=jnp.int32)
    masked.append(jnp.where(active, g, jnp.zeros_like(g)))
    actives.append(active)
  return masked, actives, num_active


def _split_pool(updates: Any, params: Any, pool_mask: Any, name: str):
  """(flat updates, treedef, pooled indices, pooled grads, pooled weights)."""
  if jax.tree.structure(updates) != jax.tree.structure(params):
    raise ValueError(
      f"{name}: updates and params have different tree structures: "
      f"{jax.tree.structure(updates)} vs {jax.tree.structure(params)}."
    )
  flat_updates, treedef = jax.tree.flatten(updates)
  flat_params = jax.tree.leaves(params)
  pooled = [i for i, flag in enumerate(jax.tree.leaves(pool_mask)) if flag]
  grads = [flat_updates[i] for i in pooled]
  weights = [flat_params[i] for i in pooled]
  return flat_updates, treedef, pooled, grads, weights


def _need_params(params: Any, name: str) -> None:
  if params is None:
    raise ValueError(f"{name} needs params to compute |g * w|: call update(grads, state, params).")


# --------------------------------------------------------------------------
# Channel GSM.


class MaskByGlobalChannelTaylorState(NamedTuple):
  """State of `mask_by_global_channel_taylor`; every field is an array.

  Attributes:
    count: number of updates done.
    keep: Q, the target number of active channels at the last update.
    threshold: the Q-th greatest channel score at the last update.
    num_active: active channels at the last update (Q, or more on ties).
    num_invalid_compression: updates whose run-time C (a schedule's value)
      was NaN, inf, < 1 or > #channels, and was clamped.
  """

  count: jax.Array
  keep: jax.Array
  threshold: jax.Array
  num_active: jax.Array
  num_invalid_compression: jax.Array


def init_channel_state(
  params: Any, compression: Any, name: str, num_channels: Callable[[Any], int]
) -> MaskByGlobalChannelTaylorState:
  """``name``.init: the state at step 0, keeping int(num_channels(params) / C) channels
  (C checked against the channel count when it is a concrete number)."""
  if params is None:
    raise ValueError(f"{name}.init needs the params pytree.")
  keep = 0
  if not _checks.is_placeholder(params):  # optax.tree_utils.tree_map_params: keep 0
    size = num_channels(params)
    if not callable(compression) and transform._is_concrete(compression):
      channel_keep_count(size, float(compression))
    keep, _ = transform._keep_for_step(size, compression, jnp.zeros([], jnp.int32))
  return MaskByGlobalChannelTaylorState(
    count=jnp.zeros([], jnp.int32),
    keep=jnp.asarray(keep, jnp.int32),
    threshold=jnp.zeros([], jnp.float32),
    num_active=jnp.zeros([], jnp.int32),
    num_invalid_compression=jnp.zeros([], jnp.int32),
  )


def mask_by_global_channel_taylor(
  compression: optax.ScalarOrSchedule,
  *,
  pool: _pool.Pool = None,
  channel_axis: Axis = -1,
  channel_score: str = "sum",
) -> optax.GradientTransformationExtraArgs:
  """Keeps the loss gradient of the Q pooled channels with the greatest sum |g * w|.

  B_j = [S_j >= t], S_j = sum over channel j's weights of |g * w| (float32), t
  the Q-th greatest S_j over all pooled channels, Q = int(#pooled channels / C):
  C counts channels, not weights. As in `mask_by_global_taylor`, ties at t are
  all kept, a score of 0 is active only when C = 1, NaN never; Q for a schedule
  or an array C is computed the same way. Pooled gradients of passive channels
  become 0; leaves outside the pool pass unchanged.

  A channel is a slice of a pooled kernel at one index of `channel_axis` (an
  int for every leaf, or a pytree / callable of ints per leaf; default -1, the
  output features of Flax Dense (in, out) and Conv (h, w, in, out) kernels).
  ``channel_score="mean"`` ranks S_j / (channel j's number of weights) instead:
  with "sum" a channel of a larger fan-in sums more weights and tends to rank
  higher across layers; "mean" compares channels of different layers per weight.

  The bias and BatchNorm after a channel are outside the pool and not masked:
  after the cut the channel outputs a constant (its bias, or what BatchNorm makes of it;
  docs/METHOD.md section 7), which exporting a smaller network must fold into the
  next layer.

  Raises:
    ValueError: at construction for a constant C < 1 or not finite; at `init`
      for a `channel_axis` a pooled leaf does not have, or C > #channels.
  """
  return transform.mask_transform(
    channel_selector(compression, pool=pool, channel_axis=channel_axis, channel_score=channel_score)
  )


def channel_selector(
  compression: optax.ScalarOrSchedule,
  *,
  pool: _pool.Pool = None,
  channel_axis: Axis = -1,
  channel_score: str = "sum",
) -> transform.Selector:
  """B_j = [S_j >= t], S_j = sum |g * w| over channel j, t the Q-th greatest S_j.

  The `transform.Selector` of `mask_by_global_channel_taylor` (its rules and
  arguments; Q = int(#pooled channels / C_t)): its step's `active` is B_j
  broadcast over each pooled leaf, its state a `MaskByGlobalChannelTaylorState`.
  """
  transform._check_compression_arg(compression)
  _check_channel_score(channel_score)

  def num_channels(params):
    mask = _pool.resolve_pool(params, pool)
    return _num_channels(params, mask, resolve_axes(params, mask, channel_axis, "channel_axis"))

  def init_fn(params):
    return init_channel_state(params, compression, "mask_by_global_channel_taylor", num_channels)

  def step_fn(updates, state, params):
    _need_params(params, "mask_by_global_channel_taylor")
    mask = _pool.resolve_pool(params, pool)
    axes = resolve_axes(params, mask, channel_axis, "channel_axis")
    flat, treedef, pooled, grads, weights = _split_pool(
      updates, params, mask, "mask_by_global_channel_taylor"
    )
    keep, invalid = transform._keep_for_step(
      _num_channels(params, mask, axes), compression, state.count
    )
    masked, actives, threshold, num_active = _mask_channels(
      grads, weights, keep, axes, channel_score
    )
    for i, g in zip(pooled, masked):
      flat[i] = g
    new_state = MaskByGlobalChannelTaylorState(
      count=optax.safe_increment(state.count),
      keep=keep,
      threshold=threshold,
      num_active=num_active,
      num_invalid_compression=state.num_invalid_compression + invalid.astype(jnp.int32),
    )
    return transform.TaylorStep(jax.tree.unflatten(treedef, flat), pooled, actives, new_state)

  return transform.Selector(init_fn, step_fn)


def gsm_channels(
  learning_rate: optax.ScalarOrSchedule,
  compression: optax.ScalarOrSchedule,
  *,
  momentum: float = 0.99,
  weight_decay: optax.ScalarOrSchedule = 5e-4,
  nesterov: bool = False,
  pool: _pool.Pool = None,
  channel_axis: Axis = -1,
  channel_score: str = "sum",
) -> optax.GradientTransformationExtraArgs:
  """Channel GSM: z <- beta * z + eta * w + B_channel * dL/dw;  w <- w - alpha * z.

  `gsm` with the mask of `mask_by_global_channel_taylor` (C counts channels).
  Every pooled weight decays, active or passive, so passive channels shrink to
  about 0 and `prune_channels` cuts them. Biases and BatchNorm (outside the
  pool) are neither masked nor decayed.
  """
  mask = mask_by_global_channel_taylor(
    compression, pool=pool, channel_axis=channel_axis, channel_score=channel_score
  )
  return transform.gsm_chain([mask], learning_rate, momentum, weight_decay, nesterov, pool)


def channel_stats(opt_state: Any) -> dict[str, jax.Array]:
  """Logging view of the one `MaskByGlobalChannelTaylorState` in `opt_state` (any nesting).

  Returns:
    A dict with "step", "keep" (Q channels), "threshold", "num_active"
    (active channels) and "num_invalid_compression".
  """
  state = transform.single_state(opt_state, MaskByGlobalChannelTaylorState, "channel_stats")
  return {
    "step": state.count,
    "keep": state.keep,
    "threshold": state.threshold,
    "num_active": state.num_active,
    "num_invalid_compression": state.num_invalid_compression,
  }


# --------------------------------------------------------------------------
# N:M GSM.


class MaskByNMTaylorState(NamedTuple):
  """State of `mask_by_nm_taylor`; every field is an array.

  Attributes:
    count: number of updates done.
    num_active: active pooled weights at the last update (N per group).
  """

  count: jax.Array
  num_active: jax.Array


def mask_by_nm_taylor(
  n: int, m: int, *, pool: _pool.Pool = None, axis: Axis = -2
) -> optax.GradientTransformationExtraArgs:
  """Keeps the loss gradient of the N weights of greatest |g * w| in every group of M.

  Groups are M consecutive weights along `axis` of a pooled kernel (default
  -2, the input features of Flax Dense (in, out) and Conv (h, w, in, out)
  kernels; an int, or a pytree / callable of ints per leaf). B = [rank < N],
  rank the position in a stable sort of -|g * w| within the group: exactly N
  active per group, ties to the lower index, NaN scores last, a zero score
  active when it is among the N greatest. Not global: every group keeps N.

  Raises:
    ValueError: at construction unless 1 <= n <= m are integers; at `init`
      for an axis a pooled leaf does not have, or m not dividing its size.
  """
  return transform.mask_transform(nm_selector(n, m, pool=pool, axis=axis))


def nm_selector(n: int, m: int, *, pool: _pool.Pool = None, axis: Axis = -2) -> transform.Selector:
  """B = [rank < N] in every group of M along `axis`, rank by -|g * w| (stable).

  The `transform.Selector` of `mask_by_nm_taylor` (its rules and arguments):
  its step's `active` is B per pooled leaf, its state a `MaskByNMTaylorState`.
  """
  _check_nm(n, m)
  n, m = int(n), int(m)

  def init_fn(params):
    if params is None:
      raise ValueError("mask_by_nm_taylor.init needs the params pytree.")
    if not _checks.is_placeholder(params):
      _nm_axes(params, _pool.resolve_pool(params, pool), n, m, axis)
    return MaskByNMTaylorState(count=jnp.zeros([], jnp.int32), num_active=jnp.zeros([], jnp.int32))

  def step_fn(updates, state, params):
    _need_params(params, "mask_by_nm_taylor")
    mask = _pool.resolve_pool(params, pool)
    axes = _nm_axes(params, mask, n, m, axis)
    flat, treedef, pooled, grads, weights = _split_pool(updates, params, mask, "mask_by_nm_taylor")
    masked, actives, num_active = _mask_nm(grads, weights, n, m, axes)
    for i, g in zip(pooled, masked):
      flat[i] = g
    new_state = MaskByNMTaylorState(count=optax.safe_increment(state.count), num_active=num_active)
    return transform.TaylorStep(jax.tree.unflatten(treedef, flat), pooled, actives, new_state)

  return transform.Selector(init_fn, step_fn)


def gsm_nm(
  learning_rate: optax.ScalarOrSchedule,
  n: int,
  m: int,
  *,
  momentum: float = 0.99,
  weight_decay: optax.ScalarOrSchedule = 5e-4,
  nesterov: bool = False,
  pool: _pool.Pool = None,
  axis: Axis = -2,
) -> optax.GradientTransformationExtraArgs:
  """N:M GSM: z <- beta * z + eta * w + B_nm * dL/dw;  w <- w - alpha * z.

  `gsm` with the per-group mask of `mask_by_nm_taylor` (not global). Every
  pooled weight decays, so the M - N passive weights of a group shrink to
  about 0 and `prune_nm` cuts them.
  """
  mask = mask_by_nm_taylor(n, m, pool=pool, axis=axis)
  return transform.gsm_chain([mask], learning_rate, momentum, weight_decay, nesterov, pool)


# --------------------------------------------------------------------------
# Final cuts.


def nm_stats(opt_state: Any) -> dict[str, jax.Array]:
  """Logging view of the one `MaskByNMTaylorState` in `opt_state`: "step", "num_active"."""
  state = transform.single_state(opt_state, MaskByNMTaylorState, "nm_stats")
  return {"step": state.count, "num_active": state.num_active}


def _with_pooled(params: Any, pool_mask: Any, pooled_masks: list[jax.Array]) -> Any:
  """A bool pytree: `pooled_masks` on the pooled leaves, True elsewhere."""
  flat, treedef = jax.tree.flatten(params)
  it = iter(pooled_masks)
  out = [
    next(it) if flag else jnp.ones(jnp.shape(p), bool)
    for p, flag in zip(flat, jax.tree.leaves(pool_mask))
  ]
  return jax.tree.unflatten(treedef, out)


def global_channel_mask(
  params: Any,
  compression: float,
  *,
  pool: _pool.Pool = None,
  channel_axis: Axis = -1,
  channel_score: str = "sum",
) -> Any:
  """Keeps exactly the Q = int(#pooled channels / C) channels of greatest sum |w|.

  ``channel_score="mean"``: greatest mean |w| over the channel's weights. Ties
  go to the channel earlier in the pool: leaves in tree order, then by channel
  index (a stable sort of -score; NaN scores last). Leaves outside the pool
  are all True.

  Returns:
    A pytree of bool arrays with the structure of `params`.
  """
  _check_channel_score(channel_score)
  mask = _pool.resolve_pool(params, pool)
  axes = resolve_axes(params, mask, channel_axis, "channel_axis")
  keep = channel_keep_count(_num_channels(params, mask, axes), compression)
  leaves = _pool.pool_leaves(params, mask)
  scores = [
    reduce_channels(jnp.abs(jnp.asarray(p).astype(jnp.float32)), a, channel_score)
    for p, a in zip(leaves, axes)
  ]
  flat = jnp.concatenate(scores)
  order = jnp.argsort(-jnp.where(jnp.isnan(flat), -1.0, flat), stable=True)
  kept = jnp.zeros(flat.shape, bool).at[order[:keep]].set(True)
  bounds = [sum(s.size for s in scores[: i + 1]) for i in range(len(scores) - 1)]
  pieces = jnp.split(kept, bounds)
  return _with_pooled(
    params,
    mask,
    [
      jnp.broadcast_to(_broadcast_along(k, p.ndim, a), p.shape)
      for k, p, a in zip(pieces, leaves, axes)
    ],
  )


def prune_channels(
  params: Any,
  compression: float,
  *,
  pool: _pool.Pool = None,
  channel_axis: Axis = -1,
  channel_score: str = "sum",
) -> Any:
  """Zeroes every pooled channel but the Q of greatest sum (or mean) |w| (`global_channel_mask`)."""
  mask = global_channel_mask(
    params, compression, pool=pool, channel_axis=channel_axis, channel_score=channel_score
  )
  return pruning.apply_mask(params, mask)


def nm_mask(params: Any, n: int, m: int, *, pool: _pool.Pool = None, axis: Axis = -2) -> Any:
  """Keeps exactly the N largest |w| of every group of M along `axis` (ties to
  the lower index, NaN last); leaves outside the pool are all True."""
  _check_nm(n, m)
  mask = _pool.resolve_pool(params, pool)
  axes = _nm_axes(params, mask, n, m, axis)
  leaves = _pool.pool_leaves(params, mask)
  return _with_pooled(
    params,
    mask,
    [
      nm_top(jnp.abs(jnp.asarray(p).astype(jnp.float32)), int(n), int(m), a)
      for p, a in zip(leaves, axes)
    ],
  )


def prune_nm(params: Any, n: int, m: int, *, pool: _pool.Pool = None, axis: Axis = -2) -> Any:
  """Zeroes all but the N largest |w| of every group of M (`nm_mask`)."""
  return pruning.apply_mask(params, nm_mask(params, n, m, pool=pool, axis=axis))


# --------------------------------------------------------------------------
# Reports.


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], total: tuple[str, ...]) -> str:
  """Rows under a header, a rule, then the total row; first two columns left-aligned."""
  widths = [max(len(r[i]) for r in [header, *rows, total]) for i in range(len(header))]

  def fmt(row):
    return "  ".join(
      c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
    )

  rule = "-" * len(fmt(header))
  return "\n".join([fmt(header), rule, *[fmt(r) for r in rows], rule, fmt(total)])


def _ratio(a: int, b: int) -> float:
  return a / b if b else float("inf")


@dataclasses.dataclass(frozen=True)
class LeafChannels:
  """Channels of one pooled leaf: how many, and how many hold a non-zero."""

  path: str
  shape: tuple[int, ...]
  channels: int
  channels_kept: int
  size: int
  nonzeros: int


class ChannelTotals:
  """Totals over ``rows`` (each with channels, channels_kept, size, nonzeros) and the
  table of `ChannelReport` and `groups.ChannelGroupReport`."""

  rows: tuple[Any, ...]

  @property
  def total_channels(self) -> int:
    return sum(r.channels for r in self.rows)

  @property
  def total_channels_kept(self) -> int:
    return sum(r.channels_kept for r in self.rows)

  @property
  def total_size(self) -> int:
    return sum(r.size for r in self.rows)

  @property
  def total_nonzeros(self) -> int:
    return sum(r.nonzeros for r in self.rows)

  @property
  def channel_compression(self) -> float:
    """#channels / #channels kept; inf when none is kept."""
    return _ratio(self.total_channels, self.total_channels_kept)

  @property
  def compression(self) -> float:
    """Weights / non-zeros; inf when none is non-zero."""
    return _ratio(self.total_size, self.total_nonzeros)

  def table(self, header: tuple[str, str], leading: list[tuple[str, str]]) -> str:
    """The rows' two ``leading`` columns, then channels, kept, weights, non-zeros; the totals."""
    rows = [
      (*lead, str(r.channels), str(r.channels_kept), str(r.size), str(r.nonzeros))
      for lead, r in zip(leading, self.rows)
    ]
    total = (
      "total",
      "",
      str(self.total_channels),
      str(self.total_channels_kept),
      str(self.total_size),
      str(self.total_nonzeros),
    )
    columns = (*header, "channels", "kept", "weights", "non-zeros")
    return (
      f"{_table(columns, rows, total)}\n"
      f"channel compression {self.channel_compression:.2f}x "
      f"({self.total_channels} / {self.total_channels_kept}), "
      f"weight compression {self.compression:.2f}x ({self.total_size} / {self.total_nonzeros})"
    )


@dataclasses.dataclass(frozen=True)
class ChannelReport(ChannelTotals):
  """Channel and weight sparsity of the pool; str() is a table."""

  rows: tuple[LeafChannels, ...]

  def __str__(self) -> str:
    return self.table(("path", "shape"), [(r.path, str(r.shape)) for r in self.rows])


def channel_report(
  params: Any, *, pool: _pool.Pool = None, channel_axis: Axis = -1
) -> ChannelReport:
  """Per pooled leaf: channels, channels kept (any non-zero weight), weights, non-zeros."""
  mask = _pool.resolve_pool(params, pool)
  axes = resolve_axes(params, mask, channel_axis, "channel_axis")
  rows = []
  for (path, shape), p, a in zip(
    _pooled_paths(params, mask), _pool.pool_leaves(params, mask), axes
  ):
    nonzero = jnp.asarray(p) != 0
    alive = jnp.any(nonzero, axis=tuple(i for i in range(len(shape)) if i != a))
    rows.append(
      LeafChannels(
        path=path,
        shape=shape,
        channels=shape[a],
        channels_kept=int(jnp.sum(alive)),
        size=int(nonzero.size),
        nonzeros=int(jnp.sum(nonzero)),
      )
    )
  return ChannelReport(rows=tuple(rows))


@dataclasses.dataclass(frozen=True)
class LeafNM:
  """N:M groups of one pooled leaf: how many, and how many hold more than N non-zeros."""

  path: str
  shape: tuple[int, ...]
  groups: int
  groups_over: int
  nonzeros: int


@dataclasses.dataclass(frozen=True)
class NMReport:
  """N:M conformity of the pool; str() is a table."""

  n: int
  m: int
  rows: tuple[LeafNM, ...]

  @property
  def total_groups(self) -> int:
    return sum(r.groups for r in self.rows)

  @property
  def total_groups_over(self) -> int:
    return sum(r.groups_over for r in self.rows)

  @property
  def conforms(self) -> bool:
    """Every group of M holds at most N non-zeros."""
    return self.total_groups_over == 0

  def __str__(self) -> str:
    header = ("path", "shape", "groups", f"> {self.n} non-zeros", "non-zeros")
    rows = [
      (r.path, str(r.shape), str(r.groups), str(r.groups_over), str(r.nonzeros)) for r in self.rows
    ]
    total = (
      "total",
      "",
      str(self.total_groups),
      str(self.total_groups_over),
      str(sum(r.nonzeros for r in self.rows)),
    )
    verdict = "conforms" if self.conforms else "does not conform"
    return f"{_table(header, rows, total)}\n{self.n}:{self.m} sparsity: the pool {verdict}"


def nm_report(params: Any, n: int, m: int, *, pool: _pool.Pool = None, axis: Axis = -2) -> NMReport:
  """Per pooled leaf: groups of M along `axis`, groups with more than N non-zeros."""
  _check_nm(n, m)
  mask = _pool.resolve_pool(params, pool)
  axes = _nm_axes(params, mask, n, m, axis)
  rows = []
  for (path, shape), p, a in zip(
    _pooled_paths(params, mask), _pool.pool_leaves(params, mask), axes
  ):
    nonzero = jnp.moveaxis(jnp.asarray(p) != 0, a, -1)
    counts = jnp.sum(nonzero.reshape(*nonzero.shape[:-1], -1, int(m)), axis=-1)
    rows.append(
      LeafNM(
        path=path,
        shape=shape,
        groups=int(counts.size),
        groups_over=int(jnp.sum(counts > n)),
        nonzeros=int(jnp.sum(nonzero)),
      )
    )
  return NMReport(n=int(n), m=int(m), rows=tuple(rows))

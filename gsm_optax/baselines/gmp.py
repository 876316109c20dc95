"""Gradual magnitude pruning (Zhu & Gupta, "To prune, or not to prune", 2017).

The target sparsity rises from s_i to s_f along a cubic over n mask updates
spaced dt steps apart, starting at step t0:

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3,  t = t0, t0 + dt, ...

and at each of those steps the mask is recomputed to keep the weights of
greatest |w|. Pruned weights are set to zero and stay zero.
"""

from __future__ import annotations

from typing import Any
from typing import Callable
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import optax

from gsm_optax import _checks
from gsm_optax import _pool
from gsm_optax.baselines import _util


class GradualMagnitudePruningState(NamedTuple):
  """State of `gradual_magnitude_pruning`; every field is an array.

  Attributes:
    count: number of updates done (the step t of the next update).
    mask: bool arrays with the params' structure: the weights kept by the last
      mask update (all True before t0 and outside the pool).
    sparsity: target sparsity s_t of that mask (0 before t0).
  """

  count: jax.Array
  mask: Any
  sparsity: jax.Array


def _check_int(value: Any, name: str, minimum: int) -> int:
  if not _checks.is_number(value, integer=True):
    raise TypeError(f"{name} must be an int, got {value!r}.")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}.")
  return int(value)


class _Cubic(NamedTuple):
  """Validated hyperparameters of the cubic schedule."""

  compression: float
  initial_sparsity: float
  begin_step: int
  end_step: int
  update_every: int

  @property
  def num_updates(self) -> int:
    """n: the mask updates after the first one (t0 + n * dt = end_step)."""
    return (self.end_step - self.begin_step) // self.update_every

  @property
  def final_sparsity(self) -> float:
    return 1.0 - 1.0 / self.compression

  def update_index(self, step: jax.Array) -> jax.Array:
    """k in [0, n] with t0 + k * dt the last mask update at or before step."""
    step = jnp.asarray(step, jnp.int32)
    return jnp.clip((step - self.begin_step) // self.update_every, 0, self.num_updates)

  def remaining_cubed(self, k: jax.Array) -> jax.Array:
    """(1 - k / n)^3 in float32 (0 when n = 0)."""
    n = self.num_updates
    if n == 0:
      return jnp.zeros([], jnp.float32)
    r = (n - k).astype(jnp.float32) / jnp.float32(n)
    return r * r * r

  def sparsity(self, step: jax.Array) -> jax.Array:
    step = jnp.asarray(step, jnp.int32)
    s_f, s_i = self.final_sparsity, self.initial_sparsity
    cube = self.remaining_cubed(self.update_index(step))
    s = jnp.float32(s_f) + jnp.float32(s_i - s_f) * cube
    return jnp.where(step < self.begin_step, jnp.float32(0), s)

  def final_keep(self, size: int) -> int:
    """Q = int(size / C), as GSM's."""
    return _pool.floor_keep(size, self.compression)

  def keep(self, size: int, k: jax.Array) -> jax.Array:
    """floor(size * (1 - s)) at update k; exact Python ints at k = 0 and n."""
    final = self.final_keep(size)
    initial = _util.floor_count(size, 1.0 - self.initial_sparsity)
    if self.num_updates == 0:
      return jnp.asarray(final, jnp.int32)
    start = size / self.compression
    span = size * (1.0 - self.initial_sparsity) - start
    approx = jnp.floor(jnp.float32(start) + jnp.float32(span) * self.remaining_cubed(k)).astype(
      jnp.int32
    )
    approx = jnp.clip(approx, final, initial)
    return jnp.where(k >= self.num_updates, final, jnp.where(k <= 0, initial, approx)).astype(
      jnp.int32
    )


def _cubic(final_compression, initial_sparsity, begin_step, end_step, update_every) -> _Cubic:
  compression = _pool.validate_compression(final_compression, "final_compression")
  if not _checks.is_number(initial_sparsity):
    raise TypeError(f"initial_sparsity must be a number in [0, 1), got {initial_sparsity!r}.")
  s_i = float(initial_sparsity)
  if not 0.0 <= s_i < 1.0:
    raise ValueError(f"initial_sparsity must be in [0, 1), got {initial_sparsity!r}.")
  if s_i > 1.0 - 1.0 / compression:
    raise ValueError(
      f"initial_sparsity {s_i} exceeds the final sparsity 1 - 1/C = "
      f"{1.0 - 1.0 / compression} of final_compression {compression}."
    )
  begin_step = _check_int(begin_step, "begin_step", 0)
  end_step = _check_int(end_step, "end_step", 0)
  update_every = _check_int(update_every, "update_every", 1)
  if begin_step > end_step:
    raise ValueError(f"begin_step ({begin_step}) must be <= end_step ({end_step}).")
  if (end_step - begin_step) % update_every:
    raise ValueError(
      f"end_step - begin_step ({end_step - begin_step}) must be a multiple "
      f"of update_every ({update_every}): the last mask update, which "
      "reaches the final sparsity, is at end_step = begin_step + n * "
      "update_every."
    )
  return _Cubic(compression, s_i, begin_step, end_step, update_every)


def gmp_sparsity_schedule(
  final_compression: float,
  *,
  begin_step: int,
  end_step: int,
  update_every: int,
  initial_sparsity: float = 0.0,
) -> Callable[[jax.Array], jax.Array]:
  """Target sparsity of the gradual-pruning mask in force after step t.

  s = s_f + (s_i - s_f) * (1 - (t_k - t0) / (n * dt))^3 with t_k = t0 + k * dt
  the last mask update at or before t (k <= n, n * dt = end_step - t0) and
  s_f = 1 - 1/C; 0 before t0 (Zhu & Gupta 2017, eq. 1). At the update steps
  t = t_k it is the cubic of the paper; in between it stays constant.

  Args:
    final_compression: C >= 1; the final sparsity is s_f = 1 - 1/C.
    begin_step: t0 >= 0, the first mask update.
    end_step: t0 + n * dt, the last mask update (a multiple of dt after t0).
    update_every: dt >= 1.
    initial_sparsity: s_i in [0, s_f], the sparsity of the first mask.

  Returns:
    An optax schedule ``step -> float32 sparsity``.
  """
  cubic = _cubic(final_compression, initial_sparsity, begin_step, end_step, update_every)
  return cubic.sparsity


def gradual_magnitude_pruning(
  final_compression: float,
  *,
  begin_step: int,
  end_step: int,
  update_every: int,
  initial_sparsity: float = 0.0,
  pool: _pool.Pool = None,
  layerwise: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Gradual magnitude pruning (Zhu & Gupta 2017) after any optimizer.

  At t = t0, t0 + dt, ..., t0 + n * dt the mask is recomputed from the current
  |w| to keep floor(size * (1 - s_t)) weights, with s_t of
  `gmp_sparsity_schedule` (the final count is Q = int(size / C), as in GSM):
  over the whole pool (exact global threshold) or with `layerwise`, per leaf.
  The update becomes u <- mask * u - (1 - mask) * w, so that w + u is exactly 0
  where the mask is False and the optimizer's update elsewhere. A pruned weight
  is zero at the next mask update and zeros are never kept (unless the whole
  pool is), so with a non-decreasing s_t it never comes back.

  Exactly the target number is kept: ties at the threshold go to the first
  entries in tree and row-major order. Intermediate counts are computed in
  float32; the first and last ones exactly.

  Use it last in a chain: ``optax.chain(optax.sgd(lr, momentum),
  gradual_magnitude_pruning(10.0, begin_step=..., ...))``.

  Args:
    final_compression: C >= 1; s_f = 1 - 1/C.
    begin_step: t0, the step of the first mask update.
    end_step: t0 + n * dt, the step of the last mask update.
    update_every: dt, the steps between mask updates.
    initial_sparsity: s_i in [0, s_f].
    pool: the prunable leaves (default: floating leaves with ndim >= 2).
    layerwise: each pooled leaf pruned to s_t separately instead of the pool
      as a whole.

  Returns:
    An `optax.GradientTransformationExtraArgs`; `update` requires `params`.
  """
  cubic = _cubic(final_compression, initial_sparsity, begin_step, end_step, update_every)

  def pooled_sizes(params):
    mask = _pool.resolve_pool(params, pool)
    flags = jax.tree.leaves(mask)
    return flags, [_checks.leaf_size(p) for p, f in zip(jax.tree.leaves(params), flags) if f]

  def init_fn(params):
    if params is None:
      raise ValueError("gradual_magnitude_pruning.init needs the params pytree.")
    if _checks.is_placeholder(params):  # optax.tree_utils.tree_map_params
      count, sparsity = jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32)
      return GradualMagnitudePruningState(count=count, mask=params, sparsity=sparsity)
    _, sizes = pooled_sizes(params)
    if layerwise:
      infos, _ = _util.pooled_leaves_with_paths(params, pool)
      for path, leaf, in_pool in infos:
        size = _checks.leaf_size(leaf)
        if in_pool and cubic.final_keep(size) < 1:
          raise ValueError(
            f"final_compression {cubic.compression} keeps int({size} / "
            f"{cubic.compression}) = 0 weights of the leaf {path} "
            "(layerwise); use a smaller compression or a global mask."
          )
    else:
      _pool.keep_count_for_size(sum(sizes), cubic.compression)
    return GradualMagnitudePruningState(
      count=jnp.zeros([], jnp.int32),
      mask=jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params),
      sparsity=jnp.zeros([], jnp.float32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
        "gradual_magnitude_pruning needs params to prune by |w| and to zero "
        "the pruned weights: call update(updates, state, params)."
      )
    if jax.tree.structure(updates) != jax.tree.structure(params):
      raise ValueError(
        "updates and params have different tree structures: "
        f"{jax.tree.structure(updates)} vs {jax.tree.structure(params)}."
      )
    flags, sizes = pooled_sizes(params)
    flat_updates, treedef = jax.tree.flatten(updates)
    flat_params = jax.tree.leaves(params)
    flat_mask = jax.tree.leaves(_util.check_mask(params, state.mask, "state.mask"))
    pooled = [i for i, f in enumerate(flags) if f]

    step = state.count
    k = cubic.update_index(step)
    is_update = (
      (step >= cubic.begin_step)
      & (step <= cubic.end_step)
      & ((step - cubic.begin_step) % cubic.update_every == 0)
    )

    def new_masks():
      magnitudes = [_util.magnitude(flat_params[i]) for i in pooled]
      if layerwise:
        return _util.layerwise_topk_masks(magnitudes, [cubic.keep(size, k) for size in sizes])
      return _util.topk_leaf_masks(magnitudes, cubic.keep(sum(sizes), k))

    def old_masks():
      return [jnp.broadcast_to(flat_mask[i], jnp.shape(flat_params[i])) for i in pooled]

    if isinstance(is_update, jax.core.Tracer):
      masks = lax.cond(is_update, new_masks, old_masks)
    else:  # eager: select only at the update steps, without tracing a cond
      masks = new_masks() if bool(is_update) else old_masks()
    for i, m in zip(pooled, masks):
      u, p = flat_updates[i], flat_params[i]
      flat_updates[i] = jnp.where(m, u, (-jnp.asarray(p)).astype(u.dtype))
      flat_mask[i] = m
    new_state = GradualMagnitudePruningState(
      count=optax.safe_increment(state.count),
      mask=jax.tree.unflatten(treedef, flat_mask),
      sparsity=cubic.sparsity(step),
    )
    return jax.tree.unflatten(treedef, flat_updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

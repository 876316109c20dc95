"""Global Sparse Momentum SGD (Ding et al., NeurIPS 2019) as optax transforms.

The paper's update, with alpha the learning rate, eta the weight decay, beta
the momentum and B the binary mask of the Q pooled weights with the greatest
Taylor score T(w) = |dL/dw * w|:

    z <- beta * z + eta * w + B * dL/dw
    w <- w - alpha * z

which is ``chain(mask_by_global_taylor, add_decayed_weights(eta, pool),
trace(beta), scale_by_learning_rate(alpha))``.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gsm_optax import _checks
from gsm_optax import _pool
from gsm_optax import selection


class MaskByGlobalTaylorState(NamedTuple):
  """State of `mask_by_global_taylor`; every field is an array (orbax-ready).

  Attributes:
    count: number of updates done.
    keep: Q used at the last update (the target number of active weights).
    threshold: the Q-th greatest Taylor score at the last update.
    num_active: active (unmasked) pooled weights at the last update.
    num_nonfinite: pooled weights whose score was NaN or inf at the last
      update (NaN scores are never active).
    num_invalid_compression: updates so far whose compression C (from a
      schedule or `inject_hyperparams`, which cannot raise under jit) was NaN,
      inf, < 1, or > |pool| (keeping 0 weights) before it was clamped.
  """

  count: jax.Array
  keep: jax.Array
  threshold: jax.Array
  num_active: jax.Array
  num_nonfinite: jax.Array
  num_invalid_compression: jax.Array


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_compression_arg(compression: optax.ScalarOrSchedule) -> None:
  """Checks what can be checked when the transform is built."""
  if callable(compression):
    return
  if isinstance(compression, (jax.Array, np.ndarray)) and compression.ndim != 0:
    raise ValueError(f"compression must be a scalar, got shape {compression.shape}.")
  if _is_concrete(compression):  # a traced C is checked where it is used
    _pool.validate_compression(compression)


def _is_float64_number(x: Any) -> bool:
  """A Python number or a NumPy float64 / integer value: C exact in float64."""
  if isinstance(x, jax.Array) or not _checks.is_number(x):
    return False
  dtype = np.asarray(x).dtype
  return dtype == np.float64 or np.issubdtype(dtype, np.integer)


def _keep_for_step(
  size: int, compression: optax.ScalarOrSchedule, count: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(Q for this step, whether C was invalid and clamped): int(|pool| / C) in
  float64 for a Python or NumPy float64 C (the reference code's rounding), also
  from a schedule; floor(|pool| / C) exactly for the float32 value of a JAX
  array C, traced or not."""
  value = compression(count) if callable(compression) else compression
  if _is_float64_number(value):
    keep, invalid = _pool.checked_number_keep(size, value)
    return jnp.asarray(keep, jnp.int32), jnp.asarray(invalid)
  return _pool.checked_traced_keep(size, value)


def taylor_score(grad: jax.Array, param: jax.Array) -> jax.Array:
  """T(w) = |g * w|, computed in float32."""
  return jnp.abs(grad.astype(jnp.float32) * param.astype(jnp.float32))


def taylor_scores(grads: list[jax.Array], params: list[jax.Array]) -> list[jax.Array]:
  """T(w) = |g * w| per leaf, computed in float32."""
  return [taylor_score(g, w) for g, w in zip(grads, params)]


@jax.jit
def _mask_pool(grads: list[jax.Array], weights: list[jax.Array], keep: jax.Array):
  """Masks the pooled gradients: (masked grads, threshold, num_active, num_nonfinite).

  One compiled computation: called eagerly (an `update` outside `jax.jit`),
  the selection's `lax.cond` branches are new closures at every call, so JAX
  re-traced and re-compiled them at every update (about 1 s per step for a
  2^22-weight pool on CPU), and every other op compiled on its own; jitted,
  it compiles once per pool layout. Inside `jax.jit` it is inlined.
  """
  size = sum(g.size for g in grads)
  selected = selection.select_threshold((grads, weights), taylor_score, keep)
  scores = taylor_scores(grads, weights)
  threshold = selected.threshold
  keep_all = keep >= size
  masked = []
  for g, s in zip(grads, scores):
    # NaN >= t is False: never active. With Q = |pool| (C = 1) every weight
    # is active; otherwise a zero score never is.
    active = (s >= threshold) & ((s > 0) | keep_all)
    masked.append(jnp.where(active, g, jnp.zeros_like(g)))
  zeros_counted = (threshold == 0) & ~keep_all
  num_active = selected.num_at_least - jnp.where(zeros_counted, selected.num_zero, 0)
  return masked, threshold, num_active, selected.num_nonfinite


def mask_by_global_taylor(
  compression: optax.ScalarOrSchedule,
  *,
  pool: _pool.Pool = None,
) -> optax.GradientTransformationExtraArgs:
  """Keeps the loss gradient of the Q pooled weights with the greatest |g * w|.

  B = [T(w) >= t] with T(w) = |g * w| and t the Q-th greatest score over the
  whole pool, Q = int(|pool| / C) (Ding et al. 2019, eq. 6). Pooled gradients
  with B = 0 become 0; leaves outside the pool pass through unchanged.

  Ties: every score equal to t is kept (the reference code's `>=`), so a few
  more than Q may be active. A score of 0 is never active when Q < |pool|:
  when fewer than Q scores are positive (t = 0) only the positive ones are
  kept, instead of the whole pool. With C = 1 (Q = |pool|) every weight is
  active, i.e. plain momentum SGD. NaN scores are never active;
  `num_nonfinite` counts NaN and inf scores. Scores are computed in float32.

  Q for a Python or NumPy float64 C, constant or a schedule's value, is
  ``int(|pool| / C)`` in float64, as `keep_count` and the reference code
  compute it. A JAX array C is float32 (a schedule's traced value,
  `optax.inject_hyperparams`, which stores C as a float32 array): Q =
  floor(|pool| / C) exactly for that float32 value, which is one less when
  rounding C to float32 raised it past |pool| / Q: C = 133.1 over 266,200
  weights keeps 2000 as a Python float and 1999 as float32 (133.1000061...).

  A constant C is checked when the transform is built. A C that is only
  known at run time (a schedule's value, or a traced C from
  `optax.inject_hyperparams` under jit) cannot raise: when it is NaN or
  +inf, or C > |pool| (Q = 0), one weight is kept; when it is below 1 (-inf
  included), all are. `num_invalid_compression` in the state (and in
  `gsm_stats`) counts the updates that clamped C this way.

  Args:
    compression: C >= 1, a float, a scalar array, or an optax schedule
      ``step -> C`` (gradual GSM).
    pool: which leaves are prunable: None (floating leaves with ndim >= 2), a
      bool pytree, or a callable ``params -> bool pytree``.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose `update` requires
    `params` (and ignores extra keyword arguments). `init` accepts abstract
    params (`jax.ShapeDtypeStruct` leaves).
  """
  _check_compression_arg(compression)

  def state_with_keep(keep):
    return MaskByGlobalTaylorState(
      count=jnp.zeros([], jnp.int32),
      keep=jnp.asarray(keep, jnp.int32),
      threshold=jnp.zeros([], jnp.float32),
      num_active=jnp.zeros([], jnp.int32),
      num_nonfinite=jnp.zeros([], jnp.int32),
      num_invalid_compression=jnp.zeros([], jnp.int32),
    )

  def init_fn(params):
    if params is None:
      raise ValueError("mask_by_global_taylor.init needs the params pytree.")
    if _checks.is_placeholder(params):  # optax.tree_utils.tree_map_params
      return state_with_keep(0)
    size = _pool.pooled_size(params, _pool.resolve_pool(params, pool))
    keep, _ = _keep_for_step(size, compression, jnp.zeros([], jnp.int32))
    if not callable(compression) and _is_concrete(compression):
      _pool.keep_count_for_size(size, float(compression))
    return state_with_keep(keep)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
        "mask_by_global_taylor needs params to compute |g * w|: call update(grads, state, params)."
      )
    mask = _pool.resolve_pool(params, pool)
    if jax.tree.structure(updates) != jax.tree.structure(params):
      raise ValueError(
        "updates and params have different tree structures: "
        f"{jax.tree.structure(updates)} vs {jax.tree.structure(params)}."
      )
    flat_updates, treedef = jax.tree.flatten(updates)
    flat_params = jax.tree.leaves(params)
    flat_mask = jax.tree.leaves(mask)
    pooled = [i for i, m in enumerate(flat_mask) if m]
    grads = [flat_updates[i] for i in pooled]
    weights = [flat_params[i] for i in pooled]
    size = sum(g.size for g in grads)

    keep, invalid = _keep_for_step(size, compression, state.count)
    masked, threshold, num_active, num_nonfinite = _mask_pool(grads, weights, keep)
    for i, g in zip(pooled, masked):
      flat_updates[i] = g
    new_state = MaskByGlobalTaylorState(
      count=optax.safe_increment(state.count),
      keep=keep,
      threshold=threshold,
      num_active=num_active,
      num_nonfinite=num_nonfinite,
      num_invalid_compression=state.num_invalid_compression + invalid.astype(jnp.int32),
    )
    return jax.tree.unflatten(treedef, flat_updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _value_at_step_0(hyperparam: Any) -> float | None:
  """A number, array or schedule at step 0 as a float; None when it is not
  concrete (traced: `inject_hyperparams` under jit)."""
  with jax.ensure_compile_time_eval():  # a schedule at 0 even under jit
    value = hyperparam(jnp.zeros([], jnp.int32)) if callable(hyperparam) else hyperparam
  return float(value) if _checks.is_number(value) else None


def _passive_decay_per_step(
  learning_rate: optax.ScalarOrSchedule,
  weight_decay: optax.ScalarOrSchedule,
  momentum: float,
) -> float | None:
  """r = alpha * eta / (1 - beta) at step 0, the relative shrink of a passive
  weight per step (Ding et al. 2019, section 3.2); None when a value is not
  concrete or beta is not in [0, 1)."""
  alpha, eta, beta = (_value_at_step_0(x) for x in (learning_rate, weight_decay, momentum))
  if alpha is None or eta is None or beta is None or not 0.0 <= beta < 1.0:
    return None
  return alpha * eta / (1.0 - beta)


def _warn_if_decay_underflows(params: Any, pool: _pool.Pool, decay: float | None) -> None:
  """Warns once per dtype of pooled leaves whose resolution eps / 2 exceeds the
  per-step relative decay r: w - alpha * z then rounds back to w."""
  if decay is None or not decay > 0 or not np.isfinite(decay):
    return  # unknown (traced), or no decay to represent
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  by_dtype: dict[np.dtype, list[str]] = {}
  for (path, leaf), flag in zip(flat, jax.tree.leaves(_pool.resolve_pool(params, pool))):
    if flag:
      by_dtype.setdefault(_checks.leaf_dtype(leaf), []).append(jax.tree_util.keystr(path))
  for dtype, paths in by_dtype.items():
    resolution = float(jnp.finfo(dtype).eps) / 2
    if decay >= resolution:
      continue
    leaves = "leaf" if len(paths) == 1 else "leaves"
    warnings.warn(
      f"gsm: {len(paths)} pooled {leaves} of dtype {dtype.name} (e.g. {paths[0]}) cannot "
      "represent the per-step decay of a passive weight: learning_rate * weight_decay / "
      f"(1 - momentum) = {decay:.2g} (at step 0) is below {dtype.name}'s resolution eps / 2 = "
      f"{resolution:.2g}, so w - learning_rate * z rounds back to w (or stalls within a factor "
      "of 2) and GSM prunes nothing. Keep float32 master weights (params and optimizer state "
      f"in float32) and cast them to {dtype.name} for the forward pass (docs/METHOD.md, "
      "'Numerics').",
      stacklevel=3,
    )


def gsm(
  learning_rate: optax.ScalarOrSchedule,
  compression: optax.ScalarOrSchedule,
  *,
  momentum: float = 0.99,
  weight_decay: optax.ScalarOrSchedule = 5e-4,
  nesterov: bool = False,
  pool: _pool.Pool = None,
) -> optax.GradientTransformationExtraArgs:
  """Global Sparse Momentum SGD (Ding et al., NeurIPS 2019, eq. 7-8).

  z <- beta * z + eta * w + B * dL/dw;  w <- w - alpha * z, with B the mask of
  `mask_by_global_taylor`. Weight decay applies to every pooled weight (active
  or passive), none to leaves outside the pool. A passive weight shrinks by
  about (1 - alpha * eta / (1 - beta)) per step.

  `init` warns when a pooled leaf's dtype cannot represent that shrink: when
  r = alpha * eta / (1 - beta) at step 0 is below the dtype's eps / 2 (2^-8
  for bfloat16, 2^-11 for float16), w - alpha * z rounds back to w: passive
  weights stall within a factor of 2, and never move when r < eps / 4 (e.g.
  bfloat16 at alpha = 0.03, eta = 5e-4, beta = 0.99: r = 1.5e-3). Keep
  float32 params and cast them for the forward pass instead. The check is skipped when a value is traced
  (`inject_hyperparams` under jit) or r = 0 (e.g. a warm-up from 0).

  Args:
    learning_rate: alpha, a float or an optax schedule.
    compression: C >= 1 (Q = int(|pool| / C) weights stay non-zero), a float or
      a schedule of the step.
    momentum: beta.
    weight_decay: eta, a float or a schedule; applied to the pool only.
    nesterov: Nesterov momentum (as ``torch.optim.SGD(nesterov=True)``).
    pool: prunable leaves, as in `mask_by_global_taylor`.

  Returns:
    An `optax.GradientTransformationExtraArgs` with the state of an
    `optax.chain`; `update` requires `params`.
  """
  decay_mask = _pool.default_pool if pool is None else pool
  chain = optax.chain(
    mask_by_global_taylor(compression, pool=pool),
    optax.add_decayed_weights(weight_decay, mask=decay_mask),
    optax.trace(decay=momentum, nesterov=nesterov),
    optax.scale_by_learning_rate(learning_rate),
  )

  def init_fn(params):
    state = chain.init(params)
    if not _checks.is_placeholder(params):  # optax.tree_utils.tree_map_params
      decay = _passive_decay_per_step(learning_rate, weight_decay, momentum)
      _warn_if_decay_underflows(params, pool, decay)
    return state

  return optax.GradientTransformationExtraArgs(init_fn, chain.update)


def _find_states(state: Any) -> list[MaskByGlobalTaylorState]:
  return [
    s
    for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, MaskByGlobalTaylorState))
    if isinstance(s, MaskByGlobalTaylorState)
  ]


def gsm_stats(opt_state: Any) -> dict[str, jax.Array]:
  """Logging view of the (single) `MaskByGlobalTaylorState` in `opt_state`.

  Works on any nesting: `optax.chain`, `inject_hyperparams`, `masked`, ...

  Returns:
    A dict with "step", "keep" (Q), "threshold", "num_active",
    "num_nonfinite" and "num_invalid_compression" (the fields of
    `MaskByGlobalTaylorState`).

  Raises:
    ValueError: `opt_state` holds no such state, or more than one.
  """
  found = _find_states(opt_state)
  if len(found) != 1:
    raise ValueError(
      "gsm_stats expects exactly one MaskByGlobalTaylorState in the "
      f"optimizer state, found {len(found)}."
    )
  state = found[0]
  return {
    "step": state.count,
    "keep": state.keep,
    "threshold": state.threshold,
    "num_active": state.num_active,
    "num_nonfinite": state.num_nonfinite,
    "num_invalid_compression": state.num_invalid_compression,
  }

"""Global Sparse Momentum SGD (Ding et al., NeurIPS 2019) as optax transforms.

The paper's update, with alpha the learning rate, eta the weight decay, beta
the momentum and B the binary mask of the Q pooled weights with the greatest
Taylor score T(w) = |dL/dw * w|:

    z <- beta * z + eta * w + B * dL/dw
    w <- w - alpha * z

which is ``chain(mask_by_global_taylor, add_decayed_weights(eta, pool),
trace(beta), scale_by_learning_rate(alpha))``.

Two opt-in variants beyond the paper (defaults off, the chain above unchanged):
a smoothed score (``score_ema``: B is the top-Q of an exponential moving
average of |g * w|) and a decay that grows with how long a weight has been
passive (`add_passive_age_decay`).
"""

from __future__ import annotations

import functools
from typing import Any
from typing import Callable
from typing import NamedTuple
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gsm_optax import _checks
from gsm_optax import _pool
from gsm_optax import selection as selection_lib


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
    _pool.validate_compression(compression, schedule_ok=True)


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


def _static_keep(size: int, compression: optax.ScalarOrSchedule, method: str) -> int | None:
  """Q as a Python int for the "top_k" selection when C is a constant Python or
  NumPy float64 number (`lax.top_k` takes a static k); None otherwise."""
  if method != "top_k" or not _is_float64_number(compression):
    return None
  return _pool.checked_number_keep(size, compression)[0]


def taylor_score(grad: jax.Array, param: jax.Array) -> jax.Array:
  """T(w) = |g * w|, computed in float32."""
  return jnp.abs(grad.astype(jnp.float32) * param.astype(jnp.float32))


def taylor_scores(grads: list[jax.Array], params: list[jax.Array]) -> list[jax.Array]:
  """T(w) = |g * w| per leaf, computed in float32."""
  return [taylor_score(g, w) for g, w in zip(grads, params)]


class TaylorMask(NamedTuple):
  """B over the pool and what `MaskByGlobalTaylorState` records of it.

  Attributes:
    active: B per pooled leaf (bool arrays, in tree order).
    threshold: t, the Q-th greatest score.
    num_active: the number of active pooled weights.
    num_nonfinite: pooled weights whose score was NaN or inf.
  """

  active: list[jax.Array]
  threshold: jax.Array
  num_active: jax.Array
  num_nonfinite: jax.Array


def _taylor_mask(
  grads: list[jax.Array],
  weights: list[jax.Array],
  keep: jax.Array,
  method: str,
  static_keep: int | None,
) -> TaylorMask:
  """B = the top-Q of |g * w| over the pooled leaves (`_active_by_selection`),
  selected by `method`, with Q = `static_keep` when it is known statically."""
  k = keep if static_keep is None else static_keep
  selected = selection_lib.select_threshold((grads, weights), taylor_score, k, method)
  return _active_by_selection(taylor_scores(grads, weights), selected, keep)


def _apply_active(grads: list[jax.Array], active: list[jax.Array]) -> list[jax.Array]:
  """B * g per pooled leaf."""
  return [jnp.where(a, g, jnp.zeros_like(g)) for g, a in zip(grads, active)]


@functools.partial(jax.jit, static_argnames=("method", "static_keep"))
def _mask_pool(
  grads: list[jax.Array],
  weights: list[jax.Array],
  keep: jax.Array,
  method: str = "auto",
  static_keep: int | None = None,
):
  """Masks the pooled gradients: (masked grads, `TaylorMask`).

  One compiled computation: called eagerly (an `update` outside `jax.jit`),
  the selection's `lax.cond` branches are new closures at every call, so JAX
  re-traced and re-compiled them at every update (about 1 s per step for a
  2^22-weight pool on CPU), and every other op compiled on its own; jitted,
  it compiles once per pool layout. Inside `jax.jit` it is inlined.
  """
  mask = _taylor_mask(grads, weights, keep, method, static_keep)
  return _apply_active(grads, mask.active), mask


def _active_by_selection(
  scores: list[jax.Array], selected: selection_lib.ScoreSelection, keep: jax.Array
) -> TaylorMask:
  """B = [s >= t] & [s > 0 or Q = |pool|] per leaf, t the selected threshold."""
  size = sum(s.size for s in scores)
  threshold = selected.threshold
  keep_all = keep >= size
  # NaN >= t is False: never active. With Q = |pool| (C = 1) every weight
  # is active; otherwise a zero score never is.
  active = [(s >= threshold) & ((s > 0) | keep_all) for s in scores]
  zeros_counted = (threshold == 0) & ~keep_all
  num_active = selected.num_at_least - jnp.where(zeros_counted, selected.num_zero, 0)
  return TaylorMask(active, threshold, num_active, selected.num_nonfinite)


def _mask_by_selection(
  grads: list[jax.Array],
  scores: list[jax.Array],
  selected: selection_lib.ScoreSelection,
  keep: jax.Array,
):
  """B = [s >= t] & [s > 0 or Q = |pool|] applied to the grads: (masked grads,
  threshold, num_active, num_nonfinite)."""
  mask = _active_by_selection(scores, selected, keep)
  return _apply_active(grads, mask.active), mask.threshold, mask.num_active, mask.num_nonfinite


def _smoothed_scores(
  scores: list[jax.Array], grads: list[jax.Array], params: list[jax.Array], decay: jax.Array
) -> list[jax.Array]:
  """s_t = d * s_{t-1} + (1 - d) * |g_t * w_t| per leaf, in float32 (1 - d too)."""
  d = jnp.asarray(decay, jnp.float32)
  return [d * s + (1 - d) * t for s, t in zip(scores, taylor_scores(grads, params))]


@functools.partial(jax.jit, static_argnames=("method", "static_keep"))
def _mask_pool_smoothed(
  grads: list[jax.Array],
  weights: list[jax.Array],
  scores: list[jax.Array],
  keep: jax.Array,
  decay: jax.Array,
  method: str = "auto",
  static_keep: int | None = None,
):
  """`_mask_pool` with B the top-Q of the smoothed scores: (masked grads,
  threshold, num_active, num_nonfinite, new scores)."""
  smoothed = _smoothed_scores(scores, grads, weights, decay)
  k = keep if static_keep is None else static_keep
  selected = selection_lib.select_score_threshold(smoothed, k, method)
  return (*_mask_by_selection(grads, smoothed, selected, keep), smoothed)


class SmoothedTaylorState(NamedTuple):
  """State of `mask_by_global_taylor` with ``score_ema > 0``; every field is arrays.

  Attributes:
    taylor: the `MaskByGlobalTaylorState` (what `gsm_stats` reads); its
      threshold is the Q-th greatest smoothed score.
    score: s_t, float32 arrays with the params' structure (0 outside the pool).
  """

  taylor: MaskByGlobalTaylorState
  score: Any


_STATIC_HINT = "with optax.inject_hyperparams, name it in static_args"


def check_score_ema(score_ema: Any) -> float:
  """Checks d of the smoothed score: None (off, d = 0) or a number in [0, 1)."""
  if score_ema is None:
    return 0.0
  if not _checks.is_number(score_ema):
    raise TypeError(f"score_ema must be a number in [0, 1) ({_STATIC_HINT}), got {score_ema!r}.")
  value = float(score_ema)
  if not 0.0 <= value < 1.0:
    raise ValueError(
      "score_ema must be in [0, 1) (s_t = d * s_(t-1) + (1 - d) * |g * w|; 0: the paper's "
      f"score), got {score_ema!r}."
    )
  return value


class _Pooled(NamedTuple):
  """The flattened updates and the pooled gradients and weights."""

  flat_updates: list[jax.Array]
  treedef: Any
  indices: list[int]
  grads: list[jax.Array]
  weights: list[jax.Array]

  def unflatten(self, masked: list[jax.Array]) -> Any:
    flat = list(self.flat_updates)
    for i, g in zip(self.indices, masked):
      flat[i] = g
    return jax.tree.unflatten(self.treedef, flat)


def _split_pool(updates: Any, params: Any, pool: _pool.Pool) -> _Pooled:
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
  pooled = [i for i, m in enumerate(jax.tree.leaves(mask)) if m]
  grads = [flat_updates[i] for i in pooled]
  weights = [flat_params[i] for i in pooled]
  return _Pooled(flat_updates, treedef, pooled, grads, weights)


def _state_with_keep(keep: Any) -> MaskByGlobalTaylorState:
  return MaskByGlobalTaylorState(
    count=jnp.zeros([], jnp.int32),
    keep=jnp.asarray(keep, jnp.int32),
    threshold=jnp.zeros([], jnp.float32),
    num_active=jnp.zeros([], jnp.int32),
    num_nonfinite=jnp.zeros([], jnp.int32),
    num_invalid_compression=jnp.zeros([], jnp.int32),
  )


def _init_taylor_state(params: Any, compression: Any, pool: _pool.Pool) -> MaskByGlobalTaylorState:
  if params is None:
    raise ValueError("mask_by_global_taylor.init needs the params pytree.")
  if _checks.is_placeholder(params):  # optax.tree_utils.tree_map_params
    return _state_with_keep(0)
  size = _pool.pooled_size(params, _pool.resolve_pool(params, pool))
  keep, _ = _keep_for_step(size, compression, jnp.zeros([], jnp.int32))
  if not callable(compression) and _is_concrete(compression):
    _pool.keep_count_for_size(size, float(compression))
  return _state_with_keep(keep)


def _next_taylor_state(state, keep, invalid, threshold, num_active, num_nonfinite):
  return MaskByGlobalTaylorState(
    count=optax.safe_increment(state.count),
    keep=keep,
    threshold=threshold,
    num_active=num_active,
    num_nonfinite=num_nonfinite,
    num_invalid_compression=state.num_invalid_compression + invalid.astype(jnp.int32),
  )


class TaylorStep(NamedTuple):
  """One update of a GSM mask (`global_taylor_step`, or a `Selector`'s step).

  Attributes:
    updates: the updates with B * g on the pool (unchanged elsewhere).
    indices: the positions of the pooled leaves among the tree's leaves.
    active: B per pooled leaf (bool arrays of the leaf's shape, in the order
      of `indices`; a structured mask broadcast over its channel or group).
    state: the mask's next state (a `MaskByGlobalTaylorState` here).
  """

  updates: Any
  indices: list[int]
  active: list[jax.Array]
  state: Any


class Selector(NamedTuple):
  """A GSM mask as two pure functions: which pooled weights are active (B).

  ``init(params) -> state`` and ``step(updates, state, params) -> TaylorStep``.
  The mask transforms (`mask_by_global_taylor`, the structured ones) are
  `mask_transform` of their selector; `shrink_passive_with` reads B from one.
  """

  init: Callable[[Any], Any]
  step: Callable[[Any, Any, Any], TaylorStep]


def mask_transform(selector: Selector) -> optax.GradientTransformationExtraArgs:
  """u = B * g: the selector's masked updates, its state as the transform's state."""

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    step = selector.step(updates, state, params)
    return step.updates, step.state

  return optax.GradientTransformationExtraArgs(selector.init, update_fn)


def global_taylor_step(
  updates: Any,
  state: MaskByGlobalTaylorState,
  params: Any,
  compression: optax.ScalarOrSchedule,
  pool: _pool.Pool,
  method: str = "auto",
) -> TaylorStep:
  """B = [|g * w| >= t] over the pool, t the Q-th greatest, Q = int(|pool| / C_t);
  the masked updates and the next state (`mask_by_global_taylor`'s update).
  `method` names the selection (`selection.SELECTIONS`), resolved here."""
  split = _split_pool(updates, params, pool)
  size = sum(g.size for g in split.grads)
  keep, invalid = _keep_for_step(size, compression, state.count)
  method = selection_lib.choose_selection(method, (split.grads, split.weights))
  static_keep = _static_keep(size, compression, method)
  masked, mask = _mask_pool(split.grads, split.weights, keep, method, static_keep)
  new_state = _next_taylor_state(
    state, keep, invalid, mask.threshold, mask.num_active, mask.num_nonfinite
  )
  return TaylorStep(split.unflatten(masked), split.indices, mask.active, new_state)


def taylor_selector(
  compression: optax.ScalarOrSchedule, *, pool: _pool.Pool = None, selection: str = "auto"
) -> Selector:
  """B = [|g * w| >= t] over the pool, t the Q-th greatest, Q = int(|pool| / C_t).

  The `Selector` of `mask_by_global_taylor` (its rules: ties at t kept, zero
  scores active only when C = 1, NaN never): `init` is its state,
  `step` is `global_taylor_step`. Raises as `mask_by_global_taylor` does.
  """
  _check_compression_arg(compression)
  method = selection_lib.check_selection(selection)

  def init_fn(params):
    return _init_taylor_state(params, compression, pool)

  def step_fn(updates, state, params):
    return global_taylor_step(updates, state, params, compression, pool, method)

  return Selector(init_fn, step_fn)


def mask_by_global_taylor(
  compression: optax.ScalarOrSchedule,
  *,
  pool: _pool.Pool = None,
  score_ema: float | None = None,
  selection: str = "auto",
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

  Smoothed score (opt-in, ``score_ema = d > 0``, as Intel Neural
  Compressor's ``snip_momentum``): B is the top-Q, by the same rules, of
  s_t = d * s_{t-1} + (1 - d) * |g_t * w_t| (s_0 = 0, float32, in the state)
  instead of |g_t * w_t|, and masks the current gradient g_t. A NaN score
  stays NaN in s, so that weight is never active again. The state is then a
  `SmoothedTaylorState` holding the `MaskByGlobalTaylorState`.

  Args:
    compression: C >= 1, a float, a scalar array, or an optax schedule
      ``step -> C`` (gradual GSM).
    pool: which leaves are prunable: None (floating leaves with ndim >= 2), a
      bool pytree, or a callable ``params -> bool pytree``.
    score_ema: d in [0, 1); None (the default) or 0 is the paper's
      instantaneous score. (None, not 0.0, so that `optax.inject_hyperparams`,
      which injects every numeric argument, leaves the paper's state as it was.)
    selection: how t is found, all exact and equal: "radix" (two histogram
      passes; under SPMD only histograms cross devices), "sampled" (a sampled
      bracket, the radix select when it cannot decide), "top_k" (the
      concatenated scores and `lax.top_k`: a sort when Q is traced), or
      "auto" (the default), chosen when traced: on the CPU "radix" below
      2^22 pooled weights and "sampled" from there; on GPU and TPU "radix"
      when a pooled leaf is split over devices (or may be: jit over a mesh
      with automatic axes), else "top_k". A split made only by jit's
      `in_shardings` of host arrays is not visible when traced: pass "radix".

  Returns:
    An `optax.GradientTransformationExtraArgs` whose `update` requires
    `params` (and ignores extra keyword arguments). `init` accepts abstract
    params (`jax.ShapeDtypeStruct` leaves).
  """
  _check_compression_arg(compression)
  decay = check_score_ema(score_ema)
  method = selection_lib.check_selection(selection)
  if decay > 0:
    return _mask_by_smoothed_taylor(compression, pool, decay, method)
  return mask_transform(taylor_selector(compression, pool=pool, selection=method))


def _mask_by_smoothed_taylor(
  compression: optax.ScalarOrSchedule, pool: _pool.Pool, decay: float, method: str
) -> optax.GradientTransformationExtraArgs:
  """`mask_by_global_taylor` with B the top-Q of s_t = d s_(t-1) + (1 - d) |g w|."""

  def init_fn(params):
    taylor = _init_taylor_state(params, compression, pool)
    if _checks.is_placeholder(params):
      return SmoothedTaylorState(taylor=taylor, score=params)
    score = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    return SmoothedTaylorState(taylor=taylor, score=score)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    split = _split_pool(updates, params, pool)
    flat_scores = jax.tree.leaves(state.score)
    scores = [flat_scores[i] for i in split.indices]
    size = sum(g.size for g in split.grads)
    keep, invalid = _keep_for_step(size, compression, state.taylor.count)
    chosen = selection_lib.choose_selection(method, (scores, split.grads, split.weights))
    static_keep = _static_keep(size, compression, chosen)
    masked, threshold, num_active, num_nonfinite, smoothed = _mask_pool_smoothed(
      split.grads, split.weights, scores, keep, jnp.float32(decay), chosen, static_keep
    )
    for i, s in zip(split.indices, smoothed):
      flat_scores[i] = s
    taylor = _next_taylor_state(state.taylor, keep, invalid, threshold, num_active, num_nonfinite)
    score = jax.tree.unflatten(jax.tree.structure(state.score), flat_scores)
    return split.unflatten(masked), SmoothedTaylorState(taylor=taylor, score=score)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class PassiveAgeDecayState(NamedTuple):
  """State of `add_passive_age_decay`; every field is arrays.

  Attributes:
    count: number of updates done (the step of a weight-decay schedule).
    age: int32 arrays with the params' structure: for each pooled weight, the
      consecutive updates so far whose incoming value was exactly 0 (0 outside
      the pool).
  """

  count: jax.Array
  age: Any


def check_passive_decay(
  growth: Any, horizon_steps: Any, names: tuple[str, str] = ("growth", "horizon_steps")
) -> tuple[float, int]:
  """Checks (growth, horizon) of the passive-age decay: growth >= 0, horizon an
  int >= 1; None is 0 and 1."""
  growth = 0.0 if growth is None else growth
  horizon_steps = 1 if horizon_steps is None else horizon_steps
  if not _checks.is_number(growth) or not 0.0 <= float(growth) < float("inf"):
    raise ValueError(f"{names[0]} must be a finite number >= 0 ({_STATIC_HINT}), got {growth!r}.")
  if not _checks.is_number(horizon_steps, integer=True) or horizon_steps < 1:
    raise ValueError(
      f"{names[1]} must be an integer >= 1 (steps; {_STATIC_HINT}), got {horizon_steps!r}."
    )
  return float(growth), int(horizon_steps)


def _age_decayed(u: jax.Array, w: jax.Array, age: jax.Array, rate: jax.Array, horizon: int):
  """(u + rate * min(a / H, 1) * w, a) with a <- a + 1 where u == 0, else 0."""
  age = jnp.where(u == 0, optax.safe_increment(age), jnp.zeros_like(age))
  factor = jnp.minimum(age.astype(jnp.float32) / jnp.float32(horizon), 1.0)
  return (u + (rate * factor) * w).astype(u.dtype), age


def add_passive_age_decay(
  weight_decay: optax.ScalarOrSchedule,
  growth: float,
  horizon_steps: int,
  *,
  pool: _pool.Pool = None,
) -> optax.GradientTransformationExtraArgs:
  """Adds eta * growth * min(a / H, 1) * w to the update of each pooled weight.

  a, the weight's passive age, counts the consecutive updates whose incoming
  value (the masked gradient, when chained right after `mask_by_global_taylor`)
  was exactly 0, and is reset to 0 by a non-zero one; it is updated before the
  decay is added (a weight passive for the first time has a = 1). Before
  ``add_decayed_weights(eta)`` in `gsm`'s chain this gives
  z <- beta z + eta (1 + growth * min(a / H, 1)) w + B g: a weight passive for
  H steps or more decays (1 + growth) times as fast. Leaves outside the pool
  pass through unchanged.

  Args:
    weight_decay: eta, a float or an optax schedule of the step.
    growth: >= 0, the extra decay reached at age H (0 adds nothing).
    horizon_steps: H, an integer >= 1.
    pool: prunable leaves, as in `mask_by_global_taylor`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose `update` requires `params`.
  """
  growth, horizon = check_passive_decay(growth, horizon_steps)

  def init_fn(params):
    count = jnp.zeros([], jnp.int32)
    if _checks.is_placeholder(params):  # optax.tree_utils.tree_map_params
      return PassiveAgeDecayState(count=count, age=params)
    _pool.resolve_pool(params, pool)
    age = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.int32), params)
    return PassiveAgeDecayState(count=count, age=age)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("add_passive_age_decay needs params: call update(updates, state, params).")
    flags = jax.tree.leaves(_pool.resolve_pool(params, pool))
    eta = weight_decay(state.count) if callable(weight_decay) else weight_decay
    rate = jnp.asarray(eta, jnp.float32) * jnp.float32(growth)
    flat_updates, treedef = jax.tree.flatten(updates)
    flat_ages = jax.tree.leaves(state.age)
    for i, (w, flag) in enumerate(zip(jax.tree.leaves(params), flags)):
      if flag:
        flat_updates[i], flat_ages[i] = _age_decayed(
          flat_updates[i], w, flat_ages[i], rate, horizon
        )
    age = jax.tree.unflatten(jax.tree.structure(state.age), flat_ages)
    new_state = PassiveAgeDecayState(count=optax.safe_increment(state.count), age=age)
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
  score_ema: float | None = None,
  passive_decay_growth: float | None = None,
  passive_decay_horizon: int | None = None,
  selection: str = "auto",
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
    learning_rate: alpha >= 0, a float or an optax schedule.
    compression: C >= 1 (Q = int(|pool| / C) weights stay non-zero), a float or
      a schedule of the step.
    momentum: beta in [0, 1).
    weight_decay: eta >= 0, a float or a schedule; applied to the pool only.
    nesterov: Nesterov momentum (as ``torch.optim.SGD(nesterov=True)``).
    pool: prunable leaves, as in `mask_by_global_taylor`.
    score_ema: d in [0, 1): B is the top-Q of s_t = d s_(t-1) + (1 - d) |g w|
      (`mask_by_global_taylor`); None (the default) or 0 is the paper's rule.
    passive_decay_growth: growth >= 0 of `add_passive_age_decay`, chained
      after the mask: a weight passive for a steps decays by
      eta (1 + growth * min(a / H, 1)); None (the default) or 0 adds nothing.
    passive_decay_horizon: H, an integer >= 1 (steps); None is 1.
    selection: how the threshold is selected, as in `mask_by_global_taylor`
      ("auto", "radix", "sampled" or "top_k"; every one exact).

  The variants default to None rather than 0 because `optax.inject_hyperparams`
  injects every numeric argument: with None, ``inject_hyperparams(gsm)`` keeps
  the state it had before they existed. To set them under
  ``inject_hyperparams``, name them in its ``static_args``.

  Returns:
    An `optax.GradientTransformationExtraArgs` with the state of an
    `optax.chain`; `update` requires `params`. With the variants off it is
    the paper's four-transform chain, state included.
  """
  growth, horizon = check_passive_decay(
    passive_decay_growth, passive_decay_horizon, ("passive_decay_growth", "passive_decay_horizon")
  )
  masks = [mask_by_global_taylor(compression, pool=pool, score_ema=score_ema, selection=selection)]
  if growth > 0:
    masks.append(add_passive_age_decay(weight_decay, growth, horizon, pool=pool))
  return gsm_chain(masks, learning_rate, momentum, weight_decay, nesterov, pool)


def paper_sgd(
  learning_rate: optax.ScalarOrSchedule,
  momentum: float,
  weight_decay: optax.ScalarOrSchedule,
  nesterov: bool,
  pool: _pool.Pool,
) -> list[optax.GradientTransformation]:
  """[add_decayed_weights(eta, pool), trace(beta), scale_by_learning_rate(alpha)]: the
  momentum SGD after GSM's mask (eq. 7-8), weight decay on the pool only.

  Raises a TypeError or ValueError for a constant alpha, beta or eta out of range.
  """
  _checks.check_sgd_args(learning_rate, momentum, weight_decay)
  return [
    optax.add_decayed_weights(weight_decay, mask=_pool.default_pool if pool is None else pool),
    optax.trace(decay=momentum, nesterov=nesterov),
    optax.scale_by_learning_rate(learning_rate),
  ]


def gsm_chain(
  masks: list[optax.GradientTransformation],
  learning_rate: optax.ScalarOrSchedule,
  momentum: float,
  weight_decay: optax.ScalarOrSchedule,
  nesterov: bool,
  pool: _pool.Pool,
) -> optax.GradientTransformationExtraArgs:
  """masks -> add_decayed_weights(eta, pool) -> trace(beta) -> scale_by_learning_rate(alpha).

  The GSM update of eq. 7-8 around any gradient masks (per weight, per channel,
  N:M); `init` warns when the dtype cannot represent the passive weights' shrink.
  Raises a TypeError or ValueError for a constant alpha, beta or eta out of range.
  """
  chain = optax.chain(*masks, *paper_sgd(learning_rate, momentum, weight_decay, nesterov, pool))

  def init_fn(params):
    state = chain.init(params)
    if not _checks.is_placeholder(params):  # optax.tree_utils.tree_map_params
      decay = _passive_decay_per_step(learning_rate, weight_decay, momentum)
      _warn_if_decay_underflows(params, pool, decay)
    return state

  return optax.GradientTransformationExtraArgs(init_fn, chain.update)


def _find_states(state: Any, kind: type = MaskByGlobalTaylorState) -> list[Any]:
  return [
    s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kind)) if isinstance(s, kind)
  ]


def single_state(opt_state: Any, kind: type, caller: str) -> Any:
  """The one state of type `kind` in `opt_state` (any nesting); a ValueError otherwise."""
  found = _find_states(opt_state, kind)
  if len(found) != 1:
    raise ValueError(
      f"{caller} expects exactly one {kind.__name__} in the optimizer state, found {len(found)}."
    )
  return found[0]


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
  state = single_state(opt_state, MaskByGlobalTaylorState, "gsm_stats")
  return {
    "step": state.count,
    "keep": state.keep,
    "threshold": state.threshold,
    "num_active": state.num_active,
    "num_nonfinite": state.num_nonfinite,
    "num_invalid_compression": state.num_invalid_compression,
  }

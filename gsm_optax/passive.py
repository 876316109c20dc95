"""Passive pooled weights shrink geometrically around any optimizer.

Per step t, with g the gradient, w the params and B a GSM mask (`mask_by_global_taylor`'s
top-Q of |g * w| over the pool, or a structured one: channels, N:M, channel groups;
1 outside the pool):

    u = base(B * g, w)         where B = 1 or the weight is outside the pool
    u = -r_t * w               where the weight is pooled and B = 0

so a weight passive for k steps in a row is w * prod(1 - r_t) over them.
`shrink_passive_with` wraps any base transform around any mask's `transform.Selector`;
`shrink_passive` is it with `mask_by_global_taylor`'s. Around the paper's momentum SGD:
`gsm_sgd_shrink` and its structured siblings (AdamW: `adam.py`). docs/METHOD.md,
section 9, explains why.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gsm_optax import _checks
from gsm_optax import _pool
from gsm_optax import groups as groups_lib
from gsm_optax import structured
from gsm_optax import transform


class ShrinkPassiveState(NamedTuple):
  """State of `shrink_passive_with` (`shrink_passive`, `gsm_adamw`, `gsm_sgd_shrink` and
  their structured siblings); every leaf is an array.

  Attributes:
    taylor: the mask's state, its `count` the step t: a `MaskByGlobalTaylorState`
      (what `gsm_stats` reads), a `MaskByGlobalChannelTaylorState` (channels and
      channel groups: `channel_stats`) or a `MaskByNMTaylorState` (`nm_stats`).
    base: the state of the base transform (e.g. Adam's m, v and counts).
  """

  taylor: Any
  base: Any


def _overwrite_passive(
  base_updates: Any, params: Any, step: transform.TaylorStep, rate: Any
) -> Any:
  """u = -r * w where a pooled weight is passive (B = 0), the base's update elsewhere."""
  flat, treedef = jax.tree.flatten(base_updates)
  flat_params = jax.tree.leaves(params)
  for i, active in zip(step.indices, step.active):
    u, w = flat[i], flat_params[i]
    shrink = -(jnp.asarray(rate, u.dtype) * w.astype(u.dtype))
    flat[i] = jnp.where(active, u, shrink)
  return jax.tree.unflatten(treedef, flat)


def shrink_passive_with(
  base: optax.GradientTransformation,
  selector: transform.Selector,
  *,
  passive_shrink: optax.ScalarOrSchedule,
) -> optax.GradientTransformationExtraArgs:
  """u = base(B * g, w) where active or not pooled, u = -r_t w where pooled and passive.

  B is the `selector`'s mask, computed once per step: `transform.taylor_selector`
  (per weight), `structured.channel_selector`, `structured.nm_selector` or
  `groups.group_selector`. The base transform sees g^ = B * g on every step,
  so its state keeps running for passive weights too (on a gradient of 0);
  only its update of a pooled passive weight is replaced, by w <- (1 - r_t) w.
  Where B = 1 everywhere (C = 1, N = M) this is `base`.

  Args:
    base: any optax transform (a chain, ``optax.sgd(...)``, ...); it gets
      `params` and the extra keyword arguments in `update`.
    selector: which pooled weights are active, a `transform.Selector`.
    passive_shrink: r_t in [0, 1), a float or a schedule of the step; e.g.
      ``budget_shrink_rate(learning_rate, total_steps)``.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose `update` requires
    `params`; its state is a `ShrinkPassiveState`.
  """
  _checks.check_schedule_or_number("passive_shrink", passive_shrink, 0.0, 1.0, True)
  base = optax.with_extra_args_support(base)

  def init_fn(params):
    return ShrinkPassiveState(taylor=selector.init(params), base=base.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    step = selector.step(updates, state.taylor, params)
    base_updates, base_state = base.update(step.updates, state.base, params, **extra_args)
    t = state.taylor.count
    rate = passive_shrink(t) if callable(passive_shrink) else passive_shrink
    new_updates = _overwrite_passive(base_updates, params, step, rate)
    return new_updates, ShrinkPassiveState(taylor=step.state, base=base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def shrink_passive(
  base: optax.GradientTransformation,
  compression: optax.ScalarOrSchedule,
  *,
  passive_shrink: optax.ScalarOrSchedule,
  pool: _pool.Pool = None,
  selection: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  """u = base(B * g, w) where active or not pooled, u = -r_t w where pooled and passive.

  B is `mask_by_global_taylor`'s mask, computed by the same code once per step
  (Q = int(|pool| / C_t), ties at the threshold kept, zero scores never active
  unless C = 1, NaN scores never); leaves outside the pool are always active.
  `shrink_passive_with` around ``transform.taylor_selector(compression, pool,
  selection)``. With C = 1 (and finite scores) every weight is active and this
  is `base`.

  Args:
    base: any optax transform (a chain, ``optax.sgd(...)``, ...); it gets
      `params` and the extra keyword arguments in `update`.
    compression: C >= 1, a float or a schedule of the step (as in `gsm`).
    passive_shrink: r_t in [0, 1), a float or a schedule of the step; e.g.
      ``budget_shrink_rate(learning_rate, total_steps)``.
    pool: prunable leaves, as in `mask_by_global_taylor`.
    selection: how the threshold is selected, as in `mask_by_global_taylor`
      ("auto", "radix", "sampled" or "top_k"; every one exact).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose `update` requires
    `params`; its state is a `ShrinkPassiveState`.
  """
  transform._check_compression_arg(compression)
  _checks.check_schedule_or_number("passive_shrink", passive_shrink, 0.0, 1.0, True)
  selector = transform.taylor_selector(compression, pool=pool, selection=selection)
  return shrink_passive_with(base, selector, passive_shrink=passive_shrink)


def gsm_sgd_shrink(
  learning_rate: optax.ScalarOrSchedule,
  compression: optax.ScalarOrSchedule,
  *,
  passive_shrink: optax.ScalarOrSchedule,
  momentum: float = 0.99,
  weight_decay: optax.ScalarOrSchedule = 5e-4,
  nesterov: bool = False,
  pool: _pool.Pool = None,
  selection: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  """The paper's momentum SGD with passive weights shrinking: z <- beta z + eta w + B g,
  u = -alpha z where active or not pooled, u = -r_t w where pooled and B = 0.

  `shrink_passive` around ``chain(add_decayed_weights(eta, mask=pool),
  trace(beta, nesterov), scale_by_learning_rate(alpha))``, the chain `gsm`
  puts after its mask: an active weight takes the paper's step, a passive
  pooled one takes no momentum step and shrinks, w <- (1 - r_t) w. Weight
  decay applies to the pool only, as in `gsm`. A passive weight's trace keeps
  running (z <- beta z + eta w, its gradient being 0), so when it turns active
  again its momentum starts from there. With C = 1 (and finite scores) this
  is ``gsm(..., compression=1)``.

  Args:
    learning_rate: alpha >= 0, a float or an optax schedule.
    compression: C >= 1, a float or a schedule of the step.
    passive_shrink: r_t in [0, 1), a float or a schedule of the step; e.g.
      ``budget_shrink_rate(learning_rate, total_steps)``.
    momentum: beta in [0, 1).
    weight_decay: eta >= 0, a float or a schedule; applied to the pool only.
    nesterov: Nesterov momentum (as ``torch.optim.SGD(nesterov=True)``).
    pool: prunable leaves, as in `mask_by_global_taylor`.
    selection: how the threshold is selected, as in `mask_by_global_taylor`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose `update` requires
    `params`; its state is a `ShrinkPassiveState`.
  """
  sgd = optax.chain(*transform.paper_sgd(learning_rate, momentum, weight_decay, nesterov, pool))
  return shrink_passive(
    sgd, compression, passive_shrink=passive_shrink, pool=pool, selection=selection
  )


def _sgd_shrink(
  selector: transform.Selector,
  learning_rate: optax.ScalarOrSchedule,
  passive_shrink: optax.ScalarOrSchedule,
  momentum: float,
  weight_decay: optax.ScalarOrSchedule,
  nesterov: bool,
  pool: _pool.Pool,
) -> optax.GradientTransformationExtraArgs:
  """`shrink_passive_with` around the paper's momentum SGD (`gsm_sgd_shrink`'s chain)."""
  sgd = optax.chain(*transform.paper_sgd(learning_rate, momentum, weight_decay, nesterov, pool))
  return shrink_passive_with(sgd, selector, passive_shrink=passive_shrink)


def gsm_channels_sgd_shrink(
  learning_rate: optax.ScalarOrSchedule,
  compression: optax.ScalarOrSchedule,
  *,
  passive_shrink: optax.ScalarOrSchedule,
  momentum: float = 0.99,
  weight_decay: optax.ScalarOrSchedule = 5e-4,
  nesterov: bool = False,
  pool: _pool.Pool = None,
  channel_axis: structured.Axis = -1,
  channel_score: str = "sum",
) -> optax.GradientTransformationExtraArgs:
  """Channel GSM with passive channels shrinking: z <- beta z + eta w + B_channel g,
  u = -alpha z where active or not pooled, u = -r_t w where pooled and B_channel = 0.

  `gsm_sgd_shrink` with the mask of `mask_by_global_channel_taylor` (C counts
  channels; `structured.channel_selector`): `gsm_channels`' chain for the
  active channels, w <- (1 - r_t) w over every weight of a passive one. With
  C = 1 (and finite scores) this is ``gsm_channels(..., compression=1)``.
  Arguments as in `gsm_channels` and `gsm_sgd_shrink`.
  """
  selector = structured.channel_selector(
    compression, pool=pool, channel_axis=channel_axis, channel_score=channel_score
  )
  return _sgd_shrink(
    selector, learning_rate, passive_shrink, momentum, weight_decay, nesterov, pool
  )


def gsm_nm_sgd_shrink(
  learning_rate: optax.ScalarOrSchedule,
  n: int,
  m: int,
  *,
  passive_shrink: optax.ScalarOrSchedule,
  momentum: float = 0.99,
  weight_decay: optax.ScalarOrSchedule = 5e-4,
  nesterov: bool = False,
  pool: _pool.Pool = None,
  axis: structured.Axis = -2,
) -> optax.GradientTransformationExtraArgs:
  """N:M GSM with passive weights shrinking: z <- beta z + eta w + B_nm g,
  u = -alpha z where active or not pooled, u = -r_t w where pooled and B_nm = 0.

  `gsm_sgd_shrink` with the per-group mask of `mask_by_nm_taylor`
  (`structured.nm_selector`): the M - N passive weights of every group shrink
  by (1 - r_t) per step. With N = M this is ``gsm_nm(..., n=m, m=m)``.
  Arguments as in `gsm_nm` and `gsm_sgd_shrink`.
  """
  selector = structured.nm_selector(n, m, pool=pool, axis=axis)
  return _sgd_shrink(
    selector, learning_rate, passive_shrink, momentum, weight_decay, nesterov, pool
  )


def gsm_channel_groups_sgd_shrink(
  learning_rate: optax.ScalarOrSchedule,
  compression: optax.ScalarOrSchedule,
  groups: groups_lib.Groups,
  *,
  passive_shrink: optax.ScalarOrSchedule,
  momentum: float = 0.99,
  weight_decay: optax.ScalarOrSchedule = 5e-4,
  nesterov: bool = False,
  channel_score: str = "sum",
) -> optax.GradientTransformationExtraArgs:
  """Channel-group GSM with passive channels shrinking: z <- beta z + eta w + B_g g,
  u = -alpha z where active or in no group, u = -r_t w in every slice of a passive channel.

  `gsm_sgd_shrink` with the mask of `mask_by_global_group_taylor` (C counts
  the groups' channels; `groups.group_selector`); the member leaves are the
  pool (weight decay and shrink). With C = 1 (and finite scores) this is
  ``gsm_channel_groups(..., compression=1)``. Arguments as in
  `gsm_channel_groups` and `gsm_sgd_shrink`.
  """
  selector = groups_lib.group_selector(compression, groups, channel_score=channel_score)
  pool = groups_lib.group_pool(groups)
  return _sgd_shrink(
    selector, learning_rate, passive_shrink, momentum, weight_decay, nesterov, pool
  )

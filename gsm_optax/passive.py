"""Passive pooled weights shrink geometrically around any optimizer.

Per step t, with g the gradient, w the params and B the GSM mask of
`mask_by_global_taylor` (top-Q of |g * w| over the pool, 1 outside it):

    u = base(B * g, w)         where B = 1 or the weight is outside the pool
    u = -r_t * w               where the weight is pooled and B = 0

so a weight passive for k steps in a row is w * prod(1 - r_t) over them.
`shrink_passive` wraps any base transform (AdamW in `gsm_adamw`, the paper's
momentum SGD in `gsm_sgd_shrink`). docs/METHOD.md, section 9, explains why.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gsm_optax import _checks
from gsm_optax import _pool
from gsm_optax import transform


class ShrinkPassiveState(NamedTuple):
  """State of `shrink_passive` (and `gsm_adamw`, `gsm_sgd_shrink`); every leaf is an array.

  Attributes:
    taylor: the `MaskByGlobalTaylorState` of the mask (what `gsm_stats` reads);
      its `count` is the step t.
    base: the state of the base transform (e.g. Adam's m, v and counts).
  """

  taylor: transform.MaskByGlobalTaylorState
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
  The base transform sees g^ = B * g on every step, so its state keeps running
  for passive weights too (on a gradient of 0); only its update of a pooled
  passive weight is replaced, by w <- (1 - r_t) w. With C = 1 (and finite
  scores) every weight is active and this is `base`.

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
  mask = transform.mask_by_global_taylor(compression, pool=pool, selection=selection)
  base = optax.with_extra_args_support(base)

  def init_fn(params):
    return ShrinkPassiveState(taylor=mask.init(params), base=base.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    step = transform.global_taylor_step(updates, state.taylor, params, compression, pool, selection)
    base_updates, base_state = base.update(step.updates, state.base, params, **extra_args)
    t = state.taylor.count
    rate = passive_shrink(t) if callable(passive_shrink) else passive_shrink
    new_updates = _overwrite_passive(base_updates, params, step, rate)
    return new_updates, ShrinkPassiveState(taylor=step.state, base=base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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

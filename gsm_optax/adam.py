"""GSM with AdamW: active weights take AdamW's step, passive weights shrink geometrically.

Per step t, with g the gradient, w the params and B the GSM mask of
`mask_by_global_taylor` (top-Q of |g * w| over the pool, 1 outside it):

    g^ = B * g
    m <- b1 m + (1 - b1) g^,   v <- b2 v + (1 - b2) g^2      (every leaf)
    u = -lr_t (m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd * w * decay_mask)
    u = -r_t * w   instead, where the weight is pooled and B = 0

so a weight passive for k steps in a row is w * prod(1 - r_t) over them.
`budget_shrink_rate` sets r_t so that the product over a training budget is
exp(-kappa). `gsm_adamw` is `passive.shrink_passive` around the AdamW chain;
`gsm_channels_adamw`, `gsm_nm_adamw` and `gsm_channel_groups_adamw` are
`passive.shrink_passive_with` around it with a structured mask's selector (B per
channel, per N:M group, per channel group). docs/METHOD.md, "GSM with Adam
(transformers)", explains why.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gsm_optax import _checks
from gsm_optax import _pool
from gsm_optax import groups as groups_lib
from gsm_optax import passive
from gsm_optax import structured

GsmAdamWState = passive.ShrinkPassiveState  # the name `gsm_adamw`'s state had first


def _check_args(learning_rate, b1, b2, eps, weight_decay) -> None:
  """Checks what `gsm_adamw` adds to `shrink_passive`'s checks when it is built."""
  _checks.check_schedule_or_number("learning_rate", learning_rate, 0.0, math.inf, True)
  _checks.check_number_in("b1", b1, 0.0, 1.0, True)
  _checks.check_number_in("b2", b2, 0.0, 1.0, True)
  _checks.check_number_in("eps", eps, 0.0, math.inf, True)
  _checks.check_schedule_or_number("weight_decay", weight_decay, 0.0, math.inf, True)


def gsm_adamw(
  learning_rate: optax.ScalarOrSchedule,
  compression: optax.ScalarOrSchedule,
  *,
  passive_shrink: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  weight_decay_mask: Any = None,
  pool: _pool.Pool = None,
  selection: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  """GSM with AdamW: u = -lr_t (m^ / (sqrt(v^) + eps) + wd w) if active, -r_t w if passive.

  B is `mask_by_global_taylor`'s mask, computed by the same code once per step
  (Q = int(|pool| / C_t), ties at the threshold kept, zero and NaN scores never
  active unless C = 1); leaves outside the pool are always active. Adam's
  moments, bias corrected as in `optax.scale_by_adam`, are kept for every leaf
  from g^ = B * g, so a passive weight's moments decay. An active or non-pooled
  weight takes exactly ``optax.adamw``'s update; a pooled passive one takes no
  Adam step and no weight decay: w <- (1 - r_t) w. With C = 1 this is
  ``optax.adamw(..., mask=weight_decay_mask)``.

  Args:
    learning_rate: lr_t >= 0, a float or an optax schedule.
    compression: C >= 1, a float or a schedule of the step (as in `gsm`).
    passive_shrink: r_t in [0, 1), a float or a schedule of the step; e.g.
      ``budget_shrink_rate(learning_rate, total_steps)``.
    b1, b2: Adam's decay rates, in [0, 1).
    eps: >= 0, added to sqrt(v^).
    weight_decay: wd >= 0 (decoupled, as AdamW), a float or a schedule.
    weight_decay_mask: which leaves take weight decay, `optax.masked`'s
      convention (a bool pytree or a callable ``params -> bool pytree``);
      None: every floating leaf with ndim >= 2 (kernels, not biases or scales).
    pool: prunable leaves, as in `mask_by_global_taylor`.
    selection: how the threshold is selected, as in `mask_by_global_taylor`
      ("auto", "radix", "sampled" or "top_k"; every one exact).

  Under `optax.inject_hyperparams`, name `pool` and `weight_decay_mask` in
  ``static_args`` when they are callables (it would call them as schedules).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose `update` requires
    `params`; its state is a `ShrinkPassiveState` (``base``: the AdamW chain's
    state), and `init` accepts abstract params.
  """
  adamw = _adamw(learning_rate, b1, b2, eps, weight_decay, weight_decay_mask)
  return passive.shrink_passive(
    adamw, compression, passive_shrink=passive_shrink, pool=pool, selection=selection
  )


def _adamw(
  learning_rate: optax.ScalarOrSchedule,
  b1: float,
  b2: float,
  eps: float,
  weight_decay: optax.ScalarOrSchedule,
  weight_decay_mask: Any,
) -> optax.GradientTransformation:
  """``optax.adamw`` with decay on `weight_decay_mask` (None: the kernels), arguments checked."""
  _check_args(learning_rate, b1, b2, eps, weight_decay)
  decay_mask = _pool.default_pool if weight_decay_mask is None else weight_decay_mask
  return optax.adamw(
    learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask
  )


def gsm_channels_adamw(
  learning_rate: optax.ScalarOrSchedule,
  compression: optax.ScalarOrSchedule,
  *,
  passive_shrink: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  weight_decay_mask: Any = None,
  pool: _pool.Pool = None,
  channel_axis: structured.Axis = -1,
  channel_score: str = "sum",
) -> optax.GradientTransformationExtraArgs:
  """Channel GSM with AdamW: u = AdamW's step on B_channel * g if active, -r_t w if passive.

  `gsm_adamw` with the mask of `mask_by_global_channel_taylor` (C counts
  channels, `structured.channel_selector`): a pooled weight of a passive
  channel takes no Adam step and no weight decay, w <- (1 - r_t) w. With C = 1
  this is ``optax.adamw(..., mask=weight_decay_mask)``. Arguments as in
  `gsm_adamw` and `gsm_channels`; the state is a `ShrinkPassiveState`.
  """
  adamw = _adamw(learning_rate, b1, b2, eps, weight_decay, weight_decay_mask)
  selector = structured.channel_selector(
    compression, pool=pool, channel_axis=channel_axis, channel_score=channel_score
  )
  return passive.shrink_passive_with(adamw, selector, passive_shrink=passive_shrink)


def gsm_nm_adamw(
  learning_rate: optax.ScalarOrSchedule,
  n: int,
  m: int,
  *,
  passive_shrink: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  weight_decay_mask: Any = None,
  pool: _pool.Pool = None,
  axis: structured.Axis = -2,
) -> optax.GradientTransformationExtraArgs:
  """N:M GSM with AdamW: u = AdamW's step on B_nm * g if active, -r_t w if passive.

  `gsm_adamw` with the per-group mask of `mask_by_nm_taylor`
  (`structured.nm_selector`): the M - N passive weights of every group take
  no Adam step and shrink, w <- (1 - r_t) w. With N = M this is
  ``optax.adamw(..., mask=weight_decay_mask)``. Arguments as in `gsm_adamw`
  and `gsm_nm`; the state is a `ShrinkPassiveState`.
  """
  adamw = _adamw(learning_rate, b1, b2, eps, weight_decay, weight_decay_mask)
  selector = structured.nm_selector(n, m, pool=pool, axis=axis)
  return passive.shrink_passive_with(adamw, selector, passive_shrink=passive_shrink)


def gsm_channel_groups_adamw(
  learning_rate: optax.ScalarOrSchedule,
  compression: optax.ScalarOrSchedule,
  groups: groups_lib.Groups,
  *,
  passive_shrink: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  weight_decay_mask: Any = None,
  channel_score: str = "sum",
) -> optax.GradientTransformationExtraArgs:
  """Channel-group GSM with AdamW: u = AdamW's step on B_g * g if active, -r_t w if passive.

  `gsm_adamw` with the mask of `mask_by_global_group_taylor` (C counts the
  groups' channels, `groups.group_selector`): every slice of a passive
  channel (an MLP neuron's fc1 column and fc2 row, a head's query, key, value
  columns and out rows) takes no Adam step and shrinks, w <- (1 - r_t) w;
  leaves in no group take AdamW's step. With C = 1 this is
  ``optax.adamw(..., mask=weight_decay_mask)``. Arguments as in `gsm_adamw`
  and `gsm_channel_groups`; the state is a `ShrinkPassiveState`.
  """
  adamw = _adamw(learning_rate, b1, b2, eps, weight_decay, weight_decay_mask)
  selector = groups_lib.group_selector(compression, groups, channel_score=channel_score)
  return passive.shrink_passive_with(adamw, selector, passive_shrink=passive_shrink)


def _schedule_values(learning_rate: optax.ScalarOrSchedule, total_steps: int) -> np.ndarray:
  """lr_s for s = 0 .. total_steps - 1, as float64 (a schedule is called once on
  all the steps, as optax's schedules allow)."""
  if not callable(learning_rate):
    return np.full(total_steps, float(learning_rate))
  with jax.ensure_compile_time_eval():
    values = np.asarray(learning_rate(jnp.arange(total_steps)), np.float64)
  if values.ndim == 0:
    return np.full(total_steps, float(values))
  if values.shape != (total_steps,):
    raise ValueError(
      f"learning_rate(steps) for {total_steps} steps has shape {values.shape}; a schedule must "
      "map an array of steps to an array of the same shape."
    )
  return values


def budget_shrink_rate(
  learning_rate: optax.ScalarOrSchedule, total_steps: int, kappa: float = 10.0
) -> optax.Schedule:
  """r_t = kappa * lr_t / sum_{s < total_steps} lr_s, so that prod_t (1 - r_t) ~ exp(-kappa).

  The shrink follows the learning rate's schedule (warm-up, cosine); a
  constant lr gives r = kappa / total_steps. Steps past the budget keep the
  last step's rate. Over the budget sum_t r_t = kappa, and since
  -r - r^2 <= log(1 - r) <= -r (r <= 1/2), the product is between
  exp(-kappa - sum r_t^2) and exp(-kappa).

  Raises:
    ValueError: total_steps < 1, kappa not finite and > 0, an lr_s negative or
      not finite, their sum 0, or some r_t >= 1 (too few steps for kappa).
  """
  if not _checks.is_number(total_steps, integer=True) or total_steps < 1:
    raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}.")
  if not _checks.is_number(kappa) or not (math.isfinite(kappa) and kappa > 0):
    raise ValueError(f"kappa must be a finite number > 0, got {kappa!r}.")
  total_steps, kappa = int(total_steps), float(kappa)
  values = _schedule_values(learning_rate, total_steps)
  if not np.all(np.isfinite(values)) or np.any(values < 0):
    raise ValueError("learning_rate must be finite and >= 0 at every step of the budget.")
  total = float(np.sum(values))
  if not total > 0:
    raise ValueError(f"the learning rate sums to {total} over {total_steps} steps; it must be > 0.")
  if kappa * values.max() / total >= 1:
    raise ValueError(
      f"r_t = kappa * lr_t / sum(lr) reaches {kappa * values.max() / total:.3g} >= 1 "
      f"(kappa = {kappa}, {total_steps} steps): use more steps or a smaller kappa."
    )
  scale = kappa / total
  last = total_steps - 1

  def schedule(count):
    step = jnp.minimum(count, last)
    lr = learning_rate(step) if callable(learning_rate) else learning_rate
    return lr * scale

  return schedule

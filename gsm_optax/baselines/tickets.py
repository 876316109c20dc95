"""Lottery tickets (Frankle & Carbin, ICLR 2019) with the protocol of Ding et al.

Save theta_0, train dense, take the global magnitude top-Q mask of (a) the
trained weights (magnitude ticket) or (b) the weights after GSM training
(GSM ticket), apply it to theta_0 and retrain with the dense schedule and
``optax.chain(optimizer, keep_masked(mask))``. The loop lives in the training
program; these are its two pruning steps.
"""

from __future__ import annotations

from typing import Any

from gsm_optax import _pool
from gsm_optax import pruning
from gsm_optax.baselines import _util


def ticket_mask(trained_params: Any, compression: float, *, pool: _pool.Pool = None) -> Any:
  """The ticket: the Q = int(|pool| / C) pooled weights of greatest trained |w|.

  mask = |w| >= t, t the Q-th greatest |w| over the whole pool; exactly
  `gsm_optax.global_magnitude_mask` (GSM's own final cut).

  Args:
    trained_params: the weights the ticket is read from (dense-trained for a
      magnitude ticket, GSM-trained for a GSM ticket).
    compression: C >= 1.
    pool: the prunable leaves (default: floating leaves with ndim >= 2).

  Returns:
    A pytree of bool arrays with the params' structure; True outside the pool.
  """
  return pruning.global_magnitude_mask(trained_params, compression, pool=pool)


def apply_ticket(initial_params: Any, mask: Any) -> Any:
  """theta_0 * mask: the winning ticket's starting weights (Frankle & Carbin).

  Args:
    initial_params: theta_0, the weights saved at initialisation.
    mask: a bool pytree with the params' structure (`ticket_mask`).

  Returns:
    theta_0 with the entries outside the mask set to 0.

  Raises:
    ValueError / TypeError: the mask does not fit the params.
  """
  checked = _util.check_mask(initial_params, mask)
  return pruning.apply_mask(initial_params, checked)

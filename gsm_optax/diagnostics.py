"""Looking inside a GSM run: the active set, mask agreement, passive decay."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gsm_optax import _pool
from gsm_optax import transform


def taylor_mask(grads: Any, params: Any, compression: float, *, pool: _pool.Pool = None) -> Any:
  """The active set B of GSM for one gradient: B = [|g * w| >= t].

  t is the Q-th greatest Taylor score over the pool, Q = int(|pool| / C)
  (Ding et al. 2019, eq. 6). This is the mask `mask_by_global_taylor` applies
  at a step with these gradients (same selection, ties and zero scores
  included), returned instead of applied.

  Args:
    grads: the loss gradient, a pytree with the structure of `params`.
    params: the current weights.
    compression: C >= 1, a number.
    pool: the prunable leaves, as in `mask_by_global_taylor`.

  Returns:
    A pytree of bool arrays with the structure of `params`: B on pooled
    leaves, all True on the others (the convention of
    `global_magnitude_mask`).
  """
  in_pool = _pool.resolve_pool(params, pool)
  tx = transform.mask_by_global_taylor(compression, pool=in_pool)
  masked, state = tx.update(grads, tx.init(params), params)
  size = _pool.pooled_size(params, in_pool)
  # An active gradient passes unchanged and an active score is > 0 (so g != 0)
  # unless Q = |pool|, where every pooled weight is active.
  keep_all = state.keep >= size

  def leaf(m, p, flag):
    if not flag:
      return jnp.ones(jnp.shape(p), bool)
    return (m != 0) | keep_all

  return jax.tree.map(leaf, masked, params, in_pool)


@dataclasses.dataclass(frozen=True)
class MaskOverlap:
  """How two masks of one leaf (or of the whole pool) agree."""

  path: str
  size: int
  kept_a: int
  kept_b: int
  both: int

  @property
  def jaccard(self) -> float:
    """|A and B| / |A or B| (1.0 when both keep nothing)."""
    union = self.kept_a + self.kept_b - self.both
    return self.both / union if union else 1.0

  @property
  def fraction_of_a_in_b(self) -> float:
    """|A and B| / |A|: the share of A's kept weights that B keeps too."""
    return self.both / self.kept_a if self.kept_a else 1.0


def mask_overlap(mask_a: Any, mask_b: Any, *, pool: Any = None) -> dict[str, MaskOverlap]:
  """Per-leaf and total agreement of two bool masks over the pool.

  Counts |A|, |B| and |A and B| on every pooled leaf; e.g. a GSM ticket
  against a magnitude ticket, or the active set at step t against the final
  cut.

  Args:
    mask_a, mask_b: bool pytrees of the same structure and shapes.
    pool: the leaves to compare: None (every leaf with ndim >= 2, the shapes
      of the default pool) or a bool pytree with the masks' structure.

  Returns:
    A dict from leaf path (``jax.tree_util.keystr``, as in `sparsity_report`)
    to `MaskOverlap`, in tree order, ending with the entry "total".

  Raises:
    ValueError: the masks' structures or shapes differ, or the pool selects
      no leaf.
  """
  def_a, def_b = jax.tree.structure(mask_a), jax.tree.structure(mask_b)
  if def_a != def_b:
    raise ValueError(f"mask_a and mask_b have different tree structures: {def_a} vs {def_b}.")
  if pool is None:
    flags = [np.ndim(m) >= 2 for m in jax.tree.leaves(mask_a)]
  else:
    if jax.tree.structure(pool) != def_a:
      raise ValueError(
        "pool must have the masks' tree structure; masks: "
        f"{def_a}, pool: {jax.tree.structure(pool)}."
      )
    flags = [bool(f) for f in jax.tree.leaves(pool)]
  if not any(flags):
    raise ValueError("the pool selects no leaf of the masks.")
  flat_a, _ = jax.tree_util.tree_flatten_with_path(mask_a)
  rows = {}
  for (path, a), b, flag in zip(flat_a, jax.tree.leaves(mask_b), flags):
    if not flag:
      continue
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    name = jax.tree_util.keystr(path)
    if a.shape != b.shape:
      raise ValueError(f"the masks differ in shape at {name}: {a.shape} vs {b.shape}.")
    rows[name] = MaskOverlap(
      path=name, size=int(a.size), kept_a=int(a.sum()), kept_b=int(b.sum()), both=int(np.sum(a & b))
    )
  rows["total"] = MaskOverlap(
    path="total",
    size=sum(r.size for r in rows.values()),
    kept_a=sum(r.kept_a for r in rows.values()),
    kept_b=sum(r.kept_b for r in rows.values()),
    both=sum(r.both for r in rows.values()),
  )
  return rows


def passive_decay(
  learning_rate: float,
  weight_decay: float,
  momentum: float,
  steps: int = 1,
  *,
  nesterov: bool = False,
) -> float:
  """Factor by which a passive weight shrinks over `steps` GSM steps.

  A passive weight gets no loss gradient: z <- beta * z + eta * w,
  w <- w - alpha * z (with `nesterov`, w <- w - alpha * (eta * w + beta * z)),
  a linear map of (w, z) whose spectral radius rho is the settled per-step
  factor; this returns rho ** steps. When alpha * eta << (1 - beta) ** 2,
  rho ~ 1 - alpha * eta / (1 - beta), the paper's estimate (Ding et al. 2019,
  section 3.2): beta = 0.99 multiplies the effective decay by 100. The final
  cut is harmless when the factor over the GSM phase is small.

  Args:
    learning_rate: alpha (constant over the steps).
    weight_decay: eta.
    momentum: beta in [0, 1).
    steps: number of steps.
    nesterov: Nesterov momentum (``optax.trace(nesterov=True)``).

  Returns:
    rho ** steps, the settled rate (a weight that just turned passive, with
    its momentum still at 0, lags it by a constant factor).
  """
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
  if steps < 0:
    raise ValueError(f"steps must be >= 0, got {steps}.")
  alpha, eta, beta = float(learning_rate), float(weight_decay), float(momentum)
  if nesterov:
    step_map = [[1.0 - alpha * eta * (1.0 + beta), -alpha * beta * beta], [eta, beta]]
  else:
    step_map = [[1.0 - alpha * eta, -alpha * beta], [eta, beta]]
  rho = float(np.max(np.abs(np.linalg.eigvals(np.asarray(step_map)))))
  return rho**steps

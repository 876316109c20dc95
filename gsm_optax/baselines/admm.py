"""ADMM weight pruning (Zhang et al., "A Systematic DNN Weight Pruning
Framework using ADMM", ECCV 2018).

    minimise f(W)  subject to  card(W_i) <= l_i  for every pruned layer i.

With Z_i = W_i and the scaled dual U_i, each ADMM iteration is

    W-step: train f(W) + sum_i rho/2 ||W_i - Z_i + U_i||^2 for a few epochs;
    Z-step: Z_i = Pi_i(W_i + U_i), keep the l_i entries of greatest |.|
            (`admm_project`);
    U-step: U_i <- U_i + W_i - Z_i (`admm_dual_update`);

`admm_step` does the Z- and U-steps. `add_admm_penalty(rho, keep_counts,
steps_per_iteration=n)`, first in an optax chain, runs the whole loop: its
state holds Z and U (started from the params as `admm_init` does: Z = Pi(W),
U = 0), it adds rho_k (W - Z + U) to the gradients, and runs `admm_step` every
n updates (rho_k = rho * rho_growth^k at ADMM iteration k). At the end
hard-prune W to the targets (`admm_hard_prune`) and retrain with
``optax.chain(opt, keep_masked(mask))``. The functions (`admm_init`,
`admm_step`, `admm_penalty_loss`, `admm_penalty_grads`) serve loops that keep
Z and U themselves.

The targets l_i are inputs: `layer_keep_counts_from_density` builds them from
per-layer densities, e.g. those GSM found at the same global compression
(``sparsity_report(gsm_params)``), or the published ones
(`LENET5_ADMM_SETTING`).

In `ADMMState`, Z and U live on the pruned leaves only: their pytrees have the
params' structure with ``optax.MaskedNode()`` elsewhere, like the keep counts.
In `AddADMMPenaltyState` they are full pytrees, zeros where not pruned.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import optax

from gsm_optax import _checks
from gsm_optax import pruning
from gsm_optax.baselines import _util
from gsm_optax.baselines import magnitude


@dataclasses.dataclass(frozen=True)
class ADMMSetting:
  """A published ADMM pruning setting (Zhang et al. 2018)."""

  optimizer: str
  learning_rate: float
  rho: float
  admm_iterations: int
  steps_per_iteration: int
  layers: tuple[str, ...]
  pruned_fractions: tuple[float, ...]
  compression: float

  @property
  def densities(self) -> tuple[float, ...]:
    """Per-layer densities 1 - pruned fraction, in `layers` order (a sequence
    `layer_keep_counts_from_density` takes for a pool in that tree order)."""
    return tuple(1.0 - f for f in self.pruned_fractions)


LENET5_ADMM_SETTING = ADMMSetting(
  optimizer="adam",
  learning_rate=1e-3,
  rho=1e-4,
  admm_iterations=30,
  steps_per_iteration=5000,
  layers=("conv1", "conv2", "fc1", "fc2"),
  pruned_fractions=(0.80, 0.92, 0.991, 0.93),
  compression=71.2,
)
"""The public LeNet-5 (Caffe variant, 430,500 weights) setting of the ADMM
code: Adam 1e-3, constant rho = 1e-4, 30 ADMM iterations of 5,000 steps, then
hard pruning and masked retraining; kept 100 + 2,000 + 3,600 + 350 = 6,050
weights (conv1 / conv2 / fc1 / fc2 pruned 80 / 92 / 99.1 / 93 %), 71.2x."""


class ADMMState(NamedTuple):
  """The ADMM auxiliary variables; pytrees of arrays with the params'
  structure, ``optax.MaskedNode()`` on the leaves that are not pruned.

  Attributes:
    z: Z, the projection of W + U onto the per-layer sparsity sets.
    u: U, the scaled dual variable.
  """

  z: Any
  u: Any


def _flatten_like(treedef, tree, name="state"):
  try:
    return treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"{name} must have the params' tree structure (MaskedNode on leaves "
      f"that are not pruned); got {jax.tree.structure(tree, is_leaf=_checks.is_masked_node)} "
      f"for params {treedef}."
    ) from e


def _state_leaves(params, state: ADMMState):
  """Flat params, Z and U leaves, and the params' treedef; pruned = Z leaf is
  not a MaskedNode."""
  if not isinstance(state, ADMMState):
    raise TypeError(f"state must be an ADMMState, got {type(state).__name__}.")
  treedef = jax.tree.structure(params)
  w = treedef.flatten_up_to(params)
  z = _flatten_like(treedef, state.z, "state.z")
  u = _flatten_like(treedef, state.u, "state.u")
  for zi, ui, wi in zip(z, u, w):
    if _checks.is_masked_node(zi) != _checks.is_masked_node(ui):
      raise ValueError("state.z and state.u must prune the same leaves.")
    if not _checks.is_masked_node(zi) and (
      jnp.shape(zi) != jnp.shape(wi) or jnp.shape(ui) != jnp.shape(wi)
    ):
      raise ValueError(
        f"state.z / state.u leaves of shapes {jnp.shape(zi)} / "
        f"{jnp.shape(ui)} do not match the param's shape {jnp.shape(wi)}."
      )
  return treedef, w, z, u


def admm_project(params_plus_u: Any, keep_counts: Any) -> Any:
  """Z-step: Pi(X)_i keeps the l_i entries of greatest |X_i|, zeroes the rest.

  The Euclidean projection onto {card(X_i) <= l_i} (Zhang et al. 2018, eq. 6);
  exactly l_i entries are kept, ties going to the first in row-major order.

  Args:
    params_plus_u: X = W + U, a pytree with the params' structure (leaves that
      are not pruned are ignored).
    keep_counts: l_i on pruned leaves, MaskedNode elsewhere
      (`layer_keep_counts_from_density`).

  Returns:
    Z, a pytree with MaskedNode on the leaves that are not pruned.
  """
  treedef, _, counts = _util.resolve_keep_counts(params_plus_u, keep_counts)
  x = [jnp.asarray(leaf) for leaf in _flatten_like(treedef, params_plus_u)]
  pruned = [i for i, count in enumerate(counts) if count is not None]
  masks = _util.layerwise_topk_masks(
    [_util.magnitude(x[i]) for i in pruned], [counts[i] for i in pruned]
  )
  out: list[Any] = [optax.MaskedNode()] * len(x)
  for i, keep in zip(pruned, masks):
    out[i] = jnp.where(keep, x[i], jnp.zeros_like(x[i]))
  return jax.tree.unflatten(treedef, out)


def admm_dual_update(u: Any, w: Any, z: Any) -> Any:
  """U-step: U_i <- U_i + W_i - Z_i on the pruned leaves.

  Args:
    u: U (MaskedNode on leaves that are not pruned).
    w: the params W (full pytree).
    z: Z, with the same MaskedNode leaves as `u`.

  Returns:
    The new U, with the structure of `u`.
  """
  treedef = jax.tree.structure(w)
  uu = _flatten_like(treedef, u, "u")
  zz = _flatten_like(treedef, z, "z")
  out = []
  for ui, wi, zi in zip(uu, treedef.flatten_up_to(w), zz):
    if _checks.is_masked_node(ui) or _checks.is_masked_node(zi):
      if _checks.is_masked_node(ui) != _checks.is_masked_node(zi):
        raise ValueError("u and z must prune the same leaves.")
      out.append(optax.MaskedNode())
    else:
      out.append((ui + (wi - zi)).astype(jnp.asarray(ui).dtype))
  return jax.tree.unflatten(treedef, out)


def admm_init(params: Any, keep_counts: Any) -> ADMMState:
  """ADMM start from pretrained W: Z = Pi(W), U = 0 (Zhang et al. 2018).

  Args:
    params: the pretrained W.
    keep_counts: l_i on pruned leaves, MaskedNode elsewhere.

  Returns:
    An `ADMMState` (Z and U in the params' dtypes).
  """
  z = admm_project(params, keep_counts)
  u = jax.tree.map(
    lambda x: x if _checks.is_masked_node(x) else jnp.zeros_like(x),
    z,
    is_leaf=_checks.is_masked_node,
  )
  return ADMMState(z=z, u=u)


def admm_step(params: Any, state: ADMMState, keep_counts: Any) -> ADMMState:
  """Z- and U-steps after a W-step: Z = Pi(W + U), then U <- U + W - Z."""
  treedef, w, _, u = _state_leaves(params, state)
  w_plus_u = jax.tree.unflatten(
    treedef, [wi if _checks.is_masked_node(ui) else wi + ui for wi, ui in zip(w, u)]
  )
  z = admm_project(w_plus_u, keep_counts)
  return ADMMState(z=z, u=admm_dual_update(state.u, params, z))


def admm_penalty_loss(params: Any, state: ADMMState, rho: Any) -> jax.Array:
  """sum_i rho/2 ||W_i - Z_i + U_i||^2 over the pruned leaves (float32).

  Add it to the loss for the W-step (or use `add_admm_penalty`).
  """
  _, w, z, u = _state_leaves(params, state)
  total = jnp.zeros([], jnp.float32)
  for wi, zi, ui in zip(w, z, u):
    if not _checks.is_masked_node(zi):
      r = jnp.asarray(wi, jnp.float32) - jnp.asarray(zi, jnp.float32) + jnp.asarray(ui, jnp.float32)
      total = total + jnp.sum(r * r)
  return 0.5 * jnp.asarray(rho, jnp.float32) * total


def admm_penalty_grads(params: Any, state: ADMMState, rho: Any) -> Any:
  """Gradient of the ADMM penalty: rho (W_i - Z_i + U_i), 0 off the pruned leaves.

  Args:
    params: W.
    state: the `ADMMState` (Z, U) of the current ADMM iteration.
    rho: the penalty rho >= 0.

  Returns:
    A pytree with the params' structure and dtypes.
  """
  treedef, w, z, u = _state_leaves(params, state)
  rho = jnp.asarray(rho, jnp.float32)
  out = []
  for wi, zi, ui in zip(w, z, u):
    wi = jnp.asarray(wi)
    if _checks.is_masked_node(zi):
      out.append(jnp.zeros_like(wi))
    else:
      r = wi.astype(jnp.float32) - jnp.asarray(zi, jnp.float32) + jnp.asarray(ui, jnp.float32)
      out.append((rho * r).astype(wi.dtype))
  return jax.tree.unflatten(treedef, out)


class AddADMMPenaltyState(NamedTuple):
  """State of `add_admm_penalty`; every field is an array (orbax-ready).

  Attributes:
    count: number of updates done.
    z: Z, a pytree with the params' structure (zeros on the leaves that are
      not pruned).
    u: U, the scaled dual, with the same structure (zeros where not pruned).
  """

  count: jax.Array
  z: Any
  u: Any


def _check_rho(rho: Any, rho_growth: Any, steps_per_iteration: Any) -> None:
  if not _checks.is_number(rho):
    raise TypeError(f"rho must be a number >= 0, got {rho!r}.")
  if not math.isfinite(float(rho)) or float(rho) < 0:
    raise ValueError(f"rho must be finite and >= 0, got {rho!r}.")
  if not _checks.is_number(rho_growth):
    raise TypeError(f"rho_growth must be a number >= 1, got {rho_growth!r}.")
  if not math.isfinite(float(rho_growth)) or float(rho_growth) < 1:
    raise ValueError(f"rho_growth must be finite and >= 1, got {rho_growth!r}.")
  if not _checks.is_number(steps_per_iteration, integer=True):
    raise TypeError(f"steps_per_iteration must be a positive int, got {steps_per_iteration!r}.")
  if steps_per_iteration < 1:
    raise ValueError(f"steps_per_iteration must be a positive int, got {steps_per_iteration!r}.")


def add_admm_penalty(
  rho: float, keep_counts: Any, *, steps_per_iteration: int, rho_growth: float = 1.0
) -> optax.GradientTransformationExtraArgs:
  """ADMM W-steps with the Z- and U-steps inside: g <- g + rho_k (W - Z + U).

  Put it first in the chain, on the raw gradients, so that the optimizer sees
  the gradient of f(W) + sum_i rho_k/2 ||W_i - Z_i + U_i||^2 (Zhang et al.
  2018, eq. 5): ``optax.chain(add_admm_penalty(1e-4, counts,
  steps_per_iteration=5000), optax.adam(1e-3))``. `init` starts ADMM from the
  params (`admm_init`: Z = Pi(W), U = 0). Every `steps_per_iteration` updates
  (at counts n, 2n, ...), before the update, `admm_step` runs: Z = Pi(W + U),
  then U <- U + W - Z. ADMM iteration k = count // n uses
  rho_k = rho * rho_growth^k (float32). Leaves whose count is MaskedNode get
  their gradient unchanged.

  Args:
    rho: rho >= 0.
    keep_counts: l_i on the pruned leaves, ``optax.MaskedNode()`` elsewhere
      (`layer_keep_counts_from_density`).
    steps_per_iteration: n >= 1, the W-steps of one ADMM iteration.
    rho_growth: rho's factor per ADMM iteration (>= 1).

  Returns:
    An `optax.GradientTransformationExtraArgs` with `AddADMMPenaltyState`;
    `update` requires `params`.
  """
  _check_rho(rho, rho_growth, steps_per_iteration)
  rho, rho_growth, steps = float(rho), float(rho_growth), int(steps_per_iteration)
  pruned = [
    not _checks.is_masked_node(c)
    for c in jax.tree.leaves(keep_counts, is_leaf=_checks.is_masked_node)
  ]

  def to_full(params, tree):
    """An ADMM pytree (MaskedNode where not pruned) as a full one (zeros)."""
    leaves = jax.tree.leaves(tree, is_leaf=_checks.is_masked_node)
    full = [
      leaf if flag else jnp.zeros_like(p)
      for leaf, flag, p in zip(leaves, pruned, jax.tree.leaves(params))
    ]
    return jax.tree.unflatten(jax.tree.structure(params), full)

  def to_admm(params, tree):
    treedef = jax.tree.structure(params)
    leaves = _flatten_like(treedef, tree)
    return jax.tree.unflatten(
      treedef, [leaf if flag else optax.MaskedNode() for leaf, flag in zip(leaves, pruned)]
    )

  def start(params):
    state = admm_init(params, keep_counts)
    return to_full(params, state.z), to_full(params, state.u)

  def init_fn(params):
    if params is None:
      raise ValueError("add_admm_penalty.init needs the params pytree.")
    count = jnp.zeros([], jnp.int32)
    if _checks.is_placeholder(params):  # optax.tree_utils.tree_map_params
      return AddADMMPenaltyState(count=count, z=params, u=params)
    if _checks.is_abstract(params):  # Z = Pi(W) needs W's values: abstract
      z = jax.eval_shape(lambda p: start(p)[0], params)
      return AddADMMPenaltyState(count=count, z=z, u=jax.tree.map(jnp.zeros_like, z))
    z, u = start(params)
    return AddADMMPenaltyState(count=count, z=z, u=u)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("add_admm_penalty needs params: call update(updates, state, params).")
    admm = ADMMState(z=to_admm(params, state.z), u=to_admm(params, state.u))
    due = (state.count > 0) & (state.count % steps == 0)
    if isinstance(due, jax.core.Tracer):
      z, u = lax.cond(
        due, lambda: tuple(admm_step(params, admm, keep_counts)), lambda: (admm.z, admm.u)
      )
    else:  # eager: the Z- and U-steps only when due, without tracing a cond
      z, u = tuple(admm_step(params, admm, keep_counts)) if bool(due) else (admm.z, admm.u)
    admm = ADMMState(z=z, u=u)
    iteration = (state.count // steps).astype(jnp.float32)
    rho_k = rho * jnp.power(jnp.float32(rho_growth), iteration)
    penalty = admm_penalty_grads(params, admm, rho_k)
    updates = jax.tree.map(lambda g, p: g + p.astype(g.dtype), updates, penalty)
    return updates, AddADMMPenaltyState(
      count=optax.safe_increment(state.count), z=to_full(params, z), u=to_full(params, u)
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def admm_hard_prune(params: Any, keep_counts: Any) -> tuple[Any, Any]:
  """End of ADMM: keep the l_i entries of greatest |W_i|, zero the rest.

  Returns:
    (pruned params, mask); retrain with ``optax.chain(opt, keep_masked(mask))``.
  """
  mask = magnitude.topk_mask(params, keep_counts)
  return pruning.apply_mask(params, mask), mask

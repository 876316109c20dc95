"""ADMM weight pruning (Zhang et al., "A Systematic DNN Weight Pruning
Framework using ADMM", ECCV 2018).

    minimise f(W)  subject to  card(W_i) <= l_i  for every pruned layer i.

With Z_i = W_i and the scaled dual U_i, each ADMM iteration is

    W-step: train f(W) + sum_i rho/2 ||W_i - Z_i + U_i||^2 for a few epochs
            (`add_admm_penalty` after the optimizer, or `admm_penalty_loss`);
    Z-step: Z_i = Pi_i(W_i + U_i), keep the l_i entries of greatest |.|
            (`admm_project`);
    U-step: U_i <- U_i + W_i - Z_i (`admm_dual_update`);

`admm_step` does the Z- and U-steps. Start from a pretrained W with
`admm_init` (Z = Pi(W), U = 0); at the end hard-prune W to the targets
(`admm_hard_prune`) and retrain with ``optax.chain(opt, keep_masked(mask))``.

The targets l_i are inputs: `layer_keep_counts_from_density` builds them from
per-layer densities, e.g. those GSM found at the same global compression
(``sparsity_report(gsm_params)``), or the published ones
(`LENET5_ADMM_SETTING`).

Z and U live on the pruned leaves only: their pytrees have the params'
structure with ``optax.MaskedNode()`` elsewhere, like the keep counts.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import NamedTuple
from typing import Union

import jax
import jax.numpy as jnp
import optax

from gsm_optax import pruning
from gsm_optax.baselines import _util
from gsm_optax.baselines import magnitude

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


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
      f"that are not pruned); got {jax.tree.structure(tree, is_leaf=_util.is_masked_node)} "
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
    if _util.is_masked_node(zi) != _util.is_masked_node(ui):
      raise ValueError("state.z and state.u must prune the same leaves.")
    if not _util.is_masked_node(zi) and (
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
    if _util.is_masked_node(ui) or _util.is_masked_node(zi):
      if _util.is_masked_node(ui) != _util.is_masked_node(zi):
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
    lambda x: x if _util.is_masked_node(x) else jnp.zeros_like(x), z, is_leaf=_util.is_masked_node
  )
  return ADMMState(z=z, u=u)


def admm_step(params: Any, state: ADMMState, keep_counts: Any) -> ADMMState:
  """Z- and U-steps after a W-step: Z = Pi(W + U), then U <- U + W - Z."""
  treedef, w, _, u = _state_leaves(params, state)
  w_plus_u = jax.tree.unflatten(
    treedef, [wi if _util.is_masked_node(ui) else wi + ui for wi, ui in zip(w, u)]
  )
  z = admm_project(w_plus_u, keep_counts)
  return ADMMState(z=z, u=admm_dual_update(state.u, params, z))


def admm_penalty_loss(params: Any, state: ADMMState, rho: Any) -> jax.Array:
  """sum_i rho/2 ||W_i - Z_i + U_i||^2 over the pruned leaves (float32).

  Add it to the loss for the W-step, or use `add_admm_penalty`.
  """
  _, w, z, u = _state_leaves(params, state)
  total = jnp.zeros([], jnp.float32)
  for wi, zi, ui in zip(w, z, u):
    if not _util.is_masked_node(zi):
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
    if _util.is_masked_node(zi):
      out.append(jnp.zeros_like(wi))
    else:
      r = wi.astype(jnp.float32) - jnp.asarray(zi, jnp.float32) + jnp.asarray(ui, jnp.float32)
      out.append((rho * r).astype(wi.dtype))
  return jax.tree.unflatten(treedef, out)


class AddADMMPenaltyState(NamedTuple):
  """State of `add_admm_penalty`: the step, for a rho schedule."""

  count: jax.Array


def add_admm_penalty(rho: ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
  """W-step of ADMM pruning: g <- g + rho (W - Z + U) on the pruned leaves.

  Put it first in the chain, on the raw gradients, so that the optimizer sees
  the gradient of f(W) + sum_i rho/2 ||W_i - Z_i + U_i||^2 (Zhang et al. 2018,
  eq. 5): ``opt = optax.chain(add_admm_penalty(1e-4), optax.adam(1e-3))``,
  then ``opt.update(grads, opt_state, params, admm_state=state)``. The
  `ADMMState` is an extra argument, not optimizer state: it changes only at
  the Z- and U-steps (`admm_step`), which the training loop runs.

  Args:
    rho: rho >= 0, a float or an optax schedule of the step.

  Returns:
    An `optax.GradientTransformationExtraArgs`; `update` requires `params` and
    the keyword argument `admm_state`.
  """
  if not callable(rho) and _util.is_number(rho) and float(rho) < 0:
    raise ValueError(f"rho must be >= 0, got {rho!r}.")

  def init_fn(params):
    del params
    return AddADMMPenaltyState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, admm_state=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("add_admm_penalty needs params: update(g, state, params, admm_state=...).")
    if admm_state is None:
      raise ValueError(
        "add_admm_penalty needs the keyword argument admm_state (an "
        "ADMMState from admm_init / admm_step)."
      )
    value = rho(state.count) if callable(rho) else rho
    penalty = admm_penalty_grads(params, admm_state, value)
    updates = jax.tree.map(lambda g, p: g + p.astype(g.dtype), updates, penalty)
    return updates, AddADMMPenaltyState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def admm_hard_prune(params: Any, keep_counts: Any) -> tuple[Any, Any]:
  """End of ADMM: keep the l_i entries of greatest |W_i|, zero the rest.

  Returns:
    (pruned params, mask); retrain with ``optax.chain(opt, keep_masked(mask))``.
  """
  mask = magnitude.topk_mask(params, keep_counts)
  return pruning.apply_mask(params, mask), mask

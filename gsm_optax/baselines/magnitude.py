"""Magnitude pruning and masked fine-tuning (Han et al., NeurIPS 2015).

One shot: keep the weights of greatest |w| (globally over the pool, or a given
number per layer), zero the rest, then fine-tune with the pruned weights held
at zero by ``optax.chain(optimizer, keep_masked(mask))``. Iteratively: repeat
prune / fine-tune for R rounds along `iterative_compression_schedule`.
"""

from __future__ import annotations

from typing import Any
from typing import Callable
from typing import NamedTuple
from typing import Union

import jax
import jax.numpy as jnp
import optax

from gsm_optax import _checks
from gsm_optax import _pool
from gsm_optax import pruning
from gsm_optax.baselines import _util

Mask = Union[Any, Callable[[Any], Any]]


def layer_keep_counts_from_density(params: Any, densities: Any, *, pool: _pool.Pool = None) -> Any:
  """Per-layer targets l_i = floor(size_i * d_i) from per-layer densities.

  Typical use: give ADMM or layer-wise pruning the per-layer densities GSM
  found at the same global compression, ``densities=sparsity_report(gsm_params)``
  (its non-zero counts are then taken exactly).

  Args:
    params: the parameter pytree (only shapes are used).
    densities: one of
      - a number d in [0, 1], the same density for every pooled leaf;
      - a `gsm_optax.SparsityReport` (l_i = its non-zeros of leaf i);
      - a pytree with the params' structure holding a density per leaf
        (values outside the pool are ignored and may be ``optax.MaskedNode``);
      - a dict from leaf paths (``jax.tree_util.keystr``, as in the report) to
        densities, covering exactly the pooled leaves;
      - a sequence of densities of the pooled leaves in tree order.
      size_i * d_i is rounded to 6 decimals before the floor, so d_i = l / size_i
      gives back l.
    pool: the prunable leaves (default: floating leaves with ndim >= 2).

  Returns:
    A pytree with the params' structure: an int l_i on every pooled leaf and
    ``optax.MaskedNode()`` on the others (the "keep counts" of `topk_mask` and
    the ADMM functions).
  """
  treedef, _, counts = _util.per_leaf_densities(params, densities, pool)
  return _util.keep_counts_pytree(treedef, counts)


def topk_mask(params: Any, keep_counts: Any) -> Any:
  """Per-leaf magnitude mask keeping exactly the l_i entries of greatest |w|.

  mask_i = top-l_i of |w_i|; ties at the l_i-th magnitude go to the first
  entries in row-major order, and a zero weight is never kept unless l_i is
  the whole leaf (a leaf with fewer than l_i non-zeros keeps only those).

  Args:
    params: the parameter pytree.
    keep_counts: ints on the pruned leaves, ``optax.MaskedNode()`` on the
      others (see `layer_keep_counts_from_density`).

  Returns:
    A pytree of bool arrays with the params' structure, all True on leaves
    whose count is MaskedNode.
  """
  treedef, leaves, counts = _util.resolve_keep_counts(params, keep_counts)
  pruned = [i for i, count in enumerate(counts) if count is not None]
  masks = [jnp.ones(jnp.shape(leaf), bool) for leaf in leaves]
  selected = _util.layerwise_topk_masks(
    [_util.magnitude(leaves[i]) for i in pruned], [counts[i] for i in pruned]
  )
  for i, mask in zip(pruned, selected):
    masks[i] = mask
  return jax.tree.unflatten(treedef, masks)


def layerwise_magnitude_mask(
  params: Any, densities_or_compression: Any, *, pool: _pool.Pool = None
) -> Any:
  """Layer-wise magnitude pruning mask: the l_i weights of greatest |w| per leaf.

  With a compression C >= 1, l_i = int(size_i / C) for every pooled leaf (each
  layer pruned by the same ratio, Han et al. 2015); otherwise l_i =
  floor(size_i * d_i) from per-leaf densities. Exactly l_i entries are kept
  (see `topk_mask`). The global variant is `gsm_optax.global_magnitude_mask`.

  Args:
    params: the parameter pytree.
    densities_or_compression: a number C >= 1 (compression of every pooled
      leaf), or per-leaf densities in any form `layer_keep_counts_from_density`
      accepts except a single number.
    pool: the prunable leaves (default: floating leaves with ndim >= 2).

  Returns:
    A pytree of bool arrays with the params' structure; True outside the pool.

  Raises:
    ValueError: C < 1, or C keeps no weight of some leaf (size_i < C).
  """
  if _checks.is_number(densities_or_compression):
    compression = _pool.validate_compression(densities_or_compression, "densities_or_compression")
    infos, treedef = _util.pooled_leaves_with_paths(params, pool)
    counts = []
    for path, leaf, flag in infos:
      if not flag:
        counts.append(None)
        continue
      size = _checks.leaf_size(leaf)
      keep = _pool.floor_keep(size, compression)
      if keep < 1:
        raise ValueError(
          f"densities_or_compression {compression} keeps int({size} / "
          f"{compression}) = 0 weights of the leaf {path}; use a compression "
          f"<= {size} or per-leaf densities."
        )
      counts.append(keep)
    keep_counts = _util.keep_counts_pytree(treedef, counts)
  else:
    treedef, _, counts = _util.per_leaf_densities(
      params, densities_or_compression, pool, name="densities_or_compression"
    )
    keep_counts = _util.keep_counts_pytree(treedef, counts)
  return topk_mask(params, keep_counts)


def magnitude_prune(
  params: Any, target: Any, *, layerwise: bool = False, pool: _pool.Pool = None
) -> tuple[Any, Any]:
  """One-shot magnitude pruning: returns (pruned params, mask) for fine-tuning.

  Global (default): ``gsm_optax.global_magnitude_mask(params, C)``, the Q =
  int(|pool| / C) weights of greatest |w| over the whole pool. Layer-wise:
  `layerwise_magnitude_mask(params, target)`. Fine-tune the result with
  ``optax.chain(optimizer, keep_masked(mask))``.

  Args:
    params: the trained parameter pytree.
    target: the compression C >= 1 (global or per leaf); with `layerwise`,
      also per-leaf densities.
    layerwise: prune every leaf separately instead of over the whole pool.
    pool: the prunable leaves.

  Returns:
    (params with the pruned entries set to 0, the bool mask pytree).
  """
  if layerwise:
    mask = layerwise_magnitude_mask(params, target, pool=pool)
  else:
    if not _checks.is_number(target):
      raise TypeError(
        "target of a global magnitude_prune must be a compression C >= 1, "
        f"got {type(target).__name__}; per-leaf densities need "
        "layerwise=True."
      )
    mask = pruning.global_magnitude_mask(params, target, pool=pool)
  return pruning.apply_mask(params, mask), mask


def iterative_compression_schedule(final_compression: float, rounds: int) -> tuple[float, ...]:
  """Compressions of R prune / fine-tune rounds reaching C geometrically.

  C_r = C^(r / R), r = 1..R (C_R = C exactly): every round keeps the same
  fraction C^(-1/R) of the weights the previous round kept, as in the
  iterative pruning of Han et al. (2015).

  Args:
    final_compression: C >= 1 reached after the last round.
    rounds: R >= 1.

  Returns:
    A tuple of R compressions, non-decreasing, the last equal to C.
  """
  compression = _pool.validate_compression(final_compression, "final_compression")
  if not _checks.is_number(rounds, integer=True):
    raise TypeError(f"rounds must be an int >= 1, got {rounds!r}.")
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}.")
  rounds = int(rounds)
  schedule = [compression ** (r / rounds) for r in range(1, rounds)]
  return tuple(schedule) + (compression,)


class KeepMaskedState(NamedTuple):
  """State of `keep_masked`: the mask itself (bool arrays), so checkpoints
  restore it with the rest of the optimizer state."""

  mask: Any


def keep_masked(mask: Mask) -> optax.GradientTransformationExtraArgs:
  """Zeroes the updates of masked-out entries: u <- mask * u.

  Chain it after any optimizer, ``optax.chain(optax.sgd(lr), keep_masked(m))``:
  params that are already 0 where the mask is False stay exactly 0 (masked
  fine-tuning of Han et al. 2015, ticket retraining of Frankle & Carbin 2019;
  with momentum-free or masked-gradient optimizers this equals masking the
  gradients). Entries where the mask is True get the optimizer's update.

  Args:
    mask: a pytree of bool arrays with the params' structure (each leaf of the
      param's shape, or a scalar bool for the whole leaf; leaves outside the
      pool all True), or a callable ``params -> mask`` evaluated at `init`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state stores the mask.
    On abstract params (`jax.ShapeDtypeStruct` leaves) a callable mask is
    evaluated abstractly (`jax.eval_shape`): the state's mask is abstract too.
  """

  def init_fn(params):
    if _checks.is_placeholder(params):  # optax.tree_utils.tree_map_params
      return KeepMaskedState(mask=params)
    if not callable(mask):
      value = mask
    elif _checks.is_abstract(params):
      value = jax.eval_shape(mask, params)
    else:
      value = mask(params)
    return KeepMaskedState(mask=_util.check_mask(params, value))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    checked = _util.check_mask(updates, state.mask)
    return jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, checked), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


masked_update = keep_masked
"""Alias of `keep_masked`."""

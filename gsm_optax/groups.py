"""Channel groups: one channel spans slices of several leaves (an MLP neuron, an attention head).

A leaf joins a group with a `ChannelSlice(group, axis, width)`: channel c of
the group is the slice ``[c * width, (c + 1) * width)`` along `axis` of every
member leaf, so all members of a group have the same number of channels. A
transformer MLP neuron j is column j of fc1's kernel and row j of fc2's
(``ChannelSlice("blocks/0/mlp", -1)``, ``ChannelSlice("blocks/0/mlp", 0)``); an
attention head h is head_dim columns of query, key and value and head_dim rows
of out (width head_dim).

Channel g of a group is scored with the first-order Taylor score of all its
weights, over all member slices,

    S_g = sum over the member slices of |dL/dw * w|     (or / their number: "mean")

and GSM keeps the loss gradient of the Q = int(#channels of all groups / C)
channels of greatest S_g over every group at once (Ding et al. 2019's rule
with such channels for weights):

    z <- beta * z + eta * w + B_g * dL/dw
    w <- w - alpha * z

Groups are given as a pytree with the structure of the params whose leaves are
a `ChannelSlice` or None (or `optax.MaskedNode`) for leaves in no group, or a
callable ``params -> such a pytree``. The member leaves are the pool: the
weight decay of `gsm_channel_groups` is theirs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any
from typing import Callable
from typing import NamedTuple
from typing import Union

import jax
import jax.numpy as jnp
import optax

from gsm_optax import _checks
from gsm_optax import paths
from gsm_optax import pruning
from gsm_optax import selection
from gsm_optax import structured
from gsm_optax import transform


class ChannelSlice(NamedTuple):
  """A leaf's part in channel group `group`: channel c is ``[c * width, (c + 1) * width)``
  along `axis`."""

  group: str
  axis: int = -1
  width: int = 1


Groups = Union[Any, Callable[[Any], Any]]


class _Member(NamedTuple):
  index: int  # position among the member leaves, in tree order
  axis: int  # non-negative
  width: int


class GroupLayout(NamedTuple):
  """The resolved groups (static, hashable): names and channel counts in the
  order of their first member leaf, each group's members, and the flat indices
  and paths of the member leaves in tree order."""

  names: tuple[str, ...]
  channels: tuple[int, ...]
  members: tuple[tuple[_Member, ...], ...]
  leaves: tuple[int, ...]
  paths: tuple[str, ...]


def _is_spec(x: Any) -> bool:
  return x is None or isinstance(x, ChannelSlice) or _checks.is_masked_node(x)


def _spec_leaves(params: Any, groups: Groups) -> list[Any]:
  """The ChannelSlice (or None) of every leaf of `params`, in tree order."""
  tree = groups(params) if callable(groups) else groups
  if jax.tree.structure(tree, is_leaf=_is_spec) != jax.tree.structure(params):
    raise ValueError(
      "groups must be a pytree with the structure of params whose leaves are ChannelSlice "
      "or None (or a callable params -> such a pytree); got the structure "
      f"{jax.tree.structure(tree, is_leaf=_is_spec)}, params have {jax.tree.structure(params)}."
    )
  return [
    s if isinstance(s, ChannelSlice) else None for s in jax.tree.leaves(tree, is_leaf=_is_spec)
  ]


def _check_slice(path: str, shape: tuple[int, ...], dtype: Any, spec: ChannelSlice) -> _Member:
  ndim = len(shape)
  if not isinstance(spec.group, str):
    raise ValueError(f"the ChannelSlice of {path} names its group {spec.group!r}: use a str.")
  if not _checks.is_number(spec.axis, integer=True) or not -ndim <= int(spec.axis) < ndim:
    raise ValueError(
      f"ChannelSlice axis={spec.axis!r} does not exist in {path} of shape {shape}: allowed are "
      f"the integers {-ndim}..{ndim - 1}."
    )
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"the channel groups take {path} of dtype {dtype}: only floating leaves.")
  axis = int(spec.axis) % ndim
  width = spec.width
  if not _checks.is_number(width, integer=True) or width < 1 or shape[axis] % width:
    raise ValueError(
      f"ChannelSlice width={width!r} of {path} must be an integer >= 1 dividing the size "
      f"{shape[axis]} of its axis {axis} (shape {shape})."
    )
  return _Member(index=-1, axis=axis, width=int(width))


def resolve_groups(params: Any, groups: Groups) -> GroupLayout:
  """The groups of `params` as a `GroupLayout`.

  Raises:
    ValueError: groups of another structure, an axis or width a member does
      not have, members of one group with different numbers of channels, or
      no member at all.
    TypeError: a non-floating member.
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  found: dict[str, list[tuple[str, int, _Member]]] = {}
  leaves, names = [], []
  for i, ((path, leaf), spec) in enumerate(zip(flat, _spec_leaves(params, groups))):
    if spec is None:
      continue
    name = paths.key_path_name(path) or "<root>"
    shape = tuple(jnp.shape(leaf))
    member = _check_slice(name, shape, _checks.leaf_dtype(leaf), spec)
    member = member._replace(index=len(leaves))
    found.setdefault(spec.group, []).append((name, shape[member.axis] // member.width, member))
    leaves.append(i)
    names.append(name)
  if not found:
    raise ValueError("the channel groups take no leaf: give at least one leaf a ChannelSlice.")
  for group, members in found.items():
    counts = {count for _, count, _ in members}
    if len(counts) > 1:
      detail = ", ".join(f"{name}: {count}" for name, count, _ in members)
      raise ValueError(
        f"the members of channel group {group!r} have different numbers of channels ({detail}); "
        "every member must hold the same channels (size of its axis / width)."
      )
  return GroupLayout(
    names=tuple(found),
    channels=tuple(members[0][1] for members in found.values()),
    members=tuple(tuple(m for _, _, m in members) for members in found.values()),
    leaves=tuple(leaves),
    paths=tuple(names),
  )


def group_pool(groups: Groups) -> Callable[[Any], Any]:
  """params -> True on the leaves of some group (the pool the groups prune)."""

  def pool(params: Any) -> Any:
    members = set(resolve_groups(params, groups).leaves)
    flat, treedef = jax.tree.flatten(params)
    return jax.tree.unflatten(treedef, [i in members for i in range(len(flat))])

  return pool


# --------------------------------------------------------------------------
# Scores and masks.


def _slice_sums(score: jax.Array, member: _Member) -> jax.Array:
  """Per channel of a member: the sum of `score` over its slice."""
  per_index = jnp.sum(score, axis=tuple(a for a in range(score.ndim) if a != member.axis))
  return per_index.reshape(-1, member.width).sum(axis=1)


def group_scores(
  scores: list[jax.Array], layout: GroupLayout, channel_score: str = "sum"
) -> list[jax.Array]:
  """S_g per group (float32): the sum of `scores` (one per member leaf) over channel g's
  member slices ("sum"), or that / the channel's number of weights ("mean")."""
  out = []
  for channels, members in zip(layout.channels, layout.members):
    total = sum(_slice_sums(scores[m.index], m) for m in members)
    if channel_score == "mean":
      total = total / sum(scores[m.index].size // channels for m in members)
    out.append(total)
  return out


def _expand(active: jax.Array, member: _Member, ndim: int) -> jax.Array:
  """A channel vector as a mask over a member leaf: each entry `width` times along its axis."""
  shape = [1] * ndim
  shape[member.axis] = -1
  return jnp.repeat(active, member.width).reshape(shape)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _mask_groups(grads, weights, keep, layout, channel_score):
  """(masked member grads, B per member leaf, threshold, num_active) of channel-group GSM."""
  scores = group_scores(transform.taylor_scores(grads, weights), layout, channel_score)
  threshold = selection.select_score_threshold(scores, keep).threshold
  keep_all = keep >= sum(layout.channels)
  masked, actives = list(grads), [None] * len(grads)  # every member leaf is set below
  num_active = jnp.zeros([], jnp.int32)
  for s, members in zip(scores, layout.members):
    # As the per-weight rule: ties at t kept, NaN never, 0 only when C = 1.
    active = (s >= threshold) & ((s > 0) | keep_all)
    num_active += jnp.sum(active, dtype=jnp.int32)
    for m in members:
      g = grads[m.index]
      expanded = _expand(active, m, g.ndim)
      masked[m.index] = jnp.where(expanded, g, jnp.zeros_like(g))
      actives[m.index] = jnp.broadcast_to(expanded, g.shape)
  return masked, actives, threshold, num_active


def mask_by_global_group_taylor(
  compression: optax.ScalarOrSchedule, groups: Groups, *, channel_score: str = "sum"
) -> optax.GradientTransformationExtraArgs:
  """Keeps the loss gradient of the Q channels of all groups with the greatest S_g.

  B_g = [S_g >= t], S_g = sum over channel g's member slices of |g * w|
  (float32), t the Q-th greatest S_g over every group, Q = int(#channels of all
  groups / C). As `mask_by_global_channel_taylor` (whose state it keeps, so
  `channel_stats` reads it): ties at t all kept, a score of 0 active only when
  C = 1, NaN never; ``channel_score="mean"`` divides S_g by the channel's
  number of weights. Gradients of passive channels become 0 in every member
  slice; leaves in no group pass unchanged.

  Raises:
    ValueError: at construction for a constant C < 1 or not finite; at `init`
      for groups `resolve_groups` refuses, or C > #channels.
  """
  return transform.mask_transform(group_selector(compression, groups, channel_score=channel_score))


def group_selector(
  compression: optax.ScalarOrSchedule, groups: Groups, *, channel_score: str = "sum"
) -> transform.Selector:
  """B_g = [S_g >= t], S_g = sum |g * w| over channel g's member slices, t the Q-th greatest.

  The `transform.Selector` of `mask_by_global_group_taylor` (its rules and
  arguments; Q = int(#channels of all groups / C_t)): the pooled leaves are the
  member leaves, its step's `active` is B_g broadcast over every member slice,
  its state a `MaskByGlobalChannelTaylorState`.
  """
  transform._check_compression_arg(compression)
  structured._check_channel_score(channel_score)

  def init_fn(params):
    return structured.init_channel_state(
      params,
      compression,
      "mask_by_global_group_taylor",
      lambda p: sum(resolve_groups(p, groups).channels),
    )

  def step_fn(updates, state, params):
    structured._need_params(params, "mask_by_global_group_taylor")
    layout = resolve_groups(params, groups)
    if jax.tree.structure(updates) != jax.tree.structure(params):
      raise ValueError(
        "mask_by_global_group_taylor: updates and params have different tree structures: "
        f"{jax.tree.structure(updates)} vs {jax.tree.structure(params)}."
      )
    flat, treedef = jax.tree.flatten(updates)
    flat_params = jax.tree.leaves(params)
    keep, invalid = transform._keep_for_step(sum(layout.channels), compression, state.count)
    masked, actives, threshold, num_active = _mask_groups(
      [flat[i] for i in layout.leaves],
      [flat_params[i] for i in layout.leaves],
      keep,
      layout,
      channel_score,
    )
    for i, g in zip(layout.leaves, masked):
      flat[i] = g
    new_state = structured.MaskByGlobalChannelTaylorState(
      count=optax.safe_increment(state.count),
      keep=keep,
      threshold=threshold,
      num_active=num_active,
      num_invalid_compression=state.num_invalid_compression + invalid.astype(jnp.int32),
    )
    indices = list(layout.leaves)
    return transform.TaylorStep(jax.tree.unflatten(treedef, flat), indices, actives, new_state)

  return transform.Selector(init_fn, step_fn)


def gsm_channel_groups(
  learning_rate: optax.ScalarOrSchedule,
  compression: optax.ScalarOrSchedule,
  groups: Groups,
  *,
  momentum: float = 0.99,
  weight_decay: optax.ScalarOrSchedule = 5e-4,
  nesterov: bool = False,
  channel_score: str = "sum",
) -> optax.GradientTransformationExtraArgs:
  """Channel-group GSM: z <- beta * z + eta * w + B_g * dL/dw;  w <- w - alpha * z.

  `gsm` with the mask of `mask_by_global_group_taylor` (C counts channels of
  the groups). Every member weight decays, so passive channels shrink to about
  0 in all their slices and `prune_channel_groups` cuts them; leaves in no
  group get their gradient and no decay.
  """
  mask = mask_by_global_group_taylor(compression, groups, channel_score=channel_score)
  return transform.gsm_chain(
    [mask], learning_rate, momentum, weight_decay, nesterov, group_pool(groups)
  )


# --------------------------------------------------------------------------
# The final cut and the report.


def channel_group_mask(
  params: Any, compression: float, groups: Groups, *, channel_score: str = "sum"
) -> Any:
  """Keeps exactly the Q = int(#channels of all groups / C) channels of greatest sum |w|.

  S_g = sum (``channel_score="mean"``: mean) of |w| over channel g's member
  slices. Ties go to the channel earlier: groups in the order of their first
  member leaf, then by channel index (a stable sort of -S; NaN last). Leaves in
  no group are all True.

  Returns:
    A pytree of bool arrays with the structure of `params`.
  """
  structured._check_channel_score(channel_score)
  layout = resolve_groups(params, groups)
  keep = structured.channel_keep_count(sum(layout.channels), compression)
  flat, treedef = jax.tree.flatten(params)
  magnitudes = [jnp.abs(jnp.asarray(flat[i]).astype(jnp.float32)) for i in layout.leaves]
  flat_scores = jnp.concatenate(group_scores(magnitudes, layout, channel_score))
  order = jnp.argsort(-jnp.where(jnp.isnan(flat_scores), -1.0, flat_scores), stable=True)
  kept = jnp.zeros(flat_scores.shape, bool).at[order[:keep]].set(True)
  out = [jnp.ones(jnp.shape(p), bool) for p in flat]
  start = 0
  for channels, members in zip(layout.channels, layout.members):
    for m in members:
      i = layout.leaves[m.index]
      out[i] = jnp.broadcast_to(
        _expand(kept[start : start + channels], m, out[i].ndim), out[i].shape
      )
    start += channels
  return jax.tree.unflatten(treedef, out)


def prune_channel_groups(
  params: Any, compression: float, groups: Groups, *, channel_score: str = "sum"
) -> Any:
  """Zeroes every channel of the groups, in all its member slices, but the Q of
  greatest sum (or mean) |w| (`channel_group_mask`)."""
  return pruning.apply_mask(
    params, channel_group_mask(params, compression, groups, channel_score=channel_score)
  )


@dataclasses.dataclass(frozen=True)
class GroupChannels:
  """Channels of one group: how many, and how many hold a non-zero in some member slice."""

  group: str
  paths: tuple[str, ...]
  channels: int
  channels_kept: int
  size: int
  nonzeros: int


@dataclasses.dataclass(frozen=True)
class ChannelGroupReport(structured.ChannelTotals):
  """Channels kept per group and in all; str() is a table."""

  rows: tuple[GroupChannels, ...]

  @property
  def kept_per_group(self) -> dict[str, int]:
    return {r.group: r.channels_kept for r in self.rows}

  def __str__(self) -> str:
    return self.table(("group", "members"), [(r.group, str(len(r.paths))) for r in self.rows])


def channel_group_report(params: Any, groups: Groups) -> ChannelGroupReport:
  """Per group: channels, channels kept (a non-zero weight in some member slice),
  member weights, non-zeros."""
  layout = resolve_groups(params, groups)
  flat = jax.tree.leaves(params)
  nonzero = [jnp.asarray(flat[i]) != 0 for i in layout.leaves]
  alive = group_scores([n.astype(jnp.float32) for n in nonzero], layout) if nonzero else []
  rows = []
  for name, channels, members, live in zip(layout.names, layout.channels, layout.members, alive):
    rows.append(
      GroupChannels(
        group=name,
        paths=tuple(layout.paths[m.index] for m in members),
        channels=channels,
        channels_kept=int(jnp.sum(live > 0)),
        size=sum(int(nonzero[m.index].size) for m in members),
        nonzeros=sum(int(jnp.sum(nonzero[m.index])) for m in members),
      )
    )
  return ChannelGroupReport(rows=tuple(rows))

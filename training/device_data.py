"""The training set on the device(s): each step draws its batch inside ``jax.jit``.

For datasets held in memory without host augmentation (MNIST, Fashion-MNIST:
``Dataset.in_memory_unaugmented``) the training set is put on every device once,
replicated over the mesh, and normalised there exactly as ``data.normalize``
does it; each epoch then uploads only its order (``Dataset.train_order``: a
``(steps, batch)`` array of training-set indices).
The step at position ``i = state.step - offset`` of the epoch gathers row ``i``
inside the jitted step, constrained to the batch sharding, then runs the
phase's train step: the batches are ``Dataset.train_batches``'s bit for bit,
and nothing crosses from the host during the epoch.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
import numpy as np

from training import data
from training import distributed
from training import steps


class TrainSet(NamedTuple):
  """The normalised training set, replicated on every device of the mesh."""

  images: jax.Array
  labels: jax.Array


class EpochOrder(NamedTuple):
  """One epoch's batches on the device: step ``state.step`` reads ``rows[state.step - offset]``."""

  rows: jax.Array
  offset: jax.Array


def can_draw(dataset: Any) -> bool:
  """Whether the batches can be drawn on the device.

  True for a ``data.Dataset`` in memory without augmentation whose
  ``train_batches`` is its own; a dataset that wraps, subclasses or patches
  ``train_batches`` is read through it on the host, as it may yield other
  batches.
  """
  own = getattr(type(dataset), "train_batches", None) is data.Dataset.train_batches
  patched = "train_batches" in getattr(dataset, "__dict__", {})
  return own and not patched and dataset.in_memory_unaugmented


def _replicated(host: np.ndarray, topology: distributed.Topology) -> jax.Array:
  """``host`` (the same on every process) on every device of the mesh."""
  return jax.make_array_from_callback(host.shape, topology.replicated, lambda index: host[index])


def upload(dataset: data.Dataset, topology: distributed.Topology) -> TrainSet:
  """``dataset.train_arrays()`` on every device, normalised (every process holds the whole set).

  Returns once the set is there: a run's setup, not its first step, pays for it.
  """
  images, labels, (scale, shift) = dataset.train_arrays()
  images = _subtract(_scale(_replicated(images, topology), scale), shift)
  return jax.block_until_ready(TrainSet(images, _replicated(labels, topology)))


# ``data.normalize`` on the device, bit for bit: the product is rounded before the
# difference, so the two are separate computations (XLA:CPU fuses ``x * a - b`` into
# a multiply-add with one rounding).
@jax.jit
def _scale(images: jax.Array, scale: np.ndarray) -> jax.Array:
  return images.astype(jnp.float32) * scale


@jax.jit
def _subtract(images: jax.Array, shift: np.ndarray) -> jax.Array:
  return images - shift


def epoch_order(
  dataset: data.Dataset,
  batch_size: int,
  *,
  epoch: int,
  seed: int,
  start: int,
  step: int,
  topology: distributed.Topology,
) -> EpochOrder:
  """The order of ``epoch`` on the device, for a state at ``step`` about to train batch ``start``."""
  rows = dataset.train_order(batch_size, epoch=epoch, seed=seed)
  offset = np.asarray(step - start, np.int32)
  return EpochOrder(_replicated(rows, topology), _replicated(offset, topology))


def draw_batch(
  train_set: TrainSet, order: EpochOrder, step: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Inside ``jax.jit``: the batch of the state at ``step``, gathered from the device set."""
  rows = order.rows[step - order.offset]
  return (
    jnp.take(train_set.images, rows, axis=0, mode="clip"),
    jnp.take(train_set.labels, rows, axis=0, mode="clip"),
  )


@functools.lru_cache(maxsize=32)
def drawing(train_step: Callable, mesh: Mesh | None) -> Callable:
  """``step(state, train_set, order) -> (state, metrics)``: ``train_step`` on the drawn batch, jitted.

  The batch is split over the mesh like a host batch.
  """

  def step(state: steps.TrainState, train_set: TrainSet, order: EpochOrder):
    batch = draw_batch(train_set, order, state.step)
    if mesh is not None:
      batch = jax.lax.with_sharding_constraint(batch, NamedSharding(mesh, distributed.BATCH_SPEC))
    return train_step(state, batch)

  return jax.jit(step)

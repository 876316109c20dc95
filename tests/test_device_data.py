"""The training set on the device: the batches drawn inside the jitted step are the host batches."""

import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from training import data  # noqa: E402
from training import device_data  # noqa: E402
from training import distributed  # noqa: E402
from training import steps  # noqa: E402

NUM_TRAIN, BATCH = 100, 16  # 6 full batches an epoch, 4 examples dropped
EPOCH, SEED = 2, 5


def _dataset(augment=False):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (NUM_TRAIN, 4, 4, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, NUM_TRAIN)
  return data.Dataset.from_arrays(
    "toy",
    (images, labels),
    (images[:10], labels[:10]),
    num_classes=10,
    mean=(0.3,),
    std=(0.4,),
    augment=augment,
  )


def _topology():
  config = ml_collections.ConfigDict({"mesh": {"fsdp": 1}, "batch_size": BATCH})
  return distributed.make_topology(config)


def _order(dataset, topology, start, step):
  return device_data.epoch_order(
    dataset, BATCH, epoch=EPOCH, seed=SEED, start=start, step=step, topology=topology
  )


@pytest.mark.parametrize("start", [0, 4])
def test_batches_drawn_on_the_device_are_the_host_batches(start):
  dataset, topology = _dataset(), _topology()
  train_set = device_data.upload(dataset, topology)
  order = _order(dataset, topology, start, step=37)  # a resumed state at step 37, batch `start`
  draw = jax.jit(device_data.draw_batch)
  host = list(dataset.train_batches(BATCH, epoch=EPOCH, seed=SEED, start=start))
  assert len(host) == NUM_TRAIN // BATCH - start
  for k, (images, labels) in enumerate(host):
    drawn_images, drawn_labels = draw(train_set, order, jnp.int32(37 + k))
    assert np.asarray(drawn_images).tobytes() == images.tobytes()
    assert np.asarray(drawn_labels).tobytes() == labels.tobytes()


@jax.jit
def _fingerprint_step(state, batch):
  """A stand-in train step: folds the batch into ``params`` in order (int32 arithmetic)."""
  images, labels = batch
  digest = jnp.sum(labels * jnp.arange(1, BATCH + 1)) + jnp.sum(images > 0)
  params = state.params * 31 + digest
  metrics = {
    "loss_sum": jnp.sum(images > 0.5) * 1.0,
    "correct": jnp.sum(labels),
    "count": jnp.int32(BATCH),
  }
  return state._replace(step=state.step + 1, params=params), metrics


def test_the_drawing_step_trains_on_the_host_batches_in_order():
  dataset, topology = _dataset(), _topology()
  start, first_step = 2, 14
  state = steps.TrainState(jnp.int32(first_step), jnp.int32(0), {}, (), jnp.zeros(2, jnp.uint32))
  draw = device_data.drawing(_fingerprint_step, topology.mesh)
  train_set, order = device_data.upload(dataset, topology), _order(dataset, topology, start, 14)
  on_device, on_host = state, state
  for batch in dataset.train_batches(BATCH, epoch=EPOCH, seed=SEED, start=start):
    on_device, device_metrics = draw(on_device, train_set, order)
    on_host, host_metrics = _fingerprint_step(on_host, distributed.global_batch(batch, topology))
    for a, b in zip(jax.tree.leaves(on_device), jax.tree.leaves(on_host)):
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert steps.totals_to_host(device_metrics) == steps.totals_to_host(host_metrics)
  assert int(on_device.step) == first_step + NUM_TRAIN // BATCH - start


class _Wrapped:
  def __init__(self, inner):
    self._inner = inner

  def __getattr__(self, name):
    return getattr(self._inner, name)

  def train_batches(self, *args, **kwargs):
    return self._inner.train_batches(*args, **kwargs)


def test_only_a_dataset_s_own_unaugmented_batches_are_drawn_on_the_device():
  assert device_data.can_draw(_dataset())
  augmented = _dataset(augment=True)
  assert not device_data.can_draw(augmented)
  with pytest.raises(ValueError, match="augmented or streamed"):
    augmented.train_arrays()
  assert not device_data.can_draw(_Wrapped(_dataset()))  # a wrapper is read through
  patched = _dataset()
  patched.train_batches = patched.train_batches
  assert not device_data.can_draw(patched)

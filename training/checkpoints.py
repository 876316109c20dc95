"""Orbax checkpoints of the train state, verified on restore, and exported models.

A checkpoint holds two items: ``state`` (an array pytree: params, batch stats,
optimizer state with its momentum, step, RNG key) and ``meta`` (JSON: the run's
progress, plus a hash of every saved array). Orbax's CheckpointManager
writes each step into a temporary directory and renames it once complete, so a
checkpoint is either whole or absent, and deletes the oldest beyond
``max_to_keep`` only after the new one is committed.

Nothing good is ever deleted: a step that is already committed is never
written again, and ``restore_latest`` restores the newest checkpoint that
restores *and* matches its checksums; a damaged one (truncated file, empty
directory, flipped bits) is moved to ``<workdir>/damaged_checkpoints/`` with the
reason, and the next older one is tried.
"""

from __future__ import annotations

from collections.abc import Callable
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

_STATE = "state"
_META = "meta"
_CHECKSUMS = "array_checksums"


class CheckpointError(RuntimeError):
  """No checkpoint of a workdir restores; the message is one line."""


def has_checkpoint(directory: str) -> bool:
  """Whether ``directory`` holds at least one finished checkpoint (without creating it)."""
  if not os.path.isdir(directory):
    return False
  return any(name.isdigit() for name in os.listdir(directory))


def _as_uint32(x: jax.Array) -> jax.Array:
  """The bit pattern of every entry as uint32 (narrower types zero-extended)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = x.dtype.itemsize * 8
  unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[width]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """Row-major index of every entry (uint32, wrapping), fused rather than stored."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    iota = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
    index = index + iota * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return index


@jax.jit
def _leaf_hashes(leaves: list[jax.Array]) -> list[jax.Array]:
  """sum_i bits_i * (2654435761 * i | 1) mod 2^32 per leaf.

  Wrapping integer sums do not depend on the order of the additions, so the
  hash is the same however the array is sharded (a checkpoint restores onto
  another mesh and still verifies), and it runs on the devices, under SPMD.
  Each multiplier is odd, so any single flipped bit changes the hash.
  """
  out = []
  for x in leaves:
    weights = _flat_index(x.shape) * jnp.uint32(2654435761) | jnp.uint32(1)
    out.append(jnp.sum(_as_uint32(x) * weights, dtype=jnp.uint32))
  return out


def array_checksums(tree: Any) -> dict[str, str]:
  """{leaf path: "dtype shape hash"} of every array of ``tree`` (see ``_leaf_hashes``)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  hashes = _leaf_hashes([jnp.asarray(leaf) for _, leaf in flat])
  return {
    jax.tree_util.keystr(path): f"{np.dtype(leaf.dtype)} {list(np.shape(leaf))} {int(h):08x}"
    for (path, leaf), h in zip(flat, hashes)
  }


def _one_line(err: BaseException) -> str:
  text = str(err).strip().splitlines()
  return f"{type(err).__name__}: {text[0][:300] if text else ''}"


class Checkpointer:
  """Saves and restores ``(state, meta)`` pairs under ``directory``, one per step."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, log: Callable[[str], None] = print):
    self._directory = os.path.abspath(directory)
    self._log = log
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=True,
      # Synchronous: after save() returns the checkpoint is on disk, so an
      # interrupted run can exit right away.
      enable_async_checkpointing=False,
    )
    self._manager = ocp.CheckpointManager(
      self._directory, options=options, item_names=(_STATE, _META)
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> bool:
    """Writes the checkpoint of ``step``; False (nothing written) if it is already committed.

    A step is a pure function of the run, so a committed checkpoint of it is
    never replaced: replacing it would delete it first.
    """
    if step in self._manager.all_steps():
      return False
    meta = {**meta, _CHECKSUMS: array_checksums(state)}
    args = ocp.args.Composite(
      **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}
    )
    self._manager.save(step, args=args)
    self._manager.wait_until_finished()
    return True

  def _meta_and_checksums(self, step: int) -> tuple[dict[str, Any], dict[str, str] | None]:
    args = ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
    meta = dict(self._manager.restore(step, args=args)[_META])
    return meta, meta.pop(_CHECKSUMS, None)

  def restore_meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON ``meta`` of ``step`` (default: the latest), checksums removed."""
    return self._meta_and_checksums(self.latest_step() if step is None else step)[0]

  def restore_state(self, target: Any, step: int | None = None) -> Any:
    """The state of ``step``, with the structure, shapes and dtypes of ``target``."""
    step = self.latest_step() if step is None else step
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)})
    return self._manager.restore(step, args=args)[_STATE]

  def restore_raw(self, step: int | None = None) -> Any:
    """The state of ``step`` as plain nested dicts and lists (no target needed)."""
    step = self.latest_step() if step is None else step
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore()})
    return self._manager.restore(step, args=args)[_STATE]

  def _restore_verified(self, step: int, target_for: Callable[[dict], Any]):
    meta, expected = self._meta_and_checksums(step)
    if expected is None:
      raise CheckpointError("its meta holds no array checksums")
    state = self.restore_state(target_for(meta), step)
    found = array_checksums(state)
    bad = [path for path in expected if found.get(path) != expected[path]]
    if bad or set(found) != set(expected):
      raise CheckpointError(
        f"the arrays at {', '.join(bad[:3]) or 'some paths'} fail their checksum"
      )
    return meta, state

  def restore_latest(self, target_for: Callable[[dict], Any]) -> tuple[int, dict, Any] | None:
    """(step, meta, state) of the newest checkpoint that restores and verifies, or None.

    ``target_for(meta)`` gives the restore target (structure, shapes, dtypes)
    of a checkpoint from its meta. Damaged checkpoints are moved aside to
    ``damaged_checkpoints/`` beside the checkpoint directory, each with a line
    saying why.

    Raises:
      CheckpointError: checkpoints exist but none restores.
    """
    skipped = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        meta, state = self._restore_verified(step, target_for)
      except Exception as err:  # noqa: BLE001  (any failure means: do not trust it)
        reason = _one_line(err)
        moved = self._quarantine(step)
        self._log(f"checkpoint of step {step} is damaged ({reason}); moved to {moved}")
        skipped.append(f"step {step}: {reason}")
        continue
      return step, meta, state
    if skipped:
      raise CheckpointError(
        f"no checkpoint in {self._directory} restores ({'; '.join(skipped)}); they were "
        "moved to damaged_checkpoints/ beside it: run the same command again to start "
        "from the beginning"
      )
    return None

  def _quarantine(self, step: int) -> str:
    """Moves the step's directory to ``damaged_checkpoints/`` and forgets it."""
    source = os.path.join(self._directory, str(step))
    target_dir = os.path.join(os.path.dirname(self._directory), "damaged_checkpoints")
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, str(step))
    suffix = 1
    while os.path.exists(target):
      target = os.path.join(target_dir, f"{step}.{suffix}")
      suffix += 1
    if os.path.exists(source):
      shutil.move(source, target)
    self._manager.reload()
    return target

  def close(self) -> None:
    self._manager.close()


def save_model(path: str, variables: Any) -> None:
  """Exports model variables (``{"params": ..., "batch_stats": ...}``) to ``path``."""
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(os.path.abspath(path), variables, force=True)
    checkpointer.wait_until_finished()
  finally:
    checkpointer.close()


def load_model(path: str, target: Any | None = None) -> Any:
  """Loads variables written by ``save_model``; ``target`` fixes structure and dtypes."""
  checkpointer = ocp.StandardCheckpointer()
  try:
    return checkpointer.restore(os.path.abspath(path), target)
  finally:
    checkpointer.close()


def model_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """{leaf path: shape} of a model written by ``save_model``, from its metadata only."""
  checkpointer = ocp.StandardCheckpointer()
  try:
    metadata = checkpointer.metadata(os.path.abspath(path))
  finally:
    checkpointer.close()
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  return {
    jax.tree_util.keystr(p): tuple(leaf.shape)
    for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    if hasattr(leaf, "shape")
  }

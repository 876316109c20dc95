"""Orbax checkpoints of the train state, and exported models.

A checkpoint holds two items: ``state`` (an array pytree: params, batch stats,
optimizer state with its momentum, step, RNG key) and ``meta`` (JSON: phase,
position in the data, metrics so far). Orbax's CheckpointManager writes each step
into a temporary directory and renames it once complete, so a checkpoint is either
whole or absent; it keeps only the latest ``max_to_keep``.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

_STATE = "state"
_META = "meta"


def has_checkpoint(directory: str) -> bool:
  """Whether ``directory`` holds at least one finished checkpoint (without creating it)."""
  if not os.path.isdir(directory):
    return False
  return any(name.isdigit() for name in os.listdir(directory))


class Checkpointer:
  """Saves and restores ``(state, meta)`` pairs under ``directory``, one per step."""

  def __init__(self, directory: str, *, max_to_keep: int = 3):
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=True,
      # Synchronous: after save() returns the checkpoint is on disk, so an
      # interrupted run can exit right away.
      enable_async_checkpointing=False,
    )
    self._manager = ocp.CheckpointManager(
      os.path.abspath(directory), options=options, item_names=(_STATE, _META)
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Writes the checkpoint of ``step``, replacing an older one of the same step."""
    if step in self._manager.all_steps():
      self._manager.delete(step)
    args = ocp.args.Composite(
      **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}
    )
    self._manager.save(step, args=args, force=True)
    self._manager.wait_until_finished()

  def restore_meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON ``meta`` of ``step`` (default: the latest)."""
    step = self.latest_step() if step is None else step
    args = ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
    return self._manager.restore(step, args=args)[_META]

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

"""Orbax checkpoints of the train state, verified on restore, and exported models.

A checkpoint holds two items: ``state`` (an array pytree: params, batch stats,
optimizer state with its momentum, step, RNG key) and ``meta`` (JSON: the run's
progress, plus a hash of every saved array). Orbax's CheckpointManager
writes each step into a temporary directory and renames it once complete, so a
checkpoint is either whole or absent, and deletes the oldest beyond
``max_to_keep`` only after the new one is committed.

Nothing good is ever deleted: a step that is already committed is never
written again, and ``restore_latest`` restores the newest checkpoint that
restores *and* matches its checksums. The meta carries a hash of itself
(``META_HASH``). A checkpoint the files prove damaged (a hash that fails, a
truncated or missing file, an on-disk structure other than the one its meta
records) is moved to ``<workdir>/damaged_checkpoints/`` with the reason, and the
next older one is tried; one that cannot be read now (permissions, an I/O
error, memory) or that this program no longer builds stops the restore with
the reason, and nothing is moved.

Exported models (``save_model``) carry a hash of every array in
``MODEL_CHECKSUMS`` inside their directory, checked by ``load_model``.
"""

from __future__ import annotations

from collections.abc import Callable
import errno
import hashlib
import json
import os
import re
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from training import strict_json

_STATE = "state"
_META = "meta"
_CHECKSUMS = "array_checksums"
META_HASH = "meta_sha256"  # in the meta: sha256 of the rest of the meta
MODEL_CHECKSUMS = "model_checksums.json"  # in an exported model's directory

# TensorStore's status codes (the first word of its errors) that say nothing about the data.
_READ_STATUS = frozenset(
  {
    "PERMISSION_DENIED",
    "UNAVAILABLE",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
    "ABORTED",
    "CANCELLED",
    "UNAUTHENTICATED",
  }
)
# ... and those that say the data are not what was written (a truncated or undecodable file).
_DAMAGE_STATUS = frozenset(
  {"DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION", "NOT_FOUND", "INVALID_ARGUMENT"}
)
# Orbax's words for an on-disk tree other than the one its meta records (checked beforehand).
_OTHER_TREE = ("tree structures do not match", "is not compatible with the stored shape")
_MISSING = frozenset({errno.ENOENT, errno.ENOTDIR})  # a file of a committed checkpoint is gone


class CheckpointError(RuntimeError):
  """A checkpoint or an exported model that cannot be used; the message is one line."""


class CheckpointDamaged(CheckpointError):
  """The files prove the checkpoint damaged; the message is the evidence."""


class CheckpointUnreadable(CheckpointError):
  """A checkpoint that cannot be read now, or that this program no longer builds."""


def committed_steps(directory: str) -> list[int]:
  """The steps of the finished checkpoints in ``directory``, sorted (orbax's temporary
  directories aside; none when it does not exist: it is not created)."""
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  return sorted(int(name) for name in names if name.isdigit())


def has_checkpoint(directory: str) -> bool:
  """Whether ``directory`` holds at least one finished checkpoint (without creating it)."""
  return bool(committed_steps(directory))


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
  return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def os_error_code(err: BaseException) -> int | None:
  """The errno a TensorStore error carries (``[os_error_code='28']``: it raises a
  ValueError, not an OSError, for a failed read or write), else None."""
  found = _OS_ERROR_CODE.search(str(err))
  return int(found.group(1)) if found else None


def _reason(err: BaseException) -> str:
  """One line saying what went wrong: the system's words and the file, where there are."""
  if isinstance(err, OSError) and err.strerror:
    return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
  code = os_error_code(err)
  if code is not None:
    paths = re.findall(r'"(/[^"]*)"', str(err))
    words = os.strerror(code)
    return f"{words}: {paths[-1]}" if paths else words
  return _one_line(err)


def exception_chain(err: BaseException) -> list[BaseException]:
  """``err`` and the exceptions it was raised from or during, outermost first."""
  chain = []
  while err is not None and all(err is not seen for seen in chain):
    chain.append(err)
    err = err.__cause__ or err.__context__
  return chain


def _says_unreadable(err: BaseException) -> bool:
  """An error of reading that says nothing about the data: memory, permissions, I/O."""
  if isinstance(err, MemoryError):
    return True
  if isinstance(err, OSError):
    return err.errno not in _MISSING
  code = os_error_code(err)
  if code is not None:
    return code not in _MISSING
  status = re.match(r"\s*([A-Z_]+):", str(err))
  return bool(status and status.group(1) in _READ_STATUS)


def _says_damaged(err: BaseException) -> bool:
  """A file other than the one written: undecodable, truncated, missing, another tree."""
  if isinstance(err, (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError)):
    return True
  if isinstance(err, KeyError):  # orbax: 'Item "meta" was not found in the checkpoint'
    return "not found in the checkpoint" in str(err)
  status = re.match(r"\s*([A-Z_]+):", str(err))
  if status and status.group(1) in _DAMAGE_STATUS:
    return True
  return isinstance(err, ValueError) and any(words in str(err) for words in _OTHER_TREE)


def _classify(err: BaseException) -> tuple[str, BaseException]:
  """("read" | "damage" | "unknown", the exception of ``err``'s chain that says so).

  Damage is what only a file other than the one written explains (``_says_damaged``);
  any sign of a read error wins, and anything else is unknown: not proven damaged.
  """
  chain = exception_chain(err)
  for link in chain:
    if _says_unreadable(link):
      return "read", link
  for link in chain:
    if _says_damaged(link):
      return "damage", link
  return "unknown", err


_KEY = re.compile(r"\['([^']*)'\]|\[(\d+)\]|\.(\w+)")  # a dict key, a list index, an attribute


def _leaf_name(keystr: str) -> str:
  """The key path ``.params['blocks'][0]`` (or ``['params']['blocks']['0']``) as params/blocks/0."""
  return "/".join(a or b or c for a, b, c in _KEY.findall(keystr))


def _named(record: dict[str, str]) -> dict[str, str]:
  """A record keyed by key path strings, keyed by leaf names (``_leaf_name``) instead."""
  return {_leaf_name(path): entry for path, entry in record.items()}


def _check_hashes(expected: dict[str, str], found: dict[str, str]) -> None:
  """Raises ``CheckpointDamaged`` unless two {leaf name: "dtype [shape] hash"} records agree."""
  bad = [name for name in expected if found.get(name) != expected[name]]
  if bad or set(found) != set(expected):
    raise CheckpointDamaged(
      f"the arrays at {', '.join(bad[:3]) or 'some paths'} fail their checksum"
    )


def _shapes(tree: Any) -> dict[str, str]:
  """{leaf name: "dtype [shape]"} of the arrays of ``tree``."""
  return {
    _leaf_name(jax.tree_util.keystr(path)): f"{np.dtype(leaf.dtype)} {list(np.shape(leaf))}"
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _differences(saved: dict[str, str], built: dict[str, str]) -> str:
  """The first leaves where two {name: description} records differ, for a message."""
  names = sorted(name for name in saved.keys() | built.keys() if saved.get(name) != built.get(name))
  return "; ".join(
    f"{name}: {saved.get(name, 'absent')} saved, {built.get(name, 'absent')} here"
    for name in names[:2]
  )


def _meta_hash(meta: dict[str, Any]) -> str:
  """sha256 of the meta's JSON with sorted keys, ``META_HASH`` itself left out."""
  body = {key: value for key, value in meta.items() if key != META_HASH}
  text = json.dumps(body, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


@jax.jit
def _finite(leaves: list[jax.Array]) -> list[jax.Array]:
  return [jnp.all(jnp.isfinite(x)) for x in leaves]


def nonfinite_leaves(tree: Any) -> list[str]:
  """Key paths of the floating arrays of ``tree`` that hold a NaN or an infinity."""
  flat = [
    (path, leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    if jnp.issubdtype(leaf.dtype, jnp.floating)
  ]
  finite = _finite([leaf for _, leaf in flat])
  return [jax.tree_util.keystr(path) for (path, _), ok in zip(flat, finite) if not bool(ok)]


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
    meta = json.loads(json.dumps({**meta, _CHECKSUMS: array_checksums(state)}))
    meta[META_HASH] = _meta_hash(meta)
    args = ocp.args.Composite(
      **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}
    )
    self._manager.save(step, args=args)
    self._manager.wait_until_finished()
    return True

  def _meta_and_checksums(self, step: int) -> tuple[dict[str, Any], dict[str, str] | None]:
    """The meta of ``step`` without its hash and checksums, and the checksums.

    Raises:
      CheckpointDamaged: the meta does not match its hash (a meta written
        before the hash existed has none and is taken as it is).
    """
    args = ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
    meta = dict(self._manager.restore(step, args=args)[_META])
    stored = meta.pop(META_HASH, None)
    if stored is not None and stored != _meta_hash(meta):
      raise CheckpointDamaged("its meta fails its checksum")
    return meta, meta.pop(_CHECKSUMS, None)

  def restore_meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON ``meta`` of ``step`` (default: the latest), verified, checksums removed."""
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

  def _unreadable(self, step: int, reason: str) -> CheckpointUnreadable:
    return CheckpointUnreadable(
      f"cannot read the checkpoint of step {step} in {self._directory} ({reason}); nothing "
      "was moved: fix this and run the same command again to resume"
    )

  def _other_version(self, step: int, what: str) -> CheckpointUnreadable:
    return CheckpointUnreadable(
      f"the checkpoint of step {step} in {self._directory} does not fit this program "
      f"({what}): it was saved by another version of train.py; finish the run with that "
      "version, or use a new --workdir; nothing was moved"
    )

  def _classified(self, step: int, err: Exception) -> CheckpointError:
    """A read error of ``step`` as damage (proven by the files) or as unreadable."""
    kind, evidence = _classify(err)
    if kind == "damage":
      return CheckpointDamaged(_reason(evidence))
    return self._unreadable(step, _reason(evidence))

  def _target(self, step: int, meta: dict, expected: dict, target_for: Callable) -> Any:
    """The restore target of ``step``; a program change (another state) is not damage."""
    try:
      target = target_for(meta)
    except Exception as err:  # noqa: BLE001  (whatever the program fails with)
      kind, evidence = _classify(err)
      if kind == "read":
        raise self._unreadable(step, _reason(evidence)) from None
      what = f"it cannot build the state of phase {meta.get('phase')!r}: {_one_line(err)}"
      raise self._other_version(step, what) from None
    saved = {name: entry.rsplit(" ", 1)[0] for name, entry in _named(expected).items()}
    built = _shapes(target)
    if saved != built:
      raise self._other_version(step, _differences(saved, built))
    return target

  def _restore_verified(self, step: int, target_for: Callable[[dict], Any]):
    """(meta, state) of ``step``; raises ``CheckpointDamaged`` or ``CheckpointUnreadable``."""
    try:
      meta, expected = self._meta_and_checksums(step)
    except CheckpointError:
      raise
    except Exception as err:  # noqa: BLE001  (orbax raises many kinds)
      raise self._classified(step, err) from None
    if expected is None:
      raise CheckpointDamaged("its meta holds no array checksums")
    target = self._target(step, meta, expected, target_for)
    try:
      state = self.restore_state(target, step)
      found = _named(array_checksums(state))
    except Exception as err:  # noqa: BLE001  (orbax and TensorStore raise many kinds)
      raise self._classified(step, err) from None
    _check_hashes(_named(expected), found)
    return meta, state

  def restore_latest(self, target_for: Callable[[dict], Any]) -> tuple[int, dict, Any] | None:
    """(step, meta, state) of the newest checkpoint that restores and verifies, or None.

    ``target_for(meta)`` gives the restore target (structure, shapes, dtypes)
    of a checkpoint from its meta. Checkpoints the files prove damaged are
    moved aside to ``damaged_checkpoints/`` beside the checkpoint directory,
    each with a line saying why, and the next older one is tried.

    Raises:
      CheckpointUnreadable: the newest checkpoint not proven damaged cannot be
        read now, or this program builds another state; nothing is moved.
      CheckpointError: checkpoints exist and every one is damaged.
    """
    skipped = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        meta, state = self._restore_verified(step, target_for)
      except CheckpointDamaged as err:
        moved = self._quarantine(step)
        self._log(f"checkpoint of step {step} is damaged ({err}); moved to {moved}")
        skipped.append(f"step {step}: {err}")
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


def _model_record(variables: Any) -> dict[str, str]:
  """{leaf name: "dtype [shape] hash"} of a model's arrays, whatever its containers."""
  return _named(array_checksums(variables))


def save_model(path: str, variables: Any) -> None:
  """Exports model variables (``{"params": ..., "batch_stats": ...}``) to ``path``.

  ``path/MODEL_CHECKSUMS`` records the dtype, shape and hash of every array;
  ``load_model`` checks them.
  """
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(os.path.abspath(path), variables, force=True)
    checkpointer.wait_until_finished()
  finally:
    checkpointer.close()
  record = _model_record(variables)  # every process: the hashes are computed on the devices
  if jax.process_index() == 0:
    strict_json.write_json(os.path.join(path, MODEL_CHECKSUMS), record, indent=1)


def _stored_record(path: str) -> dict[str, str] | None:
  """The model's ``MODEL_CHECKSUMS``; None for a model exported before they existed."""
  try:
    with open(os.path.join(path, MODEL_CHECKSUMS)) as f:
      record = json.load(f)
  except FileNotFoundError:
    return None
  except ValueError as err:
    raise CheckpointDamaged(f"{MODEL_CHECKSUMS}: {_one_line(err)}") from None
  if not isinstance(record, dict):
    raise CheckpointDamaged(f"{MODEL_CHECKSUMS} holds no checksums")
  return record


def _verified_model(path: str, target: Any | None) -> Any:
  """The variables of ``path``, checked against their record; raises ``CheckpointError``."""
  record = _stored_record(path)
  if record is not None and target is not None:
    saved = {name: entry.rsplit(" ", 1)[0] for name, entry in record.items()}
    if saved != _shapes(target):
      raise CheckpointError(
        f"the model in {path} does not fit this one ({_differences(saved, _shapes(target))}); "
        "give a model of the same architecture"
      )
  checkpointer = ocp.StandardCheckpointer()
  try:
    variables = checkpointer.restore(os.path.abspath(path), target)
  finally:
    checkpointer.close()
  if record is not None:
    _check_hashes(record, _model_record(variables))
  return variables


def load_model(path: str, target: Any | None = None) -> Any:
  """Loads variables written by ``save_model``; ``target`` fixes structure and dtypes.

  Raises:
    CheckpointError: one line naming ``path``: damaged (a hash fails, a file is
      truncated or missing), unreadable now (permissions, I/O, memory), or not
      of ``target``'s architecture.
  """
  try:
    return _verified_model(path, target)
  except CheckpointDamaged as err:
    reason = str(err)
  except CheckpointError:
    raise
  except Exception as err:  # noqa: BLE001  (orbax and TensorStore raise many kinds)
    kind, evidence = _classify(err)
    if kind != "damage":
      raise CheckpointError(
        f"cannot read the model in {path} ({_reason(evidence)}): fix this and run again"
      ) from None
    reason = _reason(evidence)
  raise CheckpointError(
    f"the model in {path} is damaged ({reason}): export it again, or give another directory"
  )


def holds_model(path: str, variables: Any) -> bool:
  """Whether ``path`` holds exactly ``variables``, intact (False where it cannot say)."""
  try:
    loaded = load_model(path, variables)
  except CheckpointError:
    return False
  return _model_record(loaded) == _model_record(variables)


def model_metadata(path: str) -> Any:
  """The tree of array metadata (shape, dtype) of a model written by ``save_model``."""
  checkpointer = ocp.StandardCheckpointer()
  try:
    metadata = checkpointer.metadata(os.path.abspath(path))
  finally:
    checkpointer.close()
  tree = getattr(metadata, "item_metadata", metadata)
  return getattr(tree, "tree", tree)


def model_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """{leaf path: shape} of a model written by ``save_model``, from its metadata only."""
  tree = model_metadata(path)
  return {
    jax.tree_util.keystr(p): tuple(leaf.shape)
    for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    if hasattr(leaf, "shape")
  }

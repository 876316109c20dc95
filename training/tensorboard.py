"""TensorBoard event files for the training program, written without TensorFlow.

`MetricsWriter` appends scalar summaries to an event file in ``logdir`` (the
training program passes ``<workdir>/tensorboard``). It uses tensorboardX's
public ``RecordWriter`` (TFRecord framing with masked CRC-32C) and its ``Event``
and ``Summary`` protobuf classes; it does not use tensorboardX's
``SummaryWriter``, whose background queue makes ``flush()`` return before
queued events are on disk and whose file name (seconds and hostname) lets two
writers opened in the same second truncate each other's file.

Every writer opens a new file named
``events.out.tfevents.<unix seconds>.<hostname>.<pid>.<random hex>``, so a
resumed run adds a file next to the previous ones and TensorBoard reads them all.
tensorboardX is imported by the first enabled writer, not by this module.

Values are stored as ``Summary.Value.simple_value``, a float32 (what TensorBoard
plots); NaN and +-inf are written as they are (TensorBoard shows them), so a
diverging run stays visible instead of leaving a gap.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import os
import re
import socket
import time
from types import TracebackType
from typing import Any
import uuid

# The first record of every event file (what TensorFlow and tensorboardX write).
_FILE_VERSION = "brain.Event:2"

# One key of a `jax.tree_util.keystr` path: ['name'], ["name"], [0] or .name.
_KEY = re.compile(r"\['((?:[^'\\]|\\.)*)'\]|\[\"((?:[^\"\\]|\\.)*)\"\]|\[([^\]]*)\]|\.([^.\[]+)")


def short_path(path: str) -> str:
  """``"['fc1']['kernel']"`` -> ``"fc1/kernel"`` (a `jax.tree_util.keystr` path).

  Dict keys (quoted), sequence indices (``[0]``) and attributes (``.name``)
  each become one component; a path with no such key is returned unchanged.
  """
  parts = [next(g for g in m.groups() if g is not None) for m in _KEY.finditer(path)]
  return "/".join(parts) if parts else path


def scalar_tag(key: str, prefix: str = "") -> str:
  """The tag of ``key``: ``"<prefix>/<key>"``, or ``key`` when there is no prefix."""
  prefix = prefix.rstrip("/")
  return f"{prefix}/{key}" if prefix else str(key)


def _event_file_name(logdir: str) -> str:
  """A new, unique event file path in ``logdir`` (TensorBoard reads ``*tfevents*``)."""
  name = (
    f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
    f".{os.getpid()}.{uuid.uuid4().hex[:8]}"
  )
  return os.path.join(logdir, name)


def _as_float(tag: str, value: Any) -> float:
  """``float(value)``, with the tag in the error when the value is not a number."""
  try:
    return float(value)
  except (TypeError, ValueError) as e:
    raise TypeError(f"TensorBoard scalar {tag!r}: {value!r} is not a number") from e


class MetricsWriter:
  """Writes scalar metrics and per-layer densities to a TensorBoard event file.

  ``MetricsWriter(logdir, enabled=False)`` (processes other than 0 of a
  multi-host run) does nothing: no directory, no file, every method a no-op.
  Records are buffered and reach the disk on `flush`, on `close` (also at the
  end of a ``with`` block) and at the first write ``flush_secs`` seconds after
  the previous flush. Writing to a closed writer raises `RuntimeError`.
  """

  def __init__(self, logdir: str, *, enabled: bool = True, flush_secs: float = 30.0):
    self.logdir = logdir
    self.enabled = enabled
    self.path: str | None = None
    self._flush_secs = flush_secs
    self._last_flush = time.monotonic()
    self._record_writer: Any = None
    self._closed = False
    if enabled:
      self._open()

  def _open(self) -> None:
    """Creates ``logdir`` and a new event file that starts with the file version."""
    # Imported here: a disabled writer (and `import training.tensorboard`) needs no tensorboardX.
    import tensorboardX
    from tensorboardX.proto import event_pb2
    from tensorboardX.proto import summary_pb2

    self._event_pb2 = event_pb2
    self._summary_pb2 = summary_pb2
    os.makedirs(self.logdir, exist_ok=True)
    self.path = _event_file_name(self.logdir)
    self._record_writer = tensorboardX.RecordWriter(self.path)
    self._write_event(event_pb2.Event(wall_time=time.time(), file_version=_FILE_VERSION))
    self._record_writer.flush()

  def _write_event(self, event: Any) -> None:
    """Appends one serialized ``Event`` record."""
    self._record_writer.write(event.SerializeToString())

  def _write_summary(self, step: int, tagged: Sequence[tuple[str, float]]) -> None:
    """Appends one ``Event`` holding a scalar summary value per ``(tag, value)``."""
    if self._closed:
      raise RuntimeError(f"MetricsWriter({self.logdir!r}) is closed")
    if not tagged:
      return
    summary = self._summary_pb2.Summary(
      value=[self._summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in tagged]
    )
    self._write_event(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
    if time.monotonic() - self._last_flush >= self._flush_secs:
      self.flush()

  def scalars(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
    """Writes one scalar per key at ``step``, tagged ``prefix/key`` (``key`` without prefix).

    Values may be Python, NumPy or JAX scalars; NaN and +-inf are written as is.
    """
    if not self.enabled:
      return
    tags = [scalar_tag(k, prefix) for k in values]
    self._write_summary(step, [(t, _as_float(t, v)) for t, v in zip(tags, values.values())])

  def layer_densities(self, step: int, layers: Sequence[Mapping[str, Any]]) -> None:
    """Writes each layer's ``density`` at ``step`` under ``density/<short path>``.

    ``layers`` is the training summary's list of dicts with ``path``, ``density``,
    ``nonzeros`` and ``size``; ``path`` is a `jax.tree_util.keystr` path (see
    `short_path`). Two layers with the same short path raise `ValueError`.
    """
    if not self.enabled:
      return
    tags = [scalar_tag(short_path(str(layer["path"])), "density") for layer in layers]
    if len(set(tags)) != len(tags):
      raise ValueError(f"layers with the same TensorBoard tag: {sorted(tags)}")
    values = [_as_float(t, layer["density"]) for t, layer in zip(tags, layers)]
    self._write_summary(step, list(zip(tags, values)))

  def flush(self) -> None:
    """Writes the buffered records to disk (fsync); a no-op when disabled or closed."""
    if not self.enabled or self._closed:
      return
    self._record_writer.flush()
    self._last_flush = time.monotonic()

  def close(self) -> None:
    """Flushes and closes the event file; closing again is a no-op."""
    if not self.enabled or self._closed:
      return
    self.flush()
    self._record_writer.close()
    self._closed = True

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(
    self,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
  ) -> None:
    self.close()

"""training/tensorboard.py: event files read back by an independent TFRecord reader.

The reader here parses the TFRecord framing itself (8-byte little-endian length,
masked CRC-32C of the length, payload, masked CRC-32C of the payload), checks
both CRCs with its own CRC-32C, and decodes the payloads with the ``Event``
protobuf class that tensorboardX ships; it shares no code with the writer.
"""

from __future__ import annotations

import math
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from training import tensorboard

REPO = pathlib.Path(__file__).resolve().parents[1]


def _crc32c_table() -> list[int]:
  """The byte table of CRC-32C (Castagnoli, reflected polynomial 0x82F63B78)."""
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def _crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = _crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_records(path: pathlib.Path) -> list[bytes]:
  """The payloads of a TFRecord file, checking the framing and both CRCs."""
  data = path.read_bytes()
  records, pos = [], 0
  while pos < len(data):
    header = data[pos : pos + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
    assert header_crc == _masked_crc(header), f"{path}: bad length CRC at byte {pos}"
    payload = data[pos + 12 : pos + 12 + length]
    assert len(payload) == length, f"{path}: truncated record at byte {pos}"
    (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
    assert payload_crc == _masked_crc(payload), f"{path}: bad payload CRC at byte {pos}"
    records.append(payload)
    pos += 16 + length
  return records


def _read_events(path: pathlib.Path) -> list[event_pb2.Event]:
  return [event_pb2.Event.FromString(r) for r in _read_records(path)]


def _scalars(path: pathlib.Path) -> list[tuple[int, str, float]]:
  """``(step, tag, value)`` of every scalar in the file, in order; checks the file version."""
  events = _read_events(path)
  assert events[0].file_version == "brain.Event:2"
  return [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value]


def _event_files(logdir: pathlib.Path) -> list[pathlib.Path]:
  return sorted(logdir.iterdir())


def _f32(x: float) -> float:
  """What a float32 ``simple_value`` holds."""
  return float(np.float32(x))


LAYERS = [
  {"path": "['fc1']['kernel']", "density": 0.25, "nonzeros": 100, "size": 400},
  {"path": "['conv']['kernel']", "density": 0.1, "nonzeros": 5, "size": 50},
]


def test_crc32c_reference_value():
  assert _crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


def test_scalars_and_layer_densities_read_back(tmp_path):
  logdir = tmp_path / "tensorboard"
  with tensorboard.MetricsWriter(str(logdir)) as writer:
    writer.scalars(10, {"loss": 2.5, "accuracy": np.float32(0.75)}, prefix="train")
    writer.scalars(20, {"lr": 0.1})
    writer.layer_densities(20, LAYERS)
  (path,) = _event_files(logdir)
  assert path.name.startswith("events.out.tfevents.")
  assert str(path) == writer.path
  assert _scalars(path) == [
    (10, "train/loss", 2.5),
    (10, "train/accuracy", 0.75),
    (20, "lr", _f32(0.1)),
    (20, "density/fc1/kernel", 0.25),
    (20, "density/conv/kernel", _f32(0.1)),
  ]


def test_non_finite_values_are_written_as_is(tmp_path):
  with tensorboard.MetricsWriter(str(tmp_path)) as writer:
    writer.scalars(3, {"nan": float("nan"), "inf": float("inf"), "ninf": -math.inf}, prefix="x/")
  (path,) = _event_files(tmp_path)
  (step_nan, tag_nan, nan), *rest = _scalars(path)
  assert (step_nan, tag_nan) == (3, "x/nan") and math.isnan(nan)
  assert rest == [(3, "x/inf", math.inf), (3, "x/ninf", -math.inf)]


def test_flush_makes_records_readable_before_close(tmp_path):
  writer = tensorboard.MetricsWriter(str(tmp_path), flush_secs=1e9)
  writer.scalars(1, {"loss": 1.0})
  writer.flush()
  (path,) = _event_files(tmp_path)
  assert _scalars(path) == [(1, "loss", 1.0)]
  writer.close()


def test_disabled_writer_writes_nothing(tmp_path):
  logdir = tmp_path / "tensorboard"
  with tensorboard.MetricsWriter(str(logdir), enabled=False) as writer:
    writer.scalars(1, {"loss": 1.0}, prefix="train")
    writer.layer_densities(1, LAYERS)
    writer.flush()
  writer.close()
  assert writer.path is None
  assert not logdir.exists()


def test_restart_appends_a_second_readable_file(tmp_path):
  with tensorboard.MetricsWriter(str(tmp_path)) as first:
    first.scalars(1, {"loss": 3.0}, prefix="train")
  with tensorboard.MetricsWriter(str(tmp_path)) as second:  # a resumed run, same second
    second.scalars(2, {"loss": 2.0}, prefix="train")
  paths = _event_files(tmp_path)
  assert len(paths) == 2 and first.path != second.path
  assert _scalars(pathlib.Path(first.path)) == [(1, "train/loss", 3.0)]
  assert _scalars(pathlib.Path(second.path)) == [(2, "train/loss", 2.0)]


def test_close_is_idempotent_and_writing_after_close_raises(tmp_path):
  writer = tensorboard.MetricsWriter(str(tmp_path))
  writer.close()
  writer.close()
  writer.flush()
  with pytest.raises(RuntimeError, match="closed"):
    writer.scalars(1, {"loss": 1.0})


def test_bad_values_and_duplicate_layer_tags_raise(tmp_path):
  with tensorboard.MetricsWriter(str(tmp_path)) as writer:
    with pytest.raises(TypeError, match="'train/name'"):
      writer.scalars(1, {"name": "abc"}, prefix="train")
    with pytest.raises(ValueError, match="same TensorBoard tag"):
      writer.layer_densities(1, [LAYERS[0], dict(LAYERS[0])])
  (path,) = _event_files(tmp_path)
  assert _scalars(path) == []


@pytest.mark.parametrize(
  ("path", "short"),
  [
    ("['fc1']['kernel']", "fc1/kernel"),
    ("['block1']['conv']['kernel']", "block1/conv/kernel"),
    ("[0]['kernel']", "0/kernel"),
    ("""["it's"]['b']""", "it's/b"),
    (".layers[1].kernel", "layers/1/kernel"),
    ("kernel", "kernel"),
  ],
)
def test_short_path(path, short):
  assert tensorboard.short_path(path) == short


def test_import_and_writing_do_not_import_tensorflow(tmp_path):
  code = (
    "import sys\n"
    "import training.tensorboard as tb\n"
    "assert 'tensorflow' not in sys.modules\n"
    "assert 'tensorboardX' not in sys.modules\n"
    f"with tb.MetricsWriter({str(tmp_path)!r}) as w:\n"
    "  w.scalars(1, {'loss': 1.0})\n"
    "assert 'tensorflow' not in sys.modules\n"
  )
  env = dict(os.environ, PYTHONPATH=str(REPO))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env, timeout=120)
  assert len(_event_files(tmp_path)) == 1

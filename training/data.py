"""Input pipelines for the GSM experiments.

MNIST, Fashion-MNIST, CIFAR-10 and ``synthetic`` (CIFAR-10-shaped random
data made in memory, for timing) are held in memory as uint8 arrays and
batched with numpy; ImageNet (``imagenet2012``) is streamed with Grain from a
TFDS ``array_record`` data source.  Every batch is ``(images, labels)`` with
float32 NHWC images normalised by the dataset's mean/std and int32 labels.

Where the data comes from:

* an explicit ``data_dir`` is the only place looked at: it must hold the four
  MNIST-format IDX files (``train-images-idx3-ubyte[.gz]``, ...) or be a TFDS
  data_dir holding the prepared dataset (``data_dir/<name>/...``); anything
  else is a ``DataNotFoundError``, never a silent fallback;
* ``data_dir=None`` searches the defaults: for ``fashion_mnist`` the Debian
  package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``),
  then TFDS (``tfds.data_source``, random access, works without TensorFlow).

``train_batches(batch_size, epoch=, seed=, start=)`` is a pure function of
``(epoch, seed)``: the shuffle is drawn from ``np.random.default_rng([seed,
epoch])`` and batch k's augmentation from its own ``default_rng([seed, epoch,
k])``, so a run resumed mid-epoch jumps straight to batch ``start`` and sees
exactly the batches of an uninterrupted run. ``split_validation(n)`` holds out
``n`` training examples (a fixed draw, the same for every seed) as a validation
set and leaves the rest, in their order, as the training set. For in-memory
datasets without augmentation, ``train_order`` gives each epoch's batches as training-set
indices and ``train_arrays`` the whole set with its normalisation, so the same
batches can be drawn elsewhere, bit for bit (on the device:
``training/device_data.py``).

Errors a caller should catch (every message is one line naming the file or
directory and what to do):

* ``DataError``: the base class of the two below; catch it in one place.
* ``DataNotFoundError`` (also a ``FileNotFoundError``): the dataset is not
  where it was looked for (an explicit ``data_dir`` without data, a directory
  lacking some IDX files, nothing prepared in TFDS).
* ``IdxFormatError`` (also a ``ValueError``): an IDX file is truncated, not
  gzip despite its header or name, has a bad magic number or sizes that do
  not add up.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import gzip
import math
import os
from typing import Any
import zlib

import numpy as np

DATASETS = ("fashion_mnist", "mnist", "cifar10", "imagenet2012", "synthetic")
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
VALIDATION_SPLIT_SEED = 13  # the held-out examples are the same for every config.seed

Batch = tuple[np.ndarray, np.ndarray]

_TFDS_CHUNK = 1024  # records per `__getitems__` call when reading a split into memory
_IMAGENET_TRAIN_RESIZE_SCALE = (0.08, 1.0)
_IMAGENET_TRAIN_RATIO = (3.0 / 4.0, 4.0 / 3.0)


class DataError(Exception):
  """Base class of the data errors: the message is one line saying what to do."""


class DataNotFoundError(DataError, FileNotFoundError):
  """No source (explicit data_dir, Debian package, TFDS) holds the dataset."""


class IdxFormatError(DataError, ValueError):
  """An IDX file is unreadable or malformed (truncated, not gzip, bad magic, bad sizes)."""


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Static facts about one supported dataset."""

  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  test_split: str
  augment: bool


_SPECS: Mapping[str, _Spec] = {
  "fashion_mnist": _Spec(10, (28, 28, 1), (0.2860,), (0.3530,), "test", False),
  "mnist": _Spec(10, (28, 28, 1), (0.1307,), (0.3081,), "test", False),
  "cifar10": _Spec(
    10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "test", True
  ),
  "imagenet2012": _Spec(
    1000, (224, 224, 3), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "validation", True
  ),
  # CIFAR-10-shaped random images and labels, made in memory: for timing, never downloads.
  "synthetic": _Spec(10, (32, 32, 3), (0.5, 0.5, 0.5), (0.29, 0.29, 0.29), "test", False),
}
SYNTHETIC_SIZES = (50_000, 10_000)  # training and test examples, as CIFAR-10
SYNTHETIC_SEED = 0


# --------------------------------------------------------------------------- #
# Dataset
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Dataset:
  """A loaded dataset: metadata plus deterministic batch iterators."""

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]  # H, W, C
  num_train: int
  num_test: int
  source: str  # human readable: "idx:/path", "tfds:fashion_mnist", ...
  _backend: Any = dataclasses.field(default=None, repr=False, compare=False)

  def steps_per_epoch(self, batch_size: int) -> int:
    """Number of full training batches per epoch (the remainder is dropped)."""
    _check_positive("batch_size", batch_size)
    return self.num_train // batch_size

  def train_batches(
    self,
    batch_size: int,
    *,
    epoch: int,
    seed: int,
    start: int = 0,
    shard: tuple[int, int] = (0, 1),
  ) -> Iterator[Batch]:
    """Shuffled, augmented batches ``start, start + 1, ...`` of one epoch.

    With ``shard = (index, count)`` (one process of ``count``), only this
    process's contiguous part of every global batch is produced: rows
    ``[index * L, (index + 1) * L)`` with ``L = batch_size / count``; the
    in-memory backend gathers only those examples (with augmentation it
    augments the global batch, then keeps the part, so the draws do not depend
    on ``count``); the Grain backend reads and transforms only those examples.

    A pure function of ``(epoch, seed)``: the result equals
    ``list(train_batches(batch_size, epoch=epoch, seed=seed))[start:]`` bitwise,
    and the batches before ``start`` are not produced (a resumed run jumps
    straight to its batch).  Each batch draws its augmentation from its own
    ``np.random.default_rng([seed, epoch, batch_index])``.  Earlier versions drew
    every batch's augmentation from one generator per epoch, so CIFAR runs see
    other augmentation draws since (once); the shuffle, ``default_rng([seed,
    epoch])``, and so every non-augmented batch, is unchanged.
    """
    self._check_epoch(batch_size, epoch, seed)
    steps = self.steps_per_epoch(batch_size)
    if not 0 <= start <= steps:
      raise ValueError(
        f"start must be in [0, {steps}] (the batches per epoch of {self.name} at "
        f"batch_size={batch_size}), got start={start}"
      )
    rows = _shard_rows(batch_size, shard)
    return self._backend.train_batches(batch_size, epoch=epoch, seed=seed, start=start, rows=rows)

  @property
  def in_memory_unaugmented(self) -> bool:
    """Whether every training batch is rows of ``train_arrays()``: held in memory, no augmentation."""
    return isinstance(self._backend, _ArrayBackend) and not self._backend.augment

  def train_arrays(self) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The whole training set as held: uint8 NHWC images, int32 labels, ``(scale, shift)``.

    Only for ``in_memory_unaugmented`` datasets: batch ``k`` of an epoch is
    ``images[rows] * scale - shift`` (``normalize``), ``labels[rows]``, with
    ``rows = train_order(...)[k]``.
    """
    if not self.in_memory_unaugmented:
      raise ValueError(f"{self.name} ({self.source}) is augmented or streamed, not gatherable")
    backend = self._backend
    return backend.train_images, backend.train_labels, scale_and_shift(backend.mean, backend.std)

  def train_order(self, batch_size: int, *, epoch: int, seed: int) -> np.ndarray:
    """The epoch's batches as training-set indices: ``(steps_per_epoch, batch_size)`` int32.

    The order ``train_batches`` reads (in-memory datasets): a pure function of
    ``(epoch, seed)``, drawn from ``np.random.default_rng([seed, epoch])``.
    """
    self._check_epoch(batch_size, epoch, seed)
    if not isinstance(self._backend, _ArrayBackend):
      raise ValueError(f"{self.name} ({self.source}) is streamed: its order is Grain's")
    return epoch_order(self.num_train, batch_size, epoch=epoch, seed=seed).astype(np.int32)

  def split_validation(self, num_validation: int) -> tuple[Dataset, Dataset]:
    """(training set without the held-out examples, the held-out examples as a test split).

    The held-out examples are ``validation_indices(num_train, num_validation)``:
    the same for every seed and method; the rest keep their order.
    """
    if not isinstance(self._backend, _ArrayBackend):
      raise ValueError(f"{self.name} ({self.source}) is streamed: no validation split")
    if not 0 < num_validation < self.num_train:
      raise ValueError(
        f"num_validation must be in [1, {self.num_train - 1}] (the training examples of "
        f"{self.name} minus one), got {num_validation}"
      )
    backend = self._backend
    held = validation_indices(self.num_train, num_validation)
    kept = np.setdiff1d(np.arange(self.num_train), held)
    images, labels = backend.train_images[held], backend.train_labels[held]
    train = dataclasses.replace(
      backend, train_images=backend.train_images[kept], train_labels=backend.train_labels[kept]
    )
    validation = dataclasses.replace(
      backend, train_images=images, train_labels=labels, test_images=images, test_labels=labels
    )
    source = f"{self.source}, {num_validation} training examples held out for validation"
    return (
      dataclasses.replace(self, num_train=len(kept), source=source, _backend=train),
      dataclasses.replace(self, num_train=len(held), num_test=len(held), _backend=validation),
    )

  def _check_epoch(self, batch_size: int, epoch: int, seed: int) -> None:
    _check_positive("batch_size", batch_size)
    if epoch < 0 or seed < 0:
      raise ValueError(f"epoch and seed must be >= 0, got epoch={epoch}, seed={seed}")
    if batch_size > self.num_train:
      raise ValueError(
        f"batch_size={batch_size} exceeds the {self.num_train} training examples "
        f"of {self.name}; no full batch can be formed"
      )

  def test_batches(self, batch_size: int) -> Iterator[Batch]:
    """Test batches in order, keeping the last partial batch."""
    _check_positive("batch_size", batch_size)
    return self._backend.test_batches(batch_size)

  def eval_batches(
    self, batch_size: int, *, shard: tuple[int, int] = (0, 1)
  ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(images, labels, mask)``: test batches of one shape, this process's part.

    The last batch is padded with zeros to ``batch_size`` and ``mask`` marks
    the real examples; with ``shard = (index, count)`` only rows ``[index * L,
    (index + 1) * L)`` of every batch are produced (``L = batch_size / count``).
    """
    rows = _shard_rows(batch_size, shard)
    for images, labels in self._backend.test_batches(batch_size):
      mask = np.arange(batch_size) < len(labels)
      if len(labels) < batch_size:
        pad = batch_size - len(labels)
        images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
      yield images[rows], labels[rows], mask[rows]

  @classmethod
  def from_arrays(
    cls,
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    num_classes: int,
    mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.5,),
    augment: bool = False,
    source: str = "arrays",
  ) -> Dataset:
    """In-memory dataset from uint8 NHWC images and integer labels (e.g. for tests)."""
    backend = _ArrayBackend(
      train_images=_as_nhwc(train[0]),
      train_labels=np.asarray(train[1], np.int32),
      test_images=_as_nhwc(test[0]),
      test_labels=np.asarray(test[1], np.int32),
      mean=tuple(mean),
      std=tuple(std),
      augment=augment,
    )
    return cls(
      name=name,
      num_classes=num_classes,
      image_shape=tuple(backend.train_images.shape[1:]),  # type: ignore[arg-type]
      num_train=len(backend.train_labels),
      num_test=len(backend.test_labels),
      source=source,
      _backend=backend,
    )


def image_shape(name: str) -> tuple[int, int, int]:
  """(H, W, C) of the images of dataset ``name``."""
  if name not in _SPECS:
    raise ValueError(f"Unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
  return _SPECS[name].image_shape


def validation_indices(num_train: int, num_validation: int) -> np.ndarray:
  """The training examples held out for validation, sorted: a fixed draw, not the run's seed."""
  order = np.random.default_rng(VALIDATION_SPLIT_SEED).permutation(num_train)
  return np.sort(order[:num_validation])


def epoch_order(num_train: int, batch_size: int, *, epoch: int, seed: int) -> np.ndarray:
  """The shuffle of epoch ``epoch`` cut into full batches: ``(num_train // batch_size, batch_size)``."""
  order = np.random.default_rng([seed, epoch]).permutation(num_train)
  steps = num_train // batch_size
  return order[: steps * batch_size].reshape(steps, batch_size)


def _shard_rows(batch_size: int, shard: tuple[int, int]) -> slice:
  """The rows of a global batch that process ``index`` of ``count`` holds."""
  index, count = shard
  if count < 1 or not 0 <= index < count or batch_size % count:
    raise ValueError(
      f"shard={shard} must be (index, count) with 0 <= index < count and count dividing "
      f"batch_size={batch_size}"
    )
  size = batch_size // count
  return slice(index * size, (index + 1) * size)


def _check_positive(what: str, value: int) -> None:
  if value <= 0:
    raise ValueError(f"{what} must be positive, got {value}")


def _as_nhwc(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images)
  return images[..., None] if images.ndim == 3 else images


# --------------------------------------------------------------------------- #
# Image ops (numpy / PIL, no TensorFlow)
# --------------------------------------------------------------------------- #


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 [0, 255] images -> float32 ``(x / 255 - mean) / std`` per channel."""
  scale, shift = scale_and_shift(mean, std)
  return images.astype(np.float32) * scale - shift


def scale_and_shift(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """float32 ``(1 / (255 std), mean / std)``: ``normalize`` is ``x * scale - shift``, two roundings."""
  scale = 1.0 / (255.0 * np.asarray(std, np.float32))
  shift = np.asarray(mean, np.float32) / np.asarray(std, np.float32)
  return scale, shift


def cifar_augment(images: np.ndarray, rng: np.random.Generator, *, pad: int = 4) -> np.ndarray:
  """Zero-pad by ``pad``, random crop back to HxW and random horizontal flip (batched)."""
  n, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  top = rng.integers(0, 2 * pad + 1, size=n)
  left = rng.integers(0, 2 * pad + 1, size=n)
  flip = rng.random(n) < 0.5
  rows = top[:, None] + np.arange(h)
  cols = left[:, None] + np.arange(w)
  cols = np.where(flip[:, None], cols[:, ::-1], cols)
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _pil(image: np.ndarray) -> Any:
  from PIL import Image

  return Image.fromarray(np.asarray(image, np.uint8))


def random_resized_crop(
  image: np.ndarray,
  rng: np.random.Generator,
  size: int = 224,
  scale: tuple[float, float] = _IMAGENET_TRAIN_RESIZE_SCALE,
  ratio: tuple[float, float] = _IMAGENET_TRAIN_RATIO,
) -> np.ndarray:
  """Inception-style crop (random area fraction and aspect ratio) resized to size x size."""
  from PIL import Image

  height, width = image.shape[:2]
  box = _sample_crop_box(height, width, rng, scale, ratio)
  resized = _pil(image).resize((size, size), Image.BILINEAR, box=box)
  return np.asarray(resized).reshape(size, size, -1)


def _sample_crop_box(
  height: int,
  width: int,
  rng: np.random.Generator,
  scale: tuple[float, float],
  ratio: tuple[float, float],
  attempts: int = 10,
) -> tuple[int, int, int, int]:
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(attempts):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  # Fallback: central crop with the aspect ratio clamped into `ratio`.
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif aspect > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  top, left = (height - h) // 2, (width - w) // 2
  return left, top, left + w, top + h


def resize_center_crop(image: np.ndarray, resize: int = 256, size: int = 224) -> np.ndarray:
  """Resize the shorter side to ``resize`` (keeping aspect), then center-crop size x size."""
  from PIL import Image

  height, width = image.shape[:2]
  factor = resize / min(height, width)
  new_h = max(size, int(round(height * factor)))
  new_w = max(size, int(round(width * factor)))
  resized = np.asarray(_pil(image).resize((new_w, new_h), Image.BILINEAR))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return resized[top : top + size, left : left + size].reshape(size, size, -1)


def imagenet_train_transform(
  record: Mapping[str, Any], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
  """TFDS ImageNet record -> (random-resized-crop 224 + flip, normalised; int32 label)."""
  image = random_resized_crop(_rgb(record["image"]), rng)
  if rng.random() < 0.5:
    image = image[:, ::-1]
  return _finish_imagenet(image, record["label"])


def imagenet_eval_transform(record: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """TFDS ImageNet record -> (resize 256 + center-crop 224, normalised; int32 label)."""
  return _finish_imagenet(resize_center_crop(_rgb(record["image"])), record["label"])


def _rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def _finish_imagenet(image: np.ndarray, label: Any) -> tuple[np.ndarray, np.ndarray]:
  spec = _SPECS["imagenet2012"]
  return normalize(image, spec.mean, spec.std), np.asarray(label, np.int32)


# --------------------------------------------------------------------------- #
# Backends
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class _ArrayBackend:
  """Whole dataset in memory as uint8 NHWC arrays; numpy batching."""

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augment: bool

  def train_batches(
    self, batch_size: int, *, epoch: int, seed: int, start: int = 0, rows: slice = slice(None)
  ) -> Iterator[Batch]:
    """Batches ``start, ...`` of the epoch: rows of ``epoch_order``."""
    order = epoch_order(len(self.train_labels), batch_size, epoch=epoch, seed=seed)
    for step in range(start, len(order)):
      idx = order[step]
      if self.augment:  # the whole batch, so the draws do not depend on the shard
        images = cifar_augment(self.train_images[idx], np.random.default_rng([seed, epoch, step]))
        images = images[rows]
      else:
        images = self.train_images[idx[rows]]
      yield normalize(images, self.mean, self.std), self.train_labels[idx[rows]]

  def test_batches(self, batch_size: int) -> Iterator[Batch]:
    for start in range(0, len(self.test_labels), batch_size):
      stop = start + batch_size
      images = normalize(self.test_images[start:stop], self.mean, self.std)
      yield images, self.test_labels[start:stop]


@dataclasses.dataclass
class _GrainBackend:
  """Streams TFDS random-access sources through Grain with per-example transforms."""

  train_source: Sequence[Any]
  test_source: Sequence[Any]
  num_train: int
  num_test: int
  train_transform: Callable[[Any, np.random.Generator], Batch] = imagenet_train_transform
  eval_transform: Callable[[Any], Batch] = imagenet_eval_transform
  num_threads: int = dataclasses.field(default_factory=lambda: min(16, os.cpu_count() or 1))

  def _read_options(self, batch_size: int) -> Any:
    import grain

    return grain.ReadOptions(
      num_threads=self.num_threads, prefetch_buffer_size=max(2 * batch_size, 16)
    )

  def train_batches(
    self, batch_size: int, *, epoch: int, seed: int, start: int = 0, rows: slice = slice(None)
  ) -> Iterator[Batch]:
    """Batches ``start, ...`` of the epoch (``rows`` of each: this process's part).

    ``random_map`` seeds each example by its index, so reading the examples of
    batches ``start, ...`` (rows ``rows`` of each) by index keeps every example
    and its augmentation as in the full epoch; the dropped remainder and the
    other processes' rows are never read or transformed.
    """
    import grain

    shuffle_seed, map_seed = np.random.default_rng([seed, epoch]).integers(0, 2**31 - 1, 2)
    epoch_ds = (
      grain.MapDataset.source(self.train_source)
      .slice(slice(0, self.num_train))
      .shuffle(seed=int(shuffle_seed))
      .random_map(self.train_transform, seed=int(map_seed))
    )
    first, stop, _ = rows.indices(batch_size)
    local = stop - first
    steps = self.num_train // batch_size

    def example(j: int) -> Batch:
      batch, row = divmod(j, local)
      return epoch_ds[(start + batch) * batch_size + first + row]

    ds = grain.MapDataset.range((steps - start) * local).map(example)
    ds = ds.to_iter_dataset(self._read_options(local))
    return iter(ds.batch(local, drop_remainder=True))

  def test_batches(self, batch_size: int) -> Iterator[Batch]:
    import grain

    ds = (
      grain.MapDataset.source(self.test_source)
      .slice(slice(0, self.num_test))
      .map(self.eval_transform)
    )
    ds = ds.to_iter_dataset(self._read_options(batch_size))
    return iter(ds.batch(batch_size, drop_remainder=False))


# --------------------------------------------------------------------------- #
# IDX files
# --------------------------------------------------------------------------- #

_IDX_MAGIC = {"labels": (0x801,), "images": (0x803, 0x804)}  # uint8, 1-d / 3-d / 4-d
_SPLIT_PREFIXES = {"train": ("train",), "test": ("t10k", "test")}


_GZIP_MAGIC = b"\x1f\x8b"
_FIX_FILE = "re-download it or delete it"


def read_idx(path: str, kind: str) -> np.ndarray:
  """Read a uint8 IDX file (gzip or raw) of ``kind`` "images" or "labels"; validates it.

  Raises:
    IdxFormatError: unreadable, truncated, not gzip, bad magic or bad sizes; the
      one-line message names ``path`` and says what to do.
  """
  data = _idx_bytes(path)
  if len(data) < 4:
    raise IdxFormatError(
      f"{path} is truncated ({len(data)} bytes, less than an IDX header): {_FIX_FILE}"
    )
  magic = int.from_bytes(data[:4], "big")
  if magic not in _IDX_MAGIC[kind]:
    raise IdxFormatError(_bad_magic_message(path, kind, magic))
  ndim = magic & 0xFF
  header = 4 + 4 * ndim
  if len(data) < header:
    raise IdxFormatError(
      f"{path} is truncated ({len(data)} bytes, less than its {header}-byte IDX header): "
      f"{_FIX_FILE}"
    )
  dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  if len(data) != header + math.prod(dims):
    raise IdxFormatError(
      f"{path}: size mismatch, the header declares shape {dims} "
      f"({header + math.prod(dims)} bytes) but the file holds {len(data)} bytes "
      f"(truncated or corrupt download): {_FIX_FILE}"
    )
  return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _idx_bytes(path: str) -> bytes:
  """The file's bytes, decompressed when they start with the gzip magic number."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as err:
    raise IdxFormatError(
      f"{path} cannot be read ({err.strerror or err}): check it is a readable file, or {_FIX_FILE}"
    ) from err
  if data[:2] != _GZIP_MAGIC:
    return data
  try:
    return gzip.decompress(data)
  except (EOFError, OSError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
    raise IdxFormatError(
      f"{path} is truncated or not a gzip file ({type(err).__name__}: {_one_line(err)}): "
      f"{_FIX_FILE}"
    ) from err


def _bad_magic_message(path: str, kind: str, magic: int) -> str:
  expected = " or ".join(f"0x{m:08x}" for m in _IDX_MAGIC[kind])
  if path.endswith(".gz"):
    return (
      f"{path} is truncated or not a gzip file (no gzip header, and 0x{magic:08x} is "
      f"not the IDX {kind} magic number {expected}): {_FIX_FILE}"
    )
  return (
    f"{path}: bad IDX magic number 0x{magic:08x}, expected {expected} (uint8 {kind}); "
    f"if it is not an IDX {kind} file, move it away, else {_FIX_FILE}"
  )


def _one_line(err: BaseException, limit: int = 200) -> str:
  """The first line of ``str(err)``, at most ``limit`` characters."""
  lines = str(err).strip().splitlines()
  return lines[0][:limit] if lines else ""


def _idx_candidates(prefix: str, kind: str) -> list[str]:
  dims = ("1",) if kind == "labels" else ("3", "4")
  names = []
  for d in dims:
    for sep in ("-", "."):
      base = f"{prefix}-{kind}{sep}idx{d}-ubyte"
      names += [base + ".gz", base]
  return names


def _find_idx_file(directory: str, split: str, kind: str) -> str | None:
  for prefix in _SPLIT_PREFIXES[split]:
    for name in _idx_candidates(prefix, kind):
      path = os.path.join(directory, name)
      if os.path.isfile(path):
        return path
  return None


def find_idx_files(directory: str) -> dict[tuple[str, str], str] | None:
  """The four IDX paths keyed by (split, kind); None if the directory holds none of them."""
  if not os.path.isdir(directory):
    return None
  found = {
    (split, kind): _find_idx_file(directory, split, kind)
    for split in _SPLIT_PREFIXES
    for kind in ("images", "labels")
  }
  missing = [key for key, path in found.items() if path is None]
  if len(missing) == len(found):
    return None
  if missing:
    names = ", ".join(_idx_candidates(_SPLIT_PREFIXES[s][0], k)[1] for s, k in missing)
    raise DataNotFoundError(
      f"{directory} holds some IDX files but lacks: {names} (or .gz); add them there, "
      "e.g. re-download the dataset"
    )
  return found  # type: ignore[return-value]


def _load_idx_split(
  images_path: str, labels_path: str, spec: _Spec, name: str, limit: int | None
) -> tuple[np.ndarray, np.ndarray]:
  images = _as_nhwc(read_idx(images_path, "images"))
  labels = read_idx(labels_path, "labels")
  if len(images) != len(labels):
    raise IdxFormatError(
      f"{images_path} holds {len(images)} images but {labels_path} holds "
      f"{len(labels)} labels: the two come from different datasets or downloads, "
      "re-download both"
    )
  if images.shape[1:] != spec.image_shape:
    raise IdxFormatError(
      f"{images_path}: images have shape {images.shape[1:]}, expected "
      f"{spec.image_shape} for {name}: is this directory the data of another dataset?"
    )
  if len(labels) and int(labels.max()) >= spec.num_classes:
    raise IdxFormatError(
      f"{labels_path}: label {int(labels.max())} out of range for {name} "
      f"({spec.num_classes} classes): is this directory the data of another dataset?"
    )
  return images[:limit], labels[:limit].astype(np.int32)


def _dataset_from_idx(
  name: str,
  spec: _Spec,
  directory: str,
  files: Mapping[tuple[str, str], str],
  max_train: int | None,
  max_test: int | None,
) -> Dataset:
  train = _load_idx_split(files["train", "images"], files["train", "labels"], spec, name, max_train)
  test = _load_idx_split(files["test", "images"], files["test", "labels"], spec, name, max_test)
  return _in_memory_dataset(name, spec, train, test, f"idx:{directory}")


def _in_memory_dataset(
  name: str,
  spec: _Spec,
  train: tuple[np.ndarray, np.ndarray],
  test: tuple[np.ndarray, np.ndarray],
  source: str,
) -> Dataset:
  return Dataset.from_arrays(
    name,
    train,
    test,
    num_classes=spec.num_classes,
    mean=spec.mean,
    std=spec.std,
    augment=spec.augment,
    source=source,
  )


# --------------------------------------------------------------------------- #
# TFDS
# --------------------------------------------------------------------------- #


def _tfds_data_dir(data_dir: str | None) -> str:
  if data_dir is not None:
    return data_dir
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def _open_tfds(
  name: str, splits: list[str], data_dir: str | None, download: bool
) -> list[Sequence[Any]]:
  """Random-access TFDS sources for ``splits``; DataNotFoundError when unavailable.

  Prepared data is used as it is; downloading is attempted only when
  ``download`` is set (no network access otherwise).
  """
  cause: BaseException
  try:
    import tensorflow_datasets as tfds
  except ImportError as err:
    cause = err
  else:
    try:
      return tfds.data_source(name, split=splits, data_dir=data_dir, download=False)
    except Exception as err:  # noqa: BLE001 - TFDS raises many types; re-raised below
      cause = err
    if download and name != "imagenet2012":
      try:
        return tfds.data_source(name, split=splits, data_dir=data_dir, download=True)
      except Exception as err:  # noqa: BLE001
        cause = err
  if data_dir is not None:
    reason = f"TFDS cannot open it ({type(cause).__name__}: {_one_line(cause)})"
    raise DataNotFoundError(_data_dir_message(name, data_dir, reason)) from cause
  raise DataNotFoundError(_missing_message(name, cause)) from cause


def _idx_names() -> str:
  """The IDX file names looked for, for messages."""
  return ", ".join(
    _idx_candidates(_SPLIT_PREFIXES[split][0], kind)[1] + "[.gz]"
    for split in _SPLIT_PREFIXES
    for kind in ("images", "labels")
  )


def _tfds_build_hint(name: str, tfds_dir: str) -> str:
  if name == "imagenet2012":
    return (
      f"`tfds build imagenet2012 --data_dir={tfds_dir}` after putting "
      f"ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in {tfds_dir}/downloads/manual "
      "(it cannot be downloaded automatically; needs TensorFlow)"
    )
  return (
    f"`tfds build {name} --data_dir={tfds_dir}` (needs TensorFlow), or one run with "
    "internet access and --config.download=True (load_dataset(..., download=True))"
  )


def _data_dir_message(name: str, data_dir: str, reason: str) -> str:
  """One line: an explicit data_dir holds no usable copy of ``name``."""
  idx = "" if name == "imagenet2012" else f"the IDX files {_idx_names()} or "
  return (
    f"Dataset {name!r} not found in data_dir={data_dir}: {reason}. An explicit data_dir "
    f"must hold {idx}the prepared TFDS dataset {os.path.join(data_dir, name)}/ "
    f"(prepare it with {_tfds_build_hint(name, data_dir)}). Only data_dir=None searches "
    "the default places."
  )


def _missing_message(name: str, cause: BaseException) -> str:
  """One line: none of the default places (Debian package, TFDS) holds ``name``."""
  tfds_dir = _tfds_data_dir(None)
  if isinstance(cause, ImportError) or os.path.isdir(os.path.join(tfds_dir, name)):
    reason = f"{type(cause).__name__}: {_one_line(cause)}"
  else:
    reason = f"no {os.path.join(tfds_dir, name)} directory"
  tried = ["no data_dir given"]
  if name == "fashion_mnist":
    tried.append(f"no IDX files in {DEBIAN_FASHION_MNIST_DIR}")
  tried.append(f"TFDS has not prepared it in {tfds_dir} ({reason})")
  ways = []
  if name != "imagenet2012":
    ways.append(f"pass --config.data_dir=DIR where DIR holds the IDX files {_idx_names()}")
  if name == "fashion_mnist":
    ways.append(
      "`sudo apt-get install dataset-fashion-mnist` "
      f"(installs the IDX files in {DEBIAN_FASHION_MNIST_DIR})"
    )
  ways.append(
    f"prepare it with TFDS: {_tfds_build_hint(name, tfds_dir)}; the TFDS data_dir is set "
    "with --config.data_dir=DIR or the TFDS_DATA_DIR environment variable"
  )
  numbered = "; ".join(f"({i}) {way}" for i, way in enumerate(ways, 1))
  return f"Dataset {name!r} not found: {'; '.join(tried)}. Get it one of these ways: {numbered}."


def _read_records(source: Sequence[Any], stop: int) -> Iterator[list[Any]]:
  """Yield records [0, stop) in chunks, batching reads through ``__getitems__`` when it works."""
  getitems = getattr(source, "__getitems__", None)
  for start in range(0, stop, _TFDS_CHUNK):
    keys = list(range(start, min(stop, start + _TFDS_CHUNK)))
    if getitems is not None:
      try:
        yield list(getitems(keys))
        continue
      except TypeError:  # e.g. the unbound mock under tfds.testing.mock_data
        getitems = None
    yield [source[k] for k in keys]


def _read_tfds_split(
  source: Sequence[Any], spec: _Spec, limit: int | None
) -> tuple[np.ndarray, np.ndarray]:
  """Read the first ``limit`` records of a TFDS source into uint8 / int32 arrays."""
  n = len(source) if limit is None else min(limit, len(source))
  images = np.empty((n, *spec.image_shape), np.uint8)
  labels = np.empty((n,), np.int32)
  i = 0
  for records in _read_records(source, n):
    for record in records:
      images[i] = np.asarray(record["image"]).reshape(spec.image_shape)
      labels[i] = record["label"]
      i += 1
  return images, labels


def _dataset_from_tfds(
  name: str,
  spec: _Spec,
  data_dir: str | None,
  max_train: int | None,
  max_test: int | None,
  download: bool,
) -> Dataset:
  train_src, test_src = _open_tfds(name, ["train", spec.test_split], data_dir, download)
  source = f"tfds:{name}" + (f" (data_dir={data_dir})" if data_dir else "")
  if name != "imagenet2012":
    train = _read_tfds_split(train_src, spec, max_train)
    test = _read_tfds_split(test_src, spec, max_test)
    return _in_memory_dataset(name, spec, train, test, source)
  backend = _GrainBackend(
    train_source=train_src,
    test_source=test_src,
    num_train=len(train_src) if max_train is None else min(max_train, len(train_src)),
    num_test=len(test_src) if max_test is None else min(max_test, len(test_src)),
  )
  return Dataset(
    name=name,
    num_classes=spec.num_classes,
    image_shape=spec.image_shape,
    num_train=backend.num_train,
    num_test=backend.num_test,
    source=source,
    _backend=backend,
  )


# --------------------------------------------------------------------------- #
# Entry point
# --------------------------------------------------------------------------- #


def load_dataset(
  name: str,
  *,
  data_dir: str | None = None,
  max_train_examples: int | None = None,
  max_test_examples: int | None = None,
  download: bool = False,
) -> Dataset:
  """Load ``name`` from an explicit ``data_dir``, else from the default places.

  An explicit ``data_dir`` must hold the IDX files or the prepared TFDS dataset
  (with ``download=True`` TFDS may download and prepare it there); it is the
  only place looked at.  ``data_dir=None`` tries the Debian package (for
  ``fashion_mnist``), then TFDS's data_dir (downloading only with ``download``).

  Raises:
    DataNotFoundError: no usable data where it was looked for.
    IdxFormatError: an IDX file found is truncated or corrupt.
  """
  if name not in _SPECS:
    raise ValueError(f"Unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
  for what, value in (
    ("max_train_examples", max_train_examples),
    ("max_test_examples", max_test_examples),
  ):
    if value is not None:
      _check_positive(what, value)
  spec = _SPECS[name]
  limits = (max_train_examples, max_test_examples)
  if name == "synthetic":
    return synthetic_dataset(spec, *limits)
  if data_dir is not None:
    return _load_from_data_dir(name, spec, data_dir, limits, download)
  if name == "fashion_mnist":
    files = find_idx_files(DEBIAN_FASHION_MNIST_DIR)
    if files is not None:
      return _dataset_from_idx(name, spec, DEBIAN_FASHION_MNIST_DIR, files, *limits)
  return _dataset_from_tfds(name, spec, None, *limits, download)


def synthetic_dataset(
  spec: _Spec, max_train: int | None = None, max_test: int | None = None
) -> Dataset:
  """CIFAR-10-shaped uniform random uint8 images and labels (fixed seed): nothing to
  learn, nothing to download; for timing the program (``--config.dataset=synthetic``)."""
  rng = np.random.default_rng(SYNTHETIC_SEED)
  splits = []
  for size, limit in zip(SYNTHETIC_SIZES, (max_train, max_test)):
    n = min(size, limit or size)
    images = rng.integers(0, 256, (n, *spec.image_shape), dtype=np.uint8)
    splits.append((images, rng.integers(0, spec.num_classes, n).astype(np.int32)))
  return _in_memory_dataset("synthetic", spec, splits[0], splits[1], "synthetic:random")


def _load_from_data_dir(
  name: str,
  spec: _Spec,
  data_dir: str,
  limits: tuple[int | None, int | None],
  download: bool,
) -> Dataset:
  """``name`` from IDX files in ``data_dir``, else from TFDS data prepared there."""
  if not data_dir:
    raise DataNotFoundError(
      f"Dataset {name!r} not found: data_dir is an empty string; pass a directory, "
      "or leave data_dir unset (None) to search the default places"
    )
  if not os.path.isdir(data_dir):
    reason = "it is not a directory" if os.path.exists(data_dir) else "it does not exist"
    raise DataNotFoundError(_data_dir_message(name, data_dir, reason))
  if name != "imagenet2012":
    files = find_idx_files(data_dir)
    if files is not None:
      return _dataset_from_idx(name, spec, data_dir, files, *limits)
  if not download and not os.path.isdir(os.path.join(data_dir, name)):
    idx = "" if name == "imagenet2012" else "none of the IDX files and "
    reason = f"it holds {idx}no TFDS dataset directory {name}/"
    raise DataNotFoundError(_data_dir_message(name, data_dir, reason))
  return _dataset_from_tfds(name, spec, data_dir, *limits, download)

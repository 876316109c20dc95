"""Tests for training/data.py: IDX reading, batching, TFDS (mocked) and errors."""

from __future__ import annotations

import gzip
import os
import time

import numpy as np
import pytest

from training import data

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def write_idx(path: str, array: np.ndarray, *, gz: bool = False, magic: int | None = None) -> str:
  """Write a uint8 IDX file (header + raw bytes), optionally gzip-compressed."""
  array = np.asarray(array, np.uint8)
  magic = 0x800 | array.ndim if magic is None else magic
  header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
  payload = header + array.tobytes()
  if gz:
    path += ".gz"
    payload = gzip.compress(payload)
  with open(path, "wb") as f:
    f.write(payload)
  return path


def write_mnist_dir(
  directory, *, n_train: int = 10, n_test: int = 7, gz: bool = False, test_prefix: str = "t10k"
) -> dict[str, np.ndarray]:
  """Four MNIST-format IDX files with random content; returns the arrays written."""
  rng = np.random.default_rng(0)
  arrays = {
    "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
    "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
    f"{test_prefix}-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
    f"{test_prefix}-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
  }
  for name, array in arrays.items():
    write_idx(os.path.join(directory, name), array, gz=gz)
  return arrays


def index_dataset(n_train: int = 50, n_test: int = 23, augment: bool = False) -> data.Dataset:
  """Synthetic dataset whose image i is filled with the value i (so batches reveal indices)."""

  def fill(n: int) -> np.ndarray:
    return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 4, 4, 1))

  return data.Dataset.from_arrays(
    "toy",
    (fill(n_train), np.arange(n_train) % 10),
    (fill(n_test), np.arange(n_test) % 10),
    num_classes=10,
    mean=(0.0,),
    std=(1.0,),
    augment=augment,
  )


def batch_indices(images: np.ndarray) -> np.ndarray:
  """Recover example indices from normalised (mean 0, std 1) index_dataset images."""
  return np.rint(images[:, 0, 0, 0] * 255).astype(int)


def random_dataset(n_train: int = 50, augment: bool = False) -> data.Dataset:
  """In-memory dataset of random 8x8x3 images, so augmentation crops and flips show."""
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (n_train, 8, 8, 3), dtype=np.uint8)
  test = (images[:5], np.arange(5) % 10)
  return data.Dataset.from_arrays(
    "toy", (images, np.arange(n_train) % 10), test, num_classes=10, augment=augment
  )


def grain_dataset(n_train: int = 50, augment: bool = False, calls: list | None = None):
  """Dataset over a _GrainBackend of plain dict records; the transform uses its rng if augment."""

  def transform(record, rng):
    if calls is not None:
      calls.append(record["x"])
    noise = rng.random((2, 2, 1)) if augment else 0.0
    return (record["x"] + noise).astype(np.float32), np.int32(record["x"] % 10)

  records = [{"x": np.full((2, 2, 1), i, np.float64)} for i in range(n_train)]
  backend = data._GrainBackend(
    train_source=records,
    test_source=records[:5],
    num_train=n_train,
    num_test=5,
    train_transform=transform,
    eval_transform=lambda record: transform(record, np.random.default_rng(0)),
    num_threads=2,
  )
  return data.Dataset("grain-toy", 10, (2, 2, 1), n_train, 5, "records", backend)


def make_dataset(backend: str, augment: bool, calls: list | None = None) -> data.Dataset:
  """A 50-example dataset of the given backend ("arrays" or "grain")."""
  if backend == "grain":
    return grain_dataset(augment=augment, calls=calls)
  return random_dataset(augment=augment)


def assert_one_line(err: pytest.ExceptionInfo, *parts: str) -> None:
  """The error is a DataError whose message is one line containing every part."""
  message = str(err.value)
  assert isinstance(err.value, data.DataError)
  assert "\n" not in message, message
  for part in parts:
    assert part in message, (part, message)


@pytest.fixture
def offline(monkeypatch, tmp_path):
  """No Debian Fashion-MNIST and no network: only explicit sources can be found."""
  monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "no-debian"))


# --------------------------------------------------------------------------- #
# IDX files
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
  images = np.random.default_rng(1).integers(0, 256, (5, 6, 3), dtype=np.uint8)
  labels = np.array([0, 9, 3, 3, 7], np.uint8)
  img_path = write_idx(str(tmp_path / "imgs"), images, gz=gz)
  lbl_path = write_idx(str(tmp_path / "lbls"), labels, gz=gz)
  np.testing.assert_array_equal(data.read_idx(img_path, "images"), images)
  np.testing.assert_array_equal(data.read_idx(lbl_path, "labels"), labels)


@pytest.mark.parametrize("gz,test_prefix", [(False, "t10k"), (True, "t10k"), (True, "test")])
def test_load_from_idx_dir_exact(tmp_path, offline, gz, test_prefix):
  arrays = write_mnist_dir(tmp_path, gz=gz, test_prefix=test_prefix)
  ds = data.load_dataset("mnist", data_dir=str(tmp_path))
  assert ds.source == f"idx:{tmp_path}"
  assert (ds.num_train, ds.num_test, ds.image_shape, ds.num_classes) == (10, 7, (28, 28, 1), 10)
  images, labels = map(np.concatenate, zip(*ds.test_batches(3)))
  assert images.dtype == np.float32 and labels.dtype == np.int32
  pixels = np.rint((images * MNIST_STD + MNIST_MEAN) * 255)[..., 0]
  np.testing.assert_array_equal(pixels, arrays[f"{test_prefix}-images-idx3-ubyte"])
  np.testing.assert_array_equal(labels, arrays[f"{test_prefix}-labels-idx1-ubyte"])


def test_max_examples_take_first_n(tmp_path, offline):
  arrays = write_mnist_dir(tmp_path)
  ds = data.load_dataset("mnist", data_dir=str(tmp_path), max_train_examples=4, max_test_examples=2)
  assert (ds.num_train, ds.num_test) == (4, 2)
  _, labels = next(ds.test_batches(10))
  np.testing.assert_array_equal(labels, arrays["t10k-labels-idx1-ubyte"][:2])


def test_bad_magic_names_file(tmp_path):
  path = write_idx(str(tmp_path / "train-labels-idx1-ubyte"), np.zeros(4), magic=0x803)
  with pytest.raises(data.IdxFormatError, match="bad IDX magic") as err:
    data.read_idx(path, "labels")
  assert path in str(err.value)


def test_truncated_file_names_file(tmp_path):
  path = write_idx(str(tmp_path / "train-images-idx3-ubyte"), np.zeros((3, 28, 28)))
  with open(path, "r+b") as f:
    f.truncate(100)
  with pytest.raises(data.IdxFormatError, match="size mismatch") as err:
    data.read_idx(path, "images")
  assert path in str(err.value)


def truncated_gz(payload: bytes) -> bytes:
  return payload[: len(payload) // 2]


def corrupt_gz(payload: bytes) -> bytes:
  middle = len(payload) // 2
  flipped = bytes(b ^ 0xFF for b in payload[middle : middle + 16])
  return payload[:middle] + flipped + payload[middle + 16 :]


def not_gzip(payload: bytes) -> bytes:
  return b"<html>404 Not Found</html>"


@pytest.mark.parametrize("damage", [truncated_gz, corrupt_gz, not_gzip])
def test_damaged_gz_is_one_clear_idx_error(tmp_path, damage):
  images = np.random.default_rng(2).integers(0, 256, (20, 28, 28), dtype=np.uint8)
  path = write_idx(str(tmp_path / "train-images-idx3-ubyte"), images, gz=True)
  with open(path, "rb") as f:
    payload = f.read()
  with open(path, "wb") as f:
    f.write(damage(payload))
  with pytest.raises(data.IdxFormatError) as err:
    data.read_idx(path, "images")
  assert_one_line(err, path, "is truncated or not a gzip file", "re-download it or delete it")


@pytest.mark.parametrize("size", [0, 3, 6])
def test_raw_file_shorter_than_its_header(tmp_path, size):
  path = write_idx(str(tmp_path / "train-images-idx3-ubyte"), np.zeros((2, 28, 28)))
  with open(path, "r+b") as f:
    f.truncate(size)
  with pytest.raises(data.IdxFormatError) as err:
    data.read_idx(path, "images")
  assert_one_line(err, path, "truncated", "re-download it or delete it")


def test_unreadable_idx_path(tmp_path):
  with pytest.raises(data.IdxFormatError) as err:
    data.read_idx(str(tmp_path), "images")  # a directory
  assert_one_line(err, str(tmp_path), "cannot be read")


def test_load_dataset_names_the_truncated_gz(tmp_path, offline):
  write_mnist_dir(tmp_path, gz=True)
  path = str(tmp_path / "t10k-labels-idx1-ubyte.gz")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 10)
  with pytest.raises(data.DataError) as err:
    data.load_dataset("mnist", data_dir=str(tmp_path))
  assert isinstance(err.value, data.IdxFormatError)
  assert_one_line(err, path, "re-download it or delete it")


def test_error_classes():
  assert issubclass(data.DataNotFoundError, data.DataError)
  assert issubclass(data.DataNotFoundError, FileNotFoundError)
  assert issubclass(data.IdxFormatError, data.DataError)
  assert issubclass(data.IdxFormatError, ValueError)
  assert str(data.DataNotFoundError("one line")) == "one line"


def test_image_label_count_mismatch(tmp_path, offline):
  write_mnist_dir(tmp_path)
  labels = write_idx(str(tmp_path / "train-labels-idx1-ubyte"), np.zeros(9))
  with pytest.raises(data.IdxFormatError, match="10 images but") as err:
    data.load_dataset("mnist", data_dir=str(tmp_path))
  assert labels in str(err.value) and "train-images-idx3-ubyte" in str(err.value)


def test_partial_idx_dir_lists_missing_files(tmp_path, offline):
  write_mnist_dir(tmp_path)
  os.remove(tmp_path / "t10k-labels-idx1-ubyte")
  with pytest.raises(data.DataNotFoundError, match="t10k-labels-idx1-ubyte"):
    data.load_dataset("mnist", data_dir=str(tmp_path))


@pytest.mark.skipif(
  not os.path.isdir(data.DEBIAN_FASHION_MNIST_DIR),
  reason=f"{data.DEBIAN_FASHION_MNIST_DIR} absent (apt-get install dataset-fashion-mnist)",
)
def test_debian_fashion_mnist():
  start = time.perf_counter()
  ds = data.load_dataset("fashion_mnist")
  assert time.perf_counter() - start < 10
  assert (ds.num_train, ds.num_test, ds.image_shape) == (60000, 10000, (28, 28, 1))
  assert ds.source == f"idx:{data.DEBIAN_FASHION_MNIST_DIR}"
  images, labels = next(ds.train_batches(256, epoch=0, seed=0))
  assert images.shape == (256, 28, 28, 1) and set(np.unique(labels)) <= set(range(10))
  assert abs(float(images.mean())) < 0.2 and 0.8 < float(images.std()) < 1.2


# --------------------------------------------------------------------------- #
# batching
# --------------------------------------------------------------------------- #


def test_train_batches_deterministic_and_epoch_dependent():
  ds = index_dataset()

  def run(epoch: int, seed: int) -> list[np.ndarray]:
    return [batch_indices(x) for x, _ in ds.train_batches(8, epoch=epoch, seed=seed)]

  first, again = run(3, 7), run(3, 7)
  assert all(np.array_equal(a, b) for a, b in zip(first, again)) and len(first) == len(again)
  assert not np.array_equal(np.concatenate(first), np.concatenate(run(4, 7)))
  assert not np.array_equal(np.concatenate(first), np.concatenate(run(3, 8)))


def test_train_batches_drop_remainder():
  ds = index_dataset(n_train=50)
  assert ds.steps_per_epoch(8) == 6
  batches = list(ds.train_batches(8, epoch=0, seed=0))
  assert len(batches) == 6 and all(x.shape == (8, 4, 4, 1) for x, _ in batches)
  seen = np.concatenate([batch_indices(x) for x, _ in batches])
  assert len(np.unique(seen)) == 48  # a permutation, minus the dropped remainder
  labels = np.concatenate([y for _, y in batches])
  np.testing.assert_array_equal(labels, seen % 10)  # labels stay paired with their images
  with pytest.raises(ValueError, match="exceeds"):
    ds.train_batches(51, epoch=0, seed=0)


BACKENDS = ["arrays", "grain"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("start", [0, 1, 3, 5, 6])
def test_train_batches_start_is_the_tail_of_the_epoch(backend, augment, start):
  ds = make_dataset(backend, augment)
  assert ds.steps_per_epoch(8) == 6
  full = list(ds.train_batches(8, epoch=2, seed=5))
  tail = list(ds.train_batches(8, epoch=2, seed=5, start=start))
  assert len(tail) == len(full) - start
  for (x, y), (x_full, y_full) in zip(tail, full[start:]):
    assert x.tobytes() == x_full.tobytes() and x.dtype == x_full.dtype
    assert y.tobytes() == y_full.tobytes() and y.dtype == y_full.dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_augmentation_differs_between_epochs_and_batches(backend):
  ds = make_dataset(backend, augment=True)
  plain = make_dataset(backend, augment=False)
  first = list(ds.train_batches(8, epoch=0, seed=0))
  unaugmented = list(plain.train_batches(8, epoch=0, seed=0))
  assert any(not np.array_equal(a, b) for (a, _), (b, _) in zip(first, unaugmented))
  other_epoch = list(ds.train_batches(8, epoch=1, seed=0))
  assert not np.array_equal(first[0][0], other_epoch[0][0])


def test_array_augmentation_draws_from_seed_epoch_and_batch_index():
  ds = random_dataset(augment=True)
  backend = ds._backend
  order = np.random.default_rng([5, 2]).permutation(50)
  for step, (images, labels) in enumerate(ds.train_batches(8, epoch=2, seed=5)):
    idx = order[step * 8 : (step + 1) * 8]
    rng = np.random.default_rng([5, 2, step])
    expected = data.normalize(
      data.cifar_augment(backend.train_images[idx], rng), backend.mean, backend.std
    )
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(labels, backend.train_labels[idx])


def test_start_skips_the_work_of_earlier_batches(monkeypatch):
  calls = []
  ds = make_dataset("grain", augment=True, calls=calls)
  assert len(list(ds.train_batches(8, epoch=0, seed=0, start=4))) == 2
  assert len(calls) == 2 * 8  # neither earlier batches nor the dropped remainder
  ds = make_dataset("arrays", augment=True)
  real = data.cifar_augment
  augmented = []
  monkeypatch.setattr(data, "cifar_augment", lambda x, rng: augmented.append(1) or real(x, rng))
  assert len(list(ds.train_batches(8, epoch=0, seed=0, start=4))) == 2
  assert len(augmented) == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("start", [-1, 7])
def test_start_out_of_range(backend, start):
  ds = make_dataset(backend, augment=False)
  with pytest.raises(ValueError, match=r"start must be in \[0, 6\].*got start=" + str(start)):
    ds.train_batches(8, epoch=0, seed=0, start=start)


def test_test_batches_cover_every_example_once():
  ds = index_dataset(n_test=23)
  batches = list(ds.test_batches(5))
  assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
  np.testing.assert_array_equal(
    np.concatenate([batch_indices(x) for x, _ in batches]), np.arange(23)
  )


def crop(image: np.ndarray, top: int, left: int, h: int, w: int, flip: bool) -> np.ndarray:
  """Reference crop (and optional horizontal flip) of a 2-d image."""
  out = image[top : top + h, left : left + w]
  return out[:, ::-1] if flip else out


def test_cifar_augment_crops_and_flips_known_input():
  n, h, w = 64, 32, 32
  base = (np.arange(h * w, dtype=np.int64).reshape(h, w) % 251 + 1).astype(np.uint8)
  images = np.broadcast_to(base[None, :, :, None], (n, h, w, 3)).copy()
  out = data.cifar_augment(images, np.random.default_rng(0))
  assert out.shape == images.shape and out.dtype == np.uint8
  padded = np.pad(base, 4)
  flips, shifts = set(), set()
  for example in out[..., 0]:
    matches = [
      (dy, dx, f)
      for dy in range(9)
      for dx in range(9)
      for f in (False, True)
      if np.array_equal(example, crop(padded, dy, dx, h, w, f))
    ]
    assert matches, "augmented image is not a (flipped) crop of the zero-padded input"
    dy, dx, f = matches[0]
    flips.add(f)
    shifts.add((dy, dx))
  assert flips == {False, True}
  assert len(shifts) > 10 and (out == 0).any()  # random offsets expose the zero padding
  np.testing.assert_array_equal(out[..., 0], out[..., 2])  # channels move together


def test_read_records_uses_getitems_in_chunks():
  class Source:
    calls = 0

    def __len__(self):
      return 2500

    def __getitem__(self, i):
      raise AssertionError("per-record access should not be used")

    def __getitems__(self, keys):
      Source.calls += 1
      return [{"image": np.full((28, 28, 1), k % 256, np.uint8), "label": k % 10} for k in keys]

  images, labels = data._read_tfds_split(Source(), data._SPECS["mnist"], None)
  assert Source.calls == 3 and images.shape == (2500, 28, 28, 1)
  np.testing.assert_array_equal(labels, np.arange(2500) % 10)
  np.testing.assert_array_equal(images[:, 0, 0, 0], np.arange(2500) % 256)


# --------------------------------------------------------------------------- #
# TFDS (mocked)
# --------------------------------------------------------------------------- #


@pytest.fixture
def tfds():
  """tensorflow_datasets; only the tests that take it are skipped where it is not installed."""
  return pytest.importorskip("tensorflow_datasets")


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_mock(offline, tfds, name, shape):
  with tfds.testing.mock_data(num_examples=20):
    ds = data.load_dataset(name)
  assert ds.source == f"tfds:{name}" and (ds.num_train, ds.num_test) == (20, 20)
  assert ds.image_shape == shape and ds.num_classes == 10
  for images, labels in [next(ds.train_batches(8, epoch=0, seed=0)), next(ds.test_batches(8))]:
    assert images.shape == (8, *shape) and images.dtype == np.float32
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < 10
  assert sum(len(y) for _, y in ds.test_batches(8)) == 20


def test_imagenet_grain_mock(offline, tfds):
  with tfds.testing.mock_data(num_examples=6):
    ds = data.load_dataset("imagenet2012")
  assert ds.source == "tfds:imagenet2012" and ds.num_classes == 1000
  assert ds.steps_per_epoch(4) == 1
  batches = list(ds.train_batches(4, epoch=0, seed=0))
  assert len(batches) == 1
  images, labels = batches[0]
  assert images.shape == (4, 224, 224, 3) and images.dtype == np.float32
  assert labels.shape == (4,) and labels.dtype == np.int32
  again, _ = next(ds.train_batches(4, epoch=0, seed=0))
  np.testing.assert_array_equal(images, again)
  assert [x.shape[0] for x, _ in ds.test_batches(4)] == [4, 2]


def test_imagenet_transforms():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
  crop = data.random_resized_crop(image, rng)
  assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
  ramp = np.broadcast_to((np.arange(500) // 2).astype(np.uint8)[None, :, None], (300, 500, 3))
  center = data.resize_center_crop(ramp)  # 300x500 -> 256x427 -> central 224x224
  assert center.shape == (224, 224, 3)
  assert abs(int(center[112, 112, 0]) - 125) <= 2  # the middle stays in the middle
  assert abs(int(center[0, 0, 0]) - 59) <= 2  # left edge at column ~101/427 of the original
  x, y = data.imagenet_eval_transform({"image": image[:, :, :1], "label": 7})
  assert x.shape == (224, 224, 3) and x.dtype == np.float32 and y.dtype == np.int32 and y == 7
  x, _ = data.imagenet_train_transform({"image": image[:5, :3], "label": 1}, rng)
  assert x.shape == (224, 224, 3)


# --------------------------------------------------------------------------- #
# errors
# --------------------------------------------------------------------------- #


@pytest.fixture
def no_tfds_data(monkeypatch, tmp_path, tfds):
  """TFDS's default data_dir is an empty directory."""
  empty = tmp_path / "tfds-default"
  empty.mkdir()
  monkeypatch.setenv("TFDS_DATA_DIR", str(empty))
  monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(empty))
  return empty


def test_missing_data_error_mentions_all_three_ways(offline, no_tfds_data):
  start = time.perf_counter()
  with pytest.raises(data.DataNotFoundError) as err:
    data.load_dataset("fashion_mnist")
  assert time.perf_counter() - start < 10
  assert isinstance(err.value, FileNotFoundError)
  assert str(err.value).startswith("Dataset 'fashion_mnist' not found")
  assert_one_line(
    err,
    "--config.data_dir=DIR",
    "train-images-idx3-ubyte[.gz]",
    "apt-get install dataset-fashion-mnist",
    f"tfds build fashion_mnist --data_dir={no_tfds_data}",
  )


@pytest.fixture
def debian_fashion_mnist(monkeypatch, tmp_path):
  """A (fake) Debian Fashion-MNIST directory with valid IDX files."""
  debian = tmp_path / "debian"
  debian.mkdir()
  write_mnist_dir(debian, gz=True)
  monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", str(debian))
  return debian


def test_defaults_find_debian_fashion_mnist(debian_fashion_mnist):
  ds = data.load_dataset("fashion_mnist")
  assert ds.source == f"idx:{debian_fashion_mnist}" and ds.num_train == 10


@pytest.mark.parametrize("content", ["empty", "missing", "unrelated", "file"])
def test_explicit_data_dir_without_data_is_an_error(tmp_path, debian_fashion_mnist, content):
  data_dir = tmp_path / "explicit"
  if content != "missing":
    data_dir.mkdir()
  if content == "unrelated":
    (data_dir / "README.txt").write_text("not a dataset")
    (data_dir / "mnist.npz").write_bytes(b"\0" * 10)
  if content == "file":
    data_dir = tmp_path / "a-file"
    data_dir.write_text("")
  start = time.perf_counter()
  with pytest.raises(data.DataNotFoundError) as err:
    data.load_dataset("fashion_mnist", data_dir=str(data_dir))  # never the Debian copy
  assert time.perf_counter() - start < 10
  assert str(err.value).startswith(f"Dataset 'fashion_mnist' not found in data_dir={data_dir}")
  assert_one_line(
    err,
    "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
    "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]",
    f"prepared TFDS dataset {data_dir}/fashion_mnist/",
    "Only data_dir=None searches the default places",
  )


def test_explicit_empty_data_dir_does_not_fall_back_to_tfds(tmp_path, offline, tfds):
  with tfds.testing.mock_data(num_examples=20):  # TFDS would serve any dataset
    with pytest.raises(data.DataNotFoundError) as err:
      data.load_dataset("mnist", data_dir=str(tmp_path))
  assert_one_line(err, str(tmp_path), "no TFDS dataset directory mnist/")


def test_empty_string_data_dir_is_an_error(offline):
  with pytest.raises(data.DataNotFoundError) as err:
    data.load_dataset("mnist", data_dir="")
  assert_one_line(err, "data_dir is an empty string", "None")


def test_explicit_tfds_data_dir_is_used(tmp_path, offline, tfds):
  (tmp_path / "mnist" / "3.0.1").mkdir(parents=True)  # the prepared dataset's directory
  with tfds.testing.mock_data(num_examples=20):
    ds = data.load_dataset("mnist", data_dir=str(tmp_path))
  assert ds.source == f"tfds:mnist (data_dir={tmp_path})" and ds.num_train == 20
  images, _ = next(ds.train_batches(8, epoch=0, seed=0, start=1))
  assert images.shape == (8, 28, 28, 1)


def test_unknown_dataset_name():
  with pytest.raises(ValueError, match="cifar100") as err:
    data.load_dataset("cifar100")
  assert all(name in str(err.value) for name in data.DATASETS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("count", [2, 4])
def test_process_shards_concatenate_to_the_global_batches(backend, augment, count):
  ds = make_dataset(backend, augment)
  full = list(ds.train_batches(8, epoch=1, seed=3, start=2))
  parts = [
    list(ds.train_batches(8, epoch=1, seed=3, start=2, shard=(i, count))) for i in range(count)
  ]
  for step, (x_full, y_full) in enumerate(full):
    x = np.concatenate([part[step][0] for part in parts])
    y = np.concatenate([part[step][1] for part in parts])
    assert x.tobytes() == x_full.tobytes() and y.tobytes() == y_full.tobytes()


def test_a_grain_shard_reads_only_its_own_examples():
  calls = []
  ds = grain_dataset(calls=calls)
  list(ds.train_batches(8, epoch=0, seed=0, shard=(1, 4)))
  order = []
  for x, _ in grain_dataset().train_batches(8, epoch=0, seed=0):
    order.extend(int(v) for v in x[:, 0, 0, 0])
  own = {order[step * 8 + row] for step in range(6) for row in (2, 3)}
  assert sorted(int(c[0, 0, 0]) for c in calls) == sorted(own)


@pytest.mark.parametrize("count", [1, 2, 4])
def test_eval_batches_pad_mask_and_shard(count):
  ds = index_dataset(n_test=23)
  parts = [list(ds.eval_batches(8, shard=(i, count))) for i in range(count)]
  full = list(ds.test_batches(8))
  assert [len(p) for p in parts] == [3] * count
  for step, (images, labels) in enumerate(full):
    mask = np.concatenate([p[step][2] for p in parts])
    y = np.concatenate([p[step][1] for p in parts])
    assert mask.sum() == len(labels) and mask[: len(labels)].all()
    np.testing.assert_array_equal(y[mask], labels)
    assert np.concatenate([p[step][0] for p in parts]).shape[0] == 8


def test_a_shard_that_does_not_divide_the_batch_is_refused():
  with pytest.raises(ValueError, match=r"shard=\(0, 3\) must be \(index, count\)"):
    next(random_dataset().train_batches(8, epoch=0, seed=0, shard=(0, 3)))

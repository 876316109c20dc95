"""``config.dataset = "synthetic"``: CIFAR-10-shaped random data for timing, no download."""

import numpy as np
import pytest

from training import data


def test_synthetic_data_has_cifar_shapes_and_sizes_and_is_the_same_every_time():
  first = data.load_dataset("synthetic", max_train_examples=512, max_test_examples=100)
  again = data.load_dataset("synthetic", max_train_examples=512, max_test_examples=100)
  assert (first.num_train, first.num_test, first.num_classes) == (512, 100, 10)
  assert first.image_shape == (32, 32, 3) and first.source == "synthetic:random"
  images, labels, _ = first.train_arrays()
  images_again, labels_again, _ = again.train_arrays()
  np.testing.assert_array_equal(images, images_again)
  np.testing.assert_array_equal(labels, labels_again)
  assert images.dtype == np.uint8 and 0 <= labels.min() and labels.max() <= 9
  assert first.in_memory_unaugmented  # its batches are drawn on the device, as Fashion-MNIST's


def test_synthetic_data_defaults_to_cifar10_sizes_and_ignores_data_dir():
  full = data.load_dataset("synthetic", data_dir="/nonexistent")
  assert (full.num_train, full.num_test) == data.SYNTHETIC_SIZES


@pytest.mark.parametrize("batch_size", [64, 128])
def test_synthetic_batches_are_normalized_float32_nhwc(batch_size):
  dataset = data.load_dataset("synthetic", max_train_examples=256, max_test_examples=64)
  images, labels = next(iter(dataset.train_batches(batch_size, epoch=0, seed=0)))
  assert images.shape == (batch_size, 32, 32, 3) and images.dtype == np.float32
  assert labels.shape == (batch_size,) and abs(float(images.mean())) < 0.1

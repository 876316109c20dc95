"""The validation split: training examples held out, never seen in training, evaluated.

The held-out examples are a fixed draw of the training set (seed 13, not the
run's seed); the tests rebuild that draw with NumPy and decode each example's
index from its pixels, so they never ask the code under test which examples it
held out.
"""

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from test_train import data_dir  # noqa: E402, F401  (the fixture)
from test_train import tiny_config  # noqa: E402

from training import checkpoints  # noqa: E402
from training import config as config_lib  # noqa: E402
from training import data  # noqa: E402
from training import train_lib  # noqa: E402

HELD_OUT_SEED = 13


def _indexed_dataset(n: int) -> data.Dataset:
  """Example i's first two pixels spell i (i % 256, i // 256)."""
  images = np.zeros((n, 2, 2), np.uint8)
  images[:, 0, 0], images[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
  labels = np.arange(n) % 10
  return data.Dataset.from_arrays(
    "indexed", (images, labels), (images[:5], labels[:5]), num_classes=10
  )


def _decode(images: np.ndarray) -> np.ndarray:
  return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 1, 0].astype(np.int64)


def test_held_out_examples_never_appear_in_any_epoch_of_any_seed():
  train, validation = _indexed_dataset(300).split_validation(60)
  held = _decode(validation.train_arrays()[0])  # the held-out examples, as held
  expected = np.sort(np.random.default_rng(HELD_OUT_SEED).permutation(300)[:60])
  np.testing.assert_array_equal(held, expected)
  train_images = train.train_arrays()[0]
  np.testing.assert_array_equal(_decode(train_images), np.setdiff1d(np.arange(300), expected))
  for seed in (0, 1, 7):
    for epoch in range(4):
      seen = _decode(train_images[train.train_order(32, epoch=epoch, seed=seed).ravel()])
      assert not np.intersect1d(seen, held).size
  assert (train.num_train, validation.num_test) == (240, 60)


def _read_idx(path: str) -> np.ndarray:
  with open(path, "rb") as f:
    raw = f.read()
  ndim = raw[3]
  dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
  return np.frombuffer(raw[4 + 4 * ndim :], np.uint8).reshape(dims)


def _numpy_accuracy(params: dict, images: np.ndarray, labels: np.ndarray) -> float:
  """LeNet-300-100 in float32 NumPy on Fashion-MNIST-normalised images."""
  x = (images.reshape(len(images), -1).astype(np.float32) / 255 - 0.2860) / 0.3530
  for name in ("fc1", "fc2"):
    x = np.maximum(x @ np.asarray(params[name]["kernel"]) + np.asarray(params[name]["bias"]), 0)
  logits = x @ np.asarray(params["fc3"]["kernel"]) + np.asarray(params["fc3"]["bias"])
  return float(np.mean(logits.argmax(-1) == labels))


def test_validation_accuracy_is_the_model_s_accuracy_on_the_seed_free_held_out_set(
  data_dir,  # noqa: F811
  tmp_path,
):
  config = tiny_config(data_dir)
  config.update(seed=1, max_train_examples=448, validation_examples=128, plots=False)
  config.method, config.dense.epochs, config.finetune.epochs = "magnitude", 2, 0  # cut, no training
  summary = train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  held = np.sort(np.random.default_rng(HELD_OUT_SEED).permutation(448)[:128])
  images = _read_idx(os.path.join(data_dir, "train-images-idx3-ubyte"))[held]
  labels = _read_idx(os.path.join(data_dir, "train-labels-idx1-ubyte"))[held]
  for key, model in (
    ("dense_validation_accuracy", "dense"),
    ("validation_accuracy_final", "final"),
  ):
    params = checkpoints.load_model(str(tmp_path / "run" / f"{model}_model"))["params"]
    # float32 in another order: at most one example may fall on the other side of a tie
    assert summary[key] == pytest.approx(_numpy_accuracy(params, images, labels), abs=1.01 / 128)
  assert summary["validation_accuracy_before_prune"] is not None
  assert (summary["num_train"], summary["num_validation"]) == (320, 128)
  with open(tmp_path / "run" / "summary.json") as f:
    assert json.load(f)["validation_accuracy_final"] == summary["validation_accuracy_final"]

  # Resumed from the end of dense epoch 1: the same held-out set, the same model, bit for bit.
  shutil.copytree(tmp_path / "run", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / str(2 * (320 // 64)))
  resumed = train_lib.train_and_evaluate(config, str(tmp_path / "resumed"))
  for key in ("dense_validation_accuracy", "validation_accuracy_before_prune", "accuracy_final"):
    assert resumed[key] == summary[key], key
  for model in ("dense", "final"):
    a, b = (
      checkpoints.load_model(str(tmp_path / d / f"{model}_model")) for d in ("run", "resumed")
    )
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize(
  ("fields", "message"),
  [
    ({"validation_examples": -1}, "an integer >= 0"),
    ({"validation_examples": 256, "max_train_examples": 256}, "leaves no training examples"),
  ],
)
def test_bad_validation_examples_are_refused_by_the_config_check(fields, message):
  config = tiny_config("/nonexistent")
  config.update(fields)
  with pytest.raises(config_lib.ConfigError, match=message):
    train_lib.validate_config(config)


def test_validation_examples_all_of_the_training_set_is_refused_before_training(
  data_dir,  # noqa: F811
  tmp_path,
):
  config = tiny_config(data_dir)
  config.validation_examples = 512
  with pytest.raises(config_lib.ConfigError, match="leaves none of the 512"):
    train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_a_workdir_written_before_the_field_existed_resumes_without_it():
  config = tiny_config("/data")
  stored = config_lib.config_json(config)
  del stored["validation_examples"]
  assert config_lib.config_differences(stored, config) == []
  config.validation_examples = 10
  assert config_lib.config_differences(stored, config) == ["validation_examples: 0 there, 10 here"]

"""Image classification: ``(images, labels)`` batches, softmax cross-entropy, accuracy.

The data are ``training.data``'s (MNIST, Fashion-MNIST, CIFAR-10, ImageNet);
``config.validation_examples`` training examples may be held out as a
validation set. Every metric is the accuracy (and the loss).
"""

from __future__ import annotations

import ml_collections

from training import data
from training.config import ConfigError
from training.tasks.base import Task
from training.tasks.base import model_size_option


def load(config: ml_collections.ConfigDict) -> tuple[data.Dataset, data.Dataset | None]:
  """(training and test set, validation set or None), checked against the batch size."""
  dataset = data.load_dataset(
    config.dataset,
    data_dir=config.data_dir,
    max_train_examples=config.max_train_examples,
    max_test_examples=config.max_test_examples,
    download=config.download,
  )
  dataset, validation = split_validation(config, dataset)
  if dataset.steps_per_epoch(config.batch_size) < 1:
    raise ConfigError(
      f"config.batch_size={config.batch_size} exceeds the {dataset.num_train} "
      f"training examples of {dataset.name} ({dataset.source})"
    )
  return dataset, validation


def split_validation(
  config: ml_collections.ConfigDict, dataset: data.Dataset
) -> tuple[data.Dataset, data.Dataset | None]:
  """(training set, validation set): ``config.validation_examples`` held out, or (dataset, None)."""
  n = config.validation_examples
  if not n:
    return dataset, None
  if n >= dataset.num_train:
    raise ConfigError(
      f"config.validation_examples={n} leaves none of the {dataset.num_train} training "
      f"examples of {dataset.name} ({dataset.source})"
    )
  try:
    return dataset.split_validation(n)
  except ValueError as err:  # a streamed dataset
    raise ConfigError(f"config.validation_examples={n}: {err}; use 0") from None


def derive(metrics: dict[str, float]) -> dict[str, float]:
  """Nothing beyond the loss and the accuracy."""
  return metrics


def check(config: ml_collections.ConfigDict) -> None:
  """No fields of its own."""
  del config


TASK = Task(
  name="image_classification",
  datasets=data.DATASETS,
  models=("lenet_300_100", "lenet5", "resnet56", "densenet40", "resnet50", "vit"),
  load=load,
  model_options=model_size_option,
  metrics=("accuracy",),
  derive=derive,
  check=check,
)

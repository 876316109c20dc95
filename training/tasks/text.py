"""Language modelling: next-byte prediction on a byte-level corpus.

Batches are ``(inputs, targets)`` int32 ``[batch, context]`` windows of the
training split, ``targets`` the inputs shifted by one byte, drawn as a pure
function of (seed, epoch, step) (``training.text_data``); an epoch is
``config.steps_per_epoch`` steps. The loss is the mean cross-entropy over every
position, reported in nats and as bits per byte (nats / ln 2), with the
next-byte accuracy. The validation split is fixed (the last 5 % of every
document), so every run reports validation bits per byte. The end of the run
prints a greedy sample of the dense and of the final model from a fixed prompt.
"""

from __future__ import annotations

import math
from typing import Any

from flax import nnx
import ml_collections

from models import gpt
from training import config as config_lib
from training import text_data
from training.tasks.base import Task
from training.tasks.base import model_size_option

DATASETS = text_data.TEXT_DATASETS


def load(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """(the corpus with its test split evaluated, the same with its validation split)."""
  dataset = text_data.load_text_dataset(
    config.dataset,
    data_dir=config.data_dir,
    context=config.context,
    steps_per_epoch=config.steps_per_epoch,
  )
  return dataset, dataset.validation()


def derive(metrics: dict[str, float]) -> dict[str, float]:
  """Adds bits per byte: the mean cross-entropy in nats / ln 2."""
  return {**metrics, "bits_per_byte": metrics["loss"] / math.log(2.0)}


def check(config: ml_collections.ConfigDict) -> None:
  """The text fields: context, steps per epoch, the sample; no image-only fields."""
  check_field = config_lib.check
  positive = (lambda x: config_lib.is_int(x) and x >= 1), "a positive integer"
  for name in ("context", "steps_per_epoch", "sample_bytes"):
    check_field(config, name, *positive)
  check_field(config, "sample_prompt", lambda x: isinstance(x, str) and x, "a non-empty string")
  check_field(config, "model_size", lambda x: x in gpt.SIZES, f"one of {', '.join(gpt.SIZES)}")
  for name in ("max_train_examples", "max_test_examples"):
    check_field(config, name, lambda x: x is None, "None for a text dataset (it has no examples)")
  check_field(
    config,
    "validation_examples",
    lambda x: x == 0,
    "0 for a text dataset (its validation split is fixed: the last 5 % of every document)",
  )


def model_options(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """The model's size and context (its learned positions)."""
  return (*model_size_option(config), ("context", config.context))


def samples(
  config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, models_by_name: dict[str, Any]
) -> dict[str, str]:
  """{name: greedy continuation of ``config.sample_prompt``} for each model's variables."""
  out = {}
  for name, variables in models_by_name.items():
    model = nnx.merge(graphdef, variables["params"], variables["batch_stats"])
    out[name] = gpt.greedy_sample(model, config.sample_prompt, config.sample_bytes)
  return out


TASK = Task(
  name="language_modelling",
  datasets=DATASETS,
  models=("gpt",),
  load=load,
  model_options=model_options,
  metrics=("bits_per_byte", "accuracy"),
  derive=derive,
  check=check,
  report=samples,
)

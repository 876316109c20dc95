"""The ``Task`` record shared by the tasks (``training.tasks``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import ml_collections

from training.steps import ModelOptions


class Task(NamedTuple):
  """What differs between tasks; the driver reads only these.

  Attributes:
    name: "image_classification" or "language_modelling" (``summary.json``'s ``task``).
    datasets: the ``config.dataset`` names of the task.
    models: the ``config.model`` names that take its inputs.
    load: config -> (dataset, validation set or None). The dataset's
      ``train_batches`` give ``(inputs, targets)``, its ``eval_batches``
      ``(inputs, targets, mask)`` of the test split.
    model_options: config -> the model constructor's keywords, as pairs.
    metrics: what every evaluation reports besides the loss, headline first;
      summary.json has ``dense_<m>``, ``<m>_before_prune``, ``<m>_after_prune``,
      ``<m>_final`` and their validation twins for each.
    derive: {"loss", "accuracy"} -> the same dict with the task's other metrics.
    check: config -> None; raises ``ConfigError`` on the task's own fields.
    report: (config, dense variables, final variables) -> lines printed at the
      end of the run and stored in the summary (``samples``), e.g. text samples.
  """

  name: str
  datasets: tuple[str, ...]
  models: tuple[str, ...]
  load: Callable[[ml_collections.ConfigDict], tuple[Any, Any]]
  model_options: Callable[[ml_collections.ConfigDict], ModelOptions]
  metrics: tuple[str, ...]
  derive: Callable[[dict[str, float]], dict[str, float]]
  check: Callable[[ml_collections.ConfigDict], None]
  report: Callable[..., dict[str, str]] | None = None

  @property
  def headline(self) -> str:
    """The metric the logs and the one-line summary lead with."""
    return self.metrics[0]


def model_size_option(config: ml_collections.ConfigDict) -> ModelOptions:
  """``(("size", config.model_size),)`` for configs that name a size (the transformers), else ()."""
  size = config.get("model_size")
  return (("size", size),) if size is not None else ()


def format_metric(name: str, value: float | None) -> str:
  """Accuracy as a percentage, anything else (bits per byte, a loss) with 4 decimals."""
  if value is None:
    return "n/a"
  return f"{100.0 * value:.2f}%" if name.endswith("accuracy") else f"{value:.4f}"

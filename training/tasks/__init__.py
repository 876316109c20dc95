"""Tasks: what the driver does not need to know about the data.

A task says how its data is loaded (batches of ``(inputs, targets)``), which
model keywords it implies, which metrics an evaluation reports and how, and
what the end-of-run report adds. The driver (``training.train_lib``), the
train and eval steps (``training.steps``: softmax cross-entropy over every
label of a batch, examples or text positions) and the stage registry
(``training.stages``) are the same for every task.

* ``image_classification`` (``training.tasks.image``): MNIST, Fashion-MNIST,
  CIFAR-10, ImageNet; reports accuracy.
* ``language_modelling`` (``training.tasks.text``): next-byte prediction on a
  byte-level corpus (Jane Austen's novels, or a UTF-8 text file); reports bits
  per byte (the loss in nats / ln 2) and next-byte accuracy.
"""

from __future__ import annotations

from training.tasks import image
from training.tasks import text
from training.tasks.base import Task

TASKS: dict[str, Task] = {task.name: task for task in (image.TASK, text.TASK)}
DATASETS: tuple[str, ...] = tuple(name for task in TASKS.values() for name in task.datasets)


def for_dataset(dataset: str) -> Task:
  """The task whose data ``dataset`` is (``config.dataset``)."""
  for task in TASKS.values():
    if dataset in task.datasets:
      return task
  raise ValueError(f"Unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


__all__ = ["DATASETS", "TASKS", "Task", "for_dataset"]

"""Flax NNX models for the GSM experiments and a name -> class registry.

The image models take NHWC float32 images and return logits ``[batch,
num_classes]``; ``gpt`` takes int32 tokens ``[batch, T]`` and returns logits
``[batch, T, num_classes]``. Transformer models (``gpt``, ``vit``) also name
their default GSM pool by key-path regexes (``pool_include``, ``pool_exclude``).
Models with batch norm are built in training mode (batch statistics, running
averages updated on every call); switch with ``model.eval()`` / ``model.train()``
(or ``nnx.view(model, use_running_average=True)`` for an eval view sharing the
same arrays).
"""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax

from models.densenet import DenseNet40
from models.gpt import GPT
from models.lenet import LeNet5
from models.lenet import LeNet300100
from models.resnet_cifar import ResNet56
from models.resnet_imagenet import ResNet50
from models.vit import ViT

MODELS: dict[str, type[nnx.Module]] = {
  "lenet_300_100": LeNet300100,
  "lenet5": LeNet5,
  "resnet56": ResNet56,
  "densenet40": DenseNet40,
  "resnet50": ResNet50,
  "gpt": GPT,
  "vit": ViT,
}


def create_model(name: str, *, num_classes: int = 10, rngs: nnx.Rngs, **kwargs: Any) -> nnx.Module:
  """Builds the model registered as ``name`` (see ``MODELS``).

  Extra keyword arguments (e.g. ``in_channels``) go to the model's
  constructor. Raises ``ValueError`` for an unknown name.
  """
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; allowed names: {', '.join(sorted(MODELS))}.")
  return MODELS[name](num_classes=num_classes, rngs=rngs, **kwargs)


def count_params(model: nnx.Module) -> int:
  """Number of scalars in the model's ``nnx.Param`` variables (kernels,
  biases, BN scale/bias); ``nnx.BatchStat`` running statistics excluded."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


__all__ = [
  "MODELS",
  "DenseNet40",
  "GPT",
  "LeNet300100",
  "LeNet5",
  "ResNet50",
  "ResNet56",
  "ViT",
  "count_params",
  "create_model",
]

"""The train state, the loss, the jitted train/eval steps, schedules and phases.

Data flows one way: a batch -> ``train_step(state, batch)`` (model, loss,
grads, ``tx.update(grads, opt_state, params)``) -> a new ``TrainState``. A
``Phase`` is an optimizer with the train step compiled for it; phases are
cached by their hyperparameters, so calling ``train_and_evaluate`` again in
one process (a resumed run, tests, a notebook) does not compile again.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
import functools
from typing import Any
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax

import gsm_optax
import models
from training import distributed


class TrainState(NamedTuple):
  """Everything that changes during training; a pytree of arrays.

  Attributes:
    step: optimizer steps taken so far, all phases together.
    params: the model's ``nnx.Param`` variables as a pure dict.
    batch_stats: the model's ``nnx.BatchStat`` variables as a pure dict.
    opt_state: the optimizer state of the current phase, momentum included.
    rng: key data derived from ``config.seed`` for stochastic layers. The
      current models have none and the data order is a function of (seed,
      epoch), so it stays constant; it is checkpointed so a model with dropout
      would still resume exactly.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  rng: jax.Array


def new_train_state(params: Any, batch_stats: Any, seed: int) -> TrainState:
  """The state before the first step (its ``opt_state`` is set by each phase)."""
  return TrainState(
    step=jnp.asarray(0, jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=(),
    rng=jax.random.key_data(jax.random.key(seed)),
  )


# ----------------------------------------------------------------------------
# Model


ModelOptions = tuple[tuple[str, Any], ...]  # hashable constructor keywords: (("size", "tiny"),)


def init_model(name: str, num_classes: int, seed: int, options: ModelOptions = ()):
  """(train graphdef, eval graphdef, params, batch_stats) of a freshly built model.

  The graphdefs come from the abstract model switched to training mode (batch
  statistics) and to eval mode (running averages); the variables are
  initialised in one jitted call (eager initialisation compiles every random
  op separately). ``options`` are the constructor's keywords (a task's
  ``model_options``).
  """
  abstract = nnx.eval_shape(lambda: _build_model(name, num_classes, 0, options))
  abstract.train()
  train_graphdef = nnx.graphdef(abstract)
  abstract.eval()
  eval_graphdef = nnx.graphdef(abstract)
  params, batch_stats = _init_variables(
    name, num_classes, jnp.asarray(seed, jnp.uint32), tuple(options)
  )
  return train_graphdef, eval_graphdef, params, batch_stats


def abstract_params(name: str, num_classes: int, options: ModelOptions = ()) -> Any:
  """The model's params as ``jax.ShapeDtypeStruct`` leaves: shapes without memory or compute."""
  abstract = nnx.eval_shape(lambda: _build_model(name, num_classes, 0, options))
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)


def _build_model(name: str, num_classes: int, seed, options: ModelOptions = ()) -> nnx.Module:
  rngs = nnx.Rngs(jax.random.key(seed))  # what nnx.Rngs(seed) does, for a traced seed too
  return models.create_model(name, num_classes=num_classes, rngs=rngs, **dict(options))


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def _init_variables(name: str, num_classes: int, seed: jax.Array, options: ModelOptions = ()):
  model = _build_model(name, num_classes, seed, options)
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)


# ----------------------------------------------------------------------------
# Loss and steps


def _per_label(mask: jax.Array, labels: jax.Array) -> jax.Array:
  """An example mask ``[batch]`` spread over the labels ``[batch, ...]`` (positions of a text)."""
  return jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (labels.ndim - mask.ndim)), labels.shape)


def cross_entropy_loss(
  logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
  """Mean softmax cross-entropy over the labels (every position of a text) where ``mask`` is true."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if mask is None:
    return losses.mean()
  mask = _per_label(mask, labels).astype(losses.dtype)
  return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _batch_metrics(logits: jax.Array, labels: jax.Array, loss: jax.Array, mask: jax.Array):
  """Totals of one batch; ``count`` counts labels (examples, or the bytes of text windows)."""
  mask = _per_label(mask, labels)
  count = jnp.sum(mask.astype(jnp.int32))
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) & mask)
  return {"loss_sum": loss * count, "correct": correct.astype(jnp.int32), "count": count}


COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype(config: Any) -> str | None:
  """``config.compute_dtype`` when it is not float32 (None: no casting at all), for the steps."""
  name = config.get("compute_dtype", "float32")
  return None if name == "float32" else name


def _cast_floats(tree: Any, dtype: str | None) -> Any:
  """The floating leaves of ``tree`` in ``dtype`` (None: ``tree`` itself)."""
  if dtype is None:
    return tree
  return jax.tree.map(
    lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree
  )


def forward(graphdef: nnx.GraphDef, params: Any, batch_stats: Any, inputs: Any, dtype=None):
  """(float32 logits, new batch stats) of the model on ``inputs``.

  Mixed precision (``dtype="bfloat16"``): the float32 master params and the
  floating inputs are cast to ``dtype`` for the forward (so the backward runs
  in it too, and the gradients come back in float32 through the cast); the
  batch statistics stay float32 and the logits are cast back to float32 for
  the loss. ``dtype=None`` casts nothing (float32 runs are unchanged bit for bit).
  """
  model = nnx.merge(graphdef, _cast_floats(params, dtype), batch_stats)
  logits = model(_cast_floats(inputs, dtype))
  new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  if dtype is None:
    return logits, new_stats
  new_stats = jax.tree.map(lambda new, old: new.astype(old.dtype), new_stats, batch_stats)
  return logits.astype(jnp.float32), new_stats


def make_train_step(
  graphdef: nnx.GraphDef, tx: optax.GradientTransformation, mesh=None, dtype: str | None = None
):
  """``train_step(state, batch) -> (state, metrics)``, jitted; ``graphdef`` in train mode.

  With a ``mesh`` the new state is pinned to ``distributed.state_shardings``
  (the batch comes in split over the devices; the gradient is its mean over the
  whole global batch, so every device computes the same update). ``dtype``:
  the compute dtype of the forward and backward (``forward``); the params, the
  gradients handed to ``tx``, its state and GSM's scores stay float32.
  """

  def train_step(state: TrainState, batch: tuple[jax.Array, jax.Array]):
    images, labels = batch

    def loss_fn(params):
      logits, batch_stats = forward(graphdef, params, state.batch_stats, images, dtype)
      return cross_entropy_loss(logits, labels), (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state._replace(
      step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    new_state = distributed.constrain(new_state, mesh)
    return new_state, _batch_metrics(logits, labels, loss, jnp.ones_like(labels, bool))

  return jax.jit(train_step)


@functools.lru_cache(maxsize=16)
def make_eval_step(graphdef: nnx.GraphDef, dtype: str | None = None):
  """``eval_step(params, batch_stats, (images, labels, mask)) -> metrics``, jitted; the
  forward in ``dtype`` (None: the params' float32) as in training."""

  def eval_step(params, batch_stats, batch):
    images, labels, mask = batch
    logits, _ = forward(graphdef, params, batch_stats, images, dtype)
    return _batch_metrics(logits, labels, cross_entropy_loss(logits, labels, mask), mask)

  return jax.jit(eval_step)


# ----------------------------------------------------------------------------
# Metric totals: summed on the device, read once per epoch.


@jax.jit
def accumulate(totals: dict[str, jax.Array], metrics: dict[str, jax.Array]):
  """Adds a batch's metrics to the running totals."""
  return jax.tree.map(jnp.add, totals, metrics)


def zero_totals() -> dict[str, Any]:
  """Totals before the first batch (host values, JSON-ready)."""
  return {"loss_sum": 0.0, "correct": 0, "count": 0}


def totals_to_device(totals: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Host totals as device scalars of fixed dtypes (one compiled ``accumulate``)."""
  return {
    "loss_sum": jnp.asarray(totals["loss_sum"], jnp.float32),
    "correct": jnp.asarray(totals["correct"], jnp.int32),
    "count": jnp.asarray(totals["count"], jnp.int32),
  }


def totals_to_host(totals: Mapping[str, jax.Array]) -> dict[str, Any]:
  """Device totals as Python numbers (checkpoint meta, logs)."""
  return {
    "loss_sum": float(totals["loss_sum"]),
    "correct": int(totals["correct"]),
    "count": int(totals["count"]),
  }


def means(totals: Mapping[str, Any]) -> tuple[float, float]:
  """(mean loss, accuracy) of host totals."""
  count = max(int(totals["count"]), 1)
  return float(totals["loss_sum"]) / count, int(totals["correct"]) / count


def evaluate(
  eval_step, params, batch_stats, dataset, batch_size: int, topology=None
) -> dict[str, float]:
  """Test loss and accuracy; the last partial batch is padded (masked) to one shape.

  With a ``topology`` every process reads its part of each batch and the
  batch is one global array split over the devices.
  """
  totals = totals_to_device(zero_totals())
  shard = (0, 1) if topology is None else (topology.process_index, topology.process_count)
  for batch in dataset.eval_batches(batch_size, shard=shard):
    if topology is not None:
      batch = distributed.global_batch(batch, topology)
    totals = accumulate(totals, eval_step(params, batch_stats, batch))
  loss, accuracy = means(totals_to_host(totals))
  return {"loss": loss, "accuracy": accuracy}


# ----------------------------------------------------------------------------
# Schedules and optimizers


def make_lr_schedule(
  learning_rate: float,
  boundaries: Sequence[float],
  decay_factor: float,
  steps_per_epoch: int,
  warmup_epochs: float = 0.0,
) -> optax.Schedule:
  """``learning_rate`` times ``decay_factor`` at each boundary (in epochs), over steps.

  With ``warmup_epochs > 0`` the rate first ramps up linearly, reaching
  ``learning_rate`` after ``warmup_epochs`` epochs.
  """
  piecewise = optax.piecewise_constant_schedule(
    learning_rate, {int(round(b * steps_per_epoch)): decay_factor for b in boundaries}
  )
  warmup_steps = int(round(warmup_epochs * steps_per_epoch))
  if warmup_steps <= 0:
    return piecewise

  def schedule(step):
    return piecewise(step) * jnp.minimum(1.0, (step + 1.0) / warmup_steps)

  return schedule


def section_schedule(cfg: Any, steps_per_epoch: int) -> optax.Schedule:
  """The learning-rate schedule of an optimizer config section.

  ``schedule="piecewise"`` (the default): ``make_lr_schedule`` (boundaries,
  decay factor, linear warm-up). ``"cosine"``: optax's linear warm-up from 0
  over ``warmup_epochs``, then cosine decay to 0 at the end of the section's
  ``epochs`` (``optax.warmup_cosine_decay_schedule``).
  """
  if cfg.get("schedule", "piecewise") == "cosine":
    total = max(int(cfg.epochs * steps_per_epoch), 1)
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, total, 0.0)
  return make_lr_schedule(
    cfg.learning_rate, cfg.boundaries, cfg.decay_factor, steps_per_epoch, cfg.warmup_epochs
  )


def pool_mask(params: Any) -> Any:
  """Where weight decay applies: every kernel (floating leaves with ndim >= 2), as a bool pytree."""
  return gsm_optax.resolve_pool(params, None)


def clipping(cfg: Any) -> list[optax.GradientTransformation]:
  """``[optax.clip_by_global_norm(clip_norm)]``, or nothing when ``cfg.clip_norm`` is 0 or absent."""
  clip_norm = cfg.get("clip_norm", 0.0)
  return [optax.clip_by_global_norm(clip_norm)] if clip_norm else []


def adamw(cfg: Any, learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
  """``optax.adamw`` with the section's b1, b2, eps and decoupled weight decay on the kernels."""
  return optax.adamw(
    learning_rate,
    b1=cfg.b1,
    b2=cfg.b2,
    eps=cfg.eps,
    weight_decay=cfg.weight_decay,
    mask=pool_mask,
  )


def optimizer(
  cfg: Any, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The plain optimizer of a config section: ``cfg.optimizer`` "sgd" or "adamw".

  "sgd": SGD with momentum, weight decay on the kernels only, as in the
  reference code (``add_decayed_weights`` then ``optax.sgd``). "adamw":
  ``optax.adamw`` (b1, b2, eps, decoupled weight decay on the kernels). Either
  way ``clip_norm > 0`` clips the gradient's global norm first.

  Returns:
    ``(tx, learning_rate_schedule)``.
  """
  lr = section_schedule(cfg, steps_per_epoch)
  if cfg.get("optimizer", "sgd") == "adamw":
    return optax.chain(*clipping(cfg), adamw(cfg, lr)), lr
  return optax.chain(
    *clipping(cfg),
    optax.add_decayed_weights(cfg.weight_decay, mask=pool_mask),
    optax.sgd(lr, momentum=cfg.momentum, nesterov=cfg.nesterov),
  ), lr


# ----------------------------------------------------------------------------
# Phases

OptimizerBuilder = Callable[..., tuple[optax.GradientTransformation, optax.Schedule]]


class Phase(NamedTuple):
  """One training phase: its optimizer and the functions compiled for it."""

  name: str
  tx: optax.GradientTransformation
  train_step: Callable  # jitted (state, batch) -> (state, metrics)
  learning_rate: Callable  # jitted schedule: phase step -> rate


def freeze(value: Any) -> Any:
  """A hashable copy of a config section / list / dict (for the phase cache)."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return tuple(sorted((key, freeze(item)) for key, item in value.items()))
  if isinstance(value, (list, tuple)):
    return tuple(freeze(item) for item in value)
  return value


def reads_epochs(cfg: Any) -> bool:
  """Whether a section's optimizer depends on its ``epochs``: a cosine schedule spans them,
  and GSM's passive shrink (``passive_rule="shrink"``) is set from the budget they give."""
  return cfg.get("schedule", "piecewise") == "cosine" or cfg.get("passive_rule") == "shrink"


def make_phase(
  name: str,
  build: OptimizerBuilder,
  cfg: Any,
  steps_per_epoch: int,
  graphdef: nnx.GraphDef,
  *extra: Any,
  mesh=None,
  dtype: str | None = None,
) -> Phase:
  """The phase ``name`` with the optimizer ``build(cfg, steps_per_epoch, *extra)``.

  ``build`` is a module-level function; ``extra`` holds hashable arguments.
  Built once per (builder, hyperparameters, steps per epoch, model graph,
  mesh); ``cfg.epochs`` enters the optimizer only where it reads them
  (``reads_epochs``).
  """
  frozen = freeze(cfg)
  if not reads_epochs(cfg):
    frozen = tuple(item for item in frozen if item[0] != "epochs")
  return _cached_phase(name, build, frozen, steps_per_epoch, graphdef, mesh, extra, dtype)


@functools.lru_cache(maxsize=32)
def _cached_phase(name, build, frozen_cfg, steps_per_epoch, graphdef, mesh, extra, dtype) -> Phase:
  cfg = ml_collections.ConfigDict(dict(frozen_cfg))
  tx, lr = build(cfg, steps_per_epoch, *extra)
  return Phase(name, tx, make_train_step(graphdef, tx, mesh, dtype), jax.jit(lr))

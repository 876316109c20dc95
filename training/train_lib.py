"""Dense training -> GSM training -> global magnitude cut -> evaluation.

``train_and_evaluate(config, workdir)`` is the whole program; ``train.py`` only
parses flags and calls it. The pieces, in the order data flows through them:

* data: ``training.data.load_dataset`` gives ``(images, labels)`` numpy batches,
  a pure function of ``(epoch, seed)``;
* model: ``models.create_model``, split by ``nnx.split`` into a graphdef (static)
  and pure-dict ``params`` / ``batch_stats`` held in a ``TrainState``;
* loss/grads: ``train_step(state, batch)`` and ``eval_step(params, batch_stats,
  batch)``, pure jitted functions around one ``cross_entropy_loss``;
* optimizer: dense = ``add_decayed_weights(wd, mask=pool)`` + ``sgd`` (the
  reference code decays kernels only); GSM = ``gsm_optax.gsm``; the update is
  always ``tx.update(grads, opt_state, params)``;
* cut and report: ``gsm_optax.prune`` then ``gsm_optax.sparsity_report``.

``config.method`` other than "gsm" (magnitude, gmp, admm, lottery) replaces the
GSM phase by the stages of ``training/methods.py``; the dense phase, the
checkpoints and the resume logic are shared.

Workdir layout: ``config.json``; ``checkpoints/<step>/`` (orbax; every epoch and
on Ctrl-C, the latest ``checkpoint_keep`` kept); ``initial_model/`` (theta_0,
written before dense training), ``dense_model/`` and ``final_model/`` (exported
variables; ``final_model`` is the pruned model);
``metrics.jsonl`` (one row per epoch); ``summary.json``; ``sparsity.png``;
``curves.png``.

Resuming: re-running with the same workdir restores the latest checkpoint (state
and the position in the data, down to the batch) and continues; the result is
bitwise the one of an uninterrupted run. A workdir's checkpoints may only be
resumed by the same config: every field must match except the ones in
``HARMLESS_FIELDS``, which do not change what is computed. In particular the
epoch counts must match too, since they move the dense/GSM boundary and the
data order of the GSM epochs.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
import contextlib
import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

import gsm_optax
import models
from training import checkpoints
from training import data
from training import plots

# Config fields that may differ between a workdir's checkpoint and the config
# resuming it: where the data comes from, the eval batching and the logging.
HARMLESS_FIELDS = frozenset(
  {
    "data_dir",
    "download",
    "eval_batch_size",
    "log_every_steps",
    "checkpoint_keep",
    "progress_bar",
    "plots",
  }
)

PHASES = ("dense", "gsm")


class ConfigError(ValueError):
  """A config (or a workdir's config) that cannot be trained; the message is one line."""


class TrainingInterrupted(KeyboardInterrupt):
  """Ctrl-C stopped training after a resumable checkpoint was written."""


class TrainState(NamedTuple):
  """Everything that changes during training; a pytree of arrays.

  Attributes:
      step: optimizer steps taken so far, both phases together.
      params: the model's ``nnx.Param`` variables as a pure dict.
      batch_stats: the model's ``nnx.BatchStat`` variables as a pure dict.
      opt_state: the optimizer state (dense SGD or GSM), momentum included.
      rng: key data derived from ``config.seed`` for stochastic layers. The
          current models have none and the data order is a function of
          (seed, epoch), so it stays constant; it is checkpointed so a model
          with dropout would still resume exactly.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  rng: jax.Array


# --------------------------------------------------------------------------- #
# Config checks
# --------------------------------------------------------------------------- #

_REQUIRED_FIELDS = (
  "model",
  "dataset",
  "data_dir",
  "download",
  "max_train_examples",
  "max_test_examples",
  "seed",
  "batch_size",
  "eval_batch_size",
  "log_every_steps",
  "checkpoint_keep",
  "progress_bar",
  "dense_checkpoint",
  "skip_dense",
  "skip_gsm",
  "dense.epochs",
  "dense.learning_rate",
  "dense.momentum",
  "dense.nesterov",
  "dense.weight_decay",
  "dense.boundaries",
  "dense.decay_factor",
  "dense.warmup_epochs",
  "gsm.epochs",
  "gsm.learning_rate",
  "gsm.momentum",
  "gsm.nesterov",
  "gsm.weight_decay",
  "gsm.boundaries",
  "gsm.decay_factor",
  "gsm.compression",
)


def _get(config: Any, dotted: str) -> Any:
  value = config
  for key in dotted.split("."):
    value = value[key]
  return value


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks a config before anything is loaded or trained.

  Raises:
      ConfigError: with a one-line message naming the field, the value and
          what is allowed.
  """
  missing = []
  for name in _REQUIRED_FIELDS:
    try:
      _get(config, name)
    except (KeyError, AttributeError):
      missing.append(name)
  if missing:
    raise ConfigError(f"config lacks the field(s) {', '.join(missing)}")

  if config.model not in models.MODELS:
    raise ConfigError(
      f"unknown model {config.model!r} (config.model); "
      f"choose one of {', '.join(sorted(models.MODELS))}"
    )
  if config.dataset not in data.DATASETS:
    raise ConfigError(
      f"unknown dataset {config.dataset!r} (config.dataset); "
      f"choose one of {', '.join(data.DATASETS)}"
    )
  compression = config.gsm.compression
  if not _is_number(compression) or not math.isfinite(compression) or compression < 1:
    raise ConfigError(
      f"config.gsm.compression must be a number >= 1 (pool size / weights kept), "
      f"got {compression!r}"
    )

  def check(name: str, ok: Callable[[Any], bool], allowed: str) -> None:
    value = _get(config, name)
    if not ok(value):
      raise ConfigError(f"config.{name} must be {allowed}, got {value!r}")

  positive_int = (lambda x: _is_int(x) and x > 0), "a positive integer"
  for name in ("batch_size", "eval_batch_size", "log_every_steps", "checkpoint_keep"):
    check(name, *positive_int)
  for name in ("seed", "dense.epochs", "gsm.epochs"):
    check(name, lambda x: _is_int(x) and x >= 0, "an integer >= 0")
  for name in ("max_train_examples", "max_test_examples"):
    check(name, lambda x: x is None or (_is_int(x) and x > 0), "None or a positive integer")
  for name in (
    "download",
    "skip_dense",
    "skip_gsm",
    "progress_bar",
    "dense.nesterov",
    "gsm.nesterov",
  ):
    check(name, lambda x: isinstance(x, bool), "True or False")
  for phase in PHASES:
    check(f"{phase}.learning_rate", lambda x: _is_number(x) and x > 0, "a number > 0")
    check(f"{phase}.momentum", lambda x: _is_number(x) and 0 <= x < 1, "in [0, 1)")
    check(f"{phase}.weight_decay", lambda x: _is_number(x) and x >= 0, "a number >= 0")
    check(f"{phase}.decay_factor", lambda x: _is_number(x) and x > 0, "a number > 0")
    check(
      f"{phase}.boundaries",
      lambda x: (
        isinstance(x, (list, tuple))
        and all(_is_number(b) and b > 0 for b in x)
        and all(a < b for a, b in zip(x, x[1:]))
      ),
      "a strictly increasing sequence of epochs > 0",
    )
  check("dense.warmup_epochs", lambda x: _is_number(x) and x >= 0, "a number >= 0")
  check("data_dir", lambda x: x is None or isinstance(x, str), "None or a directory")
  check("dense_checkpoint", lambda x: x is None or isinstance(x, str), "None or a directory")
  if config.dense_checkpoint:
    if config.skip_dense:
      raise ConfigError(
        "config.skip_dense and config.dense_checkpoint exclude each other: "
        "the dense phase is either skipped or loaded"
      )
    if not os.path.isdir(config.dense_checkpoint):
      raise ConfigError(
        f"config.dense_checkpoint={config.dense_checkpoint!r} is not a directory "
        "(give a dense_model/ directory or the workdir of an earlier run)"
      )
  from training import methods  # noqa: PLC0415  (methods imports this module)

  methods.validate_method_config(config)


def _flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten_config(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json())


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir whose checkpoints were written by a different config.

  Raises:
      ConfigError: one line listing the fields that differ (fields in
          ``HARMLESS_FIELDS`` may differ).
  """
  if not checkpoints.has_checkpoint(os.path.join(workdir, "checkpoints")):
    return
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ConfigError(
      f"workdir {workdir} holds checkpoints but no config.json; "
      "use a new --workdir or delete this one"
    )
  with open(path) as f:
    stored = _flatten_config(json.load(f))
  current = _flatten_config(_config_json(config))
  diffs = [
    f"{key}: {stored.get(key, '<absent>')!r} there, {current.get(key, '<absent>')!r} here"
    for key in sorted(set(stored) | set(current))
    if key.split(".")[-1] not in HARMLESS_FIELDS and stored.get(key) != current.get(key)
  ]
  if diffs:
    raise ConfigError(
      f"workdir {workdir} holds a checkpoint of a different config "
      f"({'; '.join(diffs)}); resume with the same config, or use a new --workdir"
    )


# --------------------------------------------------------------------------- #
# Model
# --------------------------------------------------------------------------- #


def init_model(name: str, num_classes: int, seed: int):
  """(train graphdef, eval graphdef, params, batch_stats) of a freshly built model.

  The graphdefs come from the abstract model switched to training mode (batch
  statistics) and to eval mode (running averages); the variables are
  initialised in one jitted call (eager initialisation compiles every random
  op separately).
  """
  abstract = nnx.eval_shape(lambda: _build_model(name, num_classes, 0))
  abstract.train()
  train_graphdef = nnx.graphdef(abstract)
  abstract.eval()
  eval_graphdef = nnx.graphdef(abstract)
  params, batch_stats = _init_variables(name, num_classes, jnp.asarray(seed, jnp.uint32))
  return train_graphdef, eval_graphdef, params, batch_stats


def _build_model(name: str, num_classes: int, seed) -> nnx.Module:
  rngs = nnx.Rngs(jax.random.key(seed))  # what nnx.Rngs(seed) does, for a traced seed too
  return models.create_model(name, num_classes=num_classes, rngs=rngs)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_variables(name: str, num_classes: int, seed: jax.Array):
  model = _build_model(name, num_classes, seed)
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)


def _fresh_arrays(tree: Any) -> Any:
  """Restored arrays, copied into uncommitted ones like those training creates.

  Orbax restores arrays committed to a device; the jitted steps, compiled for
  uncommitted arguments, would otherwise compile a second time.
  """
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), tree)


# --------------------------------------------------------------------------- #
# Loss, steps, optimizers
# --------------------------------------------------------------------------- #


def cross_entropy_loss(
  logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
  """Mean softmax cross-entropy over the examples where ``mask`` is true."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if mask is None:
    return losses.mean()
  mask = mask.astype(losses.dtype)
  return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _batch_metrics(logits: jax.Array, labels: jax.Array, loss: jax.Array, mask: jax.Array):
  count = jnp.sum(mask.astype(jnp.int32))
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) & mask)
  return {"loss_sum": loss * count, "correct": correct.astype(jnp.int32), "count": count}


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation):
  """``train_step(state, batch) -> (state, metrics)``, jitted; ``graphdef`` in train mode."""

  def train_step(state: TrainState, batch: tuple[jax.Array, jax.Array]):
    images, labels = batch

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.batch_stats)
      logits = model(images)
      batch_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
      return cross_entropy_loss(logits, labels), (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state._replace(
      step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, _batch_metrics(logits, labels, loss, jnp.ones_like(labels, bool))

  return jax.jit(train_step)


@functools.lru_cache(maxsize=16)
def make_eval_step(graphdef: nnx.GraphDef):
  """``eval_step(params, batch_stats, (images, labels, mask)) -> metrics``, jitted."""

  def eval_step(params, batch_stats, batch):
    images, labels, mask = batch
    logits = nnx.merge(graphdef, params, batch_stats)(images)
    return _batch_metrics(logits, labels, cross_entropy_loss(logits, labels, mask), mask)

  return jax.jit(eval_step)


@jax.jit
def _accumulate(totals: dict[str, jax.Array], metrics: dict[str, jax.Array]):
  return jax.tree.map(jnp.add, totals, metrics)


def _zero_totals() -> dict[str, Any]:
  return {"loss_sum": 0.0, "correct": 0, "count": 0}


def _to_device(totals: Mapping[str, Any]) -> dict[str, jax.Array]:
  return {
    "loss_sum": jnp.asarray(totals["loss_sum"], jnp.float32),
    "correct": jnp.asarray(totals["correct"], jnp.int32),
    "count": jnp.asarray(totals["count"], jnp.int32),
  }


def _to_host(totals: Mapping[str, jax.Array]) -> dict[str, Any]:
  return {
    "loss_sum": float(totals["loss_sum"]),
    "correct": int(totals["correct"]),
    "count": int(totals["count"]),
  }


def _means(totals: Mapping[str, Any]) -> tuple[float, float]:
  count = max(int(totals["count"]), 1)
  return float(totals["loss_sum"]) / count, int(totals["correct"]) / count


def evaluate(eval_step, params, batch_stats, dataset: data.Dataset, batch_size: int):
  """Test loss and accuracy; the last partial batch is padded (masked) to one shape."""
  totals = _to_device(_zero_totals())
  for images, labels in dataset.test_batches(batch_size):
    n = len(labels)
    mask = np.arange(batch_size) < n
    if n < batch_size:
      pad = batch_size - n
      images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
      labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
    totals = _accumulate(totals, eval_step(params, batch_stats, (images, labels, mask)))
  loss, accuracy = _means(_to_host(totals))
  return {"loss": loss, "accuracy": accuracy}


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


def _pool_mask(params) -> Any:
  return gsm_optax.resolve_pool(params, None)


def make_dense_optimizer(cfg, steps_per_epoch: int):
  """SGD with momentum; weight decay on the pool (kernels) only, as in the reference code.

  Returns:
      ``(tx, learning_rate_schedule)``.
  """
  lr = make_lr_schedule(
    cfg.learning_rate, cfg.boundaries, cfg.decay_factor, steps_per_epoch, cfg.warmup_epochs
  )
  tx = optax.chain(
    optax.add_decayed_weights(cfg.weight_decay, mask=_pool_mask),
    optax.sgd(lr, momentum=cfg.momentum, nesterov=cfg.nesterov),
  )
  return tx, lr


def make_gsm_optimizer(cfg, steps_per_epoch: int):
  """``gsm_optax.gsm`` with a piecewise-constant learning rate.

  Returns:
      ``(tx, learning_rate_schedule)``.
  """
  lr = make_lr_schedule(cfg.learning_rate, cfg.boundaries, cfg.decay_factor, steps_per_epoch)
  tx = gsm_optax.gsm(
    lr,
    cfg.compression,
    momentum=cfg.momentum,
    weight_decay=cfg.weight_decay,
    nesterov=cfg.nesterov,
  )
  return tx, lr


class Phase(NamedTuple):
  """One training phase: its optimizer and the functions compiled for it."""

  name: str  # "dense" or "gsm"
  tx: optax.GradientTransformation
  train_step: Callable  # jitted (state, batch) -> (state, metrics)
  learning_rate: Callable  # jitted schedule: phase step -> rate


def make_phase(name: str, cfg, steps_per_epoch: int, graphdef: nnx.GraphDef) -> Phase:
  """The optimizer and jitted train step of phase ``name`` with hyperparameters ``cfg``.

  Built once per (hyperparameters, steps per epoch, model graph) and reused, so
  calling ``train_and_evaluate`` again (a resumed run, tests, a notebook) does
  not compile again. ``cfg.epochs`` does not enter the optimizer.
  """
  frozen = tuple(
    sorted(
      (key, tuple(value) if isinstance(value, (list, tuple)) else value)
      for key, value in cfg.to_dict().items()
      if key != "epochs"
    )
  )
  return _make_phase(name, frozen, steps_per_epoch, graphdef)


@functools.lru_cache(maxsize=16)
def _make_phase(name, frozen_cfg, steps_per_epoch, graphdef) -> Phase:
  cfg = ml_collections.ConfigDict(dict(frozen_cfg))
  make = {"dense": make_dense_optimizer, "gsm": make_gsm_optimizer}[name]
  tx, lr = make(cfg, steps_per_epoch)
  return Phase(name, tx, make_train_step(graphdef, tx), jax.jit(lr))


def pool_magnitudes_at_cut(params, compression: float) -> tuple[float, float]:
  """(largest passive |w|, smallest kept |w|) over the pool, for Q = int(|pool| / C).

  The largest passive |w| is the (Q+1)-th largest, the most the final cut can
  remove from one weight; the smallest kept one is the Q-th largest.
  """
  keep = gsm_optax.keep_count(params, compression)
  return tuple(float(x) for x in _magnitudes_at_rank(params, keep))


@functools.partial(jax.jit, static_argnums=1)
def _magnitudes_at_rank(params, keep: int) -> tuple[jax.Array, jax.Array]:
  mask = gsm_optax.resolve_pool(params, None)
  pooled = [jnp.abs(p) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m]
  size = sum(leaf.size for leaf in pooled)
  largest_passive = gsm_optax.global_kth_largest(pooled, keep + 1) if keep < size else jnp.zeros(())
  return largest_passive, gsm_optax.global_kth_largest(pooled, keep)


@functools.partial(jax.jit, static_argnums=1)
def _prune(params, compression: float):
  return gsm_optax.prune(params, compression)


# --------------------------------------------------------------------------- #
# Ctrl-C
# --------------------------------------------------------------------------- #


class _StopRequest:
  """The first Ctrl-C asks the loop to stop at the next batch; a second one aborts."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True
    tqdm.write("Ctrl-C: saving a checkpoint after this batch (press again to abort)")

  @contextlib.contextmanager
  def installed(self) -> Iterator[_StopRequest]:
    if threading.current_thread() is not threading.main_thread():
      yield self  # Signals only reach the main thread; nothing to install.
      return
    self._previous = signal.signal(signal.SIGINT, self._handle)
    try:
      yield self
    finally:
      signal.signal(signal.SIGINT, self._previous)


# --------------------------------------------------------------------------- #
# The run
# --------------------------------------------------------------------------- #


class _Run:
  """What the phases share: config, data, model graph, checkpoints, the JSON meta."""

  def __init__(self, config, workdir, dataset, train_graphdef, eval_graphdef, stop):
    self.config = config
    self.workdir = workdir
    self.dataset = dataset
    self.train_graphdef = train_graphdef
    self.eval_step = make_eval_step(eval_graphdef)
    self.stop = stop
    self.steps_per_epoch = dataset.steps_per_epoch(config.batch_size)
    self.checkpointer = checkpoints.Checkpointer(
      os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint_keep
    )
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    self.meta: dict[str, Any] = {}

  def evaluate(self, state: TrainState, params=None) -> dict[str, float]:
    params = state.params if params is None else params
    return evaluate(
      self.eval_step, params, state.batch_stats, self.dataset, self.config.eval_batch_size
    )

  def save(self, state: TrainState) -> int:
    step = int(state.step)
    self.checkpointer.save(step, state, self.meta)
    return step

  def position(self) -> str:
    """Where training stands, from the meta: "gsm epoch 3, batch 17/234"."""
    meta = self.meta
    if meta["batch"]:
      return (
        f"{meta['phase']} epoch {meta['epoch'] + 1}, batch {meta['batch']}/{self.steps_per_epoch}"
      )
    return f"end of {meta['phase']} epoch {meta['epoch']}"

  def interrupted(self, state: TrainState) -> TrainingInterrupted:
    step = self.save(state)
    return TrainingInterrupted(
      f"interrupted: checkpoint of step {step} ({self.position()}) saved in "
      f"{self.workdir}; run the same command again to resume"
    )

  def write_metrics_file(self) -> None:
    with open(self.metrics_path, "w") as f:
      for row in self.meta["history"]:
        f.write(json.dumps(row) + "\n")

  def append_metrics(self, row: Mapping[str, Any]) -> None:
    with open(self.metrics_path, "a") as f:
      f.write(json.dumps(row) + "\n")


def _new_meta() -> dict[str, Any]:
  return {
    "phase": "dense",  # the phase the state belongs to
    "epoch": 0,  # epochs of that phase completed
    "batch": 0,  # batches of the next epoch already applied (after Ctrl-C)
    "partial": _zero_totals(),  # their train metrics
    "phase_start_step": 0,  # state.step when the phase began
    "epoch_offset": 0,  # epochs of earlier phases (numbering and data order)
    "history": [],  # one row per epoch, as in metrics.jsonl
    "wall_time_s": {"dense": 0.0, "gsm": 0.0},
    "dense_source": None,  # "trained", "checkpoint:<path>" or "skipped"
    "dense_accuracy": None,
  }


def _gsm_stats(state: TrainState) -> dict[str, float]:
  stats = gsm_optax.gsm_stats(state.opt_state)
  return {key: float(value) for key, value in stats.items()}


def _train_phase(run: _Run, state: TrainState, phase: Phase, num_epochs: int) -> TrainState:
  """Trains ``phase`` from the position saved in ``run.meta`` to ``num_epochs`` epochs."""
  config, meta = run.config, run.meta
  assert meta["phase"] == phase.name
  steps = run.steps_per_epoch
  while meta["epoch"] < num_epochs:
    epoch = meta["epoch"]
    start = time.perf_counter()
    totals = _to_device(meta["partial"])
    done = meta["batch"]
    batches = run.dataset.train_batches(
      config.batch_size, epoch=meta["epoch_offset"] + epoch, seed=config.seed
    )
    bar = tqdm(
      total=steps,
      initial=done,
      desc=f"{phase.name} {epoch + 1}/{num_epochs}",
      disable=not config.progress_bar,
      dynamic_ncols=True,
      leave=True,
    )

    def show(totals, state):
      loss, acc = _means(_to_host(totals))
      postfix = {"loss": f"{loss:.4f}", "acc": f"{acc:.4f}"}
      if phase.name == "gsm":
        stats = _gsm_stats(state)
        postfix["active"] = int(stats["num_active"])
        postfix["thresh"] = f"{stats['threshold']:.3g}"
      bar.set_postfix(postfix, refresh=False)

    # Batches before `done` were applied before an interruption: skip them.
    for i, batch in enumerate(batches):
      if i < done:
        continue
      state, metrics = phase.train_step(state, batch)
      totals = _accumulate(totals, metrics)
      done = i + 1
      bar.update(1)
      if done % config.log_every_steps == 0:
        show(totals, state)
      if run.stop.requested and done < steps:
        bar.close()
        meta.update(batch=done, partial=_to_host(totals))
        meta["wall_time_s"][phase.name] += time.perf_counter() - start
        raise run.interrupted(state)
    show(totals, state)
    bar.close()

    train_loss, train_acc = _means(_to_host(totals))
    test = run.evaluate(state)
    phase_step = int(state.step) - meta["phase_start_step"]
    meta["wall_time_s"][phase.name] += time.perf_counter() - start
    row = {
      "phase": phase.name,
      "epoch": meta["epoch_offset"] + epoch + 1,
      "phase_epoch": epoch + 1,
      "step": int(state.step),
      "learning_rate": float(phase.learning_rate(max(phase_step - 1, 0))),
      "train_loss": train_loss,
      "train_accuracy": train_acc,
      "test_loss": test["loss"],
      "test_accuracy": test["accuracy"],
    }
    if phase.name == "gsm":
      stats = _gsm_stats(state)
      row.update(
        active_weights=int(stats["num_active"]),
        keep=int(stats["keep"]),
        threshold=stats["threshold"],
        largest_passive_abs_weight=pool_magnitudes_at_cut(state.params, config.gsm.compression)[0],
      )
    row["wall_time_s"] = meta["wall_time_s"][phase.name]
    meta["history"].append(row)
    meta.update(epoch=epoch + 1, batch=0, partial=_zero_totals())
    run.save(state)
    run.append_metrics(row)
    _log(
      "%s epoch %d/%d: train loss %.4f acc %.4f, test acc %.4f, lr %.3g%s",
      phase.name,
      epoch + 1,
      num_epochs,
      train_loss,
      train_acc,
      test["accuracy"],
      row["learning_rate"],
      f", active {row['active_weights']}, largest passive |w| "
      f"{row['largest_passive_abs_weight']:.3g}"
      if phase.name == "gsm"
      else "",
    )
    if run.stop.requested:
      raise run.interrupted(state)
  return state


def _dense_model_dir(path: str) -> str:
  """A dense_checkpoint may name the exported model or the workdir holding it."""
  inner = os.path.join(path, "dense_model")
  return inner if os.path.isdir(inner) else path


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) dense training, GSM training, the cut and the evaluation.

  Args:
      config: see ``configs/default.py`` for the fields.
      workdir: where checkpoints and outputs go; re-running with the same
          workdir resumes.

  Returns:
      The summary, also written to ``workdir/summary.json``.

  Raises:
      ConfigError: an invalid config, or a workdir of another config.
      data.DataNotFoundError: the dataset is nowhere to be found.
      TrainingInterrupted: Ctrl-C; a resumable checkpoint was saved first.
  """
  run_start = time.perf_counter()
  validate_config(config)
  dataset = data.load_dataset(
    config.dataset,
    data_dir=config.data_dir,
    max_train_examples=config.max_train_examples,
    max_test_examples=config.max_test_examples,
    download=config.download,
  )
  if dataset.steps_per_epoch(config.batch_size) < 1:
    raise ConfigError(
      f"config.batch_size={config.batch_size} exceeds the {dataset.num_train} "
      f"training examples of {dataset.name} ({dataset.source})"
    )
  check_workdir(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, "config.json"), _config_json(config))
  _log(
    "data: %s from %s (%d train, %d test)",
    dataset.name,
    dataset.source,
    dataset.num_train,
    dataset.num_test,
  )

  train_graphdef, eval_graphdef, params, batch_stats = init_model(
    config.model, dataset.num_classes, config.seed
  )

  from training import methods  # noqa: PLC0415  (methods imports this module)

  gsm_path = methods.method_of(config) == "gsm"
  with _StopRequest().installed() as stop:
    run = _Run(config, workdir, dataset, train_graphdef, eval_graphdef, stop)
    try:
      if gsm_path:
        state = _run_phases(run, params, batch_stats)
      else:
        state = methods.run_stages(run, params, batch_stats)
    finally:
      run.checkpointer.close()
    if gsm_path:
      summary = _cut_and_report(run, state, run_start)
    else:
      summary = methods.report(run, state, run_start)
  return summary


def _run_phases(run: _Run, params, batch_stats) -> TrainState:
  config = run.config
  dense = make_phase("dense", config.dense, run.steps_per_epoch, run.train_graphdef)
  gsm = make_phase("gsm", config.gsm, run.steps_per_epoch, run.train_graphdef)
  state = TrainState(
    step=jnp.asarray(0, jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=dense.tx.init(params),
    rng=jax.random.key_data(jax.random.key(config.seed)),
  )

  latest = run.checkpointer.latest_step()
  if latest is None:
    run.meta = _new_meta()
  else:
    run.meta = run.checkpointer.restore_meta(latest)
    if run.meta["phase"] == "gsm":
      state = state._replace(opt_state=gsm.tx.init(params))
    state = _fresh_arrays(run.checkpointer.restore_state(state, latest))
    _log("resumed from the checkpoint of step %d (%s)", latest, run.position())
  run.write_metrics_file()
  meta = run.meta

  if meta["phase"] == "dense":
    state = finish_dense_phase(run, state, dense)
    meta.update(
      phase="gsm",
      epoch=0,
      batch=0,
      partial=_zero_totals(),
      phase_start_step=int(state.step),
      epoch_offset=len(meta["history"]),
    )
    state = state._replace(opt_state=gsm.tx.init(state.params))

  if not config.skip_gsm:
    state = _train_phase(run, state, gsm, config.gsm.epochs)
  return state


def finish_dense_phase(run: _Run, state: TrainState, dense: Phase) -> TrainState:
  """Trains (or loads, or skips) the dense model and exports it to ``dense_model/``.

  Before dense training starts, the initial weights theta_0 are exported to
  ``initial_model/`` (the lottery-ticket protocol needs them). Sets
  ``run.meta["dense_source"]`` and ``run.meta["dense_accuracy"]``.
  """
  config, meta = run.config, run.meta
  if config.dense_checkpoint:
    path = _dense_model_dir(config.dense_checkpoint)
    variables = _fresh_arrays(
      checkpoints.load_model(path, {"params": state.params, "batch_stats": state.batch_stats})
    )
    state = state._replace(params=variables["params"], batch_stats=variables["batch_stats"])
    meta["dense_source"] = f"checkpoint:{os.path.abspath(path)}"
  elif config.skip_dense:
    meta["dense_source"] = "skipped"
  else:
    initial_dir = os.path.join(run.workdir, "initial_model")
    if meta["epoch"] == 0 and meta["batch"] == 0 and not os.path.isdir(initial_dir):
      checkpoints.save_model(
        initial_dir, {"params": state.params, "batch_stats": state.batch_stats}
      )
    state = _train_phase(run, state, dense, config.dense.epochs)
    meta["dense_source"] = "trained"
  history = meta["history"]
  if history and history[-1]["phase"] == "dense":
    meta["dense_accuracy"] = history[-1]["test_accuracy"]
  else:
    meta["dense_accuracy"] = run.evaluate(state)["accuracy"]
  checkpoints.save_model(
    os.path.join(run.workdir, "dense_model"),
    {"params": state.params, "batch_stats": state.batch_stats},
  )
  _log("dense model (%s): test accuracy %.4f", meta["dense_source"], meta["dense_accuracy"])
  return state


def summary_header(run: _Run) -> dict[str, Any]:
  """The fields every summary.json starts with: model and data."""
  return {
    "model": run.config.model,
    "dataset": run.config.dataset,
    "data_source": run.dataset.source,
    "num_train": run.dataset.num_train,
    "num_test": run.dataset.num_test,
  }


def _cut_and_report(run: _Run, state: TrainState, run_start: float) -> dict[str, Any]:
  config, meta, workdir = run.config, run.meta, run.workdir
  compression = config.gsm.compression
  start = time.perf_counter()
  before = run.evaluate(state)
  largest_passive, smallest_kept = pool_magnitudes_at_cut(state.params, compression)
  pruned = _prune(state.params, float(compression))
  after = run.evaluate(state, pruned)
  report = gsm_optax.sparsity_report(pruned)
  checkpoints.save_model(
    os.path.join(workdir, "final_model"), {"params": pruned, "batch_stats": state.batch_stats}
  )
  cut_time = time.perf_counter() - start

  summary = {
    **summary_header(run),
    "dense_epochs": sum(1 for row in meta["history"] if row["phase"] == "dense"),
    "gsm_epochs": sum(1 for row in meta["history"] if row["phase"] == "gsm"),
    "dense_source": meta["dense_source"],
    "method": "gsm",
    "epochs": {
      phase: sum(1 for row in meta["history"] if row["phase"] == phase) for phase in PHASES
    },
    "dense_accuracy": meta["dense_accuracy"],
    "accuracy_after_prune": after["accuracy"],
    "accuracy_final": after["accuracy"],
    "accuracy_before_cut": before["accuracy"],
    "accuracy_after_cut": after["accuracy"],
    "cut_cost_points": 100.0 * (before["accuracy"] - after["accuracy"]),
    "loss_before_cut": before["loss"],
    "loss_after_cut": after["loss"],
    "compression_target": float(compression),
    "pool_size": int(report.total_size),
    "keep": gsm_optax.keep_count(state.params, compression),
    "nonzeros_after_cut": int(report.total_nonzeros),
    "compression_reached": float(report.total_size) / max(int(report.total_nonzeros), 1),
    "largest_passive_abs_weight_before_cut": largest_passive,
    "smallest_kept_abs_weight_before_cut": smallest_kept,
    "layers": report.to_dict()["leaves"],
    "wall_time_s": {
      "dense": meta["wall_time_s"]["dense"],
      "gsm": meta["wall_time_s"]["gsm"],
      "cut_and_eval": cut_time,
      "this_invocation": time.perf_counter() - run_start,
    },
  }
  _write_json(os.path.join(workdir, "summary.json"), summary)
  if config.get("plots", True):
    title = f"{config.model} on {config.dataset}, C={compression:g}"
    plots.plot_sparsity(summary["layers"], os.path.join(workdir, "sparsity.png"), title=title)
    plots.plot_curves(
      meta["history"],
      os.path.join(workdir, "curves.png"),
      accuracy_after_cut=after["accuracy"],
      title=title,
    )
  print(report)
  print(
    f"dense {_pct(meta['dense_accuracy'])} -> before the cut {_pct(before['accuracy'])} "
    f"-> after the cut {_pct(after['accuracy'])}; "
    f"compression {summary['compression_reached']:.1f}x "
    f"({summary['nonzeros_after_cut']:,} of {summary['pool_size']:,} pooled weights); "
    f"largest passive |w| before the cut {largest_passive:.3g} "
    f"(smallest kept {smallest_kept:.3g})"
  )
  return summary


def _log(fmt: str, *args: Any) -> None:
  """One progress line on stdout, without breaking the tqdm bars on stderr."""
  tqdm.write(fmt % args if args else fmt)


def _pct(x: float | None) -> str:
  return "n/a" if x is None else f"{100.0 * x:.2f}%"

"""The driver: dense phase -> the method's stages -> the final report, resumable.

``train_and_evaluate(config, workdir)`` is the whole program; ``train.py`` only
parses flags and calls it. The pieces, in the order data flows through them:

* data: the task of ``config.dataset`` (``training.tasks``: image
  classification or language modelling) loads it; its batches are
  ``(inputs, targets)`` numpy arrays, a pure function of ``(epoch, seed)``;
* model, loss, steps, optimizers: ``training.steps``;
* the method (GSM, a baseline, or none) as stages: ``training.stages``;
* the summary, the final model and the plots: ``training.report``.

Workdir layout: ``config_fingerprint`` (the identity of the config that started
it, written first); ``config.json``; ``checkpoints/<step>/`` (orbax; every epoch
and on Ctrl-C, the latest ``checkpoint_keep`` kept); ``initial_model/``
(theta_0, written before dense training), ``dense_model/`` and
``final_model/`` (exported variables; ``final_model`` is the pruned model);
``metrics.jsonl`` (one row per epoch); ``summary.json``; ``sparsity.png``;
``curves.png``. docs/TRAINING.md documents them.

Resuming: re-running with the same workdir restores the latest checkpoint (the
state and the position in the data, down to the batch) and continues; the
result is bitwise the one of an uninterrupted run. A workdir may only be
resumed by the config that started it, up to ``config.HARMLESS_FIELDS``.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
import contextlib
import dataclasses
import fcntl
import functools
import itertools
import math
import os
import re
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
from tqdm import tqdm

import models
from training import checkpoints
from training import config as config_lib
from training import device_data
from training import distributed
from training import report
from training import stages as stages_lib
from training import steps
from training import strict_json
from training import tasks as tasks_lib
from training import tensorboard
from training.config import ConfigError
from training.steps import TrainState

__all__ = [
  "ConfigError",
  "TrainingDiverged",
  "TrainingInterrupted",
  "train_and_evaluate",
  "validate_config",
]


class TrainingInterrupted(KeyboardInterrupt):
  """SIGINT or SIGTERM stopped the run; the latest checkpoint holds all training.

  ``train.py`` exits with ``128 + signum`` (130 for Ctrl-C, 143 for SIGTERM).
  """

  def __init__(self, message: str, signum: int = signal.SIGINT):
    super().__init__(message)
    self.signum = int(signum)


class TrainingDiverged(RuntimeError):
  """The loss or the GSM scores became non-finite; nothing after the last good checkpoint was saved.

  ``train.py`` exits with code 3.
  """


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every field the run reads, before anything is loaded or trained.

  Raises:
    ConfigError: with a one-line message naming the field, the value and
      what is allowed.
  """
  config_lib.validate_common(
    config, models=models.MODELS, datasets=tasks_lib.DATASETS, methods=stages_lib.METHODS
  )
  task = tasks_lib.for_dataset(config.dataset)
  if config.model not in task.models:
    raise ConfigError(
      f"config.model={config.model!r} does not take the inputs of {config.dataset!r} "
      f"({task.name}); choose one of {', '.join(task.models)}"
    )
  task.check(config)
  if "compute_dtype" in config:
    config_lib.check(
      config, "compute_dtype", lambda x: x in steps.COMPUTE_DTYPES, "'float32' or 'bfloat16'"
    )
  stages_lib.check_pool_fields(config)
  stages_lib.METHODS[config.method].check(config)


# ----------------------------------------------------------------------------
# Progress: where the run stands, saved as each checkpoint's JSON meta.


@dataclasses.dataclass
class Progress:
  """Where training stands; JSON-ready, saved with every checkpoint.

  Attributes:
    phase: the phase the state belongs to ("dense" or a stage's name).
    epoch: epochs of that phase completed.
    batch: batches of the next epoch already applied (after Ctrl-C).
    partial: their train metric totals.
    phase_start_step: ``state.step`` when the phase began.
    epoch_offset: epochs of earlier phases (numbering and data order).
    history: one row per epoch, as in metrics.jsonl.
    wall_time_s: seconds spent per phase.
    dense_source: "trained", "checkpoint:<path>" or "skipped".
    dense_metrics: the task's metrics of the dense model on the test split
      ({"accuracy": ...}; for text also "bits_per_byte").
    dense_validation_metrics: the same on the validation split (None without one).
    results: what the stages' transitions recorded.
  """

  phase: str = "dense"
  epoch: int = 0
  batch: int = 0
  partial: dict[str, Any] = dataclasses.field(default_factory=steps.zero_totals)
  phase_start_step: int = 0
  epoch_offset: int = 0
  history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  wall_time_s: dict[str, float] = dataclasses.field(default_factory=lambda: {"dense": 0.0})
  dense_source: str | None = None
  dense_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
  dense_validation_metrics: dict[str, float] | None = None
  results: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, meta: dict[str, Any]) -> Progress:
    meta = dict(meta)
    if "dense_accuracy" in meta:  # checkpoints written before tasks: accuracy only
      accuracy, validation = meta.pop("dense_accuracy"), meta.pop("dense_validation_accuracy", None)
      meta["dense_metrics"] = {} if accuracy is None else {"accuracy": accuracy}
      meta["dense_validation_metrics"] = None if validation is None else {"accuracy": validation}
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in meta.items() if key in names})

  def start_phase(self, name: str, step: int) -> None:
    """Moves to the first epoch of phase ``name``, starting at ``step``."""
    self.phase, self.epoch, self.batch = name, 0, 0
    self.partial = steps.zero_totals()
    self.phase_start_step = step
    self.epoch_offset = len(self.history)
    self.wall_time_s.setdefault(name, 0.0)

  def position(self, steps_per_epoch: int) -> str:
    """Where training stands: "gsm epoch 3, batch 17/234"."""
    if self.batch:
      return f"{self.phase} epoch {self.epoch + 1}, batch {self.batch}/{steps_per_epoch}"
    return f"end of {self.phase} epoch {self.epoch}"


# ----------------------------------------------------------------------------
# Ctrl-C


_SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class _StopRequest:
  """SIGINT (Ctrl-C) and SIGTERM (what schedulers send before they kill a job).

  Inside the batch loop the first signal asks the loop to stop after the
  current step, which is then checkpointed. Anywhere else (loading the data,
  building the model, restoring, a stage's transition, the final cut and
  report) nothing is lost by stopping at once: the latest checkpoint already
  holds all training, so the signal raises ``TrainingInterrupted`` right away,
  saying which checkpoints the workdir holds. A second signal aborts.
  """

  def __init__(self, workdir: str = ""):
    self.signum: int | None = None
    self.in_loop = False
    self.where = "while starting"
    self.latest_step: int | None = None
    self.workdir = workdir
    self._previous: dict[int, Any] = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def at(self, where: str) -> None:
    """Names the step the run enters ("while building the model"); a pending signal stops it.

    The handler raises at once, but a handler that runs inside a garbage
    collector callback or a ``__del__`` has its exception swallowed: the next
    step raises it again.
    """
    self.where = where
    if self.signum is not None and not self.in_loop:
      raise TrainingInterrupted(self.outside_loop_message(), self.signum)

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:
      raise KeyboardInterrupt
    self.signum = signum
    if not self.in_loop:
      raise TrainingInterrupted(self.outside_loop_message(), signum)
    tqdm.write(
      f"{_SIGNAL_NAMES.get(signum, signum)}: saving a checkpoint after this step "
      "(send it again to abort)"
    )

  def outside_loop_message(self) -> str:
    """Where the signal came and what the workdir holds (before the restore: its checkpoints)."""
    if self.latest_step is not None:
      return (
        f"interrupted {self.where}; nothing is lost: the checkpoint of step {self.latest_step} "
        "holds all training so far; run the same command again to resume"
      )
    found = checkpoints.committed_steps(os.path.join(self.workdir, "checkpoints"))
    if not found:
      return f"interrupted {self.where}; no checkpoint yet: run the same command again to start"
    which = (
      f"checkpoints of steps {_listed(found)} are"
      if found[1:]
      else f"checkpoint of step {found[0]} is"
    )
    return (
      f"interrupted {self.where}; nothing is lost: the {which} intact; run the same command "
      "again to resume"
    )

  @contextlib.contextmanager
  def installed(self) -> Iterator[_StopRequest]:
    if threading.current_thread() is not threading.main_thread():
      yield self  # Signals only reach the main thread; nothing to install.
      return
    for signum in _SIGNAL_NAMES:
      self._previous[signum] = signal.signal(signum, self._handle)
    try:
      yield self
    finally:
      for signum, previous in self._previous.items():
        signal.signal(signum, previous)


def _listed(found: list[int]) -> str:
  """The steps as "8, 16, 24", or as "8, 16, ..., 96 (12 in all)" when there are many."""
  if len(found) <= 5:
    return ", ".join(map(str, found))
  return f"{found[0]}, {found[1]}, ..., {found[-1]} ({len(found)} in all)"


# ----------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class _Run:
  """What every phase of one invocation shares."""

  config: ml_collections.ConfigDict
  workdir: str
  task: tasks_lib.Task
  dataset: Any
  train_graphdef: Any
  eval_step: Callable
  stop: _StopRequest
  checkpointer: checkpoints.Checkpointer
  topology: distributed.Topology
  writer: tensorboard.MetricsWriter
  progress: Progress = dataclasses.field(default_factory=Progress)
  train_set: device_data.TrainSet | None = None
  validation: Any = None

  @property
  def eval_batch_size(self) -> int:
    """``config.eval_batch_size`` rounded up to a multiple of the devices (padding is masked)."""
    devices = self.topology.num_devices
    return -(-self.config.eval_batch_size // devices) * devices

  @property
  def shard(self) -> tuple[int, int]:
    return (self.topology.process_index, self.topology.process_count)

  def place(self, tree: Any) -> Any:
    """``tree`` on the mesh with the state's shardings."""
    return distributed.place(tree, self.topology.mesh)

  @property
  def steps_per_epoch(self) -> int:
    return self.dataset.steps_per_epoch(self.config.batch_size)

  def upload_train_set(self) -> None:
    """Puts the training set on the devices once, if its batches can be drawn there."""
    if self.train_set is None and device_data.can_draw(self.dataset):
      self.train_set = device_data.upload(self.dataset, self.topology)

  def batch_steps(
    self, phase: steps.Phase, epoch: int, start: int, state: TrainState
  ) -> Iterator[Callable]:
    """``step(state) -> (state, metrics)`` for batches ``start, ...`` of data epoch ``epoch``.

    Drawn on the device once ``upload_train_set`` has put the training set
    there, else numpy batches read on the host and put on the mesh one at a time.
    """
    if self.train_set is None:
      return self._host_batch_steps(phase, epoch, start)
    order = device_data.epoch_order(
      self.dataset,
      self.config.batch_size,
      epoch=epoch,
      seed=self.config.seed,
      start=start,
      step=int(state.step),
      topology=self.topology,
    )
    draw = device_data.drawing(phase.train_step, self.topology.mesh)
    step = functools.partial(draw, train_set=self.train_set, order=order)
    return itertools.repeat(step, self.steps_per_epoch - start)

  def _host_batch_steps(self, phase: steps.Phase, epoch: int, start: int) -> Iterator[Callable]:
    config = self.config
    for batch in self.dataset.train_batches(
      config.batch_size, epoch=epoch, seed=config.seed, start=start, shard=self.shard
    ):
      yield functools.partial(
        phase.train_step, batch=distributed.global_batch(batch, self.topology)
      )

  @property
  def metrics_path(self) -> str:
    return os.path.join(self.workdir, "metrics.jsonl")

  def evaluate(
    self, state: TrainState, params: Any = None, dataset: Any = None
  ) -> dict[str, float]:
    """The loss and the task's metrics of ``params`` (default: the state's) on the test split."""
    params = state.params if params is None else params
    dataset = self.dataset if dataset is None else dataset
    metrics = steps.evaluate(
      self.eval_step, params, state.batch_stats, dataset, self.eval_batch_size, self.topology
    )
    return self.task.derive(metrics)

  def validate(self, state: TrainState, params: Any = None) -> dict[str, float] | None:
    """The task's metrics on the validation split; None without one."""
    if self.validation is None:
      return None
    return self.reported(self.evaluate(state, params, self.validation))

  def reported(self, metrics: dict[str, float]) -> dict[str, float]:
    """The task's metrics (``task.metrics``) of an evaluation, without the loss."""
    return {name: metrics[name] for name in self.task.metrics}

  def save(self, state: TrainState) -> int:
    """Checkpoints ``state`` at its step (a step already committed is kept as it is).

    Raises:
      TrainingDiverged: the params or batch statistics hold a NaN or an
        infinity; nothing is saved.
    """
    step = int(state.step)
    bad = checkpoints.nonfinite_leaves({"params": state.params, "batch_stats": state.batch_stats})
    if bad:
      raise _diverged(self, f"after step {step} the weights at {', '.join(bad[:3])} are not finite")
    self.checkpointer.save(step, state, self.progress.to_json())
    self.stop.latest_step = step
    return step

  def interrupted(self, state: TrainState) -> TrainingInterrupted:
    step = self.save(state)
    return TrainingInterrupted(
      f"interrupted: checkpoint of step {step} "
      f"({self.progress.position(self.steps_per_epoch)}) saved in {self.workdir}; "
      "run the same command again to resume",
      self.stop.signum,
    )

  def write_metrics_file(self) -> None:
    if not self.topology.is_main:
      return
    with strict_json.open_nofollow(self.metrics_path, "w") as f:
      for row in self.progress.history:
        f.write(report.json_line(row))

  def append_metrics(self, row: dict[str, Any]) -> None:
    """metrics.jsonl and TensorBoard (process 0 only)."""
    if not self.topology.is_main:
      return
    with strict_json.open_nofollow(self.metrics_path, "a") as f:
      f.write(report.json_line(row))
    step = row["step"]
    names = ("loss", *self.task.metrics)
    self.writer.scalars(step, {name: row[f"test_{name}"] for name in names}, "eval")
    extra = {k: v for k, v in row.items() if k in _GSM_TENSORBOARD}
    if extra:
      self.writer.scalars(step, {_GSM_TENSORBOARD[k]: v for k, v in extra.items()}, "gsm")
    self.writer.flush()


_GSM_TENSORBOARD = {
  "active_weights": "active",
  "keep": "keep",
  "threshold": "threshold",
  "largest_passive_abs_weight": "largest_passive_abs_weight",
}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the dense phase, the method's stages and the final report.

  Args:
    config: see ``configs/default.py`` and docs/TRAINING.md for the fields.
    workdir: where checkpoints and outputs go; re-running with the same
      workdir resumes.

  Returns:
    The summary, also written to ``workdir/summary.json``.

  Raises:
    ConfigError: an invalid config, or a workdir of another config.
    data.DataNotFoundError: the dataset is nowhere to be found.
    TrainingInterrupted: Ctrl-C; a resumable checkpoint was saved first.
  """
  stop = _StopRequest(workdir)
  with stop.installed():  # before anything that can take long: a signal anywhere is one line
    return _train_and_evaluate(config, workdir, stop)


def _train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, stop: _StopRequest
) -> dict[str, Any]:
  run_start = time.perf_counter()
  validate_config(config)
  task = tasks_lib.for_dataset(config.dataset)
  topology = distributed.make_topology(config)
  _log(
    "devices: %d %s (%s) in %d process(es), mesh %s",
    topology.num_devices,
    topology.describe()["device_kind"],
    jax.default_backend(),
    topology.process_count,
    dict(topology.mesh.shape),
  )
  stop.at("while loading the data")
  dataset, validation = task.load(config)
  stop.at("while checking the config against the data and the model")
  stages_lib.check_budget(config, dataset.steps_per_epoch(config.batch_size))
  model_options = task.model_options(config)
  abstract_params = steps.abstract_params(config.model, dataset.num_classes, model_options)
  stages_lib.check_params(config, abstract_params)
  _check_dense_checkpoint(config, abstract_params)
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  _refuse_links(workdir)
  config_lib.check_workdir(config, workdir, checkpoints.has_checkpoint(checkpoint_dir))
  lock = _workdir_lock(workdir) if topology.is_main else contextlib.nullcontext()
  with lock:
    if topology.is_main:
      config_lib.claim_workdir(config, workdir)  # the fingerprint: before anything else
      report.write_json(os.path.join(workdir, "config.json"), config_lib.config_json(config))
    _log(
      "data: %s from %s (%d train, %d test)",
      dataset.name,
      dataset.source,
      dataset.num_train,
      dataset.num_test,
    )
    stop.at("while building the model")
    train_graphdef, eval_graphdef, params, batch_stats = steps.init_model(
      config.model, dataset.num_classes, config.seed, model_options
    )
    method = stages_lib.METHODS[config.method]
    writer = tensorboard.MetricsWriter(
      os.path.join(workdir, "tensorboard"), enabled=topology.is_main
    )
    run = _Run(
      config=config,
      workdir=workdir,
      task=task,
      dataset=dataset,
      train_graphdef=train_graphdef,
      eval_step=steps.make_eval_step(eval_graphdef, steps.compute_dtype(config)),
      stop=stop,
      checkpointer=checkpoints.Checkpointer(
        checkpoint_dir, max_to_keep=config.checkpoint_keep, log=lambda line: _log(one_line(line))
      ),
      topology=topology,
      writer=writer,
      validation=validation,
    )
    with writer:
      try:
        variables = run.place({"params": params, "batch_stats": batch_stats})
        state = _train(run, method, variables)
      finally:
        run.checkpointer.close()
      if method.final_results is not None:  # what the final model reached (method_results)
        run.progress.results.update(method.final_results(config, state.params))
      stop.at("during the final evaluation and report")
      start = time.perf_counter()
      final = run.evaluate(state)
      validation_final = run.validate(state) or {}
      for name in task.metrics:
        final[f"validation_{name}"] = validation_final.get(name)
      samples = _report_samples(run, eval_graphdef, state, variables)
      wall_time_s = dict(run.progress.wall_time_s)
      wall_time_s["final_evaluation"] = time.perf_counter() - start
      wall_time_s["this_invocation"] = time.perf_counter() - run_start
      summary = report.write_report(
        config=config,
        dataset=dataset,
        workdir=workdir,
        progress=run.progress,
        state=state,
        final=final,
        prunes=method.prunes,
        wall_time_s=wall_time_s,
        devices=topology.describe(),
        task=task,
        pool=stages_lib.model_pool(config),
        num_validation=0 if validation is None else validation.num_test,
        samples=samples,
        write=topology.is_main,
      )
      if topology.is_main:
        writer.layer_densities(int(state.step), summary["layers"])
        writer.scalars(int(state.step), run.reported(final), "final")
    return summary


def _refuse_links(workdir: str) -> None:
  """Refuses a workdir holding a symbolic link: train.py writes no file through one.

  Its files (``.lock``, ``metrics.jsonl``, ...) are also opened with O_NOFOLLOW,
  against a link made after this check.

  Raises:
    ConfigError: naming the first link and where it points.
  """
  try:
    with os.scandir(workdir) as entries:
      links = sorted(entry.name for entry in entries if entry.is_symlink())
  except OSError:  # absent (created later) or not a directory (check_workdir says so)
    return
  if links:
    target = os.readlink(os.path.join(workdir, links[0]))
    raise ConfigError(
      f"workdir {workdir}: {links[0]} is a symbolic link (to {target}); train.py writes no "
      "file through a link: replace it with the file or directory itself, or use a new --workdir"
    )


@contextlib.contextmanager
def _workdir_lock(workdir: str) -> Iterator[None]:
  """Creates the workdir and holds an exclusive lock on it for the whole run.

  ``fcntl.flock`` on ``<workdir>/.lock``: the kernel releases it when the
  process ends, however it ends, so a killed run never leaves a stale lock.

  Raises:
    ConfigError: another process holds the lock, or the workdir cannot be
      created or written.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    handle = strict_json.open_nofollow(os.path.join(workdir, ".lock"), "a+")  # held for the run
  except OSError as err:
    raise ConfigError(f"cannot create or write the workdir {workdir}: {err.strerror}") from None
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.seek(0)
    owner = handle.read().strip() or "unknown"
    handle.close()
    raise ConfigError(
      f"workdir {workdir} is in use by another train.py (pid {owner}); wait for it to "
      "finish, or use another --workdir"
    ) from None
  try:
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    yield
  finally:
    handle.close()


def _check_dense_checkpoint(config: ml_collections.ConfigDict, abstract_params: Any) -> None:
  """Refuses a ``config.dense_checkpoint`` whose variables do not fit the model."""
  if not config.dense_checkpoint:
    return
  path = _dense_model_dir(config.dense_checkpoint)
  try:
    shapes = checkpoints.model_shapes(path)
  except Exception as err:  # noqa: BLE001  (orbax raises many kinds)
    raise ConfigError(
      f"config.dense_checkpoint={config.dense_checkpoint!r} holds no model saved by "
      f"train.py ({type(err).__name__})"
    ) from None
  # A list index (the transformers' blocks) is a string key in the saved model: compare unquoted.
  expected = {
    f"[params]{jax.tree_util.keystr(p)}".replace("'", ""): tuple(leaf.shape)
    for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  }
  found = {
    key.replace("'", ""): shape for key, shape in shapes.items() if key.startswith("['params']")
  }
  if found != expected:
    differ = sorted(set(found) ^ set(expected)) or [
      key for key in expected if found.get(key) != expected[key]
    ]
    raise ConfigError(
      f"config.dense_checkpoint={config.dense_checkpoint!r} does not fit the model "
      f"{config.model} (parameters differ at {', '.join(differ[:3])}); give a dense model of "
      "the same model and dataset"
    )


def _train(run: _Run, method: stages_lib.Method, variables: dict[str, Any]) -> TrainState:
  """The dense phase and the method's stages, from the newest good checkpoint if any."""
  config, stop = run.config, run.stop
  dense = steps.make_phase(
    "dense",
    steps.optimizer,
    config.dense,
    run.steps_per_epoch,
    run.train_graphdef,
    mesh=run.topology.mesh,
    dtype=steps.compute_dtype(config),
  )
  fresh = run.place(
    steps.new_train_state(variables["params"], variables["batch_stats"], config.seed)
  )

  def stages_of(progress: Progress) -> list[stages_lib.Stage]:
    context = stages_lib.Context(
      config=config,
      workdir=run.workdir,
      steps_per_epoch=run.steps_per_epoch,
      graphdef=run.train_graphdef,
      variables=variables,
      results=progress.results,
      evaluate=lambda state, params: run.reported(run.evaluate(state, params)),
      validate=run.validate,
      metrics=run.task.metrics,
      mesh=run.topology.mesh,
      place=run.place,
    )
    return method.stages(context)

  def target_for(meta: dict[str, Any]) -> TrainState:
    progress = Progress.from_json(meta)
    phase = dense
    if progress.phase != "dense":
      phase = {stage.name: stage for stage in stages_of(progress)}[progress.phase].phase()
    return run.place(fresh._replace(opt_state=phase.tx.init(fresh.params)))

  stop.at("while restoring the latest checkpoint")
  found = run.checkpointer.restore_latest(target_for)
  if found is None:
    state = run.place(fresh._replace(opt_state=dense.tx.init(fresh.params)))
  else:
    step, meta, restored = found  # restored onto this run's mesh, whatever mesh saved it
    run.progress = Progress.from_json(meta)
    state = run.place(restored)
    stop.latest_step = step
    _log(
      "resumed from the checkpoint of step %d (%s)",
      step,
      run.progress.position(run.steps_per_epoch),
    )
  progress = run.progress
  stages = stages_of(progress)
  names = [stage.name for stage in stages]
  run.write_metrics_file()

  if progress.phase == "dense":
    state = _finish_dense_phase(run, state, dense, variables)
    first = 0
  else:
    first = names.index(progress.phase)
  for stage in stages[first:]:
    if progress.phase != stage.name:
      stop.at(f"while entering the stage {stage.name!r}")
      state = _enter(run, state, stage)
    if stage.phase is not None:
      state = _train_epochs(run, state, stage.phase(), stage.epochs, stage)
  return state


def _enter(run: _Run, state: TrainState, stage: stages_lib.Stage) -> TrainState:
  """Applies the stage's transition and starts its phase (a fresh optimizer state)."""
  progress = run.progress
  start = time.perf_counter()
  results = {}
  if stage.enter is not None:
    state, results = stage.enter(state)
  progress.results.update(results)
  progress.start_phase(stage.name, int(state.step))
  progress.wall_time_s[stage.name] += time.perf_counter() - start
  state = run.place(state)
  if stage.phase is not None:
    state = run.place(state._replace(opt_state=stage.phase().tx.init(state.params)))
  headline = run.task.headline
  if f"{headline}_after_prune" in results:
    _log(
      "%s: %s after pruning, before training %.4f",
      stage.name,
      headline.replace("_", " "),
      results[f"{headline}_after_prune"],
    )
  return state


def _dense_model_dir(path: str) -> str:
  """A dense_checkpoint may name the exported model or the workdir holding it."""
  inner = os.path.join(path, "dense_model")
  return inner if os.path.isdir(inner) else path


def _finish_dense_phase(
  run: _Run, state: TrainState, dense: steps.Phase, initial: dict[str, Any]
) -> TrainState:
  """Trains (or loads, or skips) the dense model and exports it to ``dense_model/``.

  Before dense training starts (or resumes), ``initial_model/`` is made to hold
  ``initial``, the initial weights theta_0 (the lottery-ticket protocol needs them).
  """
  config, progress = run.config, run.progress
  run.stop.at("before the dense phase")
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  if config.dense_checkpoint:
    path = _dense_model_dir(config.dense_checkpoint)
    variables = run.place(checkpoints.load_model(path, variables))
    state = state._replace(params=variables["params"], batch_stats=variables["batch_stats"])
    progress.dense_source = f"checkpoint:{os.path.abspath(path)}"
  elif config.skip_dense:
    progress.dense_source = "skipped"
  else:
    _export_initial_model(os.path.join(run.workdir, "initial_model"), initial)
    state = _train_epochs(run, state, dense, config.dense.epochs)
    progress.dense_source = "trained"
  run.stop.at("while exporting the dense model")
  history = progress.history
  if history and history[-1]["phase"] == "dense":
    progress.dense_metrics = {name: history[-1][f"test_{name}"] for name in run.task.metrics}
  else:
    progress.dense_metrics = run.reported(run.evaluate(state))
  progress.dense_validation_metrics = run.validate(state)
  checkpoints.save_model(
    os.path.join(run.workdir, "dense_model"),
    {"params": state.params, "batch_stats": state.batch_stats},
  )
  headline = run.task.headline
  _log(
    "dense model (%s): test %s %.4f",
    progress.dense_source,
    headline.replace("_", " "),
    progress.dense_metrics[headline],
  )
  return state


def _export_initial_model(path: str, initial: dict[str, Any]) -> None:
  """Writes theta_0 to ``path`` unless it holds it already, intact (any other weights: rewritten)."""
  if os.path.isdir(path):
    if checkpoints.holds_model(path, initial):
      return
    _log("%s did not hold this config's initial weights; rewritten", path)
  checkpoints.save_model(path, initial)


def _train_epochs(
  run: _Run,
  state: TrainState,
  phase: steps.Phase,
  num_epochs: int,
  stage: stages_lib.Stage | None = None,
) -> TrainState:
  """Trains ``phase`` from the position saved in ``run.progress`` to ``num_epochs`` epochs.

  A signal stops it after the current step, which is checkpointed; a
  non-finite loss (at a logging step or an epoch's end) or non-finite GSM
  scores stop it with ``TrainingDiverged`` and nothing after the last good
  checkpoint is saved.
  """
  run.upload_train_set()
  run.stop.in_loop = True
  try:
    return _epochs(run, state, phase, num_epochs, stage)
  finally:
    run.stop.in_loop = False


def _epochs(run, state, phase, num_epochs, stage):
  config, progress = run.config, run.progress
  assert progress.phase == phase.name
  bar_stats = stage.bar_stats if stage else None
  epoch_stats = stage.epoch_stats if stage else None
  num_steps = run.steps_per_epoch
  every = config.checkpoint_every_steps
  while progress.epoch < num_epochs:
    epoch = progress.epoch
    start = time.perf_counter()
    totals = steps.totals_to_device(progress.partial)
    done = progress.batch  # batches applied before an interruption: skipped, not read
    batch_steps = run.batch_steps(phase, progress.epoch_offset + epoch, done, state)
    bar = tqdm(
      total=num_steps,
      initial=done,
      desc=f"{phase.name} {epoch + 1}/{num_epochs}",
      disable=not (config.progress_bar and run.topology.is_main),
      dynamic_ncols=True,
      leave=True,
    )

    def finite_totals(totals):
      """The totals on the host; a non-finite loss stops the run (nothing more is saved)."""
      host = steps.totals_to_host(totals)
      loss, _ = steps.means(host)
      if not math.isfinite(loss):
        bar.close()
        raise _diverged(run, f"the training loss is {loss} after batch {done}")
      return host

    def show(host, state):
      loss, acc = steps.means(host)
      run.writer.scalars(
        int(state.step),
        {"loss": loss, "accuracy": acc, "learning_rate": _learning_rate(phase, state, progress)},
        "train",
      )
      postfix = {"loss": f"{loss:.4f}", "acc": f"{acc:.4f}"}
      if bar_stats:
        postfix.update(bar_stats(state))
      bar.set_postfix(postfix, refresh=False)
      return loss, acc

    for i, step in enumerate(batch_steps, start=done):
      state, metrics = step(state)
      totals = steps.accumulate(totals, metrics)  # on the device; read at logging steps
      done = i + 1
      bar.update(1)
      if done % config.log_every_steps == 0:
        show(finite_totals(totals), state)
      if done < num_steps and (run.stop.requested or (every and done % every == 0)):
        progress.batch, progress.partial = done, finite_totals(totals)
        progress.wall_time_s[phase.name] += time.perf_counter() - start
        start = time.perf_counter()
        if run.stop.requested:
          bar.close()
          raise run.interrupted(state)
        run.save(state)
    train_loss, train_acc = show(finite_totals(totals), state)
    bar.close()

    train = run.task.derive({"loss": train_loss, "accuracy": train_acc})
    test = run.evaluate(state)
    row = {
      "phase": phase.name,
      "epoch": progress.epoch_offset + epoch + 1,
      "phase_epoch": epoch + 1,
      "step": int(state.step),
      "learning_rate": _learning_rate(phase, state, progress),
      **{f"train_{name}": value for name, value in train.items()},
      **{f"test_{name}": value for name, value in test.items()},
    }
    stats = epoch_stats(state) if epoch_stats else {}
    row.update(stats)
    problem = _non_finite(row)
    if problem:
      raise _diverged(run, f"{problem} at the end of {phase.name} epoch {epoch + 1}")
    progress.wall_time_s[phase.name] += time.perf_counter() - start
    row["wall_time_s"] = progress.wall_time_s[phase.name]
    progress.history.append(row)
    progress.epoch, progress.batch, progress.partial = epoch + 1, 0, steps.zero_totals()
    run.save(state)
    run.append_metrics(row)
    headline = run.task.headline
    short = "acc" if headline == "accuracy" else headline.replace("_", " ")
    _log(
      "%s epoch %d/%d: train loss %.4f acc %.4f, test %s %.4f, lr %.3g%s",
      phase.name,
      epoch + 1,
      num_epochs,
      train_loss,
      train_acc,
      short,
      test[headline],
      row["learning_rate"],
      "".join(f", {key} {value:.4g}" for key, value in stats.items()),
    )
    if run.stop.requested:
      raise run.interrupted(state)
  return state


def _report_samples(
  run: _Run, eval_graphdef: Any, state: TrainState, template: dict[str, Any]
) -> dict[str, str] | None:
  """The task's end-of-run report (text samples of the dense and the final model), if any."""
  leaves = jax.tree.leaves(state.params)
  if run.task.report is None or not all(x.is_fully_addressable for x in leaves):
    return None  # params split over several hosts: no sample (the metrics are reported)
  models_by_name = {}
  dense_dir = os.path.join(run.workdir, "dense_model")
  if os.path.isdir(dense_dir):
    models_by_name["dense"] = jax.device_get(checkpoints.load_model(dense_dir, template))
  models_by_name["final"] = jax.device_get(
    {"params": state.params, "batch_stats": state.batch_stats}
  )
  return run.task.report(run.config, eval_graphdef, models_by_name)


def _learning_rate(phase: steps.Phase, state: TrainState, progress: Progress) -> float:
  """The rate of the phase's last step (the schedule counts the phase's own steps)."""
  return float(phase.learning_rate(max(int(state.step) - progress.phase_start_step - 1, 0)))


def _non_finite(row: dict[str, Any]) -> str | None:
  """What makes an epoch's row diverged: a non-finite number, or non-finite GSM scores."""
  for key, value in row.items():
    if isinstance(value, float) and not math.isfinite(value):
      return f"{key} is {value}"
  if row.get("nonfinite_scores", 0) > 0:
    return f"{row['nonfinite_scores']} pooled weights have a non-finite Taylor score |g * w|"
  return None


def _diverged(run: _Run, what: str) -> TrainingDiverged:
  where = run.progress.phase
  latest = run.stop.latest_step
  kept = (
    f"the last good checkpoint, step {latest}, is kept"
    if latest is not None
    else "no checkpoint was written"
  )
  return TrainingDiverged(
    f"training diverged in the {where} phase: {what}; stopped without saving ({kept}). "
    f"Lower config.{where if where in run.config else 'dense'}.learning_rate and use a new "
    "--workdir"
  )


# What TensorStore's errors append: the repr of a pybind11 method bound to a multi-line spec.
_REPRS = re.compile(
  r"\s*See full TensorStore details: <[^;]*?(?=\)?;|\)?$)|\s*<[^<>;]* at 0x[0-9a-f]+>"
)


def one_line(text: str) -> str:
  """``text`` on one line, without the Python reprs some libraries put in their messages."""
  return " ".join(_REPRS.sub("", text).split())


def _log(fmt: str, *args: Any) -> None:
  """One progress line on stdout (process 0), without breaking the tqdm bars on stderr."""
  if jax.process_index() == 0:
    tqdm.write(fmt % args if args else fmt)

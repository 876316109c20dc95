"""The pruning methods of ``config.method`` other than GSM, as stages after the dense phase.

Every method starts from the same dense model (trained, or loaded with
``config.dense_checkpoint``) and then runs a list of stages; a stage is a
transition applied once when it begins (prune, apply a mask, ...) followed by
``epochs`` epochs of an optax optimizer. The global compression C of every
method is ``config.gsm.compression``.

* ``magnitude`` (Han et al. 2015): global (or, with ``magnitude.layerwise``,
  per-layer) magnitude cut of the dense model, then ``finetune.epochs`` of SGD
  with ``keep_masked``; with ``magnitude.rounds = R > 1`` the cut and the
  fine-tuning are repeated R times along C^(r/R), the epochs split evenly.
* ``gmp`` (Zhu & Gupta 2017): ``gmp.epochs`` of SGD with
  ``gradual_magnitude_pruning`` (cubic schedule reaching C at the end of the
  stage), then ``finetune.epochs`` of masked fine-tuning.
* ``admm`` (Zhang et al. 2018): ``admm.epochs`` of W-steps on
  f(W) + rho_k/2 ||W - Z + U||^2, Z/U updated every ``admm.steps_per_iteration``
  steps (rho_k = rho * rho_growth^k at ADMM iteration k); per-layer targets
  from a GSM run's ``summary.json`` (``admm.densities_from``), explicit
  ``admm.densities``, or else those of the global magnitude cut of the dense
  model; then hard pruning and ``finetune.epochs`` of masked retraining.
* ``lottery`` (Frankle & Carbin 2019, protocol of Ding et al.): theta_0 is
  saved before dense training; the mask is the global top-Q of the dense
  weights (``lottery.ticket = "magnitude"``) or of the GSM-trained weights
  (``"gsm"``: a GSM stage of ``gsm.epochs`` after the dense phase, or the
  ``final_model`` of an earlier GSM run given in ``lottery.gsm_checkpoint``);
  theta_0 * mask is retrained with the dense schedule (``config.dense``) and
  masked gradients.

Checkpoints and resume work as for GSM: one checkpoint per epoch, the stage and
the position in it in the checkpoint's meta; a transition is a deterministic
function of the state and the files it reads, so it is redone on resume.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import json
import os
import time
from typing import Any
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import optax

import gsm_optax
from gsm_optax import baselines
from training import checkpoints
from training import plots
from training import train_lib

METHODS = ("gsm", "magnitude", "gmp", "admm", "lottery")
TICKETS = ("magnitude", "gsm")

_OPTIMIZER_FIELDS = (
  "epochs",
  "learning_rate",
  "momentum",
  "nesterov",
  "weight_decay",
  "boundaries",
  "decay_factor",
)


# --------------------------------------------------------------------------- #
# Config checks (called by train_lib.validate_config)
# --------------------------------------------------------------------------- #


def method_of(config: ml_collections.ConfigDict) -> str:
  """``config.method``; configs written before the field existed mean "gsm"."""
  return config.get("method", "gsm")


def validate_method_config(config: ml_collections.ConfigDict) -> None:
  """Checks the fields the chosen method reads; raises ``train_lib.ConfigError`` (one line)."""
  error = train_lib.ConfigError
  method = method_of(config)
  if method not in METHODS:
    raise error(f"unknown method {method!r} (config.method); choose one of {', '.join(METHODS)}")
  if method == "gsm":
    return
  sections = {
    "magnitude": ("finetune", "magnitude"),
    "gmp": ("gmp", "finetune"),
    "admm": ("admm", "finetune"),
    "lottery": ("lottery",),
  }[method]
  for section in sections:
    if section not in config:
      raise error(f"config.method={method!r} needs the section config.{section}")
  for section in sections:
    if section in ("finetune", "gmp", "admm"):
      _check_optimizer(config, section)
  check = functools.partial(_check, config)
  if method == "magnitude":
    check("magnitude.layerwise", lambda x: isinstance(x, bool), "True or False")
    check("magnitude.rounds", lambda x: train_lib._is_int(x) and x >= 1, "an integer >= 1")
    rounds, epochs = config.magnitude.rounds, config.finetune.epochs
    if epochs % rounds:
      raise error(
        f"config.finetune.epochs={epochs} must be a multiple of "
        f"config.magnitude.rounds={rounds} (the epochs are split evenly)"
      )
  if method == "gmp":
    check("gmp.update_every_steps", lambda x: train_lib._is_int(x) and x >= 1, "a positive integer")
    check("gmp.initial_sparsity", lambda x: train_lib._is_number(x) and 0 <= x < 1, "in [0, 1)")
    check("gmp.layerwise", lambda x: isinstance(x, bool), "True or False")
    if config.gmp.epochs < 1:
      raise error("config.gmp.epochs must be >= 1 for method 'gmp'")
  if method == "admm":
    check(
      "admm.steps_per_iteration", lambda x: train_lib._is_int(x) and x >= 1, "a positive integer"
    )
    check("admm.rho", lambda x: train_lib._is_number(x) and x >= 0, "a number >= 0")
    check("admm.rho_growth", lambda x: train_lib._is_number(x) and x >= 1, "a number >= 1")
    check(
      "admm.densities_from",
      lambda x: x is None or isinstance(x, str),
      "None or a GSM run's summary.json (or its workdir)",
    )
    check(
      "admm.densities",
      lambda x: (
        x is None
        or (
          isinstance(x, (list, tuple)) and all(train_lib._is_number(d) and 0 <= d <= 1 for d in x)
        )
      ),
      "None or a sequence of densities in [0, 1], one per pooled layer",
    )
    if config.admm.densities_from and config.admm.densities:
      raise error(
        "config.admm.densities_from and config.admm.densities exclude each "
        "other: give the per-layer targets one way"
      )
    if config.admm.densities_from:
      path = _summary_path(config.admm.densities_from)
      if not os.path.isfile(path):
        raise error(f"config.admm.densities_from={config.admm.densities_from!r}: no {path}")
  if method == "lottery":
    check("lottery.ticket", lambda x: x in TICKETS, f"one of {', '.join(TICKETS)}")
    check(
      "lottery.gsm_checkpoint",
      lambda x: x is None or isinstance(x, str),
      "None or a GSM run's workdir (or its final_model/)",
    )
    if config.lottery.gsm_checkpoint and not os.path.isdir(config.lottery.gsm_checkpoint):
      raise error(
        f"config.lottery.gsm_checkpoint={config.lottery.gsm_checkpoint!r} is not a directory"
      )
    if config.skip_dense:
      raise error("config.method='lottery' needs the dense model: config.skip_dense must be False")
    if config.dense_checkpoint:
      initial = _initial_model_dir(config.dense_checkpoint)
      if initial is None:
        raise error(
          f"config.dense_checkpoint={config.dense_checkpoint!r} has no "
          "initial_model/ (theta_0) beside its dense_model/; the lottery "
          "ticket needs the weights the dense model was trained from"
        )


def _check(config, name: str, ok: Callable[[Any], bool], allowed: str) -> None:
  try:
    value = train_lib._get(config, name)
  except (KeyError, AttributeError):
    raise train_lib.ConfigError(f"config lacks the field {name}") from None
  if not ok(value):
    raise train_lib.ConfigError(f"config.{name} must be {allowed}, got {value!r}")


def _check_optimizer(config, section: str) -> None:
  check = functools.partial(_check, config)
  check(f"{section}.epochs", lambda x: train_lib._is_int(x) and x >= 0, "an integer >= 0")
  check(f"{section}.learning_rate", lambda x: train_lib._is_number(x) and x > 0, "a number > 0")
  check(f"{section}.momentum", lambda x: train_lib._is_number(x) and 0 <= x < 1, "in [0, 1)")
  check(f"{section}.nesterov", lambda x: isinstance(x, bool), "True or False")
  check(f"{section}.weight_decay", lambda x: train_lib._is_number(x) and x >= 0, "a number >= 0")
  check(f"{section}.decay_factor", lambda x: train_lib._is_number(x) and x > 0, "a number > 0")
  check(
    f"{section}.boundaries",
    lambda x: (
      isinstance(x, (list, tuple))
      and all(train_lib._is_number(b) and b > 0 for b in x)
      and all(a < b for a, b in zip(x, x[1:]))
    ),
    "a strictly increasing sequence of epochs > 0",
  )


def _summary_path(path: str) -> str:
  return os.path.join(path, "summary.json") if os.path.isdir(path) else path


def _initial_model_dir(dense_checkpoint: str) -> str | None:
  """theta_0 of a dense checkpoint: ``initial_model/`` beside its ``dense_model/``."""
  for base in (dense_checkpoint, os.path.dirname(os.path.abspath(dense_checkpoint))):
    candidate = os.path.join(base, "initial_model")
    if os.path.isdir(candidate):
      return candidate
  return None


# --------------------------------------------------------------------------- #
# Optimizers
# --------------------------------------------------------------------------- #


def nonzero_pool_mask(params: Any) -> Any:
  """True on the pooled entries that are non-zero and on every entry outside the pool."""
  pool = gsm_optax.resolve_pool(params, None)
  return jax.tree.map(lambda p, f: (p != 0) if f else jnp.ones(jnp.shape(p), bool), params, pool)


def sgd_optimizer(cfg, steps_per_epoch: int, warmup_epochs: float = 0.0):
  """SGD with momentum, weight decay on the pool only (as the dense phase).

  Returns:
      ``(tx, learning_rate_schedule)``.
  """
  lr = train_lib.make_lr_schedule(
    cfg.learning_rate, cfg.boundaries, cfg.decay_factor, steps_per_epoch, warmup_epochs
  )
  tx = optax.chain(
    optax.add_decayed_weights(cfg.weight_decay, mask=train_lib._pool_mask),
    optax.sgd(lr, momentum=cfg.momentum, nesterov=cfg.nesterov),
  )
  return tx, lr


def masked_optimizer(cfg, steps_per_epoch: int, warmup_epochs: float = 0.0):
  """``sgd_optimizer`` followed by ``keep_masked``: the zeros at init stay zero."""
  tx, lr = sgd_optimizer(cfg, steps_per_epoch, warmup_epochs)
  return optax.chain(tx, baselines.keep_masked(nonzero_pool_mask)), lr


def gmp_end_step(epochs: int, steps_per_epoch: int, update_every: int) -> int:
  """Step of the last GMP mask update: the last multiple of ``update_every`` in the stage."""
  return ((epochs * steps_per_epoch - 1) // update_every) * update_every


def gmp_optimizer(cfg, steps_per_epoch: int, compression: float):
  """SGD followed by ``gradual_magnitude_pruning`` reaching C at the end of the stage."""
  tx, lr = sgd_optimizer(cfg, steps_per_epoch)
  prune = baselines.gradual_magnitude_pruning(
    compression,
    begin_step=0,
    end_step=gmp_end_step(cfg.epochs, steps_per_epoch, cfg.update_every_steps),
    update_every=cfg.update_every_steps,
    initial_sparsity=cfg.initial_sparsity,
    layerwise=cfg.layerwise,
  )
  return optax.chain(tx, prune), lr


class ADMMPenaltyState(NamedTuple):
  """State of `admm_w_step`: the step and the ADMM variables Z, U.

  Z and U are full pytrees with the params' structure (zeros on the leaves
  that are not pruned), so checkpoints hold plain arrays.
  """

  count: jax.Array
  z: Any
  u: Any


def admm_w_step(
  rho: float, rho_growth: float, keep_counts: Any, steps_per_iteration: int
) -> optax.GradientTransformation:
  """ADMM W-steps with the Z/U updates inside: g <- g + rho_k (W - Z + U).

  Every ``steps_per_iteration`` steps, before the update, Z = Pi(W + U) and
  U <- U + W - Z (``baselines.admm_step``); rho_k = rho * rho_growth^k at
  ADMM iteration k. Put it first in the chain, on the raw gradients.
  """
  flags = [
    not isinstance(c, optax.MaskedNode)
    for c in jax.tree.leaves(keep_counts, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  ]

  def to_full(params, tree):
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    treedef = jax.tree.structure(params)
    return jax.tree.unflatten(
      treedef,
      [
        leaf if flag else jnp.zeros_like(p)
        for leaf, flag, p in zip(leaves, flags, jax.tree.leaves(params))
      ],
    )

  def to_admm(params, tree):
    treedef = jax.tree.structure(params)
    return jax.tree.unflatten(
      treedef,
      [
        leaf if flag else optax.MaskedNode()
        for leaf, flag in zip(treedef.flatten_up_to(tree), flags)
      ],
    )

  def init_fn(params):
    state = baselines.admm_init(params, keep_counts)
    return ADMMPenaltyState(
      count=jnp.zeros([], jnp.int32), z=to_full(params, state.z), u=to_full(params, state.u)
    )

  def update_fn(updates, state, params=None):
    admm = baselines.ADMMState(z=to_admm(params, state.z), u=to_admm(params, state.u))
    due = (state.count > 0) & (state.count % steps_per_iteration == 0)
    z, u = lax.cond(
      due,
      lambda: tuple(baselines.admm_step(params, admm, keep_counts)),
      lambda: (admm.z, admm.u),
    )
    admm = baselines.ADMMState(z=z, u=u)
    iteration = (state.count // steps_per_iteration).astype(jnp.float32)
    rho_k = rho * jnp.power(jnp.float32(rho_growth), iteration)
    penalty = baselines.admm_penalty_grads(params, admm, rho_k)
    updates = jax.tree.map(lambda g, p: g + p.astype(g.dtype), updates, penalty)
    return updates, ADMMPenaltyState(
      count=optax.safe_increment(state.count), z=to_full(params, z), u=to_full(params, u)
    )

  return optax.GradientTransformation(init_fn, update_fn)


def admm_optimizer(cfg, steps_per_epoch: int, keep_counts: Any):
  tx, lr = sgd_optimizer(cfg, steps_per_epoch)
  w_step = admm_w_step(cfg.rho, cfg.rho_growth, keep_counts, cfg.steps_per_iteration)
  return optax.chain(w_step, tx), lr


def _freeze(cfg) -> tuple:
  return tuple(
    sorted(
      (key, tuple(value) if isinstance(value, (list, tuple)) else value)
      for key, value in cfg.to_dict().items()
    )
  )


@functools.lru_cache(maxsize=32)
def _make_phase(
  name: str, kind: str, frozen_cfg: tuple, steps_per_epoch: int, graphdef, extra: tuple
) -> train_lib.Phase:
  cfg = ml_collections.ConfigDict(dict(frozen_cfg))
  if kind == "finetune":
    tx, lr = masked_optimizer(cfg, steps_per_epoch)
  elif kind == "retrain_dense":
    tx, lr = masked_optimizer(cfg, steps_per_epoch, cfg.warmup_epochs)
  elif kind == "gmp":
    tx, lr = gmp_optimizer(cfg, steps_per_epoch, extra[0])
  elif kind == "admm":
    tx, lr = admm_optimizer(cfg, steps_per_epoch, _unfreeze_counts(extra))
  elif kind == "gsm":
    tx, lr = train_lib.make_gsm_optimizer(cfg, steps_per_epoch)
  else:
    raise ValueError(f"unknown phase kind {kind!r}")
  return train_lib.Phase(name, tx, train_lib.make_train_step(graphdef, tx), jax.jit(lr))


def _freeze_counts(keep_counts) -> tuple:
  leaves, treedef = jax.tree.flatten(keep_counts, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  return (treedef, tuple(None if isinstance(c, optax.MaskedNode) else int(c) for c in leaves))


def _unfreeze_counts(frozen: tuple):
  treedef, counts = frozen
  return jax.tree.unflatten(treedef, [optax.MaskedNode() if c is None else c for c in counts])


# --------------------------------------------------------------------------- #
# Stages
# --------------------------------------------------------------------------- #


class Stage(NamedTuple):
  """One stage after the dense phase.

  Attributes:
      name: the phase name in metrics.jsonl and the checkpoint meta.
      epochs: epochs trained in the stage.
      phase: () -> ``train_lib.Phase`` (built when first needed).
      enter: state -> (state, results): the transition when the stage begins
          (results are JSON numbers recorded in the summary).
  """

  name: str
  epochs: int
  phase: Callable[[], train_lib.Phase]
  enter: Callable[[train_lib.TrainState], tuple[train_lib.TrainState, dict]]


def _no_transition(state):
  return state, {}


@jax.jit
def _apply_mask(params, mask):
  return gsm_optax.apply_mask(params, mask)


def _global_cut(params, compression: float):
  mask = gsm_optax.global_magnitude_mask(params, compression)
  return _apply_mask(params, mask)


def admm_keep_counts(config, params) -> tuple[Any, str]:
  """Per-layer targets l_i of ADMM and where they come from."""
  cfg = config.admm
  if cfg.densities_from:
    path = _summary_path(cfg.densities_from)
    with open(path) as f:
      summary = json.load(f)
    theirs = float(summary.get("compression_target", 0.0))
    if abs(theirs - float(config.gsm.compression)) > 1e-6 * max(theirs, 1.0):
      raise train_lib.ConfigError(
        f"config.admm.densities_from={cfg.densities_from!r} was pruned at C={theirs:g}, "
        f"this run prunes at C={config.gsm.compression:g}"
      )
    densities = {row["path"]: row["nonzeros"] / row["size"] for row in summary["layers"]}
    source = f"per-layer densities of {os.path.abspath(path)} ({summary.get('method', 'gsm')})"
  elif cfg.densities:
    densities = [float(d) for d in cfg.densities]
    source = "config.admm.densities"
  else:
    report = gsm_optax.sparsity_report(_global_cut(params, float(config.gsm.compression)))
    densities = report
    source = "per-layer densities of the global magnitude cut of the dense model"
  try:
    counts = baselines.layer_keep_counts_from_density(params, densities)
  except (ValueError, TypeError) as err:
    raise train_lib.ConfigError(f"ADMM per-layer targets: {err}") from None
  return counts, source


def build_stages(run, theta_0: Callable[[], Any]) -> list[Stage]:
  """The stages of ``run.config.method`` after the dense phase."""
  config = run.config
  method = method_of(config)
  spe, graphdef = run.steps_per_epoch, run.train_graphdef
  compression = float(config.gsm.compression)

  def phase(name, kind, cfg, extra=()):
    return lambda: _make_phase(name, kind, _freeze(cfg), spe, graphdef, extra)

  def evaluate(params, state):
    return run.evaluate(state, params)["accuracy"]

  if method == "magnitude":
    rounds = config.magnitude.rounds
    schedule = baselines.iterative_compression_schedule(compression, rounds)
    per_round = config.finetune.epochs // rounds
    stages = []
    for r, c_r in enumerate(schedule, start=1):

      def enter(state, c_r=c_r, r=r):
        pruned, _ = baselines.magnitude_prune(
          state.params, c_r, layerwise=config.magnitude.layerwise
        )
        acc = evaluate(pruned, state)
        results = {f"accuracy_after_prune_round{r}": acc}
        if r == rounds:
          results["accuracy_after_prune"] = acc
        return state._replace(params=pruned), results

      name = "finetune" if rounds == 1 else f"finetune{r}"
      stages.append(Stage(name, per_round, phase(name, "finetune", config.finetune), enter))
    return stages

  if method == "gmp":

    def enter_finetune(state):
      pruned = _global_cut(state.params, compression)
      return state._replace(params=pruned), {"accuracy_after_prune": evaluate(pruned, state)}

    return [
      Stage(
        "gmp", config.gmp.epochs, phase("gmp", "gmp", config.gmp, (compression,)), _no_transition
      ),
      Stage(
        "finetune",
        config.finetune.epochs,
        phase("finetune", "finetune", config.finetune),
        enter_finetune,
      ),
    ]

  if method == "admm":
    holder = {}

    def counts_for(params):
      if "counts" not in holder:
        holder["counts"], holder["source"] = admm_keep_counts(config, params)
      return holder["counts"]

    def admm_phase():
      counts = holder["counts"]
      return _make_phase(
        "admm", "admm", _freeze(config.admm), spe, graphdef, _freeze_counts(counts)
      )

    def enter_admm(state):
      counts = counts_for(state.params)
      report = {
        path: int(n)
        for path, n in zip(
          [
            jax.tree_util.keystr(p)
            for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]
          ],
          jax.tree.leaves(
            jax.tree.map(
              lambda c: -1 if isinstance(c, optax.MaskedNode) else c,
              counts,
              is_leaf=lambda x: isinstance(x, optax.MaskedNode),
            )
          ),
        )
        if n >= 0
      }
      return state, {"admm_targets_source": holder["source"], "admm_keep_counts": report}

    def enter_finetune(state):
      pruned, _ = baselines.admm_hard_prune(state.params, counts_for(state.params))
      return state._replace(params=pruned), {
        "accuracy_before_hard_prune": evaluate(state.params, state),
        "accuracy_after_prune": evaluate(pruned, state),
      }

    stages = [
      Stage("admm", config.admm.epochs, admm_phase, enter_admm),
      Stage(
        "finetune",
        config.finetune.epochs,
        phase("finetune", "finetune", config.finetune),
        enter_finetune,
      ),
    ]
    run.admm_counts_for = counts_for  # primed by run_method before a resumed admm phase
    return stages

  if method == "lottery":
    stages = []
    gsm_source = config.lottery.gsm_checkpoint
    if config.lottery.ticket == "gsm" and not gsm_source:
      stages.append(
        Stage("gsm", config.gsm.epochs, phase("gsm", "gsm", config.gsm), _no_transition)
      )

    def enter_ticket(state):
      source = state.params
      results = {}
      if config.lottery.ticket == "gsm" and gsm_source:
        path = os.path.join(gsm_source, "final_model")
        path = path if os.path.isdir(path) else gsm_source
        source = train_lib._fresh_arrays(
          checkpoints.load_model(path, {"params": state.params, "batch_stats": state.batch_stats})
        )["params"]
        results["ticket_source"] = f"checkpoint:{os.path.abspath(path)}"
      else:
        results["ticket_source"] = (
          "dense model" if config.lottery.ticket == "magnitude" else "gsm stage"
        )
      results["source_accuracy_after_cut"] = evaluate(_global_cut(source, compression), state)
      mask = baselines.ticket_mask(source, compression)
      initial = theta_0()
      params = baselines.apply_ticket(initial["params"], mask)
      params = train_lib._fresh_arrays(params)
      state = state._replace(params=params, batch_stats=initial["batch_stats"])
      results["accuracy_after_prune"] = evaluate(params, state)
      return state, results

    stages.append(
      Stage(
        "ticket", config.dense.epochs, phase("ticket", "retrain_dense", config.dense), enter_ticket
      )
    )
    return stages

  raise ValueError(f"method {method!r} has no stages")


# --------------------------------------------------------------------------- #
# The driver
# --------------------------------------------------------------------------- #


def run_stages(run, params, batch_stats) -> train_lib.TrainState:
  """Dense phase, then the method's stages; resumes from the workdir's checkpoints."""
  config = run.config
  initial_variables = {"params": params, "batch_stats": batch_stats}

  def theta_0():
    if config.dense_checkpoint:
      path = _initial_model_dir(config.dense_checkpoint)
    else:
      path = os.path.join(run.workdir, "initial_model")
    return train_lib._fresh_arrays(checkpoints.load_model(path, initial_variables))

  stages = build_stages(run, theta_0)
  dense = train_lib.make_phase("dense", config.dense, run.steps_per_epoch, run.train_graphdef)
  state = train_lib.TrainState(
    step=jnp.asarray(0, jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=dense.tx.init(params),
    rng=jax.random.key_data(jax.random.key(config.seed)),
  )
  names = [stage.name for stage in stages]
  latest = run.checkpointer.latest_step()
  if latest is None:
    meta = train_lib._new_meta()
    meta["wall_time_s"].update({name: 0.0 for name in names})
    meta["results"] = {}
    meta["method"] = method_of(config)
  else:
    meta = run.checkpointer.restore_meta(latest)
    if meta["phase"] != "dense":
      if method_of(config) == "admm":
        dense_params = checkpoints.load_model(
          os.path.join(run.workdir, "dense_model"), {"params": params, "batch_stats": batch_stats}
        )["params"]
        run.admm_counts_for(train_lib._fresh_arrays(dense_params))
      stage = stages[names.index(meta["phase"])]
      state = state._replace(opt_state=stage.phase().tx.init(params))
    state = train_lib._fresh_arrays(run.checkpointer.restore_state(state, latest))
    train_lib._log("resumed from the checkpoint of step %d (%s)", latest, _position(run, meta))
  run.meta = meta
  run.write_metrics_file()

  if meta["phase"] == "dense":
    state = train_lib.finish_dense_phase(run, state, dense)
    first = 0
  else:
    first = names.index(meta["phase"])
  for stage in stages[first:]:
    if meta["phase"] != stage.name:
      start = time.perf_counter()
      state, results = stage.enter(state)
      meta["results"].update(results)
      meta["wall_time_s"][stage.name] += time.perf_counter() - start
      meta.update(
        phase=stage.name,
        epoch=0,
        batch=0,
        partial=train_lib._zero_totals(),
        phase_start_step=int(state.step),
        epoch_offset=len(meta["history"]),
      )
      phase = stage.phase()
      state = state._replace(opt_state=phase.tx.init(state.params))
      if "accuracy_after_prune" in results:
        train_lib._log(
          "%s: accuracy after pruning, before training %.4f",
          stage.name,
          results["accuracy_after_prune"],
        )
    else:
      phase = stage.phase()
    state = train_lib._train_phase(run, state, phase, stage.epochs)
  return state


def _position(run, meta) -> str:
  run.meta = meta
  return run.position()


def report(run, state, run_start: float) -> dict[str, Any]:
  """Evaluates the final (pruned) model and writes summary.json, final_model/ and the plots."""
  config, meta, workdir = run.config, run.meta, run.workdir
  compression = float(config.gsm.compression)
  start = time.perf_counter()
  final = run.evaluate(state)
  sparsity = gsm_optax.sparsity_report(state.params)
  checkpoints.save_model(
    os.path.join(workdir, "final_model"),
    {"params": state.params, "batch_stats": state.batch_stats},
  )
  history = meta["history"]
  epochs = {}
  for row in history:
    epochs[row["phase"]] = epochs.get(row["phase"], 0) + 1
  results = dict(meta["results"])
  summary = {
    **train_lib.summary_header(run),
    "method": method_of(config),
    "dense_source": meta["dense_source"],
    "dense_epochs": epochs.get("dense", 0),
    "epochs": epochs,
    "dense_accuracy": meta["dense_accuracy"],
    "accuracy_after_prune": results.pop("accuracy_after_prune", None),
    "accuracy_final": final["accuracy"],
    "loss_final": final["loss"],
    "compression_target": compression,
    "pool_size": int(sparsity.total_size),
    "keep": gsm_optax.keep_count(state.params, compression),
    "nonzeros_after_cut": int(sparsity.total_nonzeros),
    "compression_reached": float(sparsity.total_size) / max(int(sparsity.total_nonzeros), 1),
    "layers": sparsity.to_dict()["leaves"],
    **results,
  }
  summary["wall_time_s"] = {
    **meta["wall_time_s"],
    "eval": time.perf_counter() - start,
    "this_invocation": time.perf_counter() - run_start,
  }
  train_lib._write_json(os.path.join(workdir, "summary.json"), summary)
  if config.get("plots", True):
    title = f"{config.model} on {config.dataset}, {summary['method']}, C={compression:g}"
    plots.plot_sparsity(summary["layers"], os.path.join(workdir, "sparsity.png"), title=title)
    plots.plot_curves(
      history,
      os.path.join(workdir, "curves.png"),
      accuracy_after_cut=final["accuracy"],
      title=title,
    )
  print(sparsity)
  print(
    f"{summary['method']}: dense {train_lib._pct(meta['dense_accuracy'])} -> after pruning "
    f"{train_lib._pct(summary['accuracy_after_prune'])} -> final "
    f"{train_lib._pct(final['accuracy'])}; compression {summary['compression_reached']:.1f}x "
    f"({summary['nonzeros_after_cut']:,} of {summary['pool_size']:,} pooled weights); "
    f"epochs {epochs}"
  )
  return summary

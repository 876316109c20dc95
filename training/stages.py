"""Every pruning method of ``config.method`` as a list of stages after the dense phase.

A run is: the dense phase (trained, loaded with ``config.dense_checkpoint`` or
skipped) -> the method's stages -> the final evaluation (``training.report``).
A stage is a transition applied once when it begins (prune, apply a mask,
the final cut, ...) followed by ``epochs`` epochs of an optax optimizer. A
transition is a deterministic function of the state and of the files it reads,
so it is simply redone when a run resumes. Adding a method is adding one
function ``ctx -> list[Stage]`` (and the checks of its config section) to
``METHODS``. The global compression C of every method is ``config.compression``.

* ``gsm`` (Ding et al. 2019): ``gsm.epochs`` of ``gsm_optax.gsm``, then the
  global magnitude cut to C with no fine-tuning (opt-in, ``gsm.finetune``:
  then ``finetune.epochs`` of masked fine-tuning, as ``magnitude``).
* ``dense``: no pruning; the dense model is the result (a reference point).
* ``magnitude`` (Han et al. 2015): global (or, with ``magnitude.layerwise``,
  per-layer) magnitude cut of the dense model, then ``finetune.epochs`` of SGD
  with ``keep_masked``; with ``magnitude.rounds = R > 1`` the cut and the
  fine-tuning are repeated R times along C^(r/R), the epochs split evenly.
* ``gmp`` (Zhu & Gupta 2017): ``gmp.epochs`` of SGD with
  ``gradual_magnitude_pruning`` (cubic schedule reaching C at the end of the
  stage), then ``finetune.epochs`` of masked fine-tuning.
* ``admm`` (Zhang et al. 2018): ``admm.epochs`` of W-steps on
  f(W) + rho_k/2 ||W - Z + U||^2, Z/U updated every ``admm.steps_per_iteration``
  steps (``gsm_optax.baselines.add_admm_penalty``); per-layer targets from a
  GSM run's ``summary.json`` (``admm.densities_from``), explicit
  ``admm.densities``, or else those of the global magnitude cut of the dense
  model; then hard pruning and ``finetune.epochs`` of masked retraining.
* ``lottery`` (Frankle & Carbin 2019, protocol of Ding et al.): the mask is the
  global top-Q of the dense weights (``lottery.ticket = "magnitude"``) or of
  the GSM-trained weights (``"gsm"``: a GSM stage of ``gsm.epochs``, or the
  ``final_model`` of an earlier GSM run given in ``lottery.gsm_checkpoint``);
  theta_0 * mask is retrained with the dense schedule and masked gradients.
* ``gsm_channels`` / ``filter_l1`` (Li et al. 2017): C counts output channels
  (``config.channels.axis``): ``gsm.epochs`` of ``gsm_optax.gsm_channels`` then
  ``prune_channels`` with no fine-tuning / ``prune_channels`` of the dense
  model then ``finetune.epochs`` of masked fine-tuning. With
  ``config.channels.groups`` ("neurons", "heads"; gpt and vit) a channel is a
  transformer's MLP neuron or attention head, ranked over every block
  (``gsm_optax.gsm_channel_groups``, ``prune_channel_groups``).
* ``gsm_nm`` / ``magnitude_nm`` (NVIDIA ASP): ``config.nm`` N of every M:
  ``gsm.epochs`` of ``gsm_optax.gsm_nm`` then ``prune_nm`` / ``prune_nm`` of the
  dense model then ``finetune.epochs`` of masked retraining.
  Structured GSM takes ``gsm.passive_rule`` as ``gsm`` does: with "shrink",
  ``gsm_optax.gsm_nm_adamw`` / ``gsm_nm_sgd_shrink`` (and the channel and
  channel-group ones) instead of the paper's rule.

The method notes: docs/METHOD.md; the config fields: docs/TRAINING.md.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import MutableMapping
import functools
import json
import os
from typing import Any
from typing import NamedTuple

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import gsm_optax
from gsm_optax import baselines
import models
from models import narrow as narrow_lib
from models import transformer
from training import checkpoints
from training import config as config_lib
from training import data as data_lib
from training import steps
from training import tasks
from training.steps import TrainState

Transition = Callable[[TrainState], tuple[TrainState, dict[str, Any]]]


class Stage(NamedTuple):
  """One stage after the dense phase.

  Attributes:
    name: the phase name in metrics.jsonl, the checkpoint and the summary.
    epochs: epochs trained in the stage (0: the transition only).
    phase: () -> ``steps.Phase``, built when first needed; None for a stage
      that never trains (``epochs == 0``).
    enter: state -> (state, results): the transition when the stage begins;
      results are JSON values recorded in the summary.
    bar_stats: state -> dict shown on the progress bar (optional).
    epoch_stats: state -> dict added to the stage's metrics.jsonl rows.
  """

  name: str
  epochs: int
  phase: Callable[[], steps.Phase] | None
  enter: Transition | None = None
  bar_stats: Callable[[TrainState], dict[str, Any]] | None = None
  epoch_stats: Callable[[TrainState], dict[str, Any]] | None = None


class Context(NamedTuple):
  """What a method needs to build its stages.

  Attributes:
    config: the run's config.
    workdir: the run's workdir.
    steps_per_epoch: optimizer steps per epoch.
    graphdef: the model graph in training mode.
    variables: ``{"params", "batch_stats"}`` of the freshly built model, the
      template for loading exported models.
    results: what the transitions so far recorded (restored on resume);
      stages read back the values they need from it.
    evaluate: (state, params) -> {metric: value} of ``params`` with the
      state's batch statistics on the test split, for the task's metrics
      (``{"accuracy": ...}``; language modelling adds ``bits_per_byte``).
    validate: (state, params) -> the same on the validation split; None
      without one.
    metrics: the names ``evaluate`` returns.
    mesh: the device mesh the phases compile for (None: one device, no
      sharding constraints).
    place: state -> the state with its arrays on the mesh (after a transition
      that builds new arrays).
  """

  config: ml_collections.ConfigDict
  workdir: str
  steps_per_epoch: int
  graphdef: nnx.GraphDef
  variables: dict[str, Any]
  results: MutableMapping[str, Any]
  evaluate: Callable[[TrainState, Any], dict[str, float]]
  validate: Callable[[TrainState, Any], dict[str, float] | None] = lambda state, params: None
  metrics: tuple[str, ...] = ("accuracy",)
  mesh: Any = None
  place: Callable[[Any], Any] = lambda tree: tree

  def phase(self, name: str, build: steps.OptimizerBuilder, cfg: Any, *extra: Any):
    """() -> the cached phase of optimizer ``build(cfg, steps_per_epoch, *extra)``."""
    return lambda: steps.make_phase(
      name,
      build,
      cfg,
      self.steps_per_epoch,
      self.graphdef,
      *extra,
      mesh=self.mesh,
      dtype=steps.compute_dtype(self.config),
    )


class Method(NamedTuple):
  """One entry of ``METHODS``.

  Attributes:
    stages: ctx -> the stages after the dense phase.
    check: config -> None; raises ``ConfigError`` on the method's own fields.
    prunes: whether the result is pruned to ``config.compression``.
    check_params: (config, abstract params) -> None; raises ``ConfigError``
      on targets the model cannot meet (``check_params`` runs it after the
      global Q >= 1 check of pruning methods), before anything is trained.
    final_results: (config, final params) -> JSON values added to the
      summary's ``method_results`` (what the final model reached).
  """

  stages: Callable[[Context], list[Stage]]
  check: Callable[[ml_collections.ConfigDict], None]
  prunes: bool = True
  check_params: Callable[[ml_collections.ConfigDict, Any], None] | None = None
  final_results: Callable[[ml_collections.ConfigDict, Any], dict[str, Any]] | None = None


PoolSpec = tuple[tuple[str, ...], tuple[str, ...]] | None  # (include, exclude) regexes, hashable


def pool_spec(config: ml_collections.ConfigDict) -> PoolSpec:
  """The run's pool as (include, exclude) key-path patterns, or None for every kernel.

  ``config.pool.include`` / ``config.pool.exclude`` when given; else the
  model's own default (``pool_include`` / ``pool_exclude`` of its class: the
  transformers pool their attention and MLP kernels); else None (every
  floating leaf with ndim >= 2, the reference code's pool).
  """
  section = config.get("pool") or {}
  include, exclude = tuple(section.get("include", ())), tuple(section.get("exclude", ()))
  model = models.MODELS[config.model]
  if not include:
    include = tuple(getattr(model, "pool_include", ()))
    exclude = exclude or tuple(getattr(model, "pool_exclude", ()))
  if not include and not exclude:
    return None
  return include, exclude


@functools.lru_cache(maxsize=32)
def pool_from_spec(spec: PoolSpec) -> gsm_optax.Pool:
  """The library pool of a spec: ``gsm_optax.path_pool(include, exclude)``, or None."""
  return None if spec is None else gsm_optax.path_pool(*spec)


def model_pool(config: ml_collections.ConfigDict) -> gsm_optax.Pool:
  """The pool every method of the run prunes (``pool_spec``)."""
  return pool_from_spec(pool_spec(config))


def check_pool_fields(config: ml_collections.ConfigDict) -> None:
  """``config.pool.include`` / ``exclude``: sequences of regular expressions (absent: defaults)."""
  if "pool" not in config:
    return
  for name in ("pool.include", "pool.exclude"):
    config_lib.check(
      config,
      name,
      lambda x: isinstance(x, (list, tuple)) and all(isinstance(p, str) and p for p in x),
      "a sequence of regular expressions over key paths such as 'blocks/0/attn/query/kernel'",
    )
  try:
    pool_from_spec(pool_spec(config))
  except ValueError as err:
    raise config_lib.ConfigError(f"config.pool: {err}") from None


def check_budget(config: ml_collections.ConfigDict, steps_per_epoch: int) -> None:
  """The GSM phase's optimizer can be built for ``steps_per_epoch`` (the passive shrink
  of ``passive_rule="shrink"`` stays below 1 per step), checked before training."""
  uses_gsm = config.method in ("gsm", "gsm_channels", "gsm_nm") or (
    config.method == "lottery"
    and config.lottery.ticket == "gsm"
    and not config.lottery.gsm_checkpoint
  )
  if not uses_gsm or config.gsm.get("passive_rule", "decay") != "shrink":
    return
  try:
    passive_shrink_rate(
      config.gsm, steps.section_schedule(config.gsm, steps_per_epoch), steps_per_epoch
    )
  except ValueError as err:
    raise config_lib.ConfigError(
      f"config.gsm.passive_shrink={config.gsm.passive_shrink:g} over config.gsm.epochs="
      f"{config.gsm.epochs} of {steps_per_epoch} steps: {err}"
    ) from None


def check_params(config: ml_collections.ConfigDict, params: Any) -> None:
  """Checks the pool-dependent values of ``config`` against the model, before training.

  ``params`` may be abstract (``jax.ShapeDtypeStruct`` leaves). Every pruning
  method needs Q = int(|pool| / C) >= 1; layer-wise variants need it per layer.

  Raises:
    ConfigError: one line naming the field and the largest value allowed.
  """
  method = METHODS[config.method]
  try:
    gsm_optax.resolve_pool(params, model_pool(config))
  except (ValueError, TypeError) as err:
    raise config_lib.ConfigError(f"the pool of {config.model} (config.pool): {err}") from None
  if method.prunes:
    try:
      gsm_optax.keep_count(params, float(config.compression), pool=model_pool(config))
    except ValueError as err:
      raise config_lib.ConfigError(f"config.compression={config.compression:g}: {err}") from None
  if method.check_params is not None:
    method.check_params(config, params)


def _check_layerwise(field: str) -> Callable[[ml_collections.ConfigDict, Any], None]:
  """Q_i = int(size_i / C) >= 1 for every pooled leaf when ``config.<field>`` is on."""

  def check(config, params):
    if not config_lib.get_field(config, field):
      return
    pool = gsm_optax.resolve_pool(params, model_pool(config))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, leaf), pooled in zip(flat, jax.tree.leaves(pool)):
      size = int(np.prod(leaf.shape))
      if pooled and int(size / float(config.compression)) < 1:
        raise config_lib.ConfigError(
          f"config.compression={config.compression:g} keeps no weight of the layer "
          f"{jax.tree_util.keystr(path)} ({size} weights) with config.{field}=True; use "
          f"compression <= {size} or a global cut"
        )

  return check


# ----------------------------------------------------------------------------
# Optimizers (module-level builders: the phase cache keys on them)


def gsm_compression(compression: float, ramp_steps: int) -> optax.ScalarOrSchedule:
  """C, or gradual GSM: C_t = 1 / d_t, d_t = 1/C + (1 - 1/C) (1 - t / T)^3, exactly C from t = T.

  The kept fraction d_t falls from 1 to 1/C along Zhu & Gupta's (2017) cubic
  over ``T = ramp_steps`` steps of the GSM phase.
  """
  if ramp_steps <= 0:
    return compression
  final = 1.0 / compression

  def schedule(count: jax.Array) -> jax.Array:
    t = jnp.minimum(count / ramp_steps, 1.0)
    density = final + (1.0 - final) * (1.0 - t) ** 3
    return jnp.where(count >= ramp_steps, jnp.float32(compression), 1.0 / density)

  return schedule


def passive_decay_horizon_steps(horizon_epochs: float, steps_per_epoch: int) -> int:
  """H in steps: ``round(horizon_epochs * steps_per_epoch)``, at least 1."""
  return max(1, round(horizon_epochs * steps_per_epoch))


PASSIVE_RULES = ("decay", "shrink")


def passive_shrink_rate(
  cfg: Any, lr: optax.Schedule, steps_per_epoch: int
) -> optax.ScalarOrSchedule:
  """r_t of ``passive_rule="shrink"``: ``gsm_optax.budget_shrink_rate`` over the section's
  epochs with kappa = ``cfg.passive_shrink`` (0 for a phase of no step)."""
  total_steps = int(cfg.epochs * steps_per_epoch)
  return gsm_optax.budget_shrink_rate(lr, total_steps, cfg.passive_shrink) if total_steps else 0.0


def gsm_optimizer(cfg: Any, steps_per_epoch: int, compression: float, spec: PoolSpec = None):
  """The GSM phase's optimizer: the section's optimizer with GSM's mask in front, by
  ``cfg.passive_rule`` (absent: "decay") and ``cfg.optimizer``:

  * "decay", SGD: ``gsm_optax.gsm``, the paper's rule (passive weights decay
    through weight decay only), with the C ramp and the opt-in variants
    ``score_ema`` and ``passive_decay_growth`` (0: off);
  * "decay", AdamW: ``mask_by_global_taylor`` in front of ``optax.adamw``;
  * "shrink": ``gsm_optax.gsm_sgd_shrink`` / ``gsm_optax.gsm_adamw``: passive
    weights take no optimizer step and shrink to exp(-``cfg.passive_shrink``)
    of their size over the section's epochs (``gsm_optax.budget_shrink_rate``).

  ``clip_norm > 0`` clips the gradient's global norm first."""
  lr = steps.section_schedule(cfg, steps_per_epoch)
  pool = pool_from_spec(spec)
  adamw = cfg.get("optimizer", "sgd") == "adamw"
  if cfg.get("passive_rule", "decay") == "shrink":
    rate = passive_shrink_rate(cfg, lr, steps_per_epoch)
    if adamw:
      tx = gsm_optax.gsm_adamw(
        lr,
        compression,
        passive_shrink=rate,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        weight_decay_mask=steps.pool_mask,
        pool=pool,
      )
    else:
      tx = gsm_optax.gsm_sgd_shrink(
        lr,
        compression,
        passive_shrink=rate,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov,
        pool=pool,
      )
  elif adamw:
    tx = optax.chain(gsm_optax.mask_by_global_taylor(compression, pool=pool), steps.adamw(cfg, lr))
  else:
    ramp_steps = round(cfg.get("ramp_epochs", 0.0) * steps_per_epoch)
    horizon = passive_decay_horizon_steps(
      cfg.get("passive_decay_horizon_epochs", 1.0), steps_per_epoch
    )
    tx = gsm_optax.gsm(
      lr,
      gsm_compression(compression, ramp_steps),
      momentum=cfg.momentum,
      weight_decay=cfg.weight_decay,
      nesterov=cfg.nesterov,
      score_ema=cfg.get("score_ema", 0.0),
      passive_decay_growth=cfg.get("passive_decay_growth", 0.0),
      passive_decay_horizon=horizon,
      pool=pool,
    )
  if cfg.get("clip_norm", 0.0):
    tx = optax.chain(*steps.clipping(cfg), tx)
  return tx, lr


def nonzero_pool_mask(params: Any, pool: gsm_optax.Pool = None) -> Any:
  """True on the pooled entries that are non-zero and on every entry outside the pool."""
  pool = gsm_optax.resolve_pool(params, pool)
  return jax.tree.map(lambda p, f: (p != 0) if f else jnp.ones(jnp.shape(p), bool), params, pool)


def masked_sgd(cfg: Any, steps_per_epoch: int, spec: PoolSpec = None):
  """``steps.optimizer`` (SGD or AdamW) followed by ``keep_masked``: the pooled
  zeros at init stay zero."""
  tx, lr = steps.optimizer(cfg, steps_per_epoch)
  pool = pool_from_spec(spec)
  keep = baselines.keep_masked(functools.partial(nonzero_pool_mask, pool=pool))
  return optax.chain(tx, keep), lr


def gmp_end_step(epochs: int, steps_per_epoch: int, update_every: int) -> int:
  """Step of the last GMP mask update: the last multiple of ``update_every`` in the stage."""
  return ((epochs * steps_per_epoch - 1) // update_every) * update_every


def gmp_optimizer(
  cfg: Any, steps_per_epoch: int, compression: float, end_step: int, spec: PoolSpec = None
):
  """SGD (or AdamW) followed by ``gradual_magnitude_pruning`` reaching C at ``end_step``."""
  tx, lr = steps.optimizer(cfg, steps_per_epoch)
  prune = baselines.gradual_magnitude_pruning(
    compression,
    begin_step=0,
    end_step=end_step,
    update_every=cfg.update_every_steps,
    initial_sparsity=cfg.initial_sparsity,
    layerwise=cfg.layerwise,
    pool=pool_from_spec(spec),
  )
  return optax.chain(tx, prune), lr


def admm_optimizer(cfg: Any, steps_per_epoch: int, treedef: Any, counts: tuple):
  """ADMM W-steps (penalty on the raw gradients, Z/U inside) followed by SGD."""
  tx, lr = steps.optimizer(cfg, steps_per_epoch)
  w_step = baselines.add_admm_penalty(
    cfg.rho,
    keep_count_tree(treedef, counts),
    steps_per_iteration=cfg.steps_per_iteration,
    rho_growth=cfg.rho_growth,
  )
  return optax.chain(w_step, tx), lr


# ----------------------------------------------------------------------------
# Transitions


@jax.jit
def _apply_mask(params, mask):
  return gsm_optax.apply_mask(params, mask)


def global_cut(params: Any, compression: float, pool: gsm_optax.Pool = None) -> Any:
  """The global magnitude cut to C: the Q pooled weights of greatest |w| stay."""
  return _apply_mask(params, gsm_optax.global_magnitude_mask(params, compression, pool=pool))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _magnitudes_at_rank(params, keep: int, spec: PoolSpec = None) -> tuple[jax.Array, jax.Array]:
  mask = gsm_optax.resolve_pool(params, pool_from_spec(spec))
  pooled = [p for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m]
  size = sum(leaf.size for leaf in pooled)
  kth = gsm_optax.global_kth_largest_magnitude
  largest_passive = kth(pooled, keep + 1) if keep < size else jnp.zeros(())
  return largest_passive, kth(pooled, keep)


def pool_magnitudes_at_cut(
  params: Any, compression: float, spec: PoolSpec = None
) -> tuple[float, float]:
  """(largest passive |w|, smallest kept |w|) over the pool, for Q = int(|pool| / C).

  The largest passive |w| is the (Q+1)-th largest, the most the final cut can
  remove from one weight; the smallest kept one is the Q-th largest.
  """
  keep = gsm_optax.keep_count(params, compression, pool=pool_from_spec(spec))
  return tuple(float(x) for x in _magnitudes_at_rank(params, keep, spec))


def _pruning(
  ctx: Context, prune: Callable[[Any], Any], extra: Callable[[Any], dict] | None = None
) -> Transition:
  """A transition that prunes the params and records the accuracies around it."""

  def enter(state):
    before = ctx.evaluate(state, state.params)
    results = extra(state.params) if extra else {}
    validation = ctx.validate(state, state.params)
    for name in before:
      results[f"validation_{name}_before_prune"] = None if validation is None else validation[name]
    pruned = prune(state.params)
    after = ctx.evaluate(state, pruned)
    results.update({f"{name}_before_prune": value for name, value in before.items()})
    results.update({f"{name}_after_prune": value for name, value in after.items()})
    return state._replace(params=pruned), results

  return enter


# ----------------------------------------------------------------------------
# The methods


def gsm_stages(ctx: Context) -> list[Stage]:
  """GSM training, then the global magnitude cut with no fine-tuning (with
  ``gsm.finetune``: then ``finetune.epochs`` of masked fine-tuning)."""
  compression = float(ctx.config.compression)
  spec = pool_spec(ctx.config)

  def cut_diagnostics(params):
    largest_passive, smallest_kept = pool_magnitudes_at_cut(params, compression, spec)
    return {
      "largest_passive_abs_weight_before_cut": largest_passive,
      "smallest_kept_abs_weight_before_cut": smallest_kept,
    }

  stages = [
    _gsm_stage(ctx, compression),
    Stage(
      "cut",
      0,
      None,
      _pruning(ctx, lambda p: global_cut(p, compression, pool_from_spec(spec)), cut_diagnostics),
    ),
  ]
  if ctx.config.gsm.get("finetune", False):
    finetune = ctx.config.finetune
    phase = ctx.phase("finetune", masked_sgd, finetune, spec)
    stages.append(Stage("finetune", finetune.epochs, phase))
  return stages


def _gsm_stage(ctx: Context, compression: float) -> Stage:
  spec = pool_spec(ctx.config)

  def bar_stats(state):
    stats = gsm_optax.gsm_stats(state.opt_state)
    return {"active": int(stats["num_active"]), "thresh": f"{float(stats['threshold']):.3g}"}

  def epoch_stats(state):
    stats = gsm_optax.gsm_stats(state.opt_state)
    return {
      "nonfinite_scores": int(stats["num_nonfinite"]),
      "invalid_compression_steps": int(stats["num_invalid_compression"]),
      "active_weights": int(stats["num_active"]),
      "keep": int(stats["keep"]),
      "threshold": float(stats["threshold"]),
      "largest_passive_abs_weight": pool_magnitudes_at_cut(state.params, compression, spec)[0],
    }

  return Stage(
    "gsm",
    ctx.config.gsm.epochs,
    ctx.phase("gsm", gsm_optimizer, ctx.config.gsm, compression, spec),
    bar_stats=bar_stats,
    epoch_stats=epoch_stats,
  )


def check_gsm(config: ml_collections.ConfigDict) -> None:
  config_lib.check_sgd_section(config, "gsm")
  if "ramp_epochs" in config.gsm:  # sections built by sgd_section alone have none: 0
    config_lib.check(
      config,
      "gsm.ramp_epochs",
      lambda x: config_lib.is_number(x) and 0 <= x <= config.gsm.epochs,
      f"a number in [0, gsm.epochs={config.gsm.epochs}]",
    )
  check_gsm_variants(config)


def _check_passive_rule(config: ml_collections.ConfigDict) -> None:
  """``gsm.passive_rule`` (absent: "decay") and, for "shrink", ``gsm.passive_shrink``."""
  check = functools.partial(config_lib.check, config)
  if "passive_rule" in config.gsm:
    check("gsm.passive_rule", lambda x: x in PASSIVE_RULES, "'decay' or 'shrink'")
  if config.gsm.get("passive_rule", "decay") == "shrink":
    check(
      "gsm.passive_shrink",
      lambda x: config_lib.is_number(x) and 0 < x < float("inf"),
      "a finite number > 0 (passive weights end at exp(-passive_shrink) of their size)",
    )


def check_gsm_variants(config: ml_collections.ConfigDict) -> None:
  """The opt-in fields of the ``gsm`` section (absent: off, as before they existed)."""
  check = functools.partial(config_lib.check, config)
  is_number = config_lib.is_number
  cfg = config.gsm
  _check_passive_rule(config)
  paper_rule = cfg.get("passive_rule", "decay") == "decay" and cfg.get("optimizer") != "adamw"
  for name in ("ramp_epochs", "score_ema", "passive_decay_growth"):
    if not paper_rule and cfg.get(name, 0.0):
      raise config_lib.ConfigError(
        f"config.gsm.{name}={cfg[name]!r} is a variant of the paper's momentum-SGD rule; "
        "with config.gsm.optimizer='adamw' or config.gsm.passive_rule='shrink' set it to 0"
      )
  if "score_ema" in cfg:
    check("gsm.score_ema", lambda x: is_number(x) and 0 <= x < 1, "a number in [0, 1)")
  if "passive_decay_growth" in cfg:
    check(
      "gsm.passive_decay_growth",
      lambda x: is_number(x) and 0 <= x < float("inf"),
      "a finite number >= 0",
    )
  if "passive_decay_horizon_epochs" in cfg:
    check(
      "gsm.passive_decay_horizon_epochs",
      lambda x: is_number(x) and 0 < x < float("inf"),
      "a finite number > 0 (epochs; at least one step is used)",
    )
  if "finetune" in cfg:
    check("gsm.finetune", lambda x: isinstance(x, bool), "True or False")
    if cfg.finetune:
      config_lib.check_sgd_section(config, "finetune")


def dense_stages(ctx: Context) -> list[Stage]:
  """No stage: the dense model is the result."""
  del ctx
  return []


def check_dense(config: ml_collections.ConfigDict) -> None:
  del config


def magnitude_stages(ctx: Context) -> list[Stage]:
  """R rounds of a magnitude cut (to C^(r/R)) and masked fine-tuning."""
  config = ctx.config
  rounds = config.magnitude.rounds
  schedule = baselines.iterative_compression_schedule(float(config.compression), rounds)
  per_round = config.finetune.epochs // rounds
  spec = pool_spec(config)
  stages = []
  for r, c_r in enumerate(schedule, start=1):
    name = "finetune" if rounds == 1 else f"finetune{r}"

    def prune(params, c_r=c_r):
      layerwise, pool = config.magnitude.layerwise, pool_from_spec(spec)
      return baselines.magnitude_prune(params, c_r, layerwise=layerwise, pool=pool)[0]

    def enter(state, prune=prune, r=r):
      state, results = _pruning(ctx, prune)(state)
      for metric in ctx.metrics:
        results[f"{metric}_after_prune_round{r}"] = results[f"{metric}_after_prune"]
      return state, results

    phase = ctx.phase(name, masked_sgd, config.finetune, spec)
    stages.append(Stage(name, per_round, phase, enter))
  return stages


def check_magnitude(config: ml_collections.ConfigDict) -> None:
  config_lib.check_sgd_section(config, "finetune")
  check = functools.partial(config_lib.check, config)
  check("magnitude.layerwise", lambda x: isinstance(x, bool), "True or False")
  check("magnitude.rounds", lambda x: config_lib.is_int(x) and x >= 1, "an integer >= 1")
  rounds, epochs = config.magnitude.rounds, config.finetune.epochs
  if epochs % rounds:
    raise config_lib.ConfigError(
      f"config.finetune.epochs={epochs} must be a multiple of "
      f"config.magnitude.rounds={rounds} (the epochs are split evenly)"
    )


def gmp_stages(ctx: Context) -> list[Stage]:
  """Gradual magnitude pruning, then the global cut and masked fine-tuning."""
  config = ctx.config
  compression = float(config.compression)
  cfg = config.gmp
  spec = pool_spec(config)
  end_step = gmp_end_step(cfg.epochs, ctx.steps_per_epoch, cfg.update_every_steps)
  return [
    Stage("gmp", cfg.epochs, ctx.phase("gmp", gmp_optimizer, cfg, compression, end_step, spec)),
    Stage(
      "finetune",
      config.finetune.epochs,
      ctx.phase("finetune", masked_sgd, config.finetune, spec),
      _pruning(ctx, lambda p: global_cut(p, compression, pool_from_spec(spec))),
    ),
  ]


def check_gmp(config: ml_collections.ConfigDict) -> None:
  config_lib.check_sgd_section(config, "gmp")
  config_lib.check_sgd_section(config, "finetune")
  check = functools.partial(config_lib.check, config)
  check("gmp.update_every_steps", lambda x: config_lib.is_int(x) and x >= 1, "a positive integer")
  check("gmp.initial_sparsity", lambda x: config_lib.is_number(x) and 0 <= x < 1, "in [0, 1)")
  check("gmp.layerwise", lambda x: isinstance(x, bool), "True or False")
  if config.gmp.epochs < 1:
    raise config_lib.ConfigError("config.gmp.epochs must be >= 1 for method 'gmp'")


def _summary_path(path: str) -> str:
  return os.path.join(path, "summary.json") if os.path.isdir(path) else path


def _leaf_paths(params: Any) -> list[str]:
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def admm_keep_counts(config: ml_collections.ConfigDict, params: Any) -> tuple[Any, str]:
  """Per-layer targets l_i of ADMM (a keep-count pytree) and where they come from."""
  cfg = config.admm
  compression = float(config.compression)
  pool = model_pool(config)
  if cfg.densities_from:
    path = _summary_path(cfg.densities_from)
    with open(path) as f:
      summary = json.load(f)
    theirs = float(summary.get("compression_target") or 0.0)
    if abs(theirs - compression) > 1e-6 * max(theirs, 1.0):
      raise config_lib.ConfigError(
        f"config.admm.densities_from={cfg.densities_from!r} was pruned at C={theirs:g}, "
        f"this run prunes at C={compression:g}"
      )
    densities = {row["path"]: row["nonzeros"] / row["size"] for row in summary["layers"]}
    source = f"per-layer densities of {os.path.abspath(path)} ({summary.get('method', 'gsm')})"
  elif cfg.densities:
    densities = [float(d) for d in cfg.densities]
    source = "config.admm.densities"
  else:
    densities = gsm_optax.sparsity_report(global_cut(params, compression, pool), pool=pool)
    source = "per-layer densities of the global magnitude cut of the dense model"
  try:
    counts = baselines.layer_keep_counts_from_density(params, densities, pool=pool)
  except (ValueError, TypeError) as err:
    raise config_lib.ConfigError(f"ADMM per-layer targets: {err}") from None
  return counts, source


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def keep_count_tree(treedef: Any, counts: tuple) -> Any:
  """The library's keep-count pytree: l_i on target leaves, ``MaskedNode`` on the others."""
  return jax.tree.unflatten(treedef, [optax.MaskedNode() if c is None else c for c in counts])


def _counts_by_path(counts: Any, params: Any) -> dict[str, int]:
  leaves = jax.tree.leaves(counts, is_leaf=_is_masked)
  return {path: int(c) for path, c in zip(_leaf_paths(params), leaves) if not _is_masked(c)}


def _counts_from_paths(by_path: dict[str, int], params: Any) -> tuple[Any, tuple]:
  """(treedef, per-leaf counts with None off the targets): the hashable keep counts."""
  treedef = jax.tree.structure(params)
  return treedef, tuple(by_path.get(path) for path in _leaf_paths(params))


def admm_stages(ctx: Context) -> list[Stage]:
  """ADMM W-steps with Z/U updates, then hard pruning and masked retraining."""
  config = ctx.config
  template = ctx.variables["params"]

  def enter_admm(state):
    counts, source = admm_keep_counts(config, state.params)
    return state, {
      "admm_targets_source": source,
      "admm_keep_counts": _counts_by_path(counts, state.params),
    }

  def keep_counts():  # what enter_admm recorded (this run, or before a resume)
    return _counts_from_paths(ctx.results["admm_keep_counts"], template)

  def admm_phase():
    return ctx.phase("admm", admm_optimizer, config.admm, *keep_counts())()

  def hard_prune(params):
    return baselines.admm_hard_prune(params, keep_count_tree(*keep_counts()))[0]

  return [
    Stage("admm", config.admm.epochs, admm_phase, enter_admm),
    Stage(
      "finetune",
      config.finetune.epochs,
      ctx.phase("finetune", masked_sgd, config.finetune, pool_spec(config)),
      _pruning(ctx, hard_prune),
    ),
  ]


def check_admm_params(config: ml_collections.ConfigDict, params: Any) -> None:
  """Explicit per-layer densities must name every pooled layer."""
  if config.admm.densities:
    try:
      densities = list(config.admm.densities)
      baselines.layer_keep_counts_from_density(params, densities, pool=model_pool(config))
    except (ValueError, TypeError) as err:
      raise config_lib.ConfigError(f"config.admm.densities: {err}") from None


def check_admm(config: ml_collections.ConfigDict) -> None:
  config_lib.check_sgd_section(config, "admm")
  config_lib.check_sgd_section(config, "finetune")
  check = functools.partial(config_lib.check, config)
  is_number, is_finite = config_lib.is_number, config_lib.is_finite
  check("admm.steps_per_iteration", lambda x: config_lib.is_int(x) and x >= 1, "a positive integer")
  check("admm.rho", lambda x: is_finite(x) and x >= 0, "a finite number >= 0")
  check("admm.rho_growth", lambda x: is_finite(x) and x >= 1, "a finite number >= 1")
  check(
    "admm.densities_from",
    lambda x: x is None or isinstance(x, str),
    "None or a GSM run's summary.json (or its workdir)",
  )
  check(
    "admm.densities",
    lambda x: (
      x is None or (isinstance(x, (list, tuple)) and all(is_number(d) and 0 <= d <= 1 for d in x))
    ),
    "None or a sequence of densities in [0, 1], one per pooled layer",
  )
  if config.admm.densities_from and config.admm.densities:
    raise config_lib.ConfigError(
      "config.admm.densities_from and config.admm.densities exclude each "
      "other: give the per-layer targets one way"
    )
  if config.admm.densities_from:
    path = _summary_path(config.admm.densities_from)
    if not os.path.isfile(path):
      raise config_lib.ConfigError(
        f"config.admm.densities_from={config.admm.densities_from!r}: no {path}"
      )


TICKETS = ("magnitude", "gsm")


def initial_model_dir(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """theta_0: ``initial_model/`` beside the dense model (loaded or trained here)."""
  if not config.dense_checkpoint:
    return os.path.join(workdir, "initial_model")
  for base in (config.dense_checkpoint, os.path.dirname(os.path.abspath(config.dense_checkpoint))):
    candidate = os.path.join(base, "initial_model")
    if os.path.isdir(candidate):
      return candidate
  return None


def lottery_stages(ctx: Context) -> list[Stage]:
  """(A GSM stage,) then theta_0 * mask retrained with the dense schedule."""
  config = ctx.config
  compression = float(config.compression)
  ticket, gsm_source = config.lottery.ticket, config.lottery.gsm_checkpoint
  spec = pool_spec(config)
  pool = pool_from_spec(spec)
  stages = []
  if ticket == "gsm" and not gsm_source:
    stages.append(_gsm_stage(ctx, compression))

  def load(path):
    return ctx.place(checkpoints.load_model(path, ctx.variables))

  def enter_ticket(state):
    source, results = state.params, {}
    if ticket == "gsm" and gsm_source:
      path = os.path.join(gsm_source, "final_model")
      path = path if os.path.isdir(path) else gsm_source
      source = load(path)["params"]
      results["ticket_source"] = f"checkpoint:{os.path.abspath(path)}"
    else:
      results["ticket_source"] = "dense model" if ticket == "magnitude" else "gsm stage"
    cut = ctx.evaluate(state, global_cut(source, compression, pool))
    results.update({f"source_{name}_after_cut": value for name, value in cut.items()})
    mask = baselines.ticket_mask(source, compression, pool=pool)
    initial = load(initial_model_dir(config, ctx.workdir))
    params = ctx.place(baselines.apply_ticket(initial["params"], mask))
    state = state._replace(params=params, batch_stats=initial["batch_stats"])
    after = ctx.evaluate(state, params)
    results.update({f"{name}_after_prune": value for name, value in after.items()})
    return state, results

  phase = ctx.phase("ticket", masked_sgd, config.dense, spec)
  stages.append(Stage("ticket", config.dense.epochs, phase, enter_ticket))
  return stages


def check_lottery(config: ml_collections.ConfigDict) -> None:
  check = functools.partial(config_lib.check, config)
  check("lottery.ticket", lambda x: x in TICKETS, f"one of {', '.join(TICKETS)}")
  check(
    "lottery.gsm_checkpoint",
    lambda x: x is None or isinstance(x, str),
    "None or a GSM run's workdir (or its final_model/)",
  )
  if config.lottery.ticket == "gsm":
    config_lib.check_sgd_section(config, "gsm")
    check_gsm_variants(config)
    if config.gsm.get("finetune", False):
      raise config_lib.ConfigError(
        "config.gsm.finetune=True applies to config.method='gsm' only; the lottery "
        "ticket is retrained from theta_0 instead"
      )
  if config.lottery.gsm_checkpoint and not os.path.isdir(config.lottery.gsm_checkpoint):
    raise config_lib.ConfigError(
      f"config.lottery.gsm_checkpoint={config.lottery.gsm_checkpoint!r} is not a directory"
    )
  if config.skip_dense:
    raise config_lib.ConfigError(
      "config.method='lottery' needs the dense model: config.skip_dense must be False"
    )
  if config.dense_checkpoint and initial_model_dir(config, "") is None:
    raise config_lib.ConfigError(
      f"config.dense_checkpoint={config.dense_checkpoint!r} has no "
      "initial_model/ (theta_0) beside its dense_model/; the lottery "
      "ticket needs the weights the dense model was trained from"
    )


# ----------------------------------------------------------------------------
# Structured methods: whole output channels (C counts channels), and N:M groups


def layer_names(layers: str) -> tuple[str, ...]:
  """``"conv2,fc1"`` -> ("conv2", "fc1"): the top-level layers of a structured pool."""
  return tuple(name.strip() for name in layers.split(",") if name.strip())


def _top_name(path: tuple) -> str:
  key = path[0]
  return str(getattr(key, "key", getattr(key, "name", key)))


def layer_pool(
  layers: str, exclude: str | None = None, spec: PoolSpec = None
) -> Callable[[Any], Any]:
  """params -> the pooled kernels (``spec``; None: ``ndim >= 2``) of the named
  top-level layers; with ``layers`` empty, every one but those of the layer ``exclude``."""
  names = layer_names(layers)
  base = pool_from_spec(spec)

  def pool(params: Any) -> Any:
    def pooled(path, flag):
      name = _top_name(path)
      return flag and (name in names if names else name != exclude)

    return jax.tree_util.tree_map_with_path(pooled, gsm_optax.resolve_pool(params, base))

  return pool


def channel_pool(model: str, layers: str, spec: PoolSpec = None) -> Callable[[Any], Any]:
  """The channel methods' pool: ``layers`` (``config.channels.layers``), or every
  pooled kernel but the classifier's (its output channels are the classes)."""
  return layer_pool(layers, exclude=models.MODELS[model].classifier, spec=spec)


def _channel_pool(config: ml_collections.ConfigDict) -> Callable[[Any], Any]:
  return channel_pool(config.model, config.channels.layers, pool_spec(config))


def group_kind(config: ml_collections.ConfigDict) -> str:
  """``config.channels.groups``: "" (per-leaf channels), "neurons" or "heads"."""
  return config.channels.get("groups", "")


@functools.lru_cache(maxsize=8)
def _head_dim(model: str, options: tuple) -> int:
  abstract = nnx.eval_shape(lambda: models.create_model(model, rngs=nnx.Rngs(0), **dict(options)))
  return abstract.blocks[0].attn.head_dim


def group_args(config: ml_collections.ConfigDict) -> tuple[str, int | None]:
  """(kind, head_dim) of the run's channel groups: head_dim of the model's
  attention for "heads", None otherwise (hashable: the phase cache keys on it)."""
  kind = group_kind(config)
  if kind != "heads":
    return kind, None
  options = tuple(tasks.for_dataset(config.dataset).model_options(config))
  return kind, _head_dim(config.model, options)


def _channel_groups(config: ml_collections.ConfigDict) -> Callable[[Any], Any]:
  return transformer.channel_groups(*group_args(config))


def _nm_pool(config: ml_collections.ConfigDict) -> Callable[[Any], Any]:
  return layer_pool(config.nm.layers, spec=pool_spec(config))


def gsm_channels_optimizer(
  cfg: Any,
  steps_per_epoch: int,
  compression: float,
  model: str,
  layers: str,
  axis: int,
  score: str,
  spec: PoolSpec = None,
) -> tuple[optax.GradientTransformation, Any]:
  """Channel GSM (C in channels) with the section's learning rate (`_structured_gsm`)."""
  lr = steps.section_schedule(cfg, steps_per_epoch)
  pool = channel_pool(model, layers, spec)
  kwargs = dict(pool=pool, channel_axis=axis, channel_score=score)
  tx = _structured_gsm(cfg, lr, steps_per_epoch, _CHANNELS, (compression,), kwargs)
  return tx, lr


def gsm_channel_groups_optimizer(
  cfg: Any,
  steps_per_epoch: int,
  compression: float,
  kind: str,
  head_dim: int | None,
  score: str,
) -> tuple[optax.GradientTransformation, Any]:
  """Channel-group GSM over a transformer's neurons or heads (C in channels) with the
  section's learning rate (`_structured_gsm`)."""
  lr = steps.section_schedule(cfg, steps_per_epoch)
  groups = transformer.channel_groups(kind, head_dim)
  args, kwargs = (compression, groups), dict(channel_score=score)
  return _structured_gsm(cfg, lr, steps_per_epoch, _CHANNEL_GROUPS, args, kwargs), lr


def gsm_nm_optimizer(
  cfg: Any, steps_per_epoch: int, n: int, m: int, axis: int, layers: str, spec: PoolSpec = None
) -> tuple[optax.GradientTransformation, Any]:
  """N:M GSM with the section's learning rate (`_structured_gsm`)."""
  lr = steps.section_schedule(cfg, steps_per_epoch)
  kwargs = dict(pool=layer_pool(layers, spec=spec), axis=axis)
  return _structured_gsm(cfg, lr, steps_per_epoch, _NM, (n, m), kwargs), lr


class _Structure(NamedTuple):
  """The library's constructors of one structured GSM, by passive rule and optimizer."""

  mask: Callable[..., optax.GradientTransformation]  # "decay" with AdamW: in front of AdamW
  sgd: Callable[..., optax.GradientTransformation]  # "decay" with SGD: the paper's rule
  adamw_shrink: Callable[..., optax.GradientTransformation]
  sgd_shrink: Callable[..., optax.GradientTransformation]


_CHANNELS = _Structure(
  gsm_optax.mask_by_global_channel_taylor,
  gsm_optax.gsm_channels,
  gsm_optax.gsm_channels_adamw,
  gsm_optax.gsm_channels_sgd_shrink,
)
_CHANNEL_GROUPS = _Structure(
  gsm_optax.mask_by_global_group_taylor,
  gsm_optax.gsm_channel_groups,
  gsm_optax.gsm_channel_groups_adamw,
  gsm_optax.gsm_channel_groups_sgd_shrink,
)
_NM = _Structure(
  gsm_optax.mask_by_nm_taylor, gsm_optax.gsm_nm, gsm_optax.gsm_nm_adamw, gsm_optax.gsm_nm_sgd_shrink
)


def _structured_gsm(
  cfg: Any,
  lr: optax.Schedule,
  steps_per_epoch: int,
  structure: _Structure,
  args: tuple,
  kwargs: dict[str, Any],
) -> optax.GradientTransformation:
  """A structured GSM phase, by ``cfg.passive_rule`` (absent: "decay") and ``cfg.optimizer``:

  * "decay", SGD: the library's momentum-SGD preset (``gsm_optax.gsm_nm``, ...);
  * "decay", AdamW: the structured mask in front of ``optax.adamw``;
  * "shrink": ``gsm_optax.gsm_nm_adamw`` / ``gsm_optax.gsm_nm_sgd_shrink`` (and the
    channel and channel-group ones): passive weights take no optimizer step and shrink
    to exp(-``cfg.passive_shrink``) of their size over the section's epochs.

  ``args`` follow the learning rate (the mask takes them first), ``kwargs`` are the
  structure's own (pool, axes, score). The gradient's global norm is clipped first
  when ``clip_norm > 0``."""
  adamw = cfg.get("optimizer", "sgd") == "adamw"
  sgd_args = dict(momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
  if cfg.get("passive_rule", "decay") == "shrink":
    rate = passive_shrink_rate(cfg, lr, steps_per_epoch)
    if adamw:
      adamw_args = dict(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
      tx = structure.adamw_shrink(
        lr, *args, passive_shrink=rate, weight_decay_mask=steps.pool_mask, **adamw_args, **kwargs
      )
    else:
      tx = structure.sgd_shrink(lr, *args, passive_shrink=rate, **sgd_args, **kwargs)
  elif adamw:
    tx = optax.chain(structure.mask(*args, **kwargs), steps.adamw(cfg, lr))
  else:
    tx = structure.sgd(lr, *args, **sgd_args, **kwargs)
  if cfg.get("clip_norm", 0.0):
    tx = optax.chain(*steps.clipping(cfg), tx)
  return tx


def channel_cut(config: ml_collections.ConfigDict) -> Callable[[Any], Any]:
  """params -> the Q = int(#pooled channels / C) channels of greatest sum (mean) |w| kept
  (with ``channels.groups``: channels of the groups, each over all its member slices)."""
  if group_kind(config):
    return jax.jit(
      functools.partial(
        gsm_optax.prune_channel_groups,
        compression=float(config.compression),
        groups=_channel_groups(config),
        channel_score=config.channels.score,
      )
    )
  cut = functools.partial(
    gsm_optax.prune_channels,
    compression=float(config.compression),
    pool=_channel_pool(config),
    channel_axis=config.channels.axis,
    channel_score=config.channels.score,
  )
  return jax.jit(cut)


def nm_cut(config: ml_collections.ConfigDict) -> Callable[[Any], Any]:
  """params -> the N of greatest |w| of every group of M kept."""
  n, m, axis = config.nm.n, config.nm.m, config.nm.axis
  pool = _nm_pool(config)
  return jax.jit(lambda p: gsm_optax.prune_nm(p, n, m, pool=pool, axis=axis))


def narrow_macs(config: ml_collections.ConfigDict, params: Any) -> dict[str, int]:
  """Multiply-accumulates of one forward pass of the model and of its narrowed
  copy (``models.narrow``: dead channels removed); {} for a model with no
  narrowing or params not all on this process."""
  leaves = jax.tree.leaves(params)
  if not all(getattr(x, "is_fully_addressable", True) for x in leaves):
    return {}
  classifier = models.MODELS[config.model].classifier
  num_classes = int(np.shape(params[classifier]["kernel"])[-1])
  options = dict(tasks.for_dataset(config.dataset).model_options(config))
  model = nnx.eval_shape(  # shapes only: the params are set below, no initialiser runs
    lambda: models.create_model(config.model, num_classes=num_classes, rngs=nnx.Rngs(0), **options)
  )
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.device_get(params))
  nnx.update(model, state)
  try:
    narrowed = narrow_lib.narrow(model)
  except TypeError:
    return {}
  if isinstance(model, models.GPT):  # one sequence of the model's context
    shape, dtype = (model.context,), jnp.int32
  else:
    shape, dtype = data_lib.image_shape(config.dataset), jnp.float32
  return {
    "macs_dense": narrow_lib.count_macs(model, shape, dtype),
    "macs_narrow": narrow_lib.count_macs(narrowed, shape, dtype),
  }


def channel_results(config: ml_collections.ConfigDict, params: Any) -> dict[str, Any]:
  """What a channel method reached: channels kept of all pooled ones, both
  compressions, and the MACs of the narrowed model."""
  if group_kind(config):
    return _group_results(config, params)
  report = gsm_optax.channel_report(
    params, pool=_channel_pool(config), channel_axis=config.channels.axis
  )
  dead = [row.path for row in report.rows if row.channels_kept == 0]
  if dead:
    logging.warning(
      "the channel cut left no channel in %s: nothing but a constant passes there; rank per "
      "weight (config.channels.score='mean') or choose the pooled layers (config.channels.layers)",
      ", ".join(dead),
    )
  return {
    "layers_without_channels": dead,
    "channels_total": report.total_channels,
    "channels_kept": report.total_channels_kept,
    "channels_kept_per_layer": {row.path: row.channels_kept for row in report.rows},
    "channel_compression_reached": report.channel_compression,
    "weight_compression_reached": report.compression,
    **narrow_macs(config, params),
  }


def _group_results(config: ml_collections.ConfigDict, params: Any) -> dict[str, Any]:
  """``channel_results`` with ``channels.groups``: channels kept per group (a block's
  MLP or attention; 0 is allowed, the block's residual carries on)."""
  report = gsm_optax.channel_group_report(params, _channel_groups(config))
  return {
    "channel_groups": group_kind(config),
    "groups_without_channels": [row.group for row in report.rows if row.channels_kept == 0],
    "channels_total": report.total_channels,
    "channels_kept": report.total_channels_kept,
    "channels_kept_per_group": report.kept_per_group,
    "channel_compression_reached": report.channel_compression,
    "weight_compression_reached": report.compression,
    **narrow_macs(config, params),
  }


def nm_results(config: ml_collections.ConfigDict, params: Any) -> dict[str, Any]:
  """What an N:M method reached: whether every group holds at most N non-zeros."""
  n, m = config.nm.n, config.nm.m
  report = gsm_optax.nm_report(params, n, m, pool=_nm_pool(config), axis=config.nm.axis)
  return {
    "nm": f"{n}:{m}",
    "nm_conforms": report.conforms,
    "nm_groups": report.total_groups,
    "nm_groups_over_n": report.total_groups_over,
    "nm_nonzeros": sum(row.nonzeros for row in report.rows),
  }


def _channel_bar_stats(state: TrainState) -> dict[str, Any]:
  stats = gsm_optax.channel_stats(state.opt_state)
  return {"active": int(stats["num_active"]), "thresh": f"{float(stats['threshold']):.3g}"}


def _channel_epoch_stats(state: TrainState) -> dict[str, Any]:
  """Active channels (Q, or more on ties), Q, the channel score threshold, clamped-C steps."""
  stats = gsm_optax.channel_stats(state.opt_state)
  return {
    "active_channels": int(stats["num_active"]),
    "keep_channels": int(stats["keep"]),
    "threshold": float(stats["threshold"]),
    "invalid_compression_steps": int(stats["num_invalid_compression"]),
  }


def _nm_stats(state: TrainState) -> dict[str, Any]:
  return {"active_weights": int(gsm_optax.nm_stats(state.opt_state)["num_active"])}


def _gsm_then_cut(
  ctx: Context, phase: Callable, cut: Callable, bar_stats: Callable, epoch_stats: Callable
) -> list[Stage]:
  """``gsm.epochs`` of a structured GSM ``phase``, then ``cut`` with no fine-tuning."""
  return [
    Stage("gsm", ctx.config.gsm.epochs, phase, bar_stats=bar_stats, epoch_stats=epoch_stats),
    Stage("cut", 0, None, _pruning(ctx, cut)),
  ]


def gsm_channels_stages(ctx: Context) -> list[Stage]:
  """Channel GSM, then the channel cut to C (in channels) with no fine-tuning."""
  config, ch = ctx.config, ctx.config.channels
  if group_kind(config):
    extra = (float(config.compression), *group_args(config), ch.score)
    phase = ctx.phase("gsm", gsm_channel_groups_optimizer, config.gsm, *extra)
  else:
    extra = (float(config.compression), config.model, ch.layers, ch.axis, ch.score)
    phase = ctx.phase("gsm", gsm_channels_optimizer, config.gsm, *extra, pool_spec(config))
  return _gsm_then_cut(ctx, phase, channel_cut(config), _channel_bar_stats, _channel_epoch_stats)


def gsm_nm_stages(ctx: Context) -> list[Stage]:
  """N:M GSM, then the N:M cut with no fine-tuning."""
  config, nm = ctx.config, ctx.config.nm
  extra = (nm.n, nm.m, nm.axis, nm.layers, pool_spec(config))
  phase = ctx.phase("gsm", gsm_nm_optimizer, config.gsm, *extra)
  return _gsm_then_cut(ctx, phase, nm_cut(config), _nm_stats, _nm_stats)


def _cut_then_finetune(ctx: Context, cut: Callable[[Any], Any]) -> list[Stage]:
  """``cut`` of the dense model, then ``finetune.epochs`` of masked fine-tuning."""
  finetune = ctx.config.finetune
  return [
    Stage(
      "finetune",
      finetune.epochs,
      ctx.phase("finetune", masked_sgd, finetune, pool_spec(ctx.config)),
      _pruning(ctx, cut),
    )
  ]


def filter_l1_stages(ctx: Context) -> list[Stage]:
  """L1-norm filter pruning (Li et al. 2017) of the dense model, then masked fine-tuning."""
  return _cut_then_finetune(ctx, channel_cut(ctx.config))


def magnitude_nm_stages(ctx: Context) -> list[Stage]:
  """ASP's recipe: the magnitude N:M cut of the dense model, then masked retraining."""
  return _cut_then_finetune(ctx, nm_cut(ctx.config))


def _check_axis(config: ml_collections.ConfigDict, field: str) -> None:
  config_lib.check(config, field, config_lib.is_int, "an integer (an axis of every pooled leaf)")


def check_channels(config: ml_collections.ConfigDict) -> None:
  _check_axis(config, "channels.axis")
  config_lib.check(
    config, "channels.score", lambda x: x in gsm_optax.CHANNEL_SCORES, "'sum' or 'mean'"
  )
  config_lib.check(config, "channels.layers", lambda x: isinstance(x, str), "a string")
  kind = group_kind(config)
  if kind not in ("", *transformer.CHANNEL_GROUP_KINDS):
    raise config_lib.ConfigError(
      f"config.channels.groups must be '' (per-leaf channels), 'neurons' (MLP hidden neurons) "
      f"or 'heads' (attention heads), got {kind!r}"
    )
  if kind and not issubclass(models.MODELS[config.model], (models.GPT, models.ViT)):
    raise config_lib.ConfigError(
      f"config.channels.groups={kind!r} prunes the {kind} of transformer blocks: use model gpt "
      f"or vit, not {config.model} (or config.channels.groups='')"
    )
  if kind and config.channels.layers:
    raise config_lib.ConfigError(
      f"config.channels.layers={config.channels.layers!r} selects layers of per-leaf channels; "
      f"with config.channels.groups={kind!r} the groups are every block's: set it to ''"
    )


def _check_layers(config: ml_collections.ConfigDict, field: str, params: Any) -> None:
  """Every name in ``config.<field>`` is a top-level layer of the model with a kernel."""
  flat = jax.tree_util.tree_flatten_with_path(gsm_optax.resolve_pool(params, model_pool(config)))
  have = sorted({_top_name(p) for p, f in flat[0] if f})
  for name in layer_names(config_lib.get_field(config, field)):
    if name not in have:
      raise config_lib.ConfigError(
        f"config.{field} names {name!r}, which is not a layer of {config.model} with a "
        f"kernel; its layers: {', '.join(have)}"
      )


def check_nm(config: ml_collections.ConfigDict) -> None:
  check = functools.partial(config_lib.check, config)
  check("nm.n", lambda x: config_lib.is_int(x) and x >= 1, "an integer >= 1")
  check(
    "nm.m",
    lambda x: config_lib.is_int(x) and x >= config.nm.n,
    f"an integer >= config.nm.n={config.nm.n}",
  )
  _check_axis(config, "nm.axis")
  check("nm.layers", lambda x: isinstance(x, str), "a string")


def _check_structured_gsm(config: ml_collections.ConfigDict) -> None:
  """Structured GSM takes either passive rule (with SGD or AdamW)."""
  config_lib.check_sgd_section(config, "gsm")
  _check_passive_rule(config)


def check_gsm_channels(config: ml_collections.ConfigDict) -> None:
  _check_structured_gsm(config)
  check_channels(config)


def check_gsm_nm(config: ml_collections.ConfigDict) -> None:
  _check_structured_gsm(config)
  check_nm(config)


def check_filter_l1(config: ml_collections.ConfigDict) -> None:
  config_lib.check_sgd_section(config, "finetune")
  check_channels(config)


def check_magnitude_nm(config: ml_collections.ConfigDict) -> None:
  config_lib.check_sgd_section(config, "finetune")
  check_nm(config)


def _check_group_params(config: ml_collections.ConfigDict, params: Any) -> None:
  """The groups' kernels are in the run's pool (the fine-tuning keeps its zeros), and C
  keeps 1 <= Q <= #channels of the groups."""
  kind = group_kind(config)
  pool = jax.tree.leaves(gsm_optax.resolve_pool(params, model_pool(config)))
  try:
    layout = gsm_optax.resolve_groups(params, _channel_groups(config))
    outside = [p for p, i in zip(layout.paths, layout.leaves) if not pool[i]]
    if outside:
      raise ValueError(f"config.pool leaves out {', '.join(outside)}, which the groups prune")
    jax.eval_shape(channel_cut(config), params)
  except (ValueError, TypeError) as err:
    raise config_lib.ConfigError(
      f"config.compression={config.compression:g}, config.channels.groups={kind!r}: {err}"
    ) from None


def check_channel_params(config: ml_collections.ConfigDict, params: Any) -> None:
  """C (in channels) keeps 1 <= Q <= #pooled channels, along an axis every pooled leaf has."""
  if group_kind(config):
    _check_group_params(config, params)
    return
  _check_layers(config, "channels.layers", params)
  try:
    jax.eval_shape(channel_cut(config), params)
  except ValueError as err:
    raise config_lib.ConfigError(
      f"config.compression={config.compression:g}, config.channels.axis="
      f"{config.channels.axis}: {err}"
    ) from None


def check_nm_params(config: ml_collections.ConfigDict, params: Any) -> None:
  """M divides config.nm.axis of every pooled leaf."""
  _check_layers(config, "nm.layers", params)
  try:
    jax.eval_shape(nm_cut(config), params)
  except ValueError as err:
    raise config_lib.ConfigError(
      f"config.nm.n={config.nm.n}, config.nm.m={config.nm.m}, config.nm.axis="
      f"{config.nm.axis}: {err}"
    ) from None


METHODS: dict[str, Method] = {
  "gsm": Method(gsm_stages, check_gsm),
  "dense": Method(dense_stages, check_dense, prunes=False),
  "magnitude": Method(
    magnitude_stages, check_magnitude, check_params=_check_layerwise("magnitude.layerwise")
  ),
  "gmp": Method(gmp_stages, check_gmp, check_params=_check_layerwise("gmp.layerwise")),
  "admm": Method(admm_stages, check_admm, check_params=check_admm_params),
  "lottery": Method(lottery_stages, check_lottery),
  "gsm_channels": Method(
    gsm_channels_stages,
    check_gsm_channels,
    check_params=check_channel_params,
    final_results=channel_results,
  ),
  "filter_l1": Method(
    filter_l1_stages,
    check_filter_l1,
    check_params=check_channel_params,
    final_results=channel_results,
  ),
  "gsm_nm": Method(
    gsm_nm_stages,
    check_gsm_nm,
    prunes=False,
    check_params=check_nm_params,
    final_results=nm_results,
  ),
  "magnitude_nm": Method(
    magnitude_nm_stages,
    check_magnitude_nm,
    prunes=False,
    check_params=check_nm_params,
    final_results=nm_results,
  ),
}

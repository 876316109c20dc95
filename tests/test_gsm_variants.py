"""The opt-in GSM variants beyond the paper, against a NumPy reference written here.

`NumpyVariantGSM` implements docs/METHOD.md ("Beyond the paper") in float32 NumPy:

    T = |g * w|,  s <- d s + (1 - d) T     (d = score_ema; s = T when d = 0)
    t = sort(s)[-Q],  B = (s >= t) & (s > 0)           on the pool
    a <- a + 1 where B g == 0, else 0                  (passive age, on the pool)
    u = B g + eta * growth * min(a / H, 1) * w + eta * w   on the pool, u = g off it
    z <- beta z + u,  w <- w - alpha z

Under `jax.jit` XLA fuses each ``a * b + c`` into one fused multiply-add, as
the reference does with ``fused=True`` (see tests/test_transform.py). The
smoothed score ``d * s + (1 - d) * T`` has two products, and which of them XLA
fuses is its choice: the reference rounds it once (in float64), so scores
differ from the library's by a few float32 ulps (each step adds at most two
roundings and the EMA shrinks old errors by d: < 4 ulp / (1 - d) in all),
hence their rtol of 1e-5 at d = 0.9; masks and passive ages are compared
exactly.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from test_train import KEEP  # noqa: E402
from test_train import data_dir  # noqa: E402, F401  (the fixture)
from test_train import tiny_config  # noqa: E402

from configs import default as default_config  # noqa: E402
import gsm_optax  # noqa: E402
from training import config as config_lib  # noqa: E402
from training import stages  # noqa: E402
from training import train_lib  # noqa: E402

LR, BETA, ETA, C = 0.05, 0.9, 1e-2, 4.0
POOL_FLAGS = {  # the shared problem of conftest.py: kernels pooled, biases not
  "conv": {"bias": False, "kernel": True},
  "mlp": {"dense1": {"bias": False, "kernel": True}, "dense2": {"bias": False, "kernel": True}},
}


def _muladd(a, b, c, fused: bool) -> np.ndarray:
  a, b, c = np.float32(a), np.float32(b), np.float32(c)
  if fused:
    return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32)
  return a * b + c


class NumpyVariantGSM:
  """GSM with the smoothed score and the passive-age decay, in float32 NumPy."""

  def __init__(self, params, *, score_ema=0.0, growth=0.0, horizon=1, fused=False):
    self.w = [np.array(p, np.float32) for p in jax.tree.leaves(params)]
    self.z = [np.zeros_like(w) for w in self.w]
    self.s = [np.zeros_like(w) for w in self.w]
    self.age = [np.zeros(w.shape, np.int64) for w in self.w]
    self.pool = jax.tree.leaves(POOL_FLAGS)
    self.treedef = jax.tree.structure(params)
    self.d, self.growth, self.horizon, self.fused = score_ema, growth, horizon, fused
    self.keep = int(sum(w.size for w, p in zip(self.w, self.pool) if p) / C)

  def step(self, grads):
    """One update; returns (mask per pooled leaf, threshold)."""
    g = [np.asarray(x, np.float32) for x in jax.tree.leaves(grads)]
    pooled = [i for i, p in enumerate(self.pool) if p]
    d = np.float32(self.d)
    for i in pooled:
      taylor = np.abs(g[i] * self.w[i])
      exact = np.float64(d) * self.s[i] + np.float64(np.float32(1) - d) * taylor
      self.s[i] = exact.astype(np.float32)
    ranked = np.sort(np.concatenate([self.s[i].ravel() for i in pooled]))
    threshold = ranked[-self.keep]
    rate = np.float32(ETA) * np.float32(self.growth)
    masks = {}
    for i in range(len(self.w)):
      u = g[i]
      if self.pool[i]:
        masks[i] = (self.s[i] >= threshold) & (self.s[i] > 0)
        u = np.where(masks[i], g[i], np.float32(0))
        self.age[i] = np.where(u == 0, self.age[i] + 1, 0)
        if self.growth:
          factor = np.minimum(self.age[i].astype(np.float32) / np.float32(self.horizon), 1)
          u = _muladd(rate * factor.astype(np.float32), self.w[i], u, self.fused)
        u = _muladd(ETA, self.w[i], u, self.fused)
      self.z[i] = _muladd(BETA, self.z[i], u, self.fused)
      self.w[i] = _muladd(self.z[i], -LR, self.w[i], self.fused)
    return [masks[i] for i in pooled], threshold


def _pooled(tree):
  return [x for x, p in zip(jax.tree.leaves(tree), jax.tree.leaves(POOL_FLAGS)) if p]


def _run(use_jit, params_factory, rng, steps, **variant):
  """gsm(**variant) and the reference side by side; checks every step."""
  score_ema = variant.get("score_ema", 0.0)
  growth = variant.get("passive_decay_growth", 0.0)
  horizon = variant.get("passive_decay_horizon", 1)
  opt = gsm_optax.gsm(LR, C, momentum=BETA, weight_decay=ETA, **variant)
  mask_only = gsm_optax.mask_by_global_taylor(C, score_ema=score_ema)

  def step(params, state, grads):
    masked, _ = mask_only.update(grads, state[0], params)  # the mask of this step
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, masked

  step = jax.jit(step) if use_jit else step
  params = params_factory(rng)
  ref = NumpyVariantGSM(params, score_ema=score_ema, growth=growth, horizon=horizon, fused=use_jit)
  params = jax.tree.map(jnp.asarray, params)
  state = opt.init(params)
  grad_rng = np.random.default_rng(7)
  ages = []
  for t in range(steps):
    grads = params_factory(grad_rng)
    params, state, masked = step(params, state, jax.tree.map(jnp.asarray, grads))
    ref_masks, ref_threshold = ref.step(grads)
    for got, want in zip(_pooled(masked), ref_masks):
      np.testing.assert_array_equal(np.asarray(got) != 0, want, err_msg=f"mask, step {t}")
    for got, want in zip(jax.tree.leaves(params), ref.w):
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7, err_msg=f"step {t}")
    stats = gsm_optax.gsm_stats(state)
    assert int(stats["keep"]) == ref.keep and int(stats["step"]) == t + 1
    assert int(stats["num_active"]) == sum(int(m.sum()) for m in ref_masks), t
    np.testing.assert_allclose(float(stats["threshold"]), ref_threshold, rtol=1e-5)
    if score_ema:
      for got, want in zip(_pooled(state[0].score), _pooled(ref.s)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, err_msg=f"score, step {t}")
    if growth:
      for got, want in zip(jax.tree.leaves(state[1].age), ref.age):
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"age, step {t}")
      ages.append(max(int(a.max()) for a in ref.age))
  return ref, ages


def test_smoothed_score_matches_numpy_reference(use_jit, rng, params_factory):
  ref, _ = _run(use_jit, params_factory, rng, 110, score_ema=0.9)
  assert all(np.array_equal(s, np.zeros_like(s)) for s, p in zip(ref.s, ref.pool) if not p)


def test_passive_age_decay_matches_numpy_reference(use_jit, rng, params_factory):
  _, ages = _run(
    use_jit, params_factory, rng, 110, passive_decay_growth=3.0, passive_decay_horizon=5
  )
  assert max(ages) > 5  # some weight reached the full (1 + growth) decay


def test_both_variants_together_match_the_reference(rng, params_factory):
  _run(
    True, params_factory, rng, 100, score_ema=0.5, passive_decay_growth=1.0, passive_decay_horizon=3
  )


def test_passive_age_decay_with_a_weight_decay_schedule():
  params = {"k": jnp.ones((2, 3)), "b": jnp.ones(3)}
  tx = gsm_optax.add_passive_age_decay(lambda count: 0.1 * (count + 1), 2.0, 2)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for count, factor in ((0, 0.5), (1, 1.0)):
    updates, state = tx.update(zeros, state, params)
    np.testing.assert_allclose(updates["k"], np.float32(0.1 * (count + 1) * 2.0) * factor)
    np.testing.assert_array_equal(updates["b"], 0.0)  # outside the pool: unchanged
  np.testing.assert_array_equal(state.age["k"], 2)
  updates, state = tx.update({"k": jnp.ones((2, 3)), "b": jnp.ones(3)}, state, params)
  np.testing.assert_array_equal(state.age["k"], 0)  # active: the age restarts
  np.testing.assert_array_equal(updates["k"], 1.0)


# ----------------------------------------------------------------------------
# Defaults, errors, stats.
# ----------------------------------------------------------------------------


def _paper_chain():
  """gsm's chain as it was built before the variants existed."""
  return optax.chain(
    gsm_optax.mask_by_global_taylor(C),
    optax.add_decayed_weights(ETA, mask=gsm_optax.default_pool),
    optax.trace(decay=BETA, nesterov=False),
    optax.scale_by_learning_rate(LR),
  )


@pytest.mark.parametrize(
  "variant", [{}, dict(score_ema=0.0, passive_decay_growth=0.0, passive_decay_horizon=7)]
)
def test_defaults_build_the_paper_s_chain_and_state(variant, rng, params_factory):
  params = jax.tree.map(jnp.asarray, params_factory(rng))
  grads = jax.tree.map(jnp.asarray, params_factory(rng))
  opt = gsm_optax.gsm(LR, C, momentum=BETA, weight_decay=ETA, **variant)
  paper = _paper_chain()
  state, paper_state = opt.init(params), paper.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(paper_state)
  for _ in range(2):
    updates, state = opt.update(grads, state, params)
    paper_updates, paper_state = paper.update(grads, paper_state, params)
    jax.tree.map(np.testing.assert_array_equal, updates, paper_updates)
    jax.tree.map(np.testing.assert_array_equal, state, paper_state)


def test_inject_hyperparams_state_is_unchanged_and_takes_static_variants(rng, params_factory):
  params = jax.tree.map(jnp.asarray, params_factory(rng))
  paper = dict(learning_rate=LR, compression=C, momentum=BETA, weight_decay=ETA)
  state = optax.inject_hyperparams(gsm_optax.gsm)(**paper).init(params)
  assert set(state.hyperparams) == {"learning_rate", "compression", "momentum", "weight_decay"}
  variants = ("score_ema", "passive_decay_growth", "passive_decay_horizon")
  tx = optax.inject_hyperparams(gsm_optax.gsm, static_args=variants)(
    **paper, score_ema=0.5, passive_decay_growth=1.0, passive_decay_horizon=2
  )
  state = tx.init(params)
  _, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
  assert int(gsm_optax.gsm_stats(state)["keep"]) == 138 // 4
  with pytest.raises(TypeError, match="name it in static_args"):
    jax.jit(lambda d: gsm_optax.gsm(LR, C, score_ema=d))(0.5)


@pytest.mark.parametrize(
  "kwargs,error,match",
  [
    (dict(score_ema=1.0), ValueError, r"score_ema must be in \[0, 1\)"),
    (dict(score_ema=-0.1), ValueError, r"score_ema must be in \[0, 1\)"),
    (dict(score_ema=float("nan")), ValueError, r"score_ema must be in \[0, 1\)"),
    (dict(score_ema="0.9"), TypeError, r"score_ema must be a number in \[0, 1\)"),
    (dict(passive_decay_growth=-1.0), ValueError, "passive_decay_growth must be a finite number"),
    (dict(passive_decay_growth=float("inf")), ValueError, "passive_decay_growth must be a finite"),
    (dict(passive_decay_horizon=0), ValueError, "passive_decay_horizon must be an integer >= 1"),
    (dict(passive_decay_horizon=2.5), ValueError, "passive_decay_horizon must be an integer >= 1"),
    (dict(passive_decay_horizon=True), ValueError, "passive_decay_horizon must be an integer"),
  ],
)
def test_gsm_rejects_bad_variant_settings(kwargs, error, match):
  with pytest.raises(error, match=match):
    gsm_optax.gsm(LR, C, **kwargs)


def test_the_library_transforms_reject_bad_settings():
  with pytest.raises(ValueError, match=r"score_ema must be in \[0, 1\)"):
    gsm_optax.mask_by_global_taylor(C, score_ema=1.5)
  with pytest.raises(ValueError, match="growth must be a finite number >= 0"):
    gsm_optax.add_passive_age_decay(ETA, -0.5, 3)
  with pytest.raises(ValueError, match=r"horizon_steps must be an integer >= 1 \(steps"):
    gsm_optax.add_passive_age_decay(ETA, 1.0, 0)


@pytest.mark.parametrize(
  "variant", [dict(score_ema=0.8), dict(passive_decay_growth=2.0, passive_decay_horizon=4)]
)
def test_gsm_stats_reads_the_variants_state(variant, rng, params_factory):
  params = jax.tree.map(jnp.asarray, params_factory(rng))
  tx = gsm_optax.gsm(LR, C, **variant)
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  stats = gsm_optax.gsm_stats(state)
  assert int(stats["keep"]) == 138 // 4 and int(stats["step"]) == 1
  assert 0 < int(stats["num_active"]) <= 138
  nested = gsm_optax.gsm_stats({"outer": (state,)})
  assert int(nested["keep"]) == 138 // 4
  abstract = jax.eval_shape(tx.init, params)  # abstract params work at init
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  zeroed = optax.tree_utils.tree_map_params(tx, jnp.zeros_like, state)  # params-shaped parts
  extra = zeroed[0].score if "score_ema" in variant else zeroed[1].age
  assert all(not np.asarray(leaf).any() for leaf in jax.tree.leaves(extra))
  assert int(gsm_optax.gsm_stats(zeroed)["keep"]) == 138 // 4


# ----------------------------------------------------------------------------
# train.py
# ----------------------------------------------------------------------------


def test_config_fields_are_checked_and_old_workdirs_resume():
  for field, value, allowed in (
    ("score_ema", 1.0, r"a number in \[0, 1\)"),
    ("passive_decay_growth", -1.0, "a finite number >= 0"),
    ("passive_decay_horizon_epochs", 0.0, "a finite number > 0"),
    ("finetune", 1, "True or False"),
  ):
    config = default_config.get_config()
    config.gsm = ml_collections.ConfigDict({**config.gsm.to_dict(), field: value})  # any type
    with pytest.raises(config_lib.ConfigError, match=f"config.gsm.{field} must be {allowed}"):
      train_lib.validate_config(config)
  config = default_config.get_config()
  config.method, config.lottery.ticket, config.gsm.finetune = "lottery", "gsm", True
  with pytest.raises(config_lib.ConfigError, match="config.gsm.finetune=True applies to"):
    train_lib.validate_config(config)
  config = default_config.get_config()
  stored = config_lib.config_json(config)
  for field in ("score_ema", "passive_decay_growth", "passive_decay_horizon_epochs", "finetune"):
    del stored["gsm"][field]
  assert config_lib.config_differences(stored, config) == []
  assert stages.passive_decay_horizon_steps(0.01, 8) == 1
  assert stages.passive_decay_horizon_steps(2.5, 8) == 20


def _variant_run(data_dir, tmp_path, name, **fields):  # noqa: F811
  config = tiny_config(data_dir)
  config.skip_dense = True
  config.gsm.epochs = 2
  config.gsm.boundaries = ()
  config.finetune.epochs = 1
  config.finetune.boundaries = ()
  config.plots = False
  for key, value in fields.items():
    config.gsm[key] = value
  workdir = str(tmp_path / name)
  summary = train_lib.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return summary, rows


@pytest.mark.parametrize(
  "fields,phases",
  [
    pytest.param(dict(score_ema=0.9), {"gsm": 2}, marks=pytest.mark.slow),  # 7 s
    (dict(passive_decay_growth=3.0, passive_decay_horizon_epochs=0.5), {"gsm": 2}),
    (dict(finetune=True), {"gsm": 2, "finetune": 1}),
  ],
  ids=["score_ema", "passive_decay", "finetune"],
)
def test_train_runs_each_variant_to_exactly_q_weights(
  data_dir,  # noqa: F811
  tmp_path,
  fields,
  phases,
):
  summary, rows = _variant_run(data_dir, tmp_path, "run", **fields)
  assert summary["nonzeros"] == KEEP
  assert {k: v for k, v in summary["epochs"].items() if v} == phases
  assert {row["phase"] for row in rows} == set(phases)
  gsm_rows = [row for row in rows if row["phase"] == "gsm"]
  assert [row["keep"] for row in gsm_rows] == [KEEP, KEEP]

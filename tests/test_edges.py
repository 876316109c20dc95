"""Edge cases of the library: low-precision params, invalid traced compressions,
the k of the k-th largest, empty pools, and Q for a float64 vs a float32 C.

Each test states the behaviour exactly (counts, messages, NumPy references).
"""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gsm_optax


def _params(rng, params_factory, dtype):
  return jax.tree.map(jnp.asarray, params_factory(rng, dtype=dtype))


def _update(opt, use_jit):
  return jax.jit(opt.update) if use_jit else opt.update


# ----------------------------------------------------------------------------
# Low-precision params: the passive decay below the dtype's resolution.
# ----------------------------------------------------------------------------

# At these settings a passive weight shrinks by r = lr * wd / (1 - beta) =
# 1.5e-3 per step: below bfloat16's eps / 2 = 2^-8, above float16's 2^-11.
LR, WD, BETA = 0.03, 5e-4, 0.99


def _warnings_of(fn) -> list[str]:
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fn()
  return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_gsm_warns_with_the_dtype_the_decay_and_the_fix_for_bfloat16_params(rng, params_factory):
  params = _params(rng, params_factory, jnp.bfloat16)
  opt = gsm_optax.gsm(LR, 10.0, momentum=BETA, weight_decay=WD)
  assert _warnings_of(lambda: opt.init(params)) == [
    "gsm: 3 pooled leaves of dtype bfloat16 (e.g. ['conv']['kernel']) cannot represent the "
    "per-step decay of a passive weight: learning_rate * weight_decay / (1 - momentum) = "
    "0.0015 (at step 0) is below bfloat16's resolution eps / 2 = 0.0039, so w - learning_rate "
    "* z rounds back to w (or stalls within a factor of 2) and GSM prunes nothing. Keep float32 "
    "master weights (params and optimizer state in float32) and cast them to bfloat16 for the "
    "forward pass (docs/METHOD.md, 'Numerics')."
  ]


@pytest.mark.parametrize(
  "dtype,learning_rate,warns",
  [
    (jnp.bfloat16, LR, True),
    (jnp.bfloat16, 0.2, False),  # r = 0.01 >= 2^-8
    (np.float16, LR, False),  # r = 1.5e-3 >= 2^-11
    (np.float16, 0.005, True),  # r = 2.5e-4 < 2^-11
    (np.float32, LR, False),
    (np.float32, 1e-6, True),  # r = 5e-8 < 2^-24
  ],
  ids=["bf16", "bf16-lr0.2", "f16", "f16-lr0.005", "f32", "f32-lr1e-6"],
)
def test_gsm_warns_exactly_when_the_decay_is_below_eps_over_2(
  dtype, learning_rate, warns, rng, params_factory
):
  params = _params(rng, params_factory, dtype)
  opt = gsm_optax.gsm(learning_rate, 10.0, momentum=BETA, weight_decay=WD)
  got = _warnings_of(lambda: opt.init(params))
  assert len(got) == int(warns)
  if warns:
    name = np.dtype(dtype).name
    assert got[0].startswith(f"gsm: 3 pooled leaves of dtype {name} ")
    assert f"cast them to {name} for the forward pass" in got[0]
  # Abstract params: the same check from the dtypes alone.
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  assert len(_warnings_of(lambda: opt.init(abstract))) == int(warns)


def test_gsm_warns_once_per_dtype_of_a_mixed_pool(rng, params_factory):
  params = _params(rng, params_factory, np.float32)
  params["conv"]["kernel"] = params["conv"]["kernel"].astype(jnp.bfloat16)
  params["mlp"]["dense1"]["kernel"] = params["mlp"]["dense1"]["kernel"].astype(np.float16)
  opt = gsm_optax.gsm(0.005, 10.0, momentum=BETA, weight_decay=WD)  # r = 2.5e-4
  got = _warnings_of(lambda: opt.init(params))
  assert [m.split(" (e.g.")[0] for m in got] == [
    "gsm: 1 pooled leaf of dtype bfloat16",
    "gsm: 1 pooled leaf of dtype float16",
  ]
  assert "(e.g. ['mlp']['dense1']['kernel'])" in got[1]


def test_gsm_checks_the_decay_of_schedules_at_step_0_and_skips_traced_values(rng, params_factory):
  params = _params(rng, params_factory, jnp.bfloat16)
  # Step 0 of the schedules: r = 1.5e-3 (warns), then r = 0 (a warm-up from 0:
  # no decay to represent, no warning).
  decaying = gsm_optax.gsm(
    optax.linear_schedule(LR, 1.0, 100), 10.0, momentum=BETA, weight_decay=WD
  )
  got = _warnings_of(lambda: jax.jit(decaying.init)(params))
  assert len(got) == 1 and "= 0.0015 (at step 0)" in got[0]
  warmup = gsm_optax.gsm(optax.linear_schedule(0.0, LR, 100), 10.0, momentum=BETA)
  assert _warnings_of(lambda: warmup.init(params)) == []
  # inject_hyperparams: concrete arrays eagerly (checked), tracers under jit
  # (not checked).
  injected = optax.inject_hyperparams(gsm_optax.gsm)(
    learning_rate=LR, compression=10.0, momentum=BETA, weight_decay=WD
  )
  assert len(_warnings_of(lambda: injected.init(params))) == 1
  assert _warnings_of(lambda: jax.jit(injected.init)(params)) == []
  # The stand-in params of optax.tree_utils.tree_map_params: nothing to check.
  opt = gsm_optax.gsm(LR, 10.0, momentum=BETA, weight_decay=WD)
  with pytest.warns(UserWarning, match="of dtype bfloat16"):
    state = opt.init(params)
  assert _warnings_of(lambda: optax.tree_utils.tree_map_params(opt, lambda p: p, state)) == []


def _run_passive(params, learning_rate, num_steps):
  """GSM with a zero loss gradient: every pooled weight is passive."""
  opt = gsm_optax.gsm(learning_rate, 10.0, momentum=BETA, weight_decay=WD)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    state = opt.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)

  @jax.jit
  def run(params, state):
    def step(_, carry):
      params, state = carry
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return jax.lax.fori_loop(0, num_steps, step, (params, state))

  return run(params, state)[0]


def _numpy_passive(w0, learning_rate, num_steps):
  """z <- beta z + wd w; w <- w - lr z, in float64."""
  w, z = np.asarray(w0, np.float64), 0.0
  for _ in range(num_steps):
    z = BETA * z + WD * w
    w = w - learning_rate * z
  return w


def test_the_warning_is_right_bfloat16_passive_weights_never_decay(rng, params_factory):
  num_steps = 400
  kernels = lambda p: [p["conv"]["kernel"], p["mlp"]["dense1"]["kernel"]]  # noqa: E731
  # bfloat16, r = 1.5e-3 < 2^-8 (warned): not one bit of any weight changes.
  w16 = _params(rng, params_factory, jnp.bfloat16)
  out16 = _run_passive(w16, LR, num_steps)
  for got, want in zip(jax.tree.leaves(out16), jax.tree.leaves(w16)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # float32, same settings: the weights shrink as the NumPy recursion says.
  w32 = jax.tree.map(lambda p: p.astype(jnp.float32), w16)
  out32 = _run_passive(w32, LR, num_steps)
  for got, w0 in zip(kernels(out32), kernels(w32)):
    np.testing.assert_allclose(np.asarray(got), _numpy_passive(w0, LR, num_steps), rtol=1e-4)
    assert np.median(np.abs(np.asarray(got) / np.asarray(w0))) < 0.65
  # bfloat16 with r = 0.01 >= 2^-8 (no warning): the weights do shrink.
  out16 = _run_passive(w16, 0.2, num_steps)
  for got, w0 in zip(kernels(out16), kernels(w16)):
    ratio = np.abs(np.asarray(got, np.float32) / np.asarray(w0, np.float32))
    assert np.median(ratio) < 0.2


# ----------------------------------------------------------------------------
# A traced compression that is NaN, inf, < 1 or > |pool|: clamped and counted.
# ----------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
# C per step, with the clamped Q over the 138-weight pool and whether C is
# invalid (not finite, < 1, or int(138 / C) = 0).
COMPRESSIONS = [
  (60.0, 2, False),
  (NAN, 1, True),
  (INF, 1, True),
  (0.5, 138, True),
  (1000.0, 1, True),
  (1.0, 138, False),
  (-INF, 138, True),
  (138.0, 1, False),
  (139.0, 1, True),
]


def test_invalid_traced_compressions_are_clamped_and_counted(use_jit, rng, params_factory):
  table = jnp.asarray([c for c, _, _ in COMPRESSIONS], jnp.float32)
  opt = gsm_optax.gsm(0.1, lambda count: table[count])
  params = _params(rng, params_factory, np.float32)
  grads = _params(rng, params_factory, np.float32)
  state, update = opt.init(params), _update(opt, use_jit)
  assert int(gsm_optax.gsm_stats(state)["num_invalid_compression"]) == 0
  invalid = 0
  for step, (_, keep, bad) in enumerate(COMPRESSIONS):
    _, state = update(grads, state, params)
    invalid += bad
    stats = gsm_optax.gsm_stats(state)
    assert int(stats["keep"]) == keep, step
    assert int(stats["num_active"]) == keep, step  # continuous scores, no ties
    assert int(stats["num_invalid_compression"]) == invalid, step
  assert invalid == 6


@pytest.mark.parametrize("value,keep", [(0.5, 138), (NAN, 1), (1000, 1)])
def test_a_schedule_returning_an_invalid_python_number_is_clamped_and_counted(
  value, keep, use_jit, rng, params_factory
):
  mask = gsm_optax.mask_by_global_taylor(lambda count: value)
  params = _params(rng, params_factory, np.float32)
  state, update = mask.init(params), _update(mask, use_jit)
  for step in range(2):
    _, state = update(params, state, params)
  assert int(state.keep) == keep
  assert int(state.num_invalid_compression) == 2


def test_inject_hyperparams_nan_compression_is_counted_under_jit_and_raises_eagerly(
  rng, params_factory
):
  opt = optax.inject_hyperparams(gsm_optax.mask_by_global_taylor)(compression=10.0)
  params = _params(rng, params_factory, np.float32)
  state = opt.init(params)
  state.hyperparams["compression"] = jnp.asarray(NAN)
  _, new_state = jax.jit(opt.update)(params, state, params)
  stats = gsm_optax.gsm_stats(new_state)
  assert (int(stats["keep"]), int(stats["num_invalid_compression"])) == (1, 1)
  with pytest.raises(ValueError, match="compression must be finite and >= 1"):
    opt.update(params, state, params)


# ----------------------------------------------------------------------------
# The k of global_kth_largest / global_kth_largest_magnitude.
# ----------------------------------------------------------------------------

KTH = [gsm_optax.global_kth_largest, gsm_optax.global_kth_largest_magnitude]
KTH_IDS = ["kth_largest", "kth_largest_magnitude"]
_TREE = {"a": jnp.arange(10.0), "b": jnp.arange(9.0).reshape(3, 3) - 20.0}  # 19 elements


@pytest.mark.parametrize("fn", KTH, ids=KTH_IDS)
@pytest.mark.parametrize(
  "k,kind",
  [
    (True, "bool"),
    (np.bool_(True), "dtype bool"),
    (jnp.asarray(True), "dtype bool"),
    (2.5, "float"),
    (3.0, "float"),
    (np.float32(3.0), "dtype float32"),
    (jnp.asarray(3.0), "dtype float32"),
    ("3", "str"),
    (None, "NoneType"),
  ],
  ids=repr,
)
def test_kth_largest_rejects_a_k_that_is_not_an_integer(fn, k, kind):
  with pytest.raises(TypeError) as error:
    fn(_TREE, k)
  assert str(error.value) == f"k must be an integer (the rank from the top), got {k!r} ({kind})."


@pytest.mark.parametrize("fn", KTH, ids=KTH_IDS)
@pytest.mark.parametrize(
  "k", [np.int64(0), np.int32(20), jnp.int32(100), jnp.asarray(-1), np.asarray(0)], ids=repr
)
def test_kth_largest_rejects_a_concrete_integer_k_out_of_range(fn, k):
  with pytest.raises(ValueError) as error:
    fn(_TREE, k)
  assert str(error.value) == f"k must be in [1, 19] (the number of elements), got {k}."


@pytest.mark.parametrize("fn", KTH, ids=KTH_IDS)
def test_kth_largest_rejects_a_k_that_is_not_a_scalar(fn):
  with pytest.raises(ValueError, match=r"^k must be a scalar, got shape \(2,\)\.$"):
    fn(_TREE, jnp.asarray([1, 2]))


def test_a_traced_k_is_clipped_and_a_traced_float_k_is_rejected():
  values = np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(_TREE)])
  kth = jax.jit(gsm_optax.global_kth_largest)
  kth_mag = jax.jit(gsm_optax.global_kth_largest_magnitude)
  for k, rank in [(0, 1), (-5, 1), (7, 7), (19, 19), (100, 19)]:
    assert float(kth(_TREE, k)) == np.sort(values)[-rank]
    assert float(kth_mag(_TREE, k)) == np.sort(np.abs(values))[-rank]
  with pytest.raises(TypeError, match=r"k must be an integer .* \(dtype float32\)\."):
    kth(_TREE, 3.0)
  with pytest.raises(TypeError, match=r"k must be an integer .* \(dtype bool\)\."):
    kth_mag(_TREE, True)


# ----------------------------------------------------------------------------
# sparsity_report of a pool whose leaves are all empty.
# ----------------------------------------------------------------------------


def test_sparsity_report_of_an_empty_pool_has_density_0_and_infinite_compression():
  params = {"k": np.zeros((0, 4), np.float32), "c": np.zeros((3, 0, 2), np.float32)}
  report = gsm_optax.sparsity_report(params)
  assert [(r.path, r.size, r.nonzeros, r.density) for r in report.rows] == [
    ("['c']", 0, 0, 0.0),
    ("['k']", 0, 0, 0.0),
  ]
  assert (report.total_size, report.total_nonzeros) == (0, 0)
  assert report.density == 0.0
  assert report.compression == float("inf")
  lines = str(report).splitlines()
  assert lines[-2].split() == ["total", "0", "0", "0.00%"]
  assert lines[-1] == "compression infx (0 / 0)"
  as_dict = report.to_dict()
  assert (as_dict["density"], as_dict["compression"]) == (0.0, float("inf"))
  assert json.loads(json.dumps(as_dict)) == as_dict
  assert gsm_optax.SparsityReport(rows=()).density == 0.0


# ----------------------------------------------------------------------------
# Q for C = 133.1 over LeNet-300-100's 266,200 weights: int(266200 / 133.1) =
# 2000 in float64; float32(133.1) = 133.10000610... gives floor(...) = 1999.
# ----------------------------------------------------------------------------

C = 133.1
C32 = float(np.float32(C))  # 133.10000610351562


def _lenet(rng):
  shapes = {"d1": (784, 300), "d2": (300, 100), "d3": (100, 10)}
  return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


def test_keep_count_is_int_of_size_over_c_in_float64(rng):
  params = _lenet(rng)
  assert gsm_optax.pool_size(params) == 266_200
  assert gsm_optax.keep_count(params, C) == int(266_200 / C) == 2000
  assert gsm_optax.keep_count(params, C32) == 1999
  assert gsm_optax.keep_count(params, np.float32(C)) == 1999


@pytest.mark.parametrize(
  "compression,keep",
  [
    (C, 2000),  # a Python float: float64
    (np.float64(C), 2000),
    (np.asarray(C), 2000),  # a 0-d float64 NumPy array
    (optax.constant_schedule(C), 2000),  # a schedule returning a Python float
    (lambda count: np.float64(C), 2000),
    (np.float32(C), 1999),  # float32 values: floor(266200 / 133.10000610...)
    (jnp.float32(C), 1999),
    (lambda count: jnp.float32(C), 1999),
    (optax.linear_schedule(1.0, C, 10), 1999),  # reaches float32(C) at step 10
  ],
  ids=[
    "float",
    "np.float64",
    "np.ndarray-float64",
    "constant_schedule",
    "schedule-np.float64",
    "np.float32",
    "jnp.float32",
    "schedule-jnp.float32",
    "linear_schedule",
  ],
)
def test_q_is_float64_for_numpy_and_python_c_and_float32_for_jax_arrays(
  compression, keep, use_jit, rng
):
  params = _lenet(rng)
  mask = gsm_optax.mask_by_global_taylor(compression)
  state = mask.init(params)
  if callable(compression):
    state = state._replace(count=jnp.asarray(10, jnp.int32))
  _, state = _update(mask, use_jit)(params, state, params)
  stats = gsm_optax.gsm_stats(state)
  assert int(stats["keep"]) == keep
  assert int(stats["num_active"]) == keep  # continuous scores: exactly Q kept
  assert int(stats["num_invalid_compression"]) == 0


def test_a_traced_or_injected_c_is_float32(rng):
  params = _lenet(rng)
  keep_of = jax.jit(lambda c: gsm_optax.mask_by_global_taylor(c).init(params).keep)
  assert int(keep_of(C)) == 1999
  injected = optax.inject_hyperparams(gsm_optax.mask_by_global_taylor)(compression=C)
  state = injected.init(params)
  assert state.hyperparams["compression"].dtype == jnp.float32
  assert int(gsm_optax.gsm_stats(state)["keep"]) == 1999
  assert int(gsm_optax.gsm_stats(jax.jit(injected.init)(params))["keep"]) == 1999

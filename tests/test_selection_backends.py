"""Every threshold selection, forced on the CPU, against a NumPy sort.

"radix", "sampled", "top_k" and "auto" must give the same threshold, counts and
GSM mask, bit for bit. The reference sorts the float32 scores T = |g * w| of
the pooled leaves (NaN ranked as 0):

    t = sort(T)[-Q],  B = (T >= t) & (T > 0 or Q = |pool|)

and counts what `ScoreSelection` reports. On 8 simulated devices the report of
tests/multidevice_check.py (the `multidevice_report` fixture) holds each
path's result on a sharded pool; the tests below check it the same way.
"""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gsm_optax
from gsm_optax import selection
from gsm_optax import transform

PATHS = ("radix", "sampled", "top_k", "auto")
DTYPES = [np.float32, jnp.bfloat16, np.float16]
DTYPE_IDS = ["float32", "bfloat16", "float16"]
CASES = ("ties", "nan_inf", "zeros", "random")
# Pooled kernels of different shapes (the last one's last axis is not a
# multiple of 8) and a bias outside the pool.
SHAPES = {"conv": (3, 3, 2, 4), "dense": (6, 10), "narrow": (5, 1), "bias": (4,)}
POOLED = ("conv", "dense", "narrow")
POOL_SIZE = 72 + 60 + 5


# ----------------------------------------------------------------------------
# The reference.
# ----------------------------------------------------------------------------


def _scores(grads: dict, params: dict) -> list[np.ndarray]:
  """T = |g * w| per pooled leaf, in float32."""
  with np.errstate(invalid="ignore"):  # inf * 0
    return [
      np.abs(np.asarray(grads[n], np.float32) * np.asarray(params[n], np.float32)) for n in POOLED
    ]


def _numpy_selection(scores: list[np.ndarray], k: int) -> dict:
  """t (the k-th greatest, NaN as 0) and the counts, by sorting."""
  flat = np.concatenate([s.ravel() for s in scores])
  threshold = np.sort(np.where(np.isnan(flat), np.float32(0), flat))[-k]
  with np.errstate(invalid="ignore"):
    return {
      "threshold": threshold,
      "num_at_least": int(np.sum(flat >= threshold)),
      "num_zero": int(np.sum(flat == 0)),
      "num_nonfinite": int(np.sum(~np.isfinite(flat))),
    }


def _numpy_mask(scores: list[np.ndarray], k: int) -> list[np.ndarray]:
  """B = (T >= t) & (T > 0 or Q = |pool|) per leaf."""
  threshold = _numpy_selection(scores, k)["threshold"]
  keep_all = k == sum(s.size for s in scores)
  with np.errstate(invalid="ignore"):
    return [(s >= threshold) & ((s > 0) | keep_all) for s in scores]


def _bits(x) -> np.ndarray:
  return np.asarray(x, np.float32).view(np.uint32)


def _assert_selection_equals_numpy(got: selection.ScoreSelection, scores, k: int) -> None:
  expected = _numpy_selection(scores, k)
  np.testing.assert_array_equal(_bits(got.threshold), _bits(expected["threshold"]), err_msg=k)
  assert int(got.num_at_least) == expected["num_at_least"], k
  assert int(got.num_nonfinite) == expected["num_nonfinite"], k
  if expected["threshold"] == 0:  # num_zero is only read then
    assert int(got.num_zero) == expected["num_zero"], k


# ----------------------------------------------------------------------------
# The problems.
# ----------------------------------------------------------------------------


def _case(name: str, dtype) -> tuple[dict, dict]:
  """(params, grads) of `SHAPES` in `dtype` with the scores of case `name`."""
  rng = np.random.default_rng(CASES.index(name))
  params = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
  grads = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
  if name == "ties":  # scores in {0.5, 1, 2} only: every threshold is tied
    for n in POOLED:
      params[n] = rng.choice([0.5, -1.0, 2.0], SHAPES[n]).astype(np.float32)
      grads[n] = rng.choice([1.0, -1.0], SHAPES[n]).astype(np.float32)
  elif name == "nan_inf":
    grads["conv"][0, 0, 0, :3] = np.nan
    grads["dense"][1, :2] = np.inf
    params["dense"][2, 0] = np.inf  # inf * g: inf
    params["narrow"][0, 0] = 0.0
    grads["narrow"][0, 0] = np.inf  # inf * 0: NaN
  elif name == "zeros":  # 27 positive scores: fewer than Q at C = 4
    for n in POOLED:
      grads[n][rng.random(SHAPES[n]) < 0.8] = 0.0
  to_dtype = functools.partial(jax.tree.map, lambda x: jnp.asarray(x.astype(dtype)))
  return to_dtype(params), to_dtype(grads)


# ----------------------------------------------------------------------------
# The selection: every k that matters, jitted (k traced) and eagerly (k a
# Python int, which "top_k" passes to lax.top_k).
# ----------------------------------------------------------------------------


@functools.cache
def _jitted_selection(path: str):
  def select(grads, params, k):
    operands = ([grads[n] for n in POOLED], [params[n] for n in POOLED])
    return selection.select_threshold(operands, transform.taylor_score, k, path)

  return jax.jit(select)


def _eager_selection(grads, params, k, path):
  operands = ([grads[n] for n in POOLED], [params[n] for n in POOLED])
  return selection.select_threshold(operands, transform.taylor_score, k, path)


KS = (1, 2, 30, 100, POOL_SIZE - 1, POOL_SIZE)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("path", PATHS)
def test_selection_equals_numpy_sort_jitted(path, dtype):
  for case in CASES:
    params, grads = _case(case, dtype)
    scores = _scores(grads, params)
    for k in KS:
      got = _jitted_selection(path)(grads, params, jnp.int32(k))
      _assert_selection_equals_numpy(got, scores, k)


@pytest.mark.parametrize("path", ["radix", "top_k", "auto"])
def test_selection_equals_numpy_sort_eagerly(path):
  # Op by op, which compiles every op: a few k, in float32. ("sampled" takes
  # some 20 s a call this way, its lax.cond traced anew; GSM runs it jitted:
  # test_gsm_mask_equals_numpy without jit.)
  ks = {"nan_inf": (1, 30, POOL_SIZE), "zeros": (100,)}
  for case, case_ks in ks.items():
    params, grads = _case(case, np.float32)
    scores = _scores(grads, params)
    for k in case_ks:
      _assert_selection_equals_numpy(_eager_selection(grads, params, k, path), scores, k)


@pytest.mark.parametrize("path", PATHS)
def test_selection_of_a_single_score(path):
  grads, params = {"w": jnp.full((1, 1), 3.0)}, {"w": jnp.full((1, 1), -0.5)}
  operands = ([grads["w"]], [params["w"]])
  got = selection.select_threshold(operands, transform.taylor_score, 1, path)
  _assert_selection_equals_numpy(got, [np.full((1, 1), 1.5, np.float32)], 1)


# ----------------------------------------------------------------------------
# The GSM mask: mask_by_global_taylor with each path at Q = |pool| / 4 (t = 0
# in the "zeros" case) in every dtype, and at Q = 1 and Q = |pool|.
# ----------------------------------------------------------------------------


@functools.cache
def _mask_update(path: str, compression: float, use_jit: bool):
  tx = gsm_optax.mask_by_global_taylor(compression, selection=path)
  return tx, (jax.jit(tx.update) if use_jit else tx.update)


def _assert_mask_equals_numpy(path, dtype, use_jit, compressions) -> None:
  for case in CASES:
    params, grads = _case(case, dtype)
    scores = _scores(grads, params)
    for compression in compressions:
      keep = int(POOL_SIZE / compression)
      tx, update = _mask_update(path, compression, use_jit)
      masked, state = update(grads, tx.init(params), params)
      stats = gsm_optax.gsm_stats(state)
      expected = _numpy_selection(scores, keep)
      mask = _numpy_mask(scores, keep)
      where = f"{case}, Q = {keep}"
      np.testing.assert_array_equal(_bits(stats["threshold"]), _bits(expected["threshold"]), where)
      assert int(stats["num_active"]) == sum(int(m.sum()) for m in mask), where
      assert int(stats["num_nonfinite"]) == expected["num_nonfinite"], where
      for n, m in zip(POOLED, mask):
        want = np.where(m, np.asarray(grads[n]), np.zeros((), grads[n].dtype))
        assert masked[n].dtype == grads[n].dtype
        np.testing.assert_array_equal(_bits(masked[n]), _bits(want), f"{where}, {n}")
      np.testing.assert_array_equal(masked["bias"], grads["bias"])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("path", PATHS)
def test_gsm_mask_equals_numpy(path, dtype, use_jit):
  _assert_mask_equals_numpy(path, dtype, use_jit, (4.0,))


@pytest.mark.parametrize("path", PATHS)
def test_gsm_mask_keeping_one_or_every_weight_equals_numpy(path, use_jit):
  _assert_mask_equals_numpy(path, np.float32, use_jit, (float(POOL_SIZE), 1.0))


def test_the_cases_hold_what_they_test():
  ties = _scores(*_case("ties", np.float32)[::-1])
  assert _numpy_selection(ties, 34)["num_at_least"] > 34  # ties at t
  nan_inf = _numpy_selection(_scores(*_case("nan_inf", np.float32)[::-1]), 1)
  assert nan_inf["threshold"] == np.inf and nan_inf["num_nonfinite"] == 3 + 2 + 1 + 1
  zeros = _scores(*_case("zeros", np.float32)[::-1])
  assert _numpy_selection(zeros, 34)["threshold"] == 0  # fewer positives than Q


# ----------------------------------------------------------------------------
# The choice: names, "auto" per backend and sharding, forwarding.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("backend", "sharded", "size", "expected"),
  [
    ("cpu", False, 1000, "radix"),
    ("cpu", True, 1000, "radix"),
    ("cpu", False, 1 << 22, "sampled"),
    ("cpu", True, 1 << 22, "sampled"),
    ("gpu", False, 1000, "top_k"),
    ("gpu", False, 1 << 22, "top_k"),
    ("gpu", True, 1000, "radix"),
    ("gpu", True, 1 << 22, "radix"),
    ("tpu", False, 1 << 22, "top_k"),
    ("tpu", True, 1000, "radix"),
  ],
)
def test_auto_resolves_per_backend_and_sharding(backend, sharded, size, expected):
  assert selection.resolve_selection("auto", backend, sharded, size) == expected
  for path in ("radix", "sampled", "top_k"):  # a forced path stays
    assert selection.resolve_selection(path, backend, sharded, size) == path


def test_auto_on_this_cpu_is_the_path_it_always_took(monkeypatch):
  pool = ([jnp.zeros((8, 8))], [jnp.zeros((8, 8))])
  assert jax.default_backend() == "cpu"
  assert selection.choose_selection("auto", pool) == "radix"
  monkeypatch.setattr(selection, "_SAMPLED_MIN_SIZE", 64)
  assert selection.choose_selection("auto", pool) == "sampled"


def _primitives(fn, *args) -> set[str]:
  """Names of the primitives in fn's jaxpr, nested jaxprs included."""
  names = set()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      names.add(eqn.primitive.name)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr)  # a new function: traced anew
  return names


def test_auto_traced_for_a_gpu_takes_top_k(monkeypatch):
  params, grads = _case("random", np.float32)
  tx = gsm_optax.mask_by_global_taylor(4.0)
  state = tx.init(params)
  cpu = _primitives(tx.update, grads, state, params)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  gpu = _primitives(tx.update, grads, state, params)
  assert "top_k" not in cpu and "scatter-add" in cpu
  assert "top_k" in gpu and "scatter-add" not in gpu


def _sgd_shrink(selection_name):
  return gsm_optax.gsm_sgd_shrink(0.1, 4.0, passive_shrink=0.01, selection=selection_name)


CONSTRUCTORS = {
  "mask_by_global_taylor": lambda s: gsm_optax.mask_by_global_taylor(4.0, selection=s),
  "mask_by_global_taylor(score_ema)": lambda s: gsm_optax.mask_by_global_taylor(
    4.0, score_ema=0.5, selection=s
  ),
  "gsm": lambda s: gsm_optax.gsm(0.1, 4.0, selection=s),
  "gsm_adamw": lambda s: gsm_optax.gsm_adamw(1e-3, 4.0, passive_shrink=0.01, selection=s),
  "gsm_sgd_shrink": _sgd_shrink,
  "shrink_passive": lambda s: gsm_optax.shrink_passive(
    optax.sgd(0.1), 4.0, passive_shrink=0.01, selection=s
  ),
}


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_every_constructor_forwards_the_selection(name):
  params, grads = _case("random", np.float32)
  for path, has_top_k in (("top_k", True), ("radix", False), ("auto", False)):
    tx = CONSTRUCTORS[name](path)
    names = _primitives(tx.update, grads, tx.init(params), params)
    assert ("top_k" in names) == has_top_k, (name, path)
    assert ("scatter-add" in names) != has_top_k, (name, path)


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
@pytest.mark.parametrize("bad", ["fast", "TOP_K", "", None, 1])
def test_an_unknown_selection_is_refused_when_built(name, bad):
  with pytest.raises(ValueError, match="'auto', 'radix', 'sampled', 'top_k'"):
    CONSTRUCTORS[name](bad)


def test_the_default_is_auto_bit_for_bit():
  params, grads = _case("nan_inf", np.float32)
  results = []
  for kwargs in ({}, {"selection": "auto"}, {"selection": "radix"}):
    tx = gsm_optax.gsm(0.1, 4.0, **kwargs)
    results.append(tx.update(grads, tx.init(params), params))
  for other in results[1:]:
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(other)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_is_sharded_of_single_device_and_numpy_leaves():
  assert not selection.is_sharded([jnp.ones((4, 4)), np.ones((2, 2))])
  seen = []
  jax.jit(lambda x: seen.append(selection.is_sharded([x])) or x)(jnp.ones((4, 4)))
  assert seen == [False]  # jit of unsharded inputs


# ----------------------------------------------------------------------------
# 8 simulated devices, the pool sharded (tests/multidevice_check.py).
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded(multidevice_report):
  report = multidevice_report["selection_paths"]

  def leaves(key):
    return {
      n: np.asarray(report[key][n], np.uint32).view(np.float32).reshape(report["shapes"][n])
      for n in report["shapes"]
    }

  return report, leaves("params_bits"), leaves("grads_bits")


def test_every_path_on_a_sharded_pool_equals_numpy(sharded):
  report, params, grads = sharded
  names = list(report["shapes"])
  scores = [np.abs(grads[n] * params[n]) for n in names]
  runs = report["runs"]
  assert {(r["selection"], r["mode"]) for r in runs} == {
    (p, m) for p in ("radix", "top_k", "auto") for m in ("jit", "eager")
  }
  for run in runs:
    where = f"{run['selection']} {run['mode']} C = {run['compression']}"
    keep = run["keep"]
    expected = _numpy_selection(scores, keep)
    mask = _numpy_mask(scores, keep)
    assert run["threshold_bits"] == int(_bits(expected["threshold"])), where
    assert run["num_active"] == sum(int(m.sum()) for m in mask), where
    assert run["num_nonfinite"] == expected["num_nonfinite"] == 8, where
    for n, m in zip(names, mask):
      want = _bits(np.where(m, grads[n], np.float32(0))).ravel()
      np.testing.assert_array_equal(np.asarray(run["masked_bits"][n], np.uint32), want, where)
    assert run["stays_sharded"], where
    if keep == 230:
      assert run["num_active"] > keep, where  # ties at t
    else:
      assert expected["threshold"] == 0, where  # fewer positives than Q


def test_sharded_leaves_make_auto_take_radix_on_a_gpu(sharded):
  report = sharded[0]
  probes = report["is_sharded"]
  assert probes == {
    "eager_sharded": True,
    "eager_replicated": False,
    "eager_single_device": False,
    "numpy": False,
    "jit_sharded": True,  # an automatic mesh axis: counted as split
    "jit_single_device": False,
    "pmap": False,
    "jit_explicit_sharded": True,
    "jit_explicit_replicated": False,
  }
  for name, is_split in probes.items():
    path = selection.resolve_selection("auto", "gpu", is_split, 2304)
    assert path == ("radix" if is_split else "top_k"), name

"""Multi-device checks of gsm_optax on 8 simulated CPU devices.

Run by tests/test_multidevice.py in a subprocess, because the device count must
be fixed before JAX starts:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice_check.py

Prints one JSON object with three parts; the test asserts on it:
  sharded: params sharded with NamedSharding over a 1D mesh "data"; the jitted
           update equals the single-device update bit for bit.
  hlo:     the collectives of the compiled sharded update; all-gathers whose
           result is as large as a pooled leaf would mean the pool is gathered.
  pmap:    under jax.pmap with pmean'd gradients every device gets the same
           params and state (threshold, so mask), equal to the single-device
           update and to NumPy's threshold on the averaged gradient.
  selection_paths: each forced selection of mask_by_global_taylor on the
           sharded pool (inputs and outputs as float32 bit patterns, checked
           against NumPy by tests/test_selection_backends.py), and what
           selection.is_sharded tells of sharded and unsharded leaves.
"""

from __future__ import annotations

import json
import os
import re
import sys

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import gsm_optax  # noqa: E402
from gsm_optax import selection  # noqa: E402
from gsm_optax import transform  # noqa: E402

NUM_DEVICES = 8
COMPRESSION = 10.0
# Kernels have a dimension divisible by 8 (sharded), biases are replicated.
SHAPES = {
  "conv": {"kernel": (3, 3, 4, 16), "bias": (16,)},
  "dense1": {"kernel": (64, 24), "bias": (24,)},
  "dense2": {"kernel": (24, 8), "bias": (8,)},
}
SPECS = {
  "conv": {"kernel": P(None, None, None, "data"), "bias": P()},
  "dense1": {"kernel": P("data", None), "bias": P()},
  "dense2": {"kernel": P("data", None), "bias": P()},
}
POOLED_SHAPES = [SHAPES[k]["kernel"] for k in ("conv", "dense1", "dense2")]
POOL_SIZE = sum(int(np.prod(s)) for s in POOLED_SHAPES)
# The large-pool path on a pool large enough for its sampled bracket to decide:
# 287,744 weights, Q = 14,387, the bracket a few % of the keys, <= 4 in a block.
LARGE_SHAPES = {
  "conv": {"kernel": (3, 3, 16, 64), "bias": (64,)},
  "dense1": {"kernel": (1024, 256), "bias": (256,)},
  "dense2": {"kernel": (256, 64), "bias": (64,)},
}
LARGE_COMPRESSION = 20.0


def _is_shape(x):
  return isinstance(x, tuple)


def _random_tree(rng, scale=1.0, shapes=SHAPES):
  return jax.tree.map(
    lambda s: (scale * rng.standard_normal(s)).astype(np.float32), shapes, is_leaf=_is_shape
  )


def _optimizer(compression=COMPRESSION):
  return gsm_optax.gsm(0.05, compression, momentum=0.9, weight_decay=1e-2, nesterov=True)


def _pooled(tree):
  """The pooled kernels, in the order the update selects over them."""
  return [tree[k]["kernel"] for k in ("conv", "dense1", "dense2")]


def _sampled_decides(select, grads, params, keep) -> bool:
  """Whether the sampled bracket decides the update's selection on these
  (sharded) kernels: `ScoreSelection.sampled` of the same selection."""
  return bool(select(_pooled(grads), _pooled(params), keep).sampled)


def _step_fn(opt):
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def _trees_equal(a, b):
  return all(
    np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def _max_abs_diff(a, b):
  return max(
    float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def check_sharded(num_steps: int = 4, shapes=SHAPES, compression=COMPRESSION):
  """NamedSharding over 8 devices vs one device, several steps."""
  devices = np.array(jax.devices()[:NUM_DEVICES])
  mesh = Mesh(devices, ("data",))
  shardings = jax.tree.map(
    lambda spec: NamedSharding(mesh, spec), SPECS, is_leaf=lambda x: isinstance(x, P)
  )
  opt = _optimizer(compression)
  step = jax.jit(_step_fn(opt))
  select = jax.jit(lambda g, w, k: selection.select_threshold((g, w), transform.taylor_score, k))
  keep = int(sum(int(np.prod(s)) for s in _pooled(shapes)) / compression)
  rng = np.random.default_rng(0)
  host_params = _random_tree(rng, shapes=shapes)
  one_device = jax.devices()[0]

  sharded_params = jax.tree.map(jax.device_put, host_params, shardings)
  single_params = jax.device_put(host_params, one_device)
  sharded_state = opt.init(sharded_params)
  single_state = opt.init(single_params)
  lowered_args = None
  equal_steps, diffs, stats, kernel_shardings, sampled = [], [], [], [], []
  for _ in range(num_steps):
    host_grads = _random_tree(rng, shapes=shapes)
    sharded_grads = jax.tree.map(jax.device_put, host_grads, shardings)
    single_grads = jax.device_put(host_grads, one_device)
    if lowered_args is None:
      lowered_args = (sharded_params, sharded_state, sharded_grads)
    sampled.append(_sampled_decides(select, sharded_grads, sharded_params, keep))
    sharded_params, sharded_state = step(sharded_params, sharded_state, sharded_grads)
    single_params, single_state = step(single_params, single_state, single_grads)
    equal_steps.append(
      _trees_equal(sharded_params, single_params) and _trees_equal(sharded_state, single_state)
    )
    diffs.append(_max_abs_diff(sharded_params, single_params))
    s_stats = {k: float(v) for k, v in gsm_optax.gsm_stats(sharded_state).items()}
    o_stats = {k: float(v) for k, v in gsm_optax.gsm_stats(single_state).items()}
    stats.append({"sharded": s_stats, "single": o_stats})
  for name in ("conv", "dense1", "dense2"):
    kernel = sharded_params[name]["kernel"]
    kernel_shardings.append(
      bool(kernel.sharding.is_equivalent_to(shardings[name]["kernel"], kernel.ndim))
    )
  return (
    {
      "equal_every_step": equal_steps,
      "max_abs_diff": diffs,
      "stats": stats,
      "keep": keep,
      "sampled_decides": sampled,
      "kernels_stay_sharded": kernel_shardings,
      "num_devices": len(jax.devices()),
    },
    step,
    lowered_args,
  )


_COLLECTIVE = re.compile(
  r"=\s*(?P<result>\(?[a-z0-9]+\[[^\]]*\][^=]*?)\s+"
  r"(?P<op>all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
  r"(?:-start)?\("
)
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")


def check_hlo(step, args, shapes=SHAPES):
  """The collectives in the compiled sharded program, with result shapes."""
  text = step.lower(*args).compile().as_text()
  collectives = []
  for line in text.splitlines():
    match = _COLLECTIVE.search(line)
    if not match:
      continue
    for dtype, dims in _ARRAY.findall(match.group("result")):
      shape = [int(d) for d in dims.split(",") if d]
      collectives.append(
        {"op": match.group("op"), "dtype": dtype, "shape": shape, "elements": int(np.prod(shape))}
      )
  pooled_sizes = sorted({int(np.prod(s)) for s in _pooled(shapes)})
  pooled_shapes = [list(s) for s in _pooled(shapes)]
  pool_size = sum(pooled_sizes)
  # A gathered pooled leaf (or the pool, or more) has one of these sizes or
  # shapes; the selection's histograms (a few thousand bins) have none of them.
  big_gathers = [
    c
    for c in collectives
    if c["op"] == "all-gather"
    and (c["elements"] in pooled_sizes or c["elements"] >= pool_size or c["shape"] in pooled_shapes)
  ]
  return {
    "collectives": collectives,
    "ops": sorted({c["op"] for c in collectives}),
    "pooled_leaf_sizes": pooled_sizes,
    "pool_size": pool_size,
    "pool_sized_all_gathers": big_gathers,
    "hlo_chars": len(text),
  }


def _numpy_threshold(params, grads):
  """Reference threshold: the Q-th greatest |g * w| of the pooled kernels."""
  scores = [
    np.abs(np.asarray(grads[k]["kernel"]) * np.asarray(params[k]["kernel"])) for k in SHAPES
  ]
  return float(np.sort(np.concatenate([s.ravel() for s in scores]))[-int(POOL_SIZE / COMPRESSION)])


def check_pmap(single_step, num_steps: int = 3):
  """pmap with pmean'd gradients vs the single-device update (`single_step`,
  the jitted step of `check_sharded`, already compiled for one device)."""
  opt = _optimizer()
  step = _step_fn(opt)

  def parallel_step(params, state, grads):
    grads = jax.lax.pmean(grads, "i")
    params, state = step(params, state, grads)
    return params, state, grads

  pstep = jax.pmap(parallel_step, axis_name="i")
  rng = np.random.default_rng(1)
  host_params = _random_tree(rng)
  replicate = lambda x: np.broadcast_to(x, (NUM_DEVICES,) + x.shape)  # noqa: E731
  params = jax.tree.map(replicate, host_params)
  state = jax.tree.map(replicate, opt.init(host_params))
  one_device = jax.devices()[0]
  single_params = jax.device_put(host_params, one_device)
  single_state = opt.init(single_params)
  results = []
  for _ in range(num_steps):
    per_device = [_random_tree(rng) for _ in range(NUM_DEVICES)]
    grads = jax.tree.map(lambda *xs: np.stack(xs), *per_device)
    before = jax.tree.map(np.asarray, single_params)
    params, state, mean_grads = pstep(params, state, grads)
    mean0 = jax.tree.map(lambda x: np.asarray(x[0]), mean_grads)
    single_params, single_state = single_step(
      single_params, single_state, jax.device_put(mean0, one_device)
    )
    host = jax.tree.map(np.asarray, params)
    states = jax.tree.map(np.asarray, state)
    numpy_mean = jax.tree.map(lambda x: x.mean(axis=0), grads)
    results.append(
      {
        "same_params_on_every_device": all(
          np.array_equal(x[d], x[0]) for x in jax.tree.leaves(host) for d in range(NUM_DEVICES)
        ),
        "same_state_on_every_device": all(
          np.array_equal(x[d], x[0]) for x in jax.tree.leaves(states) for d in range(NUM_DEVICES)
        ),
        # The mask is B = (|g w| >= threshold): same threshold, same mask.
        "threshold": [float(x) for x in np.asarray(gsm_optax.gsm_stats(states)["threshold"])],
        "numpy_threshold": _numpy_threshold(before, mean0),
        "pmean_is_the_mean": all(
          np.allclose(a, b, rtol=1e-6, atol=1e-7)
          for a, b in zip(jax.tree.leaves(mean0), jax.tree.leaves(numpy_mean))
        ),
        "equals_single_device": _trees_equal(jax.tree.map(lambda x: x[0], host), single_params),
        "max_abs_diff": _max_abs_diff(jax.tree.map(lambda x: x[0], host), single_params),
        "num_active": [int(x) for x in np.asarray(gsm_optax.gsm_stats(states)["num_active"])],
        "single_num_active": int(gsm_optax.gsm_stats(single_state)["num_active"]),
      }
    )
  return {"steps": results}


SELECTION_PATHS = ("radix", "top_k", "auto")
# Q = 230, and Q = 2194: more than the positive scores, so t = 0.
SELECTION_COMPRESSIONS = (10.0, 1.05)


def _bits(x) -> list[int]:
  return np.asarray(x, np.float32).ravel().view(np.uint32).tolist()


def _kernels_with_special_scores(rng):
  """(params, grads) whose pooled kernels hold ties, NaN, inf and zero scores."""
  params, grads = _random_tree(rng), _random_tree(rng)
  scores = np.abs(params["dense1"]["kernel"] * grads["dense1"]["kernel"])
  # 64 scores equal to about the 200th greatest: ties at the 230th (Q at C = 10).
  params["conv"]["kernel"][0, 0] = np.sort(scores.ravel())[-160]
  grads["conv"]["kernel"][0, 0, :, ::2] = -1.0
  grads["conv"]["kernel"][0, 0, :, 1::2] = 1.0
  grads["dense1"]["kernel"][0, :5] = np.nan
  grads["dense1"]["kernel"][1, :3] = np.inf
  grads["dense2"]["kernel"][:] = 0.0  # 192 zero scores
  return params, grads


def _sharded_mask_runs(params, grads, shardings):
  """Each forced selection, jitted and eager, on the sharded pool."""
  sharded_params = jax.tree.map(jax.device_put, params, shardings)
  sharded_grads = jax.tree.map(jax.device_put, grads, shardings)
  runs = []
  for path in SELECTION_PATHS:
    for compression in SELECTION_COMPRESSIONS:
      tx = gsm_optax.mask_by_global_taylor(compression, selection=path)
      state = tx.init(sharded_params)
      for mode, update in (("jit", jax.jit(tx.update)), ("eager", tx.update)):
        masked, new_state = update(sharded_grads, state, sharded_params)
        stats = gsm_optax.gsm_stats(new_state)
        runs.append(
          {
            "selection": path,
            "compression": compression,
            "mode": mode,
            "keep": int(stats["keep"]),
            "threshold_bits": _bits(stats["threshold"])[0],
            "num_active": int(stats["num_active"]),
            "num_nonfinite": int(stats["num_nonfinite"]),
            "masked_bits": {k: _bits(masked[k]["kernel"]) for k in SHAPES},
            "stays_sharded": all(
              not masked[k]["kernel"].sharding.is_fully_replicated for k in SHAPES
            ),
          }
        )
  return runs


def _is_sharded_probes(mesh, host):
  """selection.is_sharded of concrete leaves and of the tracers jit, pmap and
  an explicit mesh give it."""
  split = jax.device_put(host, NamedSharding(mesh, P("data", None)))
  replicated = jax.device_put(host, NamedSharding(mesh, P()))
  single = jax.device_put(host, jax.devices()[0])
  seen = {}

  def probe(name):
    def fn(x):
      seen[name] = selection.is_sharded([x])
      return x

    return fn

  jax.jit(probe("jit_sharded"))(split)
  jax.jit(probe("jit_single_device"))(single)
  jax.pmap(probe("pmap"))(np.stack([host] * NUM_DEVICES))
  explicit = jax.make_mesh((NUM_DEVICES,), ("data",), (jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(explicit):
    jax.jit(probe("jit_explicit_sharded"))(jax.device_put(host, P("data", None)))
    jax.jit(probe("jit_explicit_replicated"))(jax.device_put(host, P()))
  return {
    "eager_sharded": selection.is_sharded([single, split]),
    "eager_replicated": selection.is_sharded([replicated]),
    "eager_single_device": selection.is_sharded([single]),
    "numpy": selection.is_sharded([host]),
    **seen,
  }


def check_selection_paths():
  """Every forced selection on the sharded pool with special scores, and the
  sharding checks that "auto" relies on."""
  mesh = Mesh(np.array(jax.devices()[:NUM_DEVICES]), ("data",))
  shardings = jax.tree.map(
    lambda spec: NamedSharding(mesh, spec), SPECS, is_leaf=lambda x: isinstance(x, P)
  )
  params, grads = _kernels_with_special_scores(np.random.default_rng(7))
  return {
    "params_bits": {k: _bits(params[k]["kernel"]) for k in SHAPES},
    "grads_bits": {k: _bits(grads[k]["kernel"]) for k in SHAPES},
    "shapes": {k: list(SHAPES[k]["kernel"]) for k in SHAPES},
    "runs": _sharded_mask_runs(params, grads, shardings),
    "is_sharded": _is_sharded_probes(mesh, np.ones((16, 4), np.float32)),
  }


def main():
  report = {}
  sharded, step, args = check_sharded()
  report["sharded"] = sharded
  report["hlo"] = check_hlo(step, args)
  report["pmap"] = check_pmap(step)
  report["selection_paths"] = check_selection_paths()
  # The large-pool path (sampled bracket + block summaries), forced for a pool
  # of 287,744 weights: traced and compiled sharded, exact, and decided by the
  # sampled bracket at every step.
  selection._SAMPLED_MIN_SIZE = 0
  sharded, step, args = check_sharded(shapes=LARGE_SHAPES, compression=LARGE_COMPRESSION)
  report["sharded_large_pool_path"] = sharded
  report["hlo_large_pool_path"] = check_hlo(step, args, LARGE_SHAPES)
  json.dump(report, sys.stdout)
  sys.stdout.write("\n")


if __name__ == "__main__":
  main()

"""Every transform of the library works with the optax machinery around it.

`optax.tree_utils.tree_map_params` (sharding specs for an optimizer state),
abstract params (`jax.ShapeDtypeStruct`, as optax's own transforms accept),
the extra keyword arguments `optax.chain` passes on, and
`optax.inject_hyperparams`.
"""

from __future__ import annotations

import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gsm_optax
from gsm_optax import baselines

LR = 0.05
# |pool| = 138 (conftest): Q = int(138 / 4) = 34.
COMPRESSION, KEEP = 4.0, 34
NAMES = ["gsm", "mask_by_global_taylor", "keep_masked", "keep_masked_callable", "gmp", "admm"]


def _keep_counts(params):
  return baselines.layer_keep_counts_from_density(params, 0.25)


def _make(name: str, params):
  """(the transform, the params-shaped fields of its state: state -> dict)."""
  mask = jax.tree.map(lambda p: np.abs(p) > 0.5, params)
  if name == "gsm":
    return gsm_optax.gsm(LR, COMPRESSION), lambda s: {"trace": s[2].trace}
  if name == "mask_by_global_taylor":
    return gsm_optax.mask_by_global_taylor(COMPRESSION), lambda s: {}
  if name == "keep_masked":
    return baselines.keep_masked(mask), lambda s: {"mask": s.mask}
  if name == "keep_masked_callable":
    fn = lambda p: jax.tree.map(lambda x: jnp.abs(x) > 0.5, p)  # noqa: E731
    return baselines.keep_masked(fn), lambda s: {"mask": s.mask}
  if name == "gmp":
    tx = baselines.gradual_magnitude_pruning(COMPRESSION, begin_step=0, end_step=4, update_every=2)
    return tx, lambda s: {"mask": s.mask}
  if name == "admm":
    tx = baselines.add_admm_penalty(0.1, _keep_counts(params), steps_per_iteration=2)
    return tx, lambda s: {"z": s.z, "u": s.u}
  raise ValueError(name)


def _params(rng, params_factory):
  return jax.tree.map(jnp.asarray, params_factory(rng))


# ----------------------------------------------------------------------------
# optax.tree_utils.tree_map_params
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_tree_map_params_maps_the_params_shaped_fields_and_leaves_the_scalars(
  name, rng, params_factory
):
  params = _params(rng, params_factory)
  tx, params_fields = _make(name, params)
  state = tx.init(params)
  _, state = tx.update(params, state, params)  # a state after an update
  # Sharding specs, as optax documents: one per param, None for the rest.
  specs = jax.tree_util.tree_map_with_path(
    lambda path, p: f"spec{jax.tree_util.keystr(path)}{p.shape}", params
  )
  got = optax.tree_utils.tree_map_params(
    tx, lambda _, spec: spec, state, specs, transform_non_params=lambda _: None
  )
  fields = params_fields(got)
  for field in fields.values():
    assert field == specs
  spec_leaves = [x for x in jax.tree.leaves(got) if isinstance(x, str)]
  assert len(spec_leaves) == len(fields) * len(jax.tree.leaves(params))
  # Without transform_non_params, f sees every param-shaped leaf (with its
  # param's shape) and nothing else; the other leaves are the state's own.
  seen = []

  def f(x):
    seen.append(np.shape(x))
    return "mapped"

  got = optax.tree_utils.tree_map_params(tx, f, state)
  assert seen == [np.shape(p) for _ in fields for p in jax.tree.leaves(params)]
  state_leaves = {
    jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
  }
  num_mapped = 0
  for path, x in jax.tree_util.tree_flatten_with_path(got)[0]:
    if isinstance(x, str):
      num_mapped += 1
    else:  # the very array of the state (count, keep, threshold, ...)
      assert x is state_leaves[jax.tree_util.keystr(path)]
  assert num_mapped == len(seen)


# ----------------------------------------------------------------------------
# Abstract params: jax.ShapeDtypeStruct leaves.
# ----------------------------------------------------------------------------


def _abstract(params):
  return jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)


def _shapes(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype)), tree)


# gsm's bfloat16 leaves are below its passive decay's resolution (tests/test_edges.py).
@pytest.mark.filterwarnings("ignore:gsm. 2 pooled leaves of dtype bfloat16:UserWarning")
@pytest.mark.parametrize("name", NAMES)
def test_init_on_shape_dtype_structs_gives_the_states_shapes_and_dtypes(name, rng, params_factory):
  params = _params(rng, params_factory)
  params = {**params, "mlp": jax.tree.map(lambda p: p.astype(jnp.bfloat16), params["mlp"])}
  tx, params_fields = _make(name, params)
  state = tx.init(_abstract(params))
  expected = jax.eval_shape(tx.init, params)
  assert jax.tree.structure(state) == jax.tree.structure(expected)
  assert _shapes(state) == _shapes(expected)
  assert _shapes(jax.eval_shape(tx.init, _abstract(params))) == _shapes(expected)
  concrete = tx.init(params)
  # What does not depend on the params' values is the real initial state.
  for path_and_got, want in zip(
    jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(concrete)
  ):
    path, got = path_and_got
    if isinstance(got, jax.ShapeDtypeStruct):
      # Only values computed from the weights stay abstract.
      assert name in ("admm", "keep_masked_callable"), jax.tree_util.keystr(path)
    else:
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  if name in ("gsm", "mask_by_global_taylor"):
    assert int(gsm_optax.gsm_stats(state)["keep"]) == KEEP
  if name == "admm":  # Z = Pi(W) is abstract, U = 0 is not
    assert all(isinstance(z, jax.ShapeDtypeStruct) for z in jax.tree.leaves(state.z))
    assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(state.u))


def test_pool_functions_accept_shape_dtype_structs(rng, params_factory):
  params = _params(rng, params_factory)
  abstract = _abstract(params)
  assert gsm_optax.pool_size(abstract) == 138
  assert gsm_optax.keep_count(abstract, COMPRESSION) == KEEP
  assert gsm_optax.default_pool(abstract) == gsm_optax.default_pool(params)
  assert gsm_optax.resolve_pool(abstract) == gsm_optax.resolve_pool(params)
  only_dense = lambda p: jax.tree.map(lambda x: x.ndim == 2, p)  # noqa: E731
  assert gsm_optax.pool_size(abstract, only_dense) == 8 * 6 + 6 * 3
  assert gsm_optax.keep_count(abstract, 2.0, pool=only_dense) == 33
  with pytest.raises(TypeError, match=r"\['ids'\] of dtype int32"):
    gsm_optax.resolve_pool({"ids": jax.ShapeDtypeStruct((3, 3), jnp.int32)}, {"ids": True})


# ----------------------------------------------------------------------------
# Extra keyword arguments (optax.GradientTransformationExtraArgs).
# ----------------------------------------------------------------------------


def _scale_by_factor():
  """A transform that consumes the extra argument `factor`."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, factor, **extra_args):
    del params, extra_args
    return jax.tree.map(lambda u: u * factor, updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@pytest.mark.parametrize("name", NAMES)
def test_update_takes_the_extra_arguments_of_a_chain(name, rng, params_factory):
  params = _params(rng, params_factory)
  grads = _params(rng, params_factory)
  tx, _ = _make(name, params)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  plain, _ = tx.update(grads, tx.init(params), params)
  direct, _ = tx.update(grads, tx.init(params), params, factor=3.0, unused="ignored")
  chained = optax.chain(tx, _scale_by_factor())
  scaled, _ = chained.update(grads, chained.init(params), params, factor=3.0)
  for a, b, c in zip(jax.tree.leaves(plain), jax.tree.leaves(direct), jax.tree.leaves(scaled)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(c), np.asarray(a) * np.float32(3.0))


# ----------------------------------------------------------------------------
# optax.ScalarOrSchedule and inject_hyperparams.
# ----------------------------------------------------------------------------


def test_hyperparameters_are_typed_as_optax_scalar_or_schedule():
  for fn, names in [
    (gsm_optax.gsm, ["learning_rate", "compression", "weight_decay"]),
    (gsm_optax.mask_by_global_taylor, ["compression"]),
  ]:
    hints = typing.get_type_hints(fn)
    for name in names:
      assert hints[name] == optax.ScalarOrSchedule, (fn.__name__, name)


@pytest.mark.parametrize("use_jit", [False, True], ids=["nojit", "jit"])
def test_inject_hyperparams_gsm_reads_its_compression_from_the_state(use_jit, rng, params_factory):
  opt = optax.inject_hyperparams(gsm_optax.gsm)(learning_rate=LR, compression=COMPRESSION)
  params = _params(rng, params_factory)
  grads = _params(rng, params_factory)
  update = jax.jit(opt.update) if use_jit else opt.update
  state = opt.init(params)
  assert int(gsm_optax.gsm_stats(state)["keep"]) == KEEP
  updates, state = update(grads, state, params)
  assert int(gsm_optax.gsm_stats(state)["keep"]) == KEEP
  plain = gsm_optax.gsm(LR, COMPRESSION)
  want, _ = plain.update(grads, plain.init(params), params)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
  state.hyperparams["compression"] = jnp.asarray(2.0, jnp.float32)
  _, state = update(grads, state, params)
  assert int(gsm_optax.gsm_stats(state)["keep"]) == 69

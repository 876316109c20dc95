"""path_pool / key_path_name: pools named by regular expressions over key paths."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsm_optax
from gsm_optax import path_pool

D, V, T, H = 32, 256, 64, 128

ATTN = {name: {"kernel": (D, D), "bias": (D,)} for name in ("query", "key", "value", "out")}
BLOCK = {
  "attn": ATTN,
  "mlp": {"fc1": {"kernel": (D, H), "bias": (H,)}, "fc2": {"kernel": (H, D), "bias": (D,)}},
  "ln1": {"scale": (D,)},
}
KERNELS = ["attn/query", "attn/key", "attn/value", "attn/out", "mlp/fc1", "mlp/fc2"]


def _arrays(shapes, rng):
  if isinstance(shapes, dict):
    return {k: _arrays(v, rng) for k, v in shapes.items()}
  if isinstance(shapes, list):
    return [_arrays(v, rng) for v in shapes]
  return rng.standard_normal(shapes).astype(np.float32)


def transformer_shapes(blocks_as_list: bool = False, num_blocks: int = 1):
  blocks = [BLOCK] * num_blocks
  return {
    "embed": {"embedding": (V, D)},
    "pos": {"embedding": (T, D)},
    "blocks": blocks if blocks_as_list else {str(i): b for i, b in enumerate(blocks)},
    "head": {"kernel": (D, V)},
  }


@pytest.fixture
def params():
  return _arrays(transformer_shapes(), np.random.default_rng(0))


def pooled_paths(params, pool) -> list[str]:
  flags = jax.tree_util.tree_flatten_with_path(pool(params))[0]
  return sorted(gsm_optax.key_path_name(path) for path, flag in flags if flag)


def block_kernels(i: int = 0) -> list[str]:
  return [f"blocks/{i}/{k}/kernel" for k in KERNELS]


# ----------------------------------------------------------------------------
# Paths.
# ----------------------------------------------------------------------------


class Pair(NamedTuple):
  left: jax.Array
  right: list


def test_key_path_name_writes_dict_keys_indices_and_attribute_names():
  tree = {"a": Pair(left=1.0, right=[2.0, {"b": 3.0}]), "c": {7: 4.0}}
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  assert [gsm_optax.key_path_name(p) for p, _ in flat] == [
    "a/left",
    "a/right/0",
    "a/right/1/b",
    "c/7",
  ]


def test_key_path_name_drops_the_value_attribute_of_a_flax_variable():
  path = (
    jax.tree_util.DictKey("blocks"),
    jax.tree_util.SequenceKey(3),
    jax.tree_util.DictKey("kernel"),
    jax.tree_util.GetAttrKey("value"),
  )
  assert gsm_optax.key_path_name(path) == "blocks/3/kernel"
  assert gsm_optax.key_path_name(path[:3] + (jax.tree_util.GetAttrKey("scale"),)) == (
    "blocks/3/kernel/scale"
  )


# ----------------------------------------------------------------------------
# Selection.
# ----------------------------------------------------------------------------


def test_empty_include_pools_every_floating_leaf_with_two_dims(params):
  assert pooled_paths(params, path_pool()) == sorted(
    ["embed/embedding", "pos/embedding", "head/kernel"] + block_kernels()
  )
  assert path_pool()(params) == gsm_optax.default_pool(params)


def test_include_selects_by_search_and_anchors(params):
  assert pooled_paths(params, path_pool(["kernel$"])) == sorted(["head/kernel"] + block_kernels())
  assert pooled_paths(params, path_pool(["attn/"])) == sorted(block_kernels()[:4])
  assert pooled_paths(params, path_pool([r"^blocks/\d+/mlp/", "^head/"])) == sorted(
    ["head/kernel"] + block_kernels()[4:]
  )


def test_exclude_wins_over_include(params):
  pool = path_pool(["kernel$"], exclude=["^head/", "query"])
  expected = [p for p in block_kernels() if "query" not in p]
  assert pooled_paths(params, pool) == sorted(expected)
  assert pooled_paths(params, path_pool(exclude=["embedding$"])) == sorted(
    ["head/kernel"] + block_kernels()
  )


def test_min_ndim_and_dtype_filter_matched_leaves(params):
  pool = path_pool(["attn/query/", "ln1"], min_ndim=1)
  assert pooled_paths(params, pool) == [
    "blocks/0/attn/query/bias",
    "blocks/0/attn/query/kernel",
    "blocks/0/ln1/scale",
  ]
  with_ints = {"w": np.ones((2, 2), np.float32), "steps": np.ones((2, 2), np.int32)}
  assert path_pool()(with_ints) == {"w": True, "steps": False}


def test_a_list_of_blocks_is_named_by_index():
  params = _arrays(transformer_shapes(blocks_as_list=True, num_blocks=2), np.random.default_rng(1))
  assert isinstance(params["blocks"], list)
  pool = path_pool([r"^blocks/\d+/attn/"], exclude=["^blocks/1/"])
  assert pooled_paths(params, pool) == sorted(block_kernels(0)[:4])
  assert pooled_paths(params, path_pool(["^blocks/1/mlp/fc2/"])) == ["blocks/1/mlp/fc2/kernel"]


def test_abstract_params_pool_alike(params):
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  pool = path_pool(["kernel$"], exclude=["^head/"])
  assert pool(abstract) == pool(params)


# ----------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------


def test_an_invalid_regex_is_rejected_when_the_pool_is_built():
  with pytest.raises(ValueError, match=r"include pattern '\(kernel' is not a valid regular"):
    path_pool(["(kernel"])
  with pytest.raises(ValueError, match=r"exclude pattern '\[' is not a valid regular"):
    path_pool(exclude=["["])


def test_a_single_string_or_a_bad_min_ndim_is_a_type_error():
  with pytest.raises(TypeError, match=r"include must be a sequence .* include=\('kernel',\)"):
    path_pool("kernel")
  with pytest.raises(TypeError, match="min_ndim must be an int >= 0"):
    path_pool(min_ndim=-1)


def test_an_include_pattern_matching_no_leaf_lists_the_paths(params):
  pool = path_pool(["kernel$", "attention/"])
  with pytest.raises(ValueError, match="include pattern 'attention/' matches no leaf") as info:
    pool(params)
  message = str(info.value)
  assert "available paths: blocks/0/attn/key/bias, blocks/0/attn/key/kernel, " in message
  assert message.endswith(", ... (16 leaves).") and "\n" not in message


def test_an_exclude_pattern_matching_no_leaf_is_an_error(params):
  with pytest.raises(ValueError, match="exclude pattern 'mlp/fc3' matches no leaf"):
    path_pool(exclude=["mlp/fc3"])(params)


def test_a_pool_of_nothing_is_an_error(params):
  with pytest.raises(ValueError, match=r"pools no leaf \(only floating leaves with ndim >= 2"):
    path_pool(["ln1/scale"])(params)
  with pytest.raises(ValueError, match="pools no leaf"):
    path_pool(["kernel$"], exclude=["kernel"])(params)


def test_errors_reach_the_user_through_gsm(params):
  tx = gsm_optax.gsm(0.1, 4.0, pool=path_pool(["attention"]))
  with pytest.raises(ValueError, match="include pattern 'attention' matches no leaf"):
    tx.init(params)


# ----------------------------------------------------------------------------
# With the library.
# ----------------------------------------------------------------------------


def test_gsm_masks_only_the_path_pool_and_passes_other_gradients(params):
  lr, compression = 0.1, 8.0
  pool = path_pool(["attn/"], exclude=["value"])
  tx = gsm_optax.gsm(lr, compression, momentum=0.9, weight_decay=0.0, pool=pool)
  grads = _arrays(transformer_shapes(), np.random.default_rng(2))
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)

  flags = pool(params)
  size = gsm_optax.pool_size(params, pool)
  assert size == 3 * D * D
  assert int(gsm_optax.gsm_stats(state)["num_active"]) == size // 8
  changed = 0
  for u, g, flag in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), jax.tree.leaves(flags)):
    if flag:
      changed += int(np.sum(np.asarray(u) != 0))
    else:  # passive weights outside the pool: the full gradient, -lr * g
      np.testing.assert_array_equal(np.asarray(u), np.asarray(-lr * jnp.asarray(g)))
  assert changed == size // 8


def test_prune_and_sparsity_report_use_the_path_pool_under_jit(params):
  pool = path_pool(["kernel$"], exclude=["^head/"])
  pruned = jax.jit(lambda p: gsm_optax.prune(p, 10.0, pool=pool))(params)
  flags = pool(params)
  for w, p, flag in zip(jax.tree.leaves(params), jax.tree.leaves(pruned), jax.tree.leaves(flags)):
    if not flag:
      np.testing.assert_array_equal(np.asarray(p), w)
  report = gsm_optax.sparsity_report(pruned, pool=pool)
  size = gsm_optax.pool_size(params, pool)
  assert sorted(row.path for row in report.rows) == sorted(
    f"['blocks']['0']['{k.split('/')[0]}']['{k.split('/')[1]}']['kernel']" for k in KERNELS
  )
  assert report.total_size == size
  assert report.total_nonzeros == int(size / 10.0)

"""Export: BCOO kernels, the .npz format, N:M storage, narrow models."""

import functools
import io
import os

from flax import nnx
import jax
from jax.experimental import sparse
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import bench_export
import gsm_optax
from gsm_optax import export
from models import count_params
from models.lenet import LeNet5
from models.lenet import LeNet300100
from models.narrow import count_macs
from models.narrow import narrow_lenet5
from models.narrow import narrow_lenet300
from models.narrow import narrow_resnet
from models.resnet_cifar import ResNet56
from models.resnet_cifar import ResNetCifar


def _lenet300_params(seed: int = 0) -> dict:
  """LeNet-300-100-shaped kernels and non-zero biases (NumPy float32)."""
  return bench_export.lenet300_params(seed)


@functools.cache
def _pruned(compression: float) -> dict:
  """`gsm_optax.prune` of `_lenet300_params()`, as NumPy arrays."""
  return jax.tree.map(np.asarray, gsm_optax.prune(_lenet300_params(), compression))


def _forward(params: dict, x: jax.Array, dense=export.sparse_dense) -> jax.Array:
  for name in ("fc1", "fc2"):
    x = jax.nn.relu(dense(x, params[name]["kernel"], params[name]["bias"]))
  return dense(x, params["fc3"]["kernel"], params["fc3"]["bias"])


# --------------------------------------------------------------------------
# BCOO.


def test_to_bcoo_makes_pooled_kernels_sparse_and_leaves_biases():
  pruned = _pruned(10.0)
  out = export.to_bcoo(pruned)
  for name in ("fc1", "fc2", "fc3"):
    kernel = out[name]["kernel"]
    assert isinstance(kernel, sparse.BCOO)
    assert kernel.nse == int(jnp.sum(pruned[name]["kernel"] != 0))
    np.testing.assert_array_equal(kernel.todense(), pruned[name]["kernel"])
    assert out[name]["bias"] is pruned[name]["bias"]


def test_bcoo_forward_equals_the_masked_dense_forward():
  pruned = _pruned(10.0)
  x = jax.random.normal(jax.random.key(1), (8, 784))
  dense = _forward(pruned, x)
  got = jax.jit(_forward)(export.to_bcoo(pruned), x)
  np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    export.sparse_dense(x[0], export.to_bcoo(pruned)["fc1"]["kernel"]),
    x[0] @ pruned["fc1"]["kernel"],
    rtol=1e-5,
    atol=1e-5,
  )


# --------------------------------------------------------------------------
# The .npz format.


def _npz_bytes(arrays: dict) -> int:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getbuffer().nbytes


@pytest.mark.parametrize("compression", [60.0, 10.0, 2.0])
def test_save_load_round_trip_is_exact_and_small(tmp_path, compression):
  pruned = _pruned(compression)
  path = os.path.join(tmp_path, "params.npz")
  export.save_sparse(path, pruned)
  loaded = export.load_sparse(path)
  assert jax.tree.structure(loaded) == jax.tree.structure(pruned)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(pruned)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))  # bit-equal
  dense = _npz_bytes({str(i): leaf for i, leaf in enumerate(jax.tree.leaves(pruned))})
  size = os.path.getsize(path)
  # 4 bytes a value, 2 a column index (uint16), per non-zero; rows pointers and biases.
  density = 1 / compression
  assert size < dense * (1.5 * density + 0.05), (size, dense)
  print(f"C={compression}: save_sparse {size} bytes, np.savez dense {dense} bytes")


def test_save_sparse_index_dtypes_and_lists(tmp_path):
  params = {"a": [np.eye(3, 300, dtype=np.float32), np.arange(3.0)], "b": np.ones((2, 70_000))}
  path = os.path.join(tmp_path, "p.npz")
  export.save_sparse(path, params)
  with np.load(path) as data:
    assert data["0.indices"].dtype == np.uint16  # 300 columns
    assert data["0.indptr"].dtype == np.uint8  # 3 non-zeros
    assert data["2.indices"].dtype == np.uint32  # 70,000 columns
    assert data["2.indptr"].dtype == np.uint32  # 140,000 non-zeros
  loaded = export.load_sparse(path)
  assert isinstance(loaded["a"], list)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_save_sparse_keeps_bfloat16_bits(tmp_path):
  kernel = np.asarray(jnp.array([[0.0, 1.5], [-2.25, 0.0]], jnp.bfloat16))
  path = os.path.join(tmp_path, "p.npz")
  export.save_sparse(path, {"k": kernel, "b": np.asarray(jnp.ones(2, jnp.bfloat16))})
  loaded = export.load_sparse(path)
  assert loaded["k"].dtype == jnp.bfloat16 and loaded["b"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(loaded["k"].view(np.uint16), kernel.view(np.uint16))


# --------------------------------------------------------------------------
# N:M storage.


@pytest.mark.parametrize(
  ("n", "m", "shape"), [(2, 4, (64, 24)), (1, 4, (64, 24)), (4, 8, (64, 24)), (2, 4, (3, 3, 16, 8))]
)
def test_nm_round_trip_is_exact(n, m, shape):
  kernel = jax.random.normal(jax.random.key(0), shape)
  pruned = np.asarray(gsm_optax.prune_nm({"k": kernel}, n, m)["k"])
  values, indices = export.nm_compress(pruned, n, m)
  expected = list(shape)
  expected[-2] = shape[-2] * n // m
  assert values.shape == indices.shape == tuple(expected)
  assert indices.dtype == np.uint8 and int(indices.max()) < m
  np.testing.assert_array_equal(export.nm_decompress(values, indices, n, m), pruned)
  assert export.nm_storage_bytes(shape, pruned.dtype, n, m) == values.nbytes + indices.nbytes


def test_nm_pads_groups_with_fewer_non_zeros_and_other_axes():
  kernel = np.zeros((8, 3), np.float32)
  kernel[1, 0] = 5.0
  values, indices = export.nm_compress(kernel, 2, 4, axis=0)
  np.testing.assert_array_equal(indices[:2, 0], [0, 1])  # the non-zero, then a zero slot
  np.testing.assert_array_equal(export.nm_decompress(values, indices, 2, 4, axis=0), kernel)


def test_nm_compress_rejects_a_non_conforming_kernel():
  kernel = np.ones((8, 2), np.float32)
  with pytest.raises(ValueError, match="not 2:4 along axis 0: 4 of 4 groups"):
    export.nm_compress(kernel, 2, 4)
  with pytest.raises(ValueError, match="does not divide"):
    export.nm_compress(np.ones((6, 2)), 2, 4)
  with pytest.raises(ValueError, match="1 <= n <= m"):
    export.nm_compress(kernel, 5, 4)


def test_nm_storage_bytes_packed():
  # 2:4 float16: half the values (2 bytes) plus 2 bits an index.
  assert export.nm_storage_bytes((64, 64), jnp.float16, 2, 4, packed=True) == 2048 * 2 + 512


# --------------------------------------------------------------------------
# Narrow models.


def _random_model(build, seed: int) -> nnx.Module:
  """`bench_export.random_model` with larger biases (std 0.5): cut channels output constants."""
  return bench_export.random_model(build, seed, bias_scale=0.5)


@nnx.jit
def _logits(model: nnx.Module, x: jax.Array) -> jax.Array:
  return model(x)


def test_narrow_lenet5_equals_the_masked_model():
  model = _random_model(lambda: LeNet5(rngs=nnx.Rngs(0)), 1)
  bench_export.channel_prune(model, 2.0, ["['conv1']", "['conv2']", "['fc1']"])
  narrow = narrow_lenet5(model)
  widths = [layer.kernel.shape[-1] for layer in (narrow.conv1, narrow.conv2, narrow.fc1)]
  assert widths == [10, 25, 250]
  x = jax.random.normal(jax.random.key(2), (4, 28, 28, 1))
  np.testing.assert_allclose(_logits(narrow, x), _logits(model, x), rtol=1e-4, atol=1e-4)
  assert count_params(narrow) < count_params(model) // 2
  assert count_macs(narrow, (28, 28, 1)) < count_macs(model, (28, 28, 1)) // 2
  assert count_macs(model, (28, 28, 1)) == 24 * 24 * 25 * 20 + 8 * 8 * 500 * 50 + 800 * 500 + 5000


def test_narrow_lenet300_equals_the_masked_model():
  model = _random_model(lambda: LeNet300100(rngs=nnx.Rngs(0)), 3)
  bench_export.channel_prune(model, 4.0, ["['fc1']", "['fc2']"])
  narrow = narrow_lenet300(model)
  assert narrow.fc1.kernel.shape[1] + narrow.fc2.kernel.shape[1] == 100
  x = jax.random.normal(jax.random.key(4), (4, 28, 28, 1))
  np.testing.assert_allclose(_logits(narrow, x), _logits(model, x), rtol=1e-4, atol=1e-4)
  assert count_macs(model, (28, 28, 1)) == 266_200


def test_narrow_resnet_equals_the_masked_model_in_eval_mode():
  model = _random_model(lambda: ResNetCifar(1, rngs=nnx.Rngs(0)), 5)  # ResNet-8: ResNet-56's blocks
  inner = [f"['blocks'][{i}]['conv1']" for i in range(len(model.blocks))]
  bench_export.channel_prune(model, 2.0, inner)
  model.eval()
  narrow = narrow_resnet(model)
  widths = [b.conv1.kernel.shape[-1] for b in narrow.blocks]
  assert widths == [8, 16, 32]
  assert all(b.fold is not None for b in narrow.blocks if b.conv1.kernel.shape[-1] < 64)
  x = jax.random.normal(jax.random.key(6), (3, 32, 32, 3))
  np.testing.assert_allclose(_logits(narrow, x), _logits(model, x), rtol=1e-4, atol=1e-4)
  assert count_macs(narrow, (32, 32, 3)) < count_macs(model, (32, 32, 3))


def test_save_sparse_round_trips_an_nnx_model(tmp_path):
  model = _random_model(lambda: LeNet300100(rngs=nnx.Rngs(0)), 7)
  bench_export.channel_prune(model, 4.0, ["['fc1']"])
  state = nnx.state(model, nnx.Param)
  path = os.path.join(tmp_path, "lenet.npz")
  export.save_sparse(path, nnx.to_pure_dict(state))
  restored = nnx.state(_random_model(lambda: LeNet300100(rngs=nnx.Rngs(0)), 8), nnx.Param)
  nnx.replace_by_pure_dict(restored, export.load_sparse(path))
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_narrow_resnet56_equals_the_masked_model_in_eval_mode():
  model = _random_model(lambda: ResNet56(rngs=nnx.Rngs(0)), 9)
  bench_export.channel_prune(model, 2.0, [f"['blocks'][{i}]['conv1']" for i in range(27)])
  model.eval()
  narrow = narrow_resnet(model)
  assert [b.conv1.kernel.shape[-1] for b in narrow.blocks] == [8] * 9 + [16] * 9 + [32] * 9
  x = jax.random.normal(jax.random.key(10), (2, 32, 32, 3))
  np.testing.assert_allclose(_logits(narrow, x), _logits(model, x), rtol=1e-4, atol=1e-4)
  assert count_params(narrow) < count_params(model) * 0.6


def test_bench_export_conv2_models_have_the_experiments_mac_ratios():
  for keep, ratio in zip(bench_export.CONV2_KEEP, (2.02, 4.00)):
    masked = bench_export.conv2_masked(keep)
    narrow = narrow_lenet5(masked)
    widths = [layer.kernel.shape[-1] for layer in (narrow.conv1, narrow.conv2, narrow.fc1)]
    assert widths == [20, keep, 500]
    macs = count_macs(masked, (28, 28, 1)) / count_macs(narrow, (28, 28, 1))
    assert round(macs, 2) == ratio
    x = jax.random.normal(jax.random.key(3), (4, 28, 28, 1))
    np.testing.assert_allclose(_logits(narrow, x), _logits(masked, x), rtol=1e-4, atol=1e-4)
    assert bench_export.model_bytes(narrow) < bench_export.model_bytes(masked)


def test_bench_export_resnet56_is_masked_in_eval_mode_and_narrows_to_half():
  masked = bench_export.resnet56_masked()
  assert all(b.bn1.use_running_average for b in masked.blocks)
  narrow = narrow_resnet(masked)
  assert bench_export.resnet_widths(narrow) == [8] * 9 + [16] * 9 + [32] * 9
  assert bench_export.model_bytes(narrow) < bench_export.model_bytes(masked)

"""LeNet-5's own convolution and pooling equal ``nnx.Conv`` and ``nnx.max_pool``.

``models.lenet`` applies LeNet-5's ``nnx.Conv`` parameters with ``conv_valid``
and pools with ``max_pool_2x2`` (custom gradients, faster on XLA:CPU). The
reference here is the plain definition: ``nnx.Conv.__call__`` and
``nnx.max_pool``, whose gradients are JAX's own.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import lenet

# The same initialisers, cheaper to compile than the default threefry (as in test_models.py).
RBG_KEY = jax.random.key(0, impl="rbg")


def reference_lenet5(model: lenet.LeNet5, x: jax.Array) -> jax.Array:
  """LeNet-5 written with nnx.Conv and nnx.max_pool, on ``model``'s parameters."""
  x = nnx.max_pool(nnx.relu(model.conv1(x)), window_shape=(2, 2), strides=(2, 2))
  x = nnx.max_pool(nnx.relu(model.conv2(x)), window_shape=(2, 2), strides=(2, 2))
  x = nnx.relu(model.fc1(x.reshape((x.shape[0], -1))))
  return model.fc2(x)


def loss_and_grads(apply, graphdef, params, x, labels, use_jit: bool):
  """(logits, d loss / d params, d loss / d x) of a cross-entropy on ``apply(model, x)``."""

  def loss(params, x):
    logits = apply(nnx.merge(graphdef, params), x)
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_probs, labels[:, None], 1).mean(), logits

  fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  (_, logits), (grad_params, grad_x) = (jax.jit(fn) if use_jit else fn)(params, x)
  return logits, grad_params, grad_x


@pytest.mark.parametrize("use_jit", [True, False], ids=["jit", "nojit"])
def test_lenet5_outputs_and_gradients_equal_the_nnx_conv_definition(use_jit):
  model = lenet.LeNet5(rngs=nnx.Rngs(RBG_KEY))
  graphdef, params = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 28, 28, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 4), jnp.int32)
  ours = loss_and_grads(lambda m, x: m(x), graphdef, params, x, labels, use_jit)
  reference = loss_and_grads(reference_lenet5, graphdef, params, x, labels, use_jit)
  for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


def test_lenet5_parameter_tree_is_that_of_nnx_conv():
  params = nnx.to_pure_dict(nnx.state(lenet.LeNet5(rngs=nnx.Rngs(RBG_KEY)), nnx.Param))
  shapes = jax.tree.map(lambda p: (p.shape, p.dtype), params)
  f32 = jnp.dtype("float32")
  assert shapes == {
    "conv1": {"kernel": ((5, 5, 1, 20), f32), "bias": ((20,), f32)},
    "conv2": {"kernel": ((5, 5, 20, 50), f32), "bias": ((50,), f32)},
    "fc1": {"kernel": ((800, 500), f32), "bias": ((500,), f32)},
    "fc2": {"kernel": ((500, 10), f32), "bias": ((10,), f32)},
  }


@pytest.mark.parametrize("use_jit", [True, False], ids=["jit", "nojit"])
@pytest.mark.parametrize("shape", [(3, 8, 8, 4), (2, 7, 9, 3)], ids=["even", "odd"])
def test_max_pool_2x2_routes_ties_to_the_same_input_as_nnx_max_pool(shape, use_jit):
  rng = np.random.default_rng(1)
  # Small integers after a ReLU: most windows hold ties, zeros and positive values.
  x = jnp.asarray(np.maximum(rng.integers(-2, 3, shape), 0), jnp.float32)
  cotangent = jnp.asarray(rng.standard_normal((shape[0], shape[1] // 2, shape[2] // 2, shape[3])))

  def pooled(pool):
    fn = lambda x: jnp.sum(pool(x) * cotangent)
    fn = jax.value_and_grad(fn)
    return (jax.jit(fn) if use_jit else fn)(x)

  value, grad = pooled(lenet.max_pool_2x2)
  want_value, want_grad = pooled(lambda x: nnx.max_pool(x, (2, 2), strides=(2, 2)))
  np.testing.assert_array_equal(lenet.max_pool_2x2(x), nnx.max_pool(x, (2, 2), strides=(2, 2)))
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  np.testing.assert_array_equal(grad, want_grad)


def test_lenet5_on_other_backends_is_the_nnx_conv_definition(monkeypatch):
  # GPU and TPU run nnx.Conv and nnx.max_pool themselves: the same ops as the reference.
  model = lenet.LeNet5(rngs=nnx.Rngs(RBG_KEY))
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 28, 28, 1)), jnp.float32)
  monkeypatch.setattr(lenet.jax, "default_backend", lambda: "gpu")
  np.testing.assert_array_equal(model(x), reference_lenet5(model, x))

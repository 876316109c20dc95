"""Tests for the models package: parameter counts, shapes, init, BN modes.

Initialising the big models for real is slow on CPU (every distinct kernel
shape compiles its own random-number program), so most structural tests work
on abstract models from ``nnx.eval_shape``; tests that need numbers either use
the LeNets (cheap, real init), shallow variants of the CIFAR model classes, or
fill an abstract model with host-side random values (``materialize``).
Where the real initialisers run, the tests seed them with an "rbg" PRNG key:
same initialisers, far cheaper to compile than the default threefry.
"""

from __future__ import annotations

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import MODELS
from models import count_params
from models import create_model
from models import densenet
from models import resnet_cifar
from models import resnet_imagenet
from models.densenet import DenseNetCifar
from models.resnet_cifar import BasicBlock
from models.resnet_cifar import ResNetCifar
from models.resnet_imagenet import Bottleneck

ALL_NAMES = ("lenet_300_100", "lenet5", "resnet56", "densenet40", "resnet50")
BN_NAMES = ("resnet56", "densenet40", "resnet50")
LENET_NAMES = ("lenet_300_100", "lenet5")

INPUT_SHAPES = {
  "lenet_300_100": (28, 28, 1),
  "lenet5": (28, 28, 1),
  "resnet56": (32, 32, 3),
  "densenet40": (32, 32, 3),
  "resnet50": (64, 64, 3),
}
NUM_CLASSES = {name: 10 for name in ALL_NAMES} | {"resnet50": 1000}


# --- Parameter counts from independent formulas ------------------------------
# Each returns (kernel entries, 1-D entries: biases + BN scale/bias).


def lenet_300_100_sizes() -> tuple[int, int]:
  weights = 784 * 300 + 300 * 100 + 100 * 10
  biases = 300 + 100 + 10
  return weights, biases


def lenet5_sizes() -> tuple[int, int]:
  # 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4; 4*4*50 = 800 features.
  weights = 5 * 5 * 1 * 20 + 5 * 5 * 20 * 50 + 800 * 500 + 500 * 10
  biases = 20 + 50 + 500 + 10
  return weights, biases


def resnet56_sizes(num_classes: int = 10) -> tuple[int, int]:
  weights = 3 * 3 * 3 * 16  # stem conv, no bias
  vectors = 2 * 16  # stem BN
  cin = 16
  for width in (16, 32, 64):
    for _ in range(9):
      weights += 3 * 3 * cin * width + 3 * 3 * width * width
      vectors += 2 * (2 * width)  # two BNs
      cin = width  # option-A shortcut: no parameters
  weights += 64 * num_classes
  vectors += num_classes
  return weights, vectors


def densenet40_sizes(num_classes: int = 10) -> tuple[int, int]:
  k = 12
  c = 16
  weights = 3 * 3 * 3 * 16
  vectors = 0
  for block in range(3):
    if block > 0:  # transition BN + conv1x1 (c -> c)
      vectors += 2 * c
      weights += c * c
    for _ in range(12):  # BN + conv3x3 (c -> k)
      vectors += 2 * c
      weights += 3 * 3 * c * k
      c += k
  assert c == 448
  vectors += 2 * c + num_classes  # final BN, dense bias
  weights += c * num_classes
  return weights, vectors


def resnet50_sizes(num_classes: int = 1000) -> tuple[int, int]:
  weights = 7 * 7 * 3 * 64
  vectors = 2 * 64
  cin = 64
  for blocks, width in ((3, 64), (4, 128), (6, 256), (3, 512)):
    cout = 4 * width
    # Projection shortcut (first block of each stage).
    weights += cin * cout
    vectors += 2 * cout
    for _ in range(blocks):
      weights += cin * width + 3 * 3 * width * width + width * cout
      vectors += 2 * (width + width + cout)
      cin = cout
  weights += 2048 * num_classes
  vectors += num_classes
  return weights, vectors


EXPECTED_SIZES = {
  "lenet_300_100": lenet_300_100_sizes(),
  "lenet5": lenet5_sizes(),
  "resnet56": resnet56_sizes(),
  "densenet40": densenet40_sizes(),
  "resnet50": resnet50_sizes(),
}
# The published / hand-checked totals.
EXPECTED_TOTALS = {
  "lenet_300_100": 266_610,
  "lenet5": 431_080,
  "resnet56": 853_018,
  "densenet40": 1_019_722,
  "resnet50": 25_557_032,  # torchvision.models.resnet50
}


# --- Helpers -----------------------------------------------------------------


def abstract_model(name: str, num_classes: int | None = None) -> nnx.Module:
  """The model with ShapeDtypeStruct leaves; no arrays are allocated."""
  if num_classes is None:
    num_classes = NUM_CLASSES[name]
  return nnx.eval_shape(lambda: create_model(name, num_classes=num_classes, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def abstract_models() -> dict[str, nnx.Module]:
  return {name: abstract_model(name) for name in ALL_NAMES}


def named_leaves(tree) -> list[tuple[str, str, jax.ShapeDtypeStruct]]:
  """(path, variable name, leaf) for every array of an nnx.State."""
  out = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    keys = [str(k) for k in keys if k != "value"]
    out.append(("/".join(keys), keys[-1], leaf))
  return out


def materialize(model: nnx.Module, seed: int = 0) -> nnx.Module:
  """Fills an abstract model with host-side values: He-scaled normal
  kernels, zero biases / running means, unit BN scales / running variances.
  Much faster than the real init for deep models (no per-shape compiles)."""
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = [getattr(k, "key", None) for k in path if hasattr(k, "key")][-1]
    if name == "kernel":
      fan_in = math.prod(leaf.shape[:-1])
      value = rng.standard_normal(leaf.shape, dtype=np.float32)
      return jnp.asarray(value * np.float32(math.sqrt(2.0 / fan_in)))
    if name in ("scale", "var"):
      return jnp.ones(leaf.shape, leaf.dtype)
    assert name in ("bias", "mean"), name
    return jnp.zeros(leaf.shape, leaf.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def batch_norms(model: nnx.Module) -> list[nnx.BatchNorm]:
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]


def random_images(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def fast_rngs(seed: int = 0) -> nnx.Rngs:
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


# One jitted forward for every test: nnx.jit caches per graph definition, so
# models of the same architecture, mode and input shape compile only once.
jit_forward = nnx.jit(lambda model, x: model(x))


@pytest.fixture(scope="module")
def lenets() -> dict[str, nnx.Module]:
  """The LeNets with their real initialisation."""
  return {name: create_model(name, rngs=fast_rngs()) for name in LENET_NAMES}


# Small models with real numbers: the LeNets, and shallow instances of the
# CIFAR ResNet / DenseNet classes (same blocks as ResNet-56 / DenseNet-40,
# fewer of them) filled by ``materialize``.
SMALL_BN_MODELS = {
  "resnet_cifar_n1": lambda: materialize(nnx.eval_shape(lambda: ResNetCifar(1, rngs=nnx.Rngs(0)))),
  "densenet_cifar_l1k4": lambda: materialize(
    nnx.eval_shape(lambda: DenseNetCifar(1, 4, rngs=nnx.Rngs(0)))
  ),
}
SMALL_INPUTS = {
  "lenet_300_100": (28, 28, 1),
  "lenet5": (28, 28, 1),
  "resnet_cifar_n1": (32, 32, 3),
  "densenet_cifar_l1k4": (32, 32, 3),
}
BATCH = 3  # one batch size everywhere, so compiled functions are reused


# --- Registry ----------------------------------------------------------------


def test_registry_names():
  assert set(MODELS) == set(ALL_NAMES) | {
    "gpt",
    "vit",
  }  # the transformers: tests/test_transformers.py
  assert set(models.__all__) >= {"MODELS", "create_model", "count_params"}


def test_unknown_name_raises_with_allowed_names():
  with pytest.raises(ValueError, match="resnet18") as info:
    create_model("resnet18", rngs=nnx.Rngs(0))
  for name in ALL_NAMES:
    assert name in str(info.value)


# --- Structure (abstract models) ----------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_param_count_matches_formula(name, abstract_models):
  model = abstract_models[name]
  weights, vectors = EXPECTED_SIZES[name]
  assert count_params(model) == weights + vectors == EXPECTED_TOTALS[name]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_pruning_pool_convention(name, abstract_models):
  """Kernels (the GSM pool: float leaves with ndim >= 2) hold exactly the
  weights; biases and BN scale/bias are 1-D and stay out of the pool."""
  weights, vectors = EXPECTED_SIZES[name]
  params = nnx.state(abstract_models[name], nnx.Param)
  pool, rest = 0, 0
  for path, var_name, leaf in named_leaves(params):
    assert jnp.issubdtype(leaf.dtype, jnp.floating), path
    if var_name == "kernel":
      assert leaf.ndim in (2, 4), path  # dense [in, out], conv HWIO
      pool += math.prod(leaf.shape)
    else:
      assert var_name in ("bias", "scale"), path
      assert leaf.ndim == 1, path
      rest += math.prod(leaf.shape)
  assert (pool, rest) == (weights, vectors)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_state_is_params_and_batch_stats_only(name, abstract_models):
  model = abstract_models[name]
  kinds = {
    type(v)
    for v in jax.tree.leaves(nnx.state(model), is_leaf=lambda v: isinstance(v, nnx.Variable))
  }
  has_bn = name in BN_NAMES
  assert kinds == ({nnx.Param, nnx.BatchStat} if has_bn else {nnx.Param})
  stats = nnx.state(model, nnx.BatchStat)
  n_stats = sum(math.prod(x.shape) for x in jax.tree.leaves(stats))
  n_bn = sum(2 * bn.num_features for bn in batch_norms(model))
  # Running mean + var: as many scalars as BN scale + bias, not counted.
  assert n_stats == n_bn
  assert count_params(model) == EXPECTED_TOTALS[name]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_output_shape(name, abstract_models):
  model = nnx.view(abstract_models[name], use_running_average=True, raise_if_not_found=False)
  shape = INPUT_SHAPES[name]
  if name == "resnet50":
    shape = (224, 224, 3)  # abstract, so the full ImageNet size is free
  x = jax.ShapeDtypeStruct((BATCH, *shape), jnp.float32)
  y = nnx.eval_shape(lambda m, x: m(x), model, x)
  assert y.shape == (BATCH, NUM_CLASSES[name])
  assert y.dtype == jnp.float32


@pytest.mark.parametrize("num_classes", [2, 100])
def test_num_classes(num_classes):
  model = abstract_model("lenet5", num_classes=num_classes)
  assert model.fc2.kernel.shape == (500, num_classes)
  assert model.fc2.bias.shape == (num_classes,)


def test_depths(abstract_models):
  def n_layers(model, cls):
    return sum(isinstance(m, cls) for _, m in nnx.iter_modules(model))

  r56 = abstract_models["resnet56"]
  blocks = [m for _, m in nnx.iter_modules(r56) if isinstance(m, BasicBlock)]
  assert len(blocks) == 27
  assert [b.stride for b in blocks].count(2) == 2
  assert n_layers(r56, nnx.Conv) + n_layers(r56, nnx.Linear) == 56

  d40 = abstract_models["densenet40"]
  assert n_layers(d40, nnx.Conv) + n_layers(d40, nnx.Linear) == 40

  r50 = abstract_models["resnet50"]
  bottlenecks = [m for _, m in nnx.iter_modules(r50) if isinstance(m, Bottleneck)]
  assert len(bottlenecks) == 16
  n_proj = sum(b.proj_conv is not None for b in bottlenecks)
  assert n_proj == 4
  # 50 = stem + 3 convs per bottleneck + fc (projections not counted).
  assert n_layers(r50, nnx.Conv) - n_proj + n_layers(r50, nnx.Linear) == 50
  # v1.5: the stride sits on the 3x3 conv of a downsampling block.
  for b in bottlenecks:
    assert b.conv1.strides == (1, 1)
    assert b.conv3.strides == (1, 1)
  assert [b.conv2.strides for b in bottlenecks].count((2, 2)) == 3


@pytest.mark.parametrize("name", BN_NAMES)
def test_batch_norm_settings_and_mode_toggle(name, abstract_models):
  model = abstract_models[name]
  bns = batch_norms(model)
  assert bns
  for bn in bns:
    assert bn.momentum == 0.9
    assert bn.epsilon == 1e-5
    assert bn.use_running_average is False  # built in training mode
  try:
    model.eval()
    assert all(bn.use_running_average is True for bn in bns)
  finally:
    model.train()  # the fixture is shared: leave it as built
  assert all(bn.use_running_average is False for bn in bns)


# --- Initialisation ----------------------------------------------------------


@pytest.mark.parametrize("name", LENET_NAMES)
def test_lenet_xavier_uniform_init_and_zero_biases(name, lenets):
  assert count_params(lenets[name]) == EXPECTED_TOTALS[name]
  for path, var_name, w in named_leaves(nnx.state(lenets[name], nnx.Param)):
    if var_name == "bias":
      np.testing.assert_array_equal(w, 0.0)
      continue
    receptive = math.prod(w.shape[:-2])
    fan_in, fan_out = receptive * w.shape[-2], receptive * w.shape[-1]
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    max_abs = float(jnp.max(jnp.abs(w)))
    assert max_abs <= bound, path
    assert max_abs >= 0.9 * bound, path  # uniform, not a narrower law
    # Var of U(-b, b) is b^2 / 3.
    assert float(jnp.std(w)) == pytest.approx(bound / math.sqrt(3), rel=0.1)


@pytest.mark.parametrize("module", [resnet_cifar, densenet, resnet_imagenet])
def test_he_normal_fan_out_conv_init_and_bn_init(module):
  shape = (3, 3, 32, 64)
  w = module.conv_init(jax.random.key(0, impl="rbg"), shape, jnp.float32)
  expected_std = math.sqrt(2.0 / (3 * 3 * 64))
  assert float(jnp.std(w)) == pytest.approx(expected_std, rel=0.05)
  assert abs(float(jnp.mean(w))) < 0.1 * expected_std
  # Dense: PyTorch's U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  d = module.dense_init(jax.random.key(1, impl="rbg"), (64, 10), jnp.float32)
  assert float(jnp.max(jnp.abs(d))) <= 1 / math.sqrt(64)
  bn = module.batch_norm(8, fast_rngs())
  np.testing.assert_array_equal(bn.scale[...], 1.0)
  np.testing.assert_array_equal(bn.bias[...], 0.0)
  np.testing.assert_array_equal(bn.mean[...], 0.0)
  np.testing.assert_array_equal(bn.var[...], 1.0)
  assert (bn.momentum, bn.epsilon, bn.use_running_average) == (0.9, 1e-5, False)


# --- Forward passes with numbers ----------------------------------------------


def test_option_a_shortcut_is_subsample_and_zero_pad():
  block = nnx.eval_shape(lambda: BasicBlock(16, 32, 2, rngs=nnx.Rngs(0)))
  x = random_images((2, 8, 8, 16))
  s = block.shortcut(x)
  assert s.shape == (2, 4, 4, 32)
  np.testing.assert_array_equal(s[..., :8], 0.0)
  np.testing.assert_array_equal(s[..., 24:], 0.0)
  np.testing.assert_array_equal(s[..., 8:24], x[:, ::2, ::2, :])
  identity = nnx.eval_shape(lambda: BasicBlock(16, 16, 1, rngs=nnx.Rngs(0)))
  np.testing.assert_array_equal(identity.shortcut(x), x)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", LENET_NAMES)
def test_lenet_forward(name, jit, lenets):
  model = lenets[name]
  x = random_images((BATCH, *SMALL_INPUTS[name]))
  y = jit_forward(model, x) if jit else model(x)
  assert y.shape == (BATCH, 10)
  assert y.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(y)))
  assert float(jnp.std(y)) > 0
  # Row i depends on example i only.
  np.testing.assert_allclose(y[1:], model(x[1:]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(SMALL_BN_MODELS))
def test_eval_mode_is_per_example_train_mode_is_not(name):
  model = SMALL_BN_MODELS[name]()
  x = random_images((BATCH, *SMALL_INPUTS[name]), seed=1)
  other = random_images((BATCH, *SMALL_INPUTS[name]), seed=2) * 3.0 + 1.0
  batch_a = x
  batch_b = x.at[1:].set(other[1:])  # same first example, other neighbours

  model.eval()
  stats_before = jax.tree.map(jnp.copy, nnx.state(model, nnx.BatchStat))
  ya, yb = jit_forward(model, batch_a), jit_forward(model, batch_b)
  assert ya.shape == (BATCH, 10)
  assert bool(jnp.all(jnp.isfinite(ya)))
  np.testing.assert_allclose(ya[0], yb[0], rtol=1e-5, atol=1e-5)
  # Eval calls never touch the running statistics.
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.BatchStat), stats_before)

  model.train()
  ya, yb = jit_forward(model, batch_a), jit_forward(model, batch_b)
  assert not np.allclose(ya[0], yb[0], rtol=1e-3, atol=1e-3)


def test_train_call_updates_running_stats_jit():
  model = SMALL_BN_MODELS["resnet_cifar_n1"]()
  model.train()
  x = random_images((BATCH, 32, 32, 3), seed=3) + 0.5
  y = jit_forward(model, x)
  assert y.shape == (BATCH, 10)
  # Stem BN started at mean 0 / var 1 and saw one batch with momentum 0.9.
  h = model.conv(x)
  batch_mean = jnp.mean(h, axis=(0, 1, 2))
  batch_var = jnp.var(h, axis=(0, 1, 2))
  np.testing.assert_allclose(model.bn.mean[...], 0.1 * batch_mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(model.bn.var[...], 0.9 + 0.1 * batch_var, rtol=1e-4, atol=1e-6)
  # Every BN layer moved away from its initial running statistics.
  for bn in batch_norms(model):
    assert float(jnp.max(jnp.abs(bn.mean[...]))) > 0


def test_train_call_updates_running_stats_eager():
  """Same as above without jit (in-place update), on one residual block to
  keep the op-by-op compilation short."""
  block = nnx.eval_shape(lambda: BasicBlock(16, 16, 1, rngs=nnx.Rngs(0)))
  block = materialize(block)
  x = random_images((BATCH, 8, 8, 16), seed=6) + 0.5
  block.eval()
  block(x)
  np.testing.assert_array_equal(block.bn1.mean[...], 0.0)
  block.train()
  block(x)
  h = block.conv1(x)
  expected = 0.1 * jnp.mean(h, axis=(0, 1, 2))
  np.testing.assert_allclose(block.bn1.mean[...], expected, rtol=1e-4, atol=1e-6)
  assert float(jnp.max(jnp.abs(block.bn2.mean[...]))) > 0


def test_eval_view_shares_arrays_with_training_model():
  model = SMALL_BN_MODELS["resnet_cifar_n1"]()
  x = random_images((BATCH, 32, 32, 3), seed=4)
  eval_model = nnx.view(model, use_running_average=True)
  assert all(bn.use_running_average is False for bn in batch_norms(model))
  jit_forward(model, x)  # a train-mode call updates the shared statistics
  model.eval()
  np.testing.assert_allclose(
    jit_forward(eval_model, x), jit_forward(model, x), rtol=1e-6, atol=1e-6
  )


def test_gradients_reach_every_param_and_loss_decreases():
  """A few plain-SGD steps in train mode: gradients w.r.t. ``nnx.Param`` only
  (BatchStat updated as a side effect), every kernel gets a gradient."""
  model = SMALL_BN_MODELS["resnet_cifar_n1"]()
  x = random_images((BATCH, 32, 32, 3), seed=7)
  labels = jnp.arange(BATCH) % 10

  def loss_fn(model):
    logits = model(x)
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))

  @nnx.jit
  def step(model):
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param))
    loss, grads = grad_fn(model)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p, g: p - 0.05 * g, params, grads))
    return loss, grads

  loss0, grads = step(model)
  assert jax.tree.structure(grads) == jax.tree.structure(nnx.state(model, nnx.Param))
  for path, var_name, g in named_leaves(grads):
    if var_name == "kernel":
      assert float(jnp.max(jnp.abs(g))) > 0, path
  for _ in range(4):
    loss, _ = step(model)
  assert float(loss) < float(loss0)


def test_resnet50_forward_64x64(abstract_models):
  """One jitted eval-mode compile of the full ResNet-50 on 64x64 images (the
  train-mode BN path is covered on the small models above)."""
  model = materialize(abstract_models["resnet50"])
  model.eval()
  x = random_images((2, 64, 64, 3), seed=5)
  y = jit_forward(model, x)
  assert y.shape == (2, 1000)
  assert bool(jnp.all(jnp.isfinite(y)))
  assert float(jnp.std(y)) > 0
  y2 = jit_forward(model, x.at[1].set(-x[1]))
  np.testing.assert_allclose(y2[0], y[0], rtol=1e-5, atol=1e-5)

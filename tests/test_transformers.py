"""Tests for the transformer models: GPT (bytes) and ViT (MNIST-sized images).

Parameter counts come from formulas written here, checked on abstract models
(``nnx.eval_shape``); numerical tests use the "nano" sizes, initialised for
real with an "rbg" key (cheap to compile) or filled with host-side random
values (``randomize``) so that biases, norms and attention all matter.
"""

from __future__ import annotations

import math
import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import MODELS
from models import count_params
from models import create_model
from models.gpt import GPT
from models.gpt import greedy_sample
from models.transformer import Block
from models.transformer import MultiHeadAttention
from models.vit import ViT

# (layers, d_model, heads, mlp hidden, context) and (..., patch) written out
# here, independent of the modules' SIZES.
GPT_SIZES = {
  "nano": (1, 32, 2, 64, 32),
  "tiny": (2, 128, 4, 512, 128),
  "small": (6, 384, 6, 1536, 256),
}
VIT_SIZES = {"nano": (1, 32, 2, 64, 7), "tiny": (2, 64, 4, 128, 7), "small": (6, 192, 3, 768, 4)}
GPT_TOTALS = {"nano": 26_272, "tiny": 478_976, "small": 10_942_720}
VIT_TOTALS = {"nano": 11_082, "tiny": 72_010, "small": 2_684_362}
BATCH = 2


def block_params(d: int, hidden: int) -> int:
  norms = 2 * (2 * d)  # ln1, ln2: scale + bias
  attention = 4 * (d * d + d)  # query, key, value, out
  mlp = d * hidden + hidden + hidden * d + d
  return norms + attention + mlp


def gpt_params(size: str, vocab: int = 256) -> int:
  layers, d, _, hidden, context = GPT_SIZES[size]
  return vocab * d + context * d + layers * block_params(d, hidden) + 2 * d + d * vocab + vocab


def vit_params(size: str, pooling: str = "cls", classes: int = 10, image: int = 28) -> int:
  layers, d, _, hidden, patch = VIT_SIZES[size]
  num_patches = (image // patch) ** 2
  embed = patch * patch * 1 * d + d
  cls = d if pooling == "cls" else 0
  head = d * classes + classes
  return embed + cls + num_patches * d + layers * block_params(d, hidden) + 2 * d + head


# --- Helpers -----------------------------------------------------------------


def fast_rngs(seed: int = 0) -> nnx.Rngs:
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def abstract(name: str, **kwargs) -> nnx.Module:
  return nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0), **kwargs))


def param_paths(model: nnx.Module) -> dict[str, jax.Array]:
  """ "/"-joined key path -> leaf for every ``nnx.Param``."""
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  flat, _ = jax.tree_util.tree_flatten_with_path(pure)
  return {"/".join(str(k.key) for k in path): leaf for path, leaf in flat}


def randomize(model: nnx.Module, seed: int = 0, scale: float = 0.3) -> nnx.Module:
  """Every parameter (biases and norms too) drawn from normal(0, scale)
  (LayerNorm scales around one), host-side."""
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)

  def draw(path, leaf):
    value = scale * rng.standard_normal(leaf.shape)
    if str(path[-1].key) == "scale":
      value += 1.0
    return jnp.asarray(value, jnp.float32)

  nnx.update(model, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
  return model


def block_paths(prefix: str) -> set[str]:
  names = [f"attn/{p}/{w}" for p in ("query", "key", "value", "out") for w in ("kernel", "bias")]
  names += [f"mlp/{p}/{w}" for p in ("fc1", "fc2") for w in ("kernel", "bias")]
  names += [f"{n}/{w}" for n in ("ln1", "ln2") for w in ("scale", "bias")]
  return {f"{prefix}/{n}" for n in names}


def pool_kernels(layers: int) -> set[str]:
  attn = [f"attn/{p}/kernel" for p in ("query", "key", "value", "out")]
  mlp = ["mlp/fc1/kernel", "mlp/fc2/kernel"]
  return {f"blocks/{i}/{n}" for i in range(layers) for n in attn + mlp}


def pool_of(cls: type[nnx.Module], paths) -> set[str]:
  """The paths the class's pool regexes select (``re.search``)."""
  included = {p for p in paths if any(re.search(r, p) for r in cls.pool_include)}
  return {p for p in included if not any(re.search(r, p) for r in cls.pool_exclude)}


jit_forward = nnx.jit(lambda model, x: model(x))


@pytest.fixture(scope="module")
def gpt_nano() -> GPT:
  return randomize(GPT(size="nano", rngs=fast_rngs()), seed=1)


@pytest.fixture(scope="module")
def vit_nano() -> ViT:
  return randomize(ViT(size="nano", rngs=fast_rngs()), seed=2)


def random_tokens(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, shape), jnp.int32)


def random_images(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# --- Registry and structure ----------------------------------------------------


def test_registry_and_class_attributes():
  assert MODELS["gpt"] is GPT and MODELS["vit"] is ViT
  for cls in (GPT, ViT):
    assert cls.classifier == "head"
    assert cls.pool_exclude == ()


@pytest.mark.parametrize("size", list(GPT_SIZES))
def test_gpt_param_count(size):
  model = abstract("gpt", num_classes=256, size=size)
  assert count_params(model) == gpt_params(size) == GPT_TOTALS[size]


@pytest.mark.parametrize("size", list(VIT_SIZES))
def test_vit_param_count_and_pooling_difference(size):
  cls = abstract("vit", size=size, pooling="cls")
  mean = abstract("vit", size=size, pooling="mean")
  assert count_params(cls) == vit_params(size, "cls") == VIT_TOTALS[size]
  assert count_params(mean) == vit_params(size, "mean")
  assert count_params(cls) - count_params(mean) == VIT_SIZES[size][1]


def test_gpt_key_paths_and_shapes():
  paths = param_paths(abstract("gpt", num_classes=256, size="tiny"))
  expected = {"embed/embedding", "pos/embedding", "ln_f/scale", "ln_f/bias"}
  expected |= {"head/kernel", "head/bias"} | block_paths("blocks/0") | block_paths("blocks/1")
  assert set(paths) == expected
  assert paths["embed/embedding"].shape == (256, 128)
  assert paths["pos/embedding"].shape == (128, 128)
  assert paths["blocks/1/attn/query/kernel"].shape == (128, 128)
  assert paths["blocks/1/mlp/fc1/kernel"].shape == (128, 512)
  assert paths["blocks/1/mlp/fc2/kernel"].shape == (512, 128)
  assert paths["head/kernel"].shape == (128, 256)
  assert all(leaf.dtype == jnp.float32 for leaf in paths.values())


def test_vit_key_paths_and_shapes():
  paths = param_paths(abstract("vit", size="tiny"))
  expected = {"patch_embed/kernel", "patch_embed/bias", "cls_token", "pos/embedding"}
  expected |= {"ln_f/scale", "ln_f/bias", "head/kernel", "head/bias"}
  expected |= block_paths("blocks/0") | block_paths("blocks/1")
  assert set(paths) == expected
  assert paths["patch_embed/kernel"].shape == (49, 64)
  assert paths["cls_token"].shape == (1, 1, 64)
  assert paths["pos/embedding"].shape == (16, 64)
  assert paths["head/kernel"].shape == (64, 10)
  assert "cls_token" not in param_paths(abstract("vit", size="tiny", pooling="mean"))


@pytest.mark.parametrize("name", ["gpt", "vit"])
@pytest.mark.parametrize("size", ["tiny", "small"])
def test_pool_regexes_select_attention_and_mlp_kernels(name, size):
  model = abstract(name, size=size)
  paths = param_paths(model)
  layers = (GPT_SIZES if name == "gpt" else VIT_SIZES)[size][0]
  assert pool_of(type(model), paths) == pool_kernels(layers)
  assert all(paths[p].ndim == 2 for p in pool_of(type(model), paths))  # [in, out] kernels


def test_unknown_size_and_bad_options_raise():
  with pytest.raises(ValueError, match="nano, tiny, small"):
    GPT(size="huge", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="nano, tiny, small"):
    ViT(size="huge", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="divisible"):
    nnx.eval_shape(lambda: ViT(size="nano", patch=5, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="pooling"):
    nnx.eval_shape(lambda: ViT(size="nano", pooling="max", rngs=nnx.Rngs(0)))


# --- Initialisation ------------------------------------------------------------


def test_gpt2_init():
  model = GPT(size="tiny", rngs=fast_rngs(3))  # 2 layers: residual std 0.02 / 2
  for path, leaf in param_paths(model).items():
    if path.endswith(("/bias", "ln_f/scale")) or "/ln" in path:
      expected = 1.0 if path.endswith("scale") else 0.0
      np.testing.assert_array_equal(leaf, expected, err_msg=path)
      continue
    residual = path.endswith(("attn/out/kernel", "mlp/fc2/kernel"))
    std = 0.02 / math.sqrt(2 * 2) if residual else 0.02
    assert float(jnp.std(leaf)) == pytest.approx(std, rel=0.05), path
    assert abs(float(jnp.mean(leaf))) < 0.05 * std, path


# --- GPT forward ---------------------------------------------------------------


@pytest.mark.parametrize("length", [32, 5])
def test_gpt_output_shape_and_dtype(gpt_nano, length):
  logits = gpt_nano(random_tokens((BATCH, length)))
  assert logits.shape == (BATCH, length, 256)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_gpt_longer_than_context_raises(gpt_nano):
  with pytest.raises(ValueError, match="exceeds the model's context 32"):
    gpt_nano(random_tokens((BATCH, 33)))
  short = nnx.eval_shape(lambda: GPT(size="nano", context=8, rngs=nnx.Rngs(0)))
  assert short.pos.embedding.shape == (8, 32)
  with pytest.raises(ValueError, match="context 8"):
    nnx.eval_shape(lambda m, x: m(x), short, jax.ShapeDtypeStruct((1, 9), jnp.int32))


def test_gpt_is_causal(gpt_nano):
  tokens = random_tokens((BATCH, 16), seed=1)
  t = 6
  changed = tokens.at[:, t + 1 :].set(random_tokens((BATCH, 16 - t - 1), seed=2))
  a, b = jit_forward(gpt_nano, tokens), jit_forward(gpt_nano, changed)
  np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], rtol=1e-5, atol=1e-5)
  assert not np.allclose(a[:, t + 1 :], b[:, t + 1 :], atol=1e-3)


@pytest.mark.parametrize("model_name", ["gpt", "vit"])
def test_jit_and_eager_forward_agree(model_name, gpt_nano, vit_nano):
  if model_name == "gpt":
    model, x = gpt_nano, random_tokens((BATCH, 12), seed=3)
  else:
    model, x = vit_nano, random_images((BATCH, 28, 28, 1), seed=3)
  np.testing.assert_allclose(model(x), jit_forward(model, x), rtol=1e-5, atol=1e-5)


# --- Generation ----------------------------------------------------------------


def reference_greedy(model: GPT, prompt: list[int], num_new: int) -> list[int]:
  """Step by step: a full forward pass over the last ``context`` tokens, argmax."""
  tokens = list(prompt)
  for _ in range(num_new):
    window = jnp.asarray(tokens[-model.context :], jnp.int32)[None]
    tokens.append(int(jnp.argmax(jit_forward(model, window)[0, -1])))
  return tokens


@pytest.mark.parametrize("prompt_length", [3, 29, 40])
def test_generate_equals_step_by_step_argmax(gpt_nano, prompt_length):
  prompt = np.random.default_rng(prompt_length).integers(0, 256, prompt_length).tolist()
  out = gpt_nano.generate(jnp.asarray(prompt, jnp.int32), 5)  # 29 + 5 crosses the context
  assert out.shape == (prompt_length + 5,)
  assert out.dtype == jnp.int32
  assert out.tolist() == reference_greedy(gpt_nano, prompt, 5)


def test_greedy_sample_decodes_prompt_and_bytes(gpt_nano):
  prompt = "Ça"  # 3 bytes, as a prompt above: the reference's compiled shapes are reused
  expected = reference_greedy(gpt_nano, list(prompt.encode("utf-8")), 5)
  text = greedy_sample(gpt_nano, prompt, 5)
  assert text == bytes(expected).decode("utf-8", errors="replace")
  assert text.startswith(prompt)
  with pytest.raises(ValueError, match="non-empty"):
    gpt_nano.generate(jnp.zeros((0,), jnp.int32), 3)


# --- Attention against NumPy ---------------------------------------------------


def numpy_attention(attn: MultiHeadAttention, x: np.ndarray, causal: bool) -> np.ndarray:
  """Multi-head attention written with NumPy, float64, head by head."""
  w = {
    n: np.asarray(getattr(attn, n).kernel[...], np.float64)
    for n in ("query", "key", "value", "out")
  }
  b = {
    n: np.asarray(getattr(attn, n).bias[...], np.float64) for n in ("query", "key", "value", "out")
  }
  x = np.asarray(x, np.float64)
  q, k, v = (x @ w[n] + b[n] for n in ("query", "key", "value"))
  length, d = x.shape[1], x.shape[2]
  hd = d // attn.num_heads
  heads = []
  for h in range(attn.num_heads):
    cols = slice(h * hd, (h + 1) * hd)
    scores = q[:, :, cols] @ k[:, :, cols].transpose(0, 2, 1) / np.sqrt(hd)
    if causal:
      scores = np.where(np.tril(np.ones((length, length))) > 0, scores, -np.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    heads.append(scores / scores.sum(axis=-1, keepdims=True) @ v[:, :, cols])
  return np.concatenate(heads, axis=-1) @ w["out"] + b["out"]


@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_numpy(gpt_nano, causal):
  attn = gpt_nano.blocks[0].attn
  if not causal:
    attn = randomize(MultiHeadAttention(32, 2, causal=False, rngs=fast_rngs(4)), seed=4)
  x = random_images((BATCH, 7, 32), seed=5)
  np.testing.assert_allclose(attn(x), numpy_attention(attn, x, causal), rtol=1e-4, atol=1e-5)


# --- ViT forward ---------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_vit_output_shape_and_dtype(vit_nano, pooling):
  model = vit_nano
  if pooling == "mean":
    model = randomize(ViT(size="nano", pooling="mean", rngs=fast_rngs()), seed=6)
  y = model(random_images((BATCH, 28, 28, 1)))
  assert y.shape == (BATCH, 10)
  assert y.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(y)))


def test_vit_other_input_sizes_abstract():
  model = nnx.eval_shape(
    lambda: ViT(100, size="small", image_size=32, in_channels=3, rngs=nnx.Rngs(0))
  )
  assert model.pos.embedding.shape == (64, 192)
  assert model.patch_embed.kernel.shape == (4 * 4 * 3, 192)
  y = nnx.eval_shape(
    lambda m, x: m(x), model, jax.ShapeDtypeStruct((BATCH, 32, 32, 3), jnp.float32)
  )
  assert (y.shape, y.dtype) == ((BATCH, 100), jnp.float32)


def test_vit_patches_are_row_major_blocks(vit_nano):
  images = jnp.arange(BATCH * 28 * 28, dtype=jnp.float32).reshape(BATCH, 28, 28, 1)
  patches = vit_nano.patches(images)
  assert patches.shape == (BATCH, 16, 49)
  np.testing.assert_array_equal(patches[1, 0], images[1, :7, :7, 0].reshape(-1))
  np.testing.assert_array_equal(patches[0, 6], images[0, 7:14, 14:21, 0].reshape(-1))


def test_vit_is_not_causal(vit_nano):
  """The class token sits first: with a causal mask it would never see the
  image; changing the last patch must change the logits."""
  images = random_images((BATCH, 28, 28, 1), seed=7)
  changed = images.at[:, 21:, 21:].set(random_images((BATCH, 7, 7, 1), seed=8))
  a, b = jit_forward(vit_nano, images), jit_forward(vit_nano, changed)
  assert not np.allclose(a, b, atol=1e-3)
  block = randomize(Block(32, 2, 64, causal=False, num_layers=1, rngs=fast_rngs(9)), seed=9)
  x = random_images((BATCH, 5, 32), seed=10)
  changed = x.at[:, -1].set(random_images((BATCH, 32), seed=11))  # not a shift: LN removes those
  assert not np.allclose(block(x)[:, 0], block(changed)[:, 0], atol=1e-3)

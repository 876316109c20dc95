"""Transformer blocks shared by the GPT and ViT models.

A pre-LayerNorm block (GPT-2 layout): ``x + attn(ln1(x))`` then
``x + mlp(ln2(x))``. Attention projections are plain 2-D ``nnx.Linear``
kernels ``[d_model, d_model]`` (head ``h`` owns columns
``h * head_dim : (h + 1) * head_dim`` of query/key/value and the matching rows
of ``out``), so code that treats every kernel as ``[in, out]`` (channel and
N:M pruning) works on them unchanged. No dropout: the models are deterministic.

Initialisation (GPT-2): kernels and embeddings normal(0.02), biases zero,
LayerNorm scale one; the two projections that write into the residual stream
(``attn/out`` and ``mlp/fc2``) normal(0.02 / sqrt(2 * num_layers)).
"""

from __future__ import annotations

import math

from flax import nnx
import jax
import jax.numpy as jnp

INIT_STD = 0.02
LN_EPSILON = 1e-5

normal = nnx.initializers.normal
zeros = nnx.initializers.zeros_init()


# Their kernels a GSM pool takes by default (regexes over key paths such as
# "blocks/0/attn/query/kernel"): attention and MLP only, the models' `pool_include`.
BLOCK_KERNELS = (r"attn/(query|key|value|out)/kernel$", r"mlp/fc[12]/kernel$")


def residual_std(num_layers: int) -> float:
  """GPT-2's std for the projections that feed the residual stream."""
  return INIT_STD / math.sqrt(2 * num_layers)


def dense(din: int, dout: int, rngs: nnx.Rngs, std: float = INIT_STD) -> nnx.Linear:
  """``nnx.Linear`` with normal(std) kernel and zero bias."""
  return nnx.Linear(din, dout, kernel_init=normal(std), bias_init=zeros, rngs=rngs)


def layer_norm(features: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm with epsilon 1e-5 (PyTorch's and GPT-2's)."""
  return nnx.LayerNorm(features, epsilon=LN_EPSILON, rngs=rngs)


class MultiHeadAttention(nnx.Module):
  """Multi-head scaled dot-product self-attention; causal mask when ``causal``.

  Scores and softmax are computed in float32 whatever the input dtype.
  """

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    *,
    causal: bool,
    out_std: float = INIT_STD,
    rngs: nnx.Rngs,
  ):
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}.")
    self.num_heads = num_heads
    self.head_dim = d_model // num_heads
    self.causal = causal
    self.query = dense(d_model, d_model, rngs)
    self.key = dense(d_model, d_model, rngs)
    self.value = dense(d_model, d_model, rngs)
    self.out = dense(d_model, d_model, rngs, std=out_std)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, d_model = x.shape

    def heads(y: jax.Array) -> jax.Array:  # [B, T, d] -> [B, T, H, head_dim]
      return y.reshape(batch, length, self.num_heads, self.head_dim)

    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(self.head_dim)
    if self.causal:
      allowed = jnp.tril(jnp.ones((length, length), bool))
      scores = jnp.where(allowed, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, d_model)
    return self.out(y)


class MLP(nnx.Module):
  """fc1 -> GELU (exact, erf form) -> fc2."""

  def __init__(self, d_model: int, hidden: int, *, out_std: float = INIT_STD, rngs: nnx.Rngs):
    self.fc1 = dense(d_model, hidden, rngs)
    self.fc2 = dense(hidden, d_model, rngs, std=out_std)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(nnx.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``.

  ``num_layers`` (the model's depth) scales the init of the residual
  projections ``attn/out`` and ``mlp/fc2``.
  """

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    mlp_hidden: int,
    *,
    causal: bool,
    num_layers: int,
    rngs: nnx.Rngs,
  ):
    std = residual_std(num_layers)
    self.ln1 = layer_norm(d_model, rngs)
    self.attn = MultiHeadAttention(d_model, num_heads, causal=causal, out_std=std, rngs=rngs)
    self.ln2 = layer_norm(d_model, rngs)
    self.mlp = MLP(d_model, mlp_hidden, out_std=std, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


def stack_blocks(
  num_layers: int, d_model: int, num_heads: int, mlp_hidden: int, *, causal: bool, rngs: nnx.Rngs
) -> nnx.List:
  """``num_layers`` blocks in an ``nnx.List`` (key paths ``blocks/<i>/...``)."""
  return nnx.List(
    [
      Block(d_model, num_heads, mlp_hidden, causal=causal, num_layers=num_layers, rngs=rngs)
      for _ in range(num_layers)
    ]
  )

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
import re
from typing import Any
from typing import Callable

from flax import nnx
import jax
import jax.numpy as jnp

import gsm_optax

INIT_STD = 0.02
LN_EPSILON = 1e-5

normal = nnx.initializers.normal
zeros = nnx.initializers.zeros_init()


# Their kernels a GSM pool takes by default (regexes over key paths such as
# "blocks/0/attn/query/kernel"): attention and MLP only, the models' `pool_include`.
BLOCK_KERNELS = (r"attn/(query|key|value|out)/kernel$", r"mlp/fc[12]/kernel$")

# Structured pruning of the blocks: a channel is an MLP hidden neuron or an attention head.
CHANNEL_GROUP_KINDS = ("neurons", "heads")
# kind -> the block's module and the axis of the channel in each of its [in, out] kernels
_GROUP_AXES = {
  "neurons": ("mlp", {"fc1": -1, "fc2": 0}),
  "heads": ("attn", {"query": -1, "key": -1, "value": -1, "out": 0}),
}
_BLOCK_KERNEL = re.compile(r"^blocks/(\d+)/(mlp|attn)/(\w+)/kernel$")


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

  ``head_dim`` defaults to ``d_model // num_heads``; given, the heads need not
  fill ``d_model`` (a narrowed block may keep any number of heads, 0 included:
  then it adds ``out``'s bias only). Scores and softmax are computed in float32
  whatever the input dtype.
  """

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    *,
    causal: bool,
    out_std: float = INIT_STD,
    head_dim: int | None = None,
    rngs: nnx.Rngs,
  ):
    if head_dim is None:
      if d_model % num_heads:
        raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}.")
      head_dim = d_model // num_heads
    self.num_heads = num_heads
    self.head_dim = head_dim
    self.causal = causal
    inner = num_heads * head_dim
    self.query = dense(d_model, inner, rngs)
    self.key = dense(d_model, inner, rngs)
    self.value = dense(d_model, inner, rngs)
    self.out = dense(inner, d_model, rngs, std=out_std)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, _ = x.shape

    def heads(y: jax.Array) -> jax.Array:  # [B, T, d] -> [B, T, H, head_dim]
      return y.reshape(batch, length, self.num_heads, self.head_dim)

    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(self.head_dim)
    if self.causal:
      allowed = jnp.tril(jnp.ones((length, length), bool))
      scores = jnp.where(allowed, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    y = y.reshape(batch, length, self.num_heads * self.head_dim)
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
  projections ``attn/out`` and ``mlp/fc2``; ``head_dim`` as in
  ``MultiHeadAttention``.
  """

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    mlp_hidden: int,
    *,
    causal: bool,
    num_layers: int,
    head_dim: int | None = None,
    rngs: nnx.Rngs,
  ):
    std = residual_std(num_layers)
    self.ln1 = layer_norm(d_model, rngs)
    self.attn = MultiHeadAttention(
      d_model, num_heads, causal=causal, out_std=std, head_dim=head_dim, rngs=rngs
    )
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


def channel_groups(kind: str, head_dim: int | None = None) -> Callable[[Any], Any]:
  """params -> a ``gsm_optax.ChannelSlice`` on each block kernel of `kind`, None elsewhere.

  "neurons": hidden neuron j of block i is column j of ``blocks/i/mlp/fc1/kernel``
  and row j of ``blocks/i/mlp/fc2/kernel`` (group ``blocks/i/mlp``). "heads": head
  h of block i is columns ``h * head_dim : (h + 1) * head_dim`` of the query, key
  and value kernels and the same rows of the out kernel (group ``blocks/i/attn``).
  Biases stay out: a cut neuron or head then adds nothing (its fc2 / out rows are
  zero), so ``models.narrow`` removes it exactly.

  Raises:
    ValueError: an unknown kind, or "heads" without a positive head_dim.
  """
  if kind not in _GROUP_AXES:
    raise ValueError(
      f"unknown channel group kind {kind!r}; kinds: {', '.join(CHANNEL_GROUP_KINDS)}."
    )
  if kind == "heads" and not (isinstance(head_dim, int) and head_dim >= 1):
    raise ValueError(f"channel groups of heads need the head_dim (an int >= 1), got {head_dim!r}.")
  module, axes = _GROUP_AXES[kind]
  width = head_dim if kind == "heads" else 1

  def spec(path: tuple, leaf: Any) -> gsm_optax.ChannelSlice | None:
    del leaf
    match = _BLOCK_KERNEL.match(gsm_optax.key_path_name(path))
    if match is None or match[2] != module or match[3] not in axes:
      return None
    return gsm_optax.ChannelSlice(f"blocks/{match[1]}/{module}", axes[match[3]], width)

  return lambda params: jax.tree_util.tree_map_with_path(spec, params)

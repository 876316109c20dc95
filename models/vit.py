"""A small Vision Transformer (Dosovitskiy et al., ICLR 2021) for MNIST-sized images.

The NHWC image is cut into ``patch`` x ``patch`` patches, each flattened and
embedded by ``patch_embed`` (a Linear); learned positions ``pos`` are added to
the patch tokens; a class token ``cls_token`` is prepended (pooling "cls") or
the tokens are averaged after the blocks (pooling "mean"). Non-causal pre-LN
blocks (models/transformer.py), final LayerNorm ``ln_f``, classifier ``head``.

The class token gets no position of its own: a learned vector at a fixed
place, its position embedding would only add to it. So "cls" has exactly
d_model more parameters than "mean".

Parameters for 28x28x1 inputs and 10 classes, N = (28 / patch)^2 patches,
d = d_model, h = mlp_hidden: patch_embed (patch^2 * C + 1) * d, cls_token d,
pos N * d, per block 4d + 4(d^2 + d) + 2dh + h + d, ln_f 2d, head 10d + 10.

  nano   1 x d 32,  2 heads, mlp 64,  patch 7, cls:    11,082
  tiny   2 x d 64,  4 heads, mlp 128, patch 7, cls:    72,010
  small  6 x d 192, 3 heads, mlp 768, patch 4, cls: 2,684,362
"""

from __future__ import annotations

from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

from models.transformer import BLOCK_KERNELS
from models.transformer import INIT_STD
from models.transformer import dense
from models.transformer import layer_norm
from models.transformer import normal
from models.transformer import stack_blocks

POOLINGS = ("cls", "mean")


class ViTSize(NamedTuple):
  """Depth, width and default patch size and pooling of a named ViT size."""

  num_layers: int
  d_model: int
  num_heads: int
  mlp_hidden: int
  patch: int
  pooling: str


SIZES: dict[str, ViTSize] = {
  "nano": ViTSize(num_layers=1, d_model=32, num_heads=2, mlp_hidden=64, patch=7, pooling="cls"),
  "tiny": ViTSize(num_layers=2, d_model=64, num_heads=4, mlp_hidden=128, patch=7, pooling="cls"),
  "small": ViTSize(num_layers=6, d_model=192, num_heads=3, mlp_hidden=768, patch=4, pooling="cls"),
}


class ViT(nnx.Module):
  """Vision Transformer: float32 NHWC images ``[B, image_size, image_size,
  in_channels]`` to logits ``[B, num_classes]``.

  ``size`` names an entry of ``SIZES``; ``patch`` and ``pooling`` ("cls" or
  "mean") default to the size's.
  """

  classifier = "head"  # the output layer: its channels are the classes
  # The default GSM pool: attention and MLP kernels only (patch embedding,
  # positions, class token, norms, biases and the head stay dense).
  pool_include = BLOCK_KERNELS
  pool_exclude = ()

  def __init__(
    self,
    num_classes: int = 10,
    *,
    rngs: nnx.Rngs,
    size: str = "tiny",
    patch: int | None = None,
    pooling: str | None = None,
    image_size: int = 28,
    in_channels: int = 1,
  ):
    if size not in SIZES:
      raise ValueError(f"Unknown ViT size {size!r}; sizes: {', '.join(SIZES)}.")
    spec = SIZES[size]
    self.patch = spec.patch if patch is None else patch
    self.pooling = spec.pooling if pooling is None else pooling
    if self.patch < 1 or image_size % self.patch:
      raise ValueError(f"image_size={image_size} is not divisible by patch={self.patch}.")
    if self.pooling not in POOLINGS:
      raise ValueError(f"Unknown pooling {self.pooling!r}; allowed: {', '.join(POOLINGS)}.")
    self.image_size = image_size
    d = spec.d_model
    num_patches = (image_size // self.patch) ** 2
    self.patch_embed = dense(self.patch * self.patch * in_channels, d, rngs)
    if self.pooling == "cls":
      self.cls_token = nnx.Param(jnp.zeros((1, 1, d), jnp.float32))
    self.pos = nnx.Embed(num_patches, d, embedding_init=normal(INIT_STD), rngs=rngs)
    self.blocks = stack_blocks(
      spec.num_layers, d, spec.num_heads, spec.mlp_hidden, causal=False, rngs=rngs
    )
    self.ln_f = layer_norm(d, rngs)
    self.head = dense(d, num_classes, rngs)

  def patches(self, images: jax.Array) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, (H / p) * (W / p), p * p * C]``, patches in
    row-major order, each flattened as (row, column, channel)."""
    b, h, w, c = images.shape
    if (h, w) != (self.image_size, self.image_size):
      raise ValueError(f"Expected {self.image_size}x{self.image_size} images, got {h}x{w}.")
    p = self.patch
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = self.patch_embed(self.patches(images)) + self.pos.embedding[...]
    if self.pooling == "cls":
      cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[-1])).astype(x.dtype)
      x = jnp.concatenate([cls, x], axis=1)
    for block in self.blocks:
      x = block(x)
    x = self.ln_f(x)
    x = x[:, 0] if self.pooling == "cls" else jnp.mean(x, axis=1)
    return self.head(x).astype(jnp.float32)

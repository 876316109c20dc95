"""A byte-level GPT (decoder-only transformer, GPT-2 layout) for language modelling.

Token embedding (``embed``) + learned positions (``pos``), causal pre-LN
blocks (models/transformer.py), final LayerNorm ``ln_f`` and an untied
output layer ``head`` with bias. The vocabulary is ``num_classes`` (256: raw
UTF-8 bytes).

Parameters per block, d = d_model, h = mlp_hidden: two LayerNorms 4d,
attention 4(d^2 + d), MLP 2dh + h + d. Whole model, V = num_classes,
C = context: V*d (embed) + C*d (pos) + L * block + 2d (ln_f) + d*V + V (head).

  nano   1 x d 32,  2 heads, mlp 64,   context 32:      26,272
  tiny   2 x d 128, 4 heads, mlp 512,  context 128:    478,976
  small  6 x d 384, 6 heads, mlp 1536, context 256: 10,942,720

"small" has the shape of nanoGPT's 6-layer, 384-wide character-level
Shakespeare model (reported as 10.65M parameters: its count leaves out the
position table, ties the head to a 65-character embedding and has no biases).
Here the six blocks hold 10,646,784 parameters and the 256-byte embedding,
the positions, ``ln_f`` and the untied head 295,936 more.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from models.transformer import BLOCK_KERNELS
from models.transformer import INIT_STD
from models.transformer import dense
from models.transformer import layer_norm
from models.transformer import normal
from models.transformer import stack_blocks


class GPTSize(NamedTuple):
  """Depth, width and default context of a named GPT size."""

  num_layers: int
  d_model: int
  num_heads: int
  mlp_hidden: int
  context: int


SIZES: dict[str, GPTSize] = {
  "nano": GPTSize(num_layers=1, d_model=32, num_heads=2, mlp_hidden=64, context=32),
  "tiny": GPTSize(num_layers=2, d_model=128, num_heads=4, mlp_hidden=512, context=128),
  "small": GPTSize(num_layers=6, d_model=384, num_heads=6, mlp_hidden=1536, context=256),
}


class GPT(nnx.Module):
  """Decoder-only transformer: int32 tokens ``[batch, T]`` (T <= context) to
  float32 next-token logits ``[batch, T, num_classes]``.

  ``size`` names an entry of ``SIZES``; ``context`` (the length of the
  position table) defaults to the size's.
  """

  classifier = "head"  # the output layer: its channels are the vocabulary
  # The default GSM pool: attention and MLP kernels only (embeddings,
  # positions, norms, biases and the head stay dense).
  pool_include = BLOCK_KERNELS
  pool_exclude = ()

  def __init__(
    self,
    num_classes: int = 256,
    *,
    rngs: nnx.Rngs,
    size: str = "tiny",
    context: int | None = None,
  ):
    if size not in SIZES:
      raise ValueError(f"Unknown GPT size {size!r}; sizes: {', '.join(SIZES)}.")
    spec = SIZES[size]
    self.context = spec.context if context is None else context
    if self.context < 1:
      raise ValueError(f"context must be positive, got {self.context}.")
    self.num_classes = num_classes
    d = spec.d_model
    self.embed = nnx.Embed(num_classes, d, embedding_init=normal(INIT_STD), rngs=rngs)
    self.pos = nnx.Embed(self.context, d, embedding_init=normal(INIT_STD), rngs=rngs)
    self.blocks = stack_blocks(
      spec.num_layers, d, spec.num_heads, spec.mlp_hidden, causal=True, rngs=rngs
    )
    self.ln_f = layer_norm(d, rngs)
    self.head = dense(d, num_classes, rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    length = tokens.shape[-1]
    if length > self.context:
      raise ValueError(f"Sequence length {length} exceeds the model's context {self.context}.")
    x = self.embed(tokens) + self.pos(jnp.arange(length))
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln_f(x)).astype(jnp.float32)

  def generate(self, prompt_tokens: jax.Array, num_new: int) -> jax.Array:
    """Greedy (argmax) decoding: the int32 prompt ``[T0]`` followed by
    ``num_new`` generated tokens, ``[T0 + num_new]``. Each step sees the last
    ``context`` tokens, positions counted from the start of that window."""
    prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
    if prompt_tokens.ndim != 1 or prompt_tokens.shape[0] == 0:
      raise ValueError(f"prompt_tokens must be a non-empty 1-D array, got {prompt_tokens.shape}.")
    graphdef, state = nnx.split(self)
    return _generate(graphdef, state, prompt_tokens, num_new)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _generate(graphdef: nnx.GraphDef, state: nnx.State, prompt: jax.Array, num_new: int):
  """``GPT.generate`` on a fixed ``context``-long window: while the text is
  shorter than the context, the window is filled left to right (the causal
  mask hides the zeros after it); once full, it shifts left by one token."""
  model = nnx.merge(graphdef, state)
  context, start = model.context, prompt.shape[0]
  window = prompt[-context:]
  buffer = jnp.zeros(context, jnp.int32).at[: window.shape[0]].set(window)
  out = jnp.concatenate([prompt, jnp.zeros(num_new, jnp.int32)])

  def step(i, carry):
    buffer, out = carry
    filled = jnp.minimum(start + i, context)  # tokens in the window
    logits = model(buffer[None])[0, filled - 1]
    token = jnp.argmax(logits).astype(jnp.int32)
    shifted = jnp.roll(buffer, -1).at[-1].set(token)
    appended = buffer.at[jnp.minimum(filled, context - 1)].set(token)
    buffer = jnp.where(filled == context, shifted, appended)
    return buffer, out.at[start + i].set(token)

  _, out = lax.fori_loop(0, num_new, step, (buffer, out))
  return out


def greedy_sample(model: GPT, prompt: str, num_bytes: int) -> str:
  """``prompt`` and ``num_bytes`` greedily generated bytes, decoded as UTF-8
  (invalid sequences replaced). ``model`` must be byte-level (256 classes)."""
  if model.num_classes != 256:
    raise ValueError(
      f"greedy_sample needs a byte-level model (256 classes), not {model.num_classes}."
    )
  tokens = jnp.asarray(list(prompt.encode("utf-8")), jnp.int32)
  out = np.asarray(model.generate(tokens, num_bytes))
  return bytes(out.astype(np.uint8).tolist()).decode("utf-8", errors="replace")

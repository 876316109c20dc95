"""Physically narrower models from channel-pruned ones (issue 14).

A channel whose kernel slice is all zero (after `gsm_optax.prune_channels`)
still outputs a constant: ReLU(bias), or ReLU(BN(0)) after BatchNorm. Each
function here removes such channels and folds their constant into the next
layer exactly, so the narrow model computes what the masked one does (up to
float rounding):

* through a 2x2 max pool a constant stays constant;
* into a VALID convolution or a Dense layer the constant adds
  const * (sum of the next kernel's slice) to the next bias;
* into a SAME (zero-padded) convolution the contribution is smaller at the
  borders, so ResNet blocks keep it as a one-input-channel convolution of an
  all-ones image (`NarrowBasicBlock.fold`): exact at every position and input
  size, 9 * cout numbers instead of a channel.

Transformers (GPT, ViT; `narrow_transformer`) lose, block by block, the MLP
hidden neurons and the attention heads that add nothing or a constant: a
neuron whose fc2 row is zero, or whose fc1 column is zero (GELU(bias) times its
fc2 row is folded into fc2's bias); a head whose out rows are zero, or whose
value columns are zero (its output is then the value bias at every position,
the attention weights summing to 1, folded into out's bias through its out
rows). Blocks may keep different numbers of neurons and heads, 0 included.

`count_macs` counts the multiply-accumulates of a model's convolutions and
matmuls for one input, before and after.
"""

from __future__ import annotations

import math
from typing import Any

from flax import nnx
import jax
from jax import lax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from models.gpt import GPT
from models.lenet import LeNet5
from models.lenet import LeNet300100
from models.resnet_cifar import BasicBlock
from models.resnet_cifar import ResNetCifar
from models.transformer import Block
from models.vit import ViT

# --------------------------------------------------------------------------
# Helpers.


def _array(variable: nnx.Variable) -> np.ndarray:
  return np.asarray(variable[...], np.float64)


def _relu(x: np.ndarray) -> np.ndarray:
  return np.maximum(x, 0.0)


def _alive(kernel: np.ndarray) -> np.ndarray:
  """Output channels (last axis) with a non-zero weight; at least the first one."""
  keep = np.any(kernel.reshape(-1, kernel.shape[-1]) != 0, axis=0)
  if not keep.any():
    keep[0] = True
  return keep


def _set(variable: nnx.Variable, value: np.ndarray) -> None:
  """Sets a variable (of an abstract model too) to `value`, in the variable's dtype."""
  variable.set_value(jnp.asarray(value, variable.get_value().dtype))


def _abstract(build):
  """The module `build()` makes, its arrays shapes only: no initialiser runs (or compiles)."""
  return nnx.eval_shape(build)


# --------------------------------------------------------------------------
# LeNets.


def narrow_lenet300(model: LeNet300100) -> LeNet300100:
  """A LeNet-300-100 without the fc1 / fc2 neurons whose kernel column is all zero."""
  k1, b1 = _array(model.fc1.kernel), _array(model.fc1.bias)
  k2, b2 = _array(model.fc2.kernel), _array(model.fc2.bias)
  k3, b3 = _array(model.fc3.kernel), _array(model.fc3.bias)
  keep1 = _alive(k1)
  b2 = b2 + _relu(b1[~keep1]) @ k2[~keep1]
  k1, b1, k2 = k1[:, keep1], b1[keep1], k2[keep1]
  keep2 = _alive(k2)
  b3 = b3 + _relu(b2[~keep2]) @ k3[~keep2]
  k2, b2, k3 = k2[:, keep2], b2[keep2], k3[keep2]
  new = _abstract(
    lambda: LeNet300100(
      num_classes=k3.shape[1],
      in_features=k1.shape[0],
      widths=(k1.shape[1], k2.shape[1]),
      rngs=nnx.Rngs(0),
    )
  )
  for layer, (k, b) in zip((new.fc1, new.fc2, new.fc3), ((k1, b1), (k2, b2), (k3, b3))):
    _set(layer.kernel, k)
    _set(layer.bias, b)
  return new


def narrow_lenet5(model: LeNet5) -> LeNet5:
  """A LeNet-5 without the conv1 / conv2 channels and fc1 neurons whose kernel
  slice is all zero; their constant outputs folded into the next biases."""
  k1, b1 = _array(model.conv1.kernel), _array(model.conv1.bias)
  k2, b2 = _array(model.conv2.kernel), _array(model.conv2.bias)
  k3, b3 = _array(model.fc1.kernel), _array(model.fc1.bias)
  k4, b4 = _array(model.fc2.kernel), _array(model.fc2.bias)
  # conv1 -> max pool -> VALID conv2: a constant channel adds r * sum of its slice.
  keep1 = _alive(k1)
  b2 = b2 + np.einsum("hwco,c->o", k2[:, :, ~keep1], _relu(b1[~keep1]))
  k1, b1, k2 = k1[..., keep1], b1[keep1], k2[:, :, keep1]
  # conv2 -> max pool -> flatten (h, w, c) -> fc1: the rows of channel c at every (h, w).
  keep2 = _alive(k2)
  rows = k3.reshape(-1, keep2.size, k3.shape[1])
  b3 = b3 + np.einsum("pco,c->o", rows[:, ~keep2], _relu(b2[~keep2]))
  k2, b2, k3 = k2[..., keep2], b2[keep2], rows[:, keep2].reshape(-1, k3.shape[1])
  # fc1 -> fc2.
  keep3 = _alive(k3)
  b4 = b4 + _relu(b3[~keep3]) @ k4[~keep3]
  k3, b3, k4 = k3[:, keep3], b3[keep3], k4[keep3]
  spatial = math.isqrt(rows.shape[0])
  new = _abstract(
    lambda: LeNet5(
      num_classes=k4.shape[1],
      in_channels=k1.shape[2],
      input_size=4 * spatial + 12,  # ((size - 4) // 2 - 4) // 2 == spatial
      widths=(k1.shape[-1], k2.shape[-1], k3.shape[1]),
      rngs=nnx.Rngs(0),
    )
  )
  layers = (new.conv1, new.conv2, new.fc1, new.fc2)
  for layer, (k, b) in zip(layers, ((k1, b1), (k2, b2), (k3, b3), (k4, b4))):
    _set(layer.kernel, k)
    _set(layer.bias, b)
  return new


# --------------------------------------------------------------------------
# CIFAR ResNets: the inner channels of every basic block.


class FoldedConstant(nnx.Variable):
  """A constant folded in at export; not a parameter (not trained, not counted)."""


class NarrowBasicBlock(BasicBlock):
  """`BasicBlock` with `width` inner channels; the cut channels' constant
  ReLU(BN(0)) enters conv2 through `fold`, a (3, 3, 1, cout) kernel applied to
  an all-ones image with conv2's zero padding (None when nothing was cut)."""

  def __init__(self, cin: int, width: int, cout: int, stride: int, *, rngs: nnx.Rngs):
    super().__init__(cin, cout, stride, width=width, rngs=rngs)
    self.fold = nnx.data(None)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x)))
    z = self.conv2(y)
    if self.fold is not None:
      ones = jnp.ones((1, *y.shape[1:3], 1), z.dtype)
      z = z + lax.conv_general_dilated(
        ones, self.fold[...], (1, 1), self.conv2.padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
    y = self.bn2(z)
    return nnx.relu(y + self.shortcut(x))


def _bn_arrays(bn: nnx.BatchNorm) -> list[np.ndarray]:
  return [_array(v) for v in (bn.scale, bn.bias, bn.mean, bn.var)]


def _narrow_block(block: BasicBlock) -> NarrowBasicBlock:
  k1, k2 = _array(block.conv1.kernel), _array(block.conv2.kernel)
  scale, bias, mean, var = _bn_arrays(block.bn1)
  keep = _alive(k1)
  const = _relu(bias - scale * mean / np.sqrt(var + block.bn1.epsilon))  # ReLU(BN(0)), eval
  cin, cout = k1.shape[2], k2.shape[3]
  width = int(keep.sum())
  new = _abstract(lambda: NarrowBasicBlock(cin, width, cout, block.stride, rngs=nnx.Rngs(0)))
  _set(new.conv1.kernel, k1[..., keep])
  _set(new.conv2.kernel, k2[:, :, keep])
  for target, value in zip(
    (new.bn1.scale, new.bn1.bias, new.bn1.mean, new.bn1.var), (scale, bias, mean, var)
  ):
    _set(target, value[keep])
  for target, value in zip(
    (new.bn2.scale, new.bn2.bias, new.bn2.mean, new.bn2.var), _bn_arrays(block.bn2)
  ):
    _set(target, value)
  if not keep.all():
    fold = np.einsum("hwco,c->hwo", k2[:, :, ~keep], const[~keep])[:, :, None]
    new.fold = FoldedConstant(jnp.asarray(fold, block.conv2.kernel[...].dtype))
  return new


def narrow_resnet(model: ResNetCifar) -> ResNetCifar:
  """A copy of a CIFAR ResNet without the inner channels (conv1 of each basic
  block) whose kernel slice is all zero; in eval mode (BN running averages),
  where it computes what the masked model computes."""
  new = nnx.clone(model)
  new.blocks = nnx.List([_narrow_block(block) for block in model.blocks])
  new.eval()
  return new


# --------------------------------------------------------------------------
# Transformers: the MLP neurons and attention heads of every block.


def _gelu(x: np.ndarray) -> np.ndarray:
  """GELU, exact (erf) form, as the blocks' MLP."""
  return 0.5 * x * (1.0 + np.vectorize(math.erf, otypes=[np.float64])(x / math.sqrt(2.0)))


def _zero(kernel: np.ndarray, axis: int) -> np.ndarray:
  """Per index of `axis`: whether that slice of a 2-D kernel is all zero."""
  return ~np.any(kernel != 0, axis=1 - axis)


def _mlp_arrays(block: Block) -> tuple[list[np.ndarray], int]:
  """[fc1 kernel, fc1 bias, fc2 kernel, fc2 bias] of the kept neurons, and their number."""
  k1, b1 = _array(block.mlp.fc1.kernel), _array(block.mlp.fc1.bias)
  k2, b2 = _array(block.mlp.fc2.kernel), _array(block.mlp.fc2.bias)
  dead_in, dead_out = _zero(k1, 1), _zero(k2, 0)
  fold = dead_in & ~dead_out  # outputs GELU(b1) times its fc2 row, whatever the input
  b2 = b2 + _gelu(b1[fold]) @ k2[fold]
  keep = ~(dead_in | dead_out)
  return [k1[:, keep], b1[keep], k2[keep], b2], int(keep.sum())


def _attention_arrays(block: Block) -> tuple[list[np.ndarray], int]:
  """[q, k, v kernels and biases, out kernel and bias] of the kept heads, and their number."""
  attn = block.attn
  hd = attn.head_dim
  q, k, v, o = (_array(layer.kernel) for layer in (attn.query, attn.key, attn.value, attn.out))
  bq, bk, bv, bo = (_array(layer.bias) for layer in (attn.query, attn.key, attn.value, attn.out))

  def per_head(dead: np.ndarray) -> np.ndarray:
    return dead.reshape(-1, hd).all(axis=1)

  dead_v, dead_out = per_head(_zero(v, 1)), per_head(_zero(o, 0))
  fold = np.repeat(dead_v & ~dead_out, hd)  # outputs its value bias at every position
  bo = bo + bv[fold] @ o[fold]
  keep = np.repeat(~(dead_v | dead_out), hd)
  arrays = [q[:, keep], bq[keep], k[:, keep], bk[keep], v[:, keep], bv[keep], o[keep], bo]
  return arrays, int(keep.sum()) // hd


def narrow_block(block: Block) -> Block:
  """A `Block` without the MLP neurons and attention heads that add nothing or a
  constant (folded into fc2's or out's bias); 0 of either may remain."""
  mlp, hidden = _mlp_arrays(block)
  attention, heads = _attention_arrays(block)
  d_model, hd = block.ln1.scale.shape[0], block.attn.head_dim
  new = _abstract(
    lambda: Block(
      d_model,
      heads,
      hidden,
      causal=block.attn.causal,
      num_layers=1,
      head_dim=hd,
      rngs=nnx.Rngs(0),
    )
  )
  for norm, old in ((new.ln1, block.ln1), (new.ln2, block.ln2)):
    _set(norm.scale, _array(old.scale))
    _set(norm.bias, _array(old.bias))
  attn = new.attn
  layers = (attn.query, attn.key, attn.value, attn.out, new.mlp.fc1, new.mlp.fc2)
  values = attention + mlp
  for i, layer in enumerate(layers):
    _set(layer.kernel, values[2 * i])
    _set(layer.bias, values[2 * i + 1])
  return new


def narrow_transformer(model: GPT | ViT) -> GPT | ViT:
  """A copy of a GPT or ViT whose blocks keep only the MLP neurons and attention
  heads that contribute more than a constant (`narrow_block`); it computes what
  the masked model computes, up to float rounding."""
  new = nnx.clone(model)
  new.blocks = nnx.List([narrow_block(block) for block in model.blocks])
  return new


# --------------------------------------------------------------------------
# Multiply-accumulates.


def narrow(model: nnx.Module) -> nnx.Module:
  """The narrowed copy of a LeNet-300-100, LeNet-5, CIFAR ResNet, GPT or ViT (the
  functions above).

  Raises:
    TypeError: for a model with no narrowing.
  """
  for cls, fn in (
    (LeNet300100, narrow_lenet300),
    (LeNet5, narrow_lenet5),
    (ResNetCifar, narrow_resnet),
    ((GPT, ViT), narrow_transformer),
  ):
    if isinstance(model, cls):
      return fn(model)
  raise TypeError(
    f"no narrowing for {type(model).__name__}: LeNet300100, LeNet5, ResNetCifar, GPT and ViT "
    "have one"
  )


def _jaxpr_macs(jaxpr: jex.Jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      out, rhs = eqn.outvars[0].aval.shape, eqn.invars[1].aval.shape
      total += math.prod(out) * math.prod(rhs) // rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
    elif name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jex.ClosedJaxpr):
          total += _jaxpr_macs(sub.jaxpr)
        elif isinstance(sub, jex.Jaxpr):
          total += _jaxpr_macs(sub)
  return total


def count_macs(model: nnx.Module, input_shape: tuple[int, ...], dtype: Any = jnp.float32) -> int:
  """Multiply-accumulates of the convolutions and matmuls of one forward pass
  on one input of `input_shape` and `dtype` (no batch axis; a GPT takes int32
  tokens); traced, nothing is run."""
  graphdef, state = nnx.split(model)

  def forward(state, x):
    return nnx.merge(graphdef, state)(x)

  x = jax.ShapeDtypeStruct((1, *input_shape), dtype)
  return _jaxpr_macs(jax.make_jaxpr(forward)(state, x).jaxpr)

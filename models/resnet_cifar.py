"""ResNet-56 for CIFAR-10 (He et al., "Deep Residual Learning for Image
Recognition", CVPR 2016, Section 4.2).

Layout: conv 3x3x16 - BN - ReLU, then three stages of 9 basic blocks with
16 / 32 / 64 channels (the first block of stages 2 and 3 has stride 2), then
global average pooling and a dense classifier. 6*9 + 2 = 56 weighted layers.

Shortcuts are option A of the paper: identity, or, where the shape changes, a
parameter-free stride-2 subsample followed by zero-padding of the new
channels. Convolutions have no bias (BN follows each of them); the classifier
has one.

Parameter count for 10 classes (kernels + BN scale/bias + dense bias):

  stem     3*3*3*16 + 2*16                                =     464
  stage 1  9 * (2*3*3*16*16 + 2*2*16)                     =  42,048
  stage 2  (3*3*16*32 + 3*3*32*32 + 2*2*32)
           + 8 * (2*3*3*32*32 + 2*2*32)                   = 162,432
  stage 3  (3*3*32*64 + 3*3*64*64 + 2*2*64)
           + 8 * (2*3*3*64*64 + 2*2*64)                   = 647,424
  dense    64*10 + 10                                     =     650
  total                                                   = 853,018

BN running mean/variance (``nnx.BatchStat``) are not parameters.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from models.layers import BN_EPSILON  # noqa: F401
from models.layers import BN_MOMENTUM  # noqa: F401
from models.layers import batch_norm  # noqa: F401
from models.layers import conv  # noqa: F401
from models.layers import conv_init  # noqa: F401
from models.layers import dense_init  # noqa: F401
from models.layers import zeros  # noqa: F401


class BasicBlock(nnx.Module):
  """Basic residual block: conv3x3-BN-ReLU-conv3x3-BN, + shortcut, ReLU.

  The shortcut is option A: identity, or stride-``stride`` subsampling and
  symmetric zero-padding of the channels when the shape changes.
  """

  def __init__(self, cin: int, cout: int, stride: int, *, width: int | None = None, rngs: nnx.Rngs):
    width = cout if width is None else width  # inner channels (conv1's outputs)
    self.stride = stride
    self.pad_channels = cout - cin
    self.conv1 = conv(cin, width, 3, stride, rngs)
    self.bn1 = batch_norm(width, rngs)
    self.conv2 = conv(width, cout, 3, 1, rngs)
    self.bn2 = batch_norm(cout, rngs)

  def shortcut(self, x: jax.Array) -> jax.Array:
    if self.stride > 1:
      x = x[:, :: self.stride, :: self.stride, :]
    if self.pad_channels > 0:
      lo = self.pad_channels // 2
      hi = self.pad_channels - lo
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (lo, hi)))
    return x

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return nnx.relu(y + self.shortcut(x))


class ResNetCifar(nnx.Module):
  """CIFAR ResNet with ``6n + 2`` layers (He et al. 2016), option-A shortcuts.

  ``blocks_per_stage = n`` basic blocks in each of three stages of widths
  16 / 32 / 64; n = 9 gives ResNet-56.
  """

  classifier = "fc"  # the output layer: its channels are the classes

  def __init__(
    self,
    blocks_per_stage: int,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    rngs: nnx.Rngs,
  ):
    self.conv = conv(in_channels, 16, 3, 1, rngs)
    self.bn = batch_norm(16, rngs)
    blocks = []
    cin = 16
    for stage, cout in enumerate((16, 32, 64)):
      for i in range(blocks_per_stage):
        stride = 2 if stage > 0 and i == 0 else 1
        blocks.append(BasicBlock(cin, cout, stride, rngs=rngs))
        cin = cout
    self.blocks = nnx.List(blocks)
    self.fc = nnx.Linear(64, num_classes, kernel_init=dense_init, bias_init=zeros, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.bn(self.conv(x)))
    for block in self.blocks:
      x = block(x)
    x = jnp.mean(x, axis=(1, 2))
    return self.fc(x)


class ResNet56(ResNetCifar):
  """ResNet-56 for CIFAR (He et al. 2016): 3 stages x 9 basic blocks,
  widths 16/32/64, option-A shortcuts; 853,018 parameters for 10 classes."""

  def __init__(self, *, num_classes: int = 10, in_channels: int = 3, rngs: nnx.Rngs):
    super().__init__(9, num_classes=num_classes, in_channels=in_channels, rngs=rngs)

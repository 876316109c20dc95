"""ResNet-50 for ImageNet (He et al., "Deep Residual Learning for Image
Recognition", CVPR 2016), in the torchvision "v1.5" form: the stride of a
downsampling bottleneck sits on its 3x3 conv rather than its first 1x1 conv.

Layout: conv 7x7x64 stride 2 - BN - ReLU - maxpool 3x3 stride 2, then four
stages of [3, 4, 6, 3] bottleneck blocks (1x1 - 3x3 - 1x1, expansion 4) with
widths 64 / 128 / 256 / 512 (outputs 256 / 512 / 1024 / 2048), then global
average pooling and a dense classifier. The first block of every stage has a
projection shortcut (conv 1x1 with the block's stride, then BN). Convolutions
have no bias; the classifier has one. Padding matches torchvision (explicit
3 / 1 pixels), and the global pool makes any input size >= 32x32 work.

Parameter count for 1000 classes, the torchvision figure:
kernels 25,502,912 + BN scale/bias 53,120 + dense bias 1,000 = 25,557,032.
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

STAGE_SIZES = (3, 4, 6, 3)
STAGE_WIDTHS = (64, 128, 256, 512)
EXPANSION = 4


class Bottleneck(nnx.Module):
  """Bottleneck block: conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1-BN,
  + shortcut, ReLU. The shortcut is a strided conv1x1-BN projection when the
  shape changes, the identity otherwise."""

  def __init__(self, cin: int, width: int, stride: int, *, rngs: nnx.Rngs):
    cout = width * EXPANSION
    self.conv1 = conv(cin, width, 1, 1, rngs)
    self.bn1 = batch_norm(width, rngs)
    self.conv2 = conv(width, width, 3, stride, rngs)
    self.bn2 = batch_norm(width, rngs)
    self.conv3 = conv(width, cout, 1, 1, rngs)
    self.bn3 = batch_norm(cout, rngs)
    if stride != 1 or cin != cout:
      self.proj_conv = conv(cin, cout, 1, stride, rngs)
      self.proj_bn = batch_norm(cout, rngs)
    else:
      self.proj_conv = None
      self.proj_bn = None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    if self.proj_conv is not None:
      x = self.proj_bn(self.proj_conv(x))
    return nnx.relu(y + x)


class ResNet50(nnx.Module):
  """ResNet-50 v1.5 for ImageNet (He et al. 2016; torchvision layout):
  7x7 stem, [3, 4, 6, 3] bottleneck blocks, projection shortcuts;
  25,557,032 parameters for 1000 classes."""

  classifier = "fc"  # the output layer: its channels are the classes

  def __init__(self, *, num_classes: int = 1000, in_channels: int = 3, rngs: nnx.Rngs):
    self.conv = conv(in_channels, 64, 7, 2, rngs)
    self.bn = batch_norm(64, rngs)
    blocks = []
    cin = 64
    for stage, (size, width) in enumerate(zip(STAGE_SIZES, STAGE_WIDTHS)):
      for i in range(size):
        stride = 2 if stage > 0 and i == 0 else 1
        blocks.append(Bottleneck(cin, width, stride, rngs=rngs))
        cin = width * EXPANSION
    self.blocks = nnx.List(blocks)
    self.fc = nnx.Linear(cin, num_classes, kernel_init=dense_init, bias_init=zeros, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.bn(self.conv(x)))
    x = nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for block in self.blocks:
      x = block(x)
    x = jnp.mean(x, axis=(1, 2))
    return self.fc(x)

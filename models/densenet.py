"""DenseNet-40 for CIFAR (Huang et al., "Densely Connected Convolutional
Networks", CVPR 2017), the basic (non-bottleneck, no-compression) variant.

Layout: conv 3x3x16, then three dense blocks of 12 layers each with growth
rate k = 12; each layer is BN-ReLU-conv3x3(k) and its output is concatenated
to its input. Between blocks a transition layer BN-ReLU-conv1x1-avgpool 2x2
keeps the channel count (no compression). The head is BN-ReLU-global average
pool-dense. 1 + 3*12 + 2 + 1 = 40 weighted layers. Convolutions have no bias;
the dense classifier has one. No dropout (the paper uses none with data
augmentation).

Channels: block 1 sees 16, 28, ..., 148 and ends at 160; block 2 sees
160, ..., 292 and ends at 304; block 3 sees 304, ..., 436 and ends at 448.
A dense layer with c input channels holds 2c BN parameters and 3*3*c*12 kernel
entries, 110c in total. Parameter count for 10 classes:

  stem conv       3*3*3*16                                 =       432
  block 1         110 * (16 + 28 + ... + 148)   = 110 * 984  =   108,240
  transition 1    2*160 + 160*160                          =    25,920
  block 2         110 * (160 + ... + 292)       = 110 * 2712 =   298,320
  transition 2    2*304 + 304*304                          =    93,024
  block 3         110 * (304 + ... + 436)       = 110 * 4440 =   488,400
  final BN        2*448                                    =       896
  dense           448*10 + 10                              =     4,490
  total                                                    = 1,019,722

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


class DenseLayer(nnx.Module):
  """BN-ReLU-conv3x3 producing ``growth_rate`` maps, concatenated to input."""

  def __init__(self, cin: int, growth_rate: int, *, rngs: nnx.Rngs):
    self.bn = batch_norm(cin, rngs)
    self.conv = conv(cin, growth_rate, 3, 1, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(nnx.relu(self.bn(x)))
    return jnp.concatenate([x, y], axis=-1)


class Transition(nnx.Module):
  """BN-ReLU-conv1x1-avgpool 2x2 (stride 2)."""

  def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
    self.bn = batch_norm(cin, rngs)
    self.conv = conv(cin, cout, 1, 1, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(nnx.relu(self.bn(x)))
    return nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))


class DenseNetCifar(nnx.Module):
  """Basic CIFAR DenseNet (Huang et al. 2017): three dense blocks of
  ``layers_per_block`` BN-ReLU-conv3x3 layers, transitions without
  compression."""

  classifier = "fc"  # the output layer: its channels are the classes

  def __init__(
    self,
    layers_per_block: int,
    growth_rate: int,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    init_channels: int = 16,
    rngs: nnx.Rngs,
  ):
    self.conv = conv(in_channels, init_channels, 3, 1, rngs)
    layers = []
    c = init_channels
    for block in range(3):
      if block > 0:
        layers.append(Transition(c, c, rngs=rngs))
      for _ in range(layers_per_block):
        layers.append(DenseLayer(c, growth_rate, rngs=rngs))
        c += growth_rate
    self.layers = nnx.List(layers)
    self.bn = batch_norm(c, rngs)
    self.fc = nnx.Linear(c, num_classes, kernel_init=dense_init, bias_init=zeros, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(x)
    for layer in self.layers:
      x = layer(x)
    x = nnx.relu(self.bn(x))
    x = jnp.mean(x, axis=(1, 2))
    return self.fc(x)


class DenseNet40(DenseNetCifar):
  """DenseNet-40 for CIFAR (Huang et al. 2017): k = 12, 3 blocks x 12
  layers, 16-channel stem, no compression; 1,019,722 parameters for 10
  classes."""

  def __init__(self, *, num_classes: int = 10, in_channels: int = 3, rngs: nnx.Rngs):
    super().__init__(
      12,
      12,
      num_classes=num_classes,
      in_channels=in_channels,
      rngs=rngs,
    )

"""LeNet models for MNIST, as used in the Global Sparse Momentum paper.

Both follow the GSM reference code (Ding et al., NeurIPS 2019): every kernel is
initialised with Xavier/Glorot uniform and every bias with zeros. Neither model
has batch norm or dropout, so ``model.train()`` / ``model.eval()`` are no-ops.
"""

from __future__ import annotations

from flax import nnx
import jax

xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()


class LeNet300100(nnx.Module):
  """LeNet-300-100 (LeCun et al. 1998): MLP 784-300-100-10 with ReLU.

  The NHWC input is flattened, so any image with H*W*C == ``in_features``
  works (28x28x1 MNIST by default).

  Parameters with the default sizes: 784*300 + 300*100 + 100*10 = 266,200
  weights plus 300 + 100 + 10 = 410 biases, 266,610 in total.
  """

  def __init__(
    self,
    *,
    num_classes: int = 10,
    in_features: int = 28 * 28 * 1,
    rngs: nnx.Rngs,
  ):
    def dense(din: int, dout: int) -> nnx.Linear:
      return nnx.Linear(din, dout, kernel_init=xavier_uniform, bias_init=zeros, rngs=rngs)

    self.fc1 = dense(in_features, 300)
    self.fc2 = dense(300, 100)
    self.fc3 = dense(100, num_classes)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    x = nnx.relu(self.fc1(x))
    x = nnx.relu(self.fc2(x))
    return self.fc3(x)


class LeNet5(nnx.Module):
  """LeNet-5, Caffe variant (LeCun et al. 1998; Caffe's MNIST example).

  conv 5x5x20 (VALID) - ReLU - maxpool 2x2/2 - conv 5x5x50 (VALID) - ReLU -
  maxpool 2x2/2 - flatten - fc 500 - ReLU - fc ``num_classes``.

  Parameters on 28x28x1 inputs (spatial 28 -> 24 -> 12 -> 8 -> 4, so the
  flattened feature has 4*4*50 = 800 entries):
  weights 5*5*1*20 + 5*5*20*50 + 800*500 + 500*10 = 430,500,
  biases 20 + 50 + 500 + 10 = 580, 431,080 in total.
  """

  def __init__(
    self,
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int = 28,
    rngs: nnx.Rngs,
  ):
    def conv(cin: int, cout: int) -> nnx.Conv:
      return nnx.Conv(
        cin,
        cout,
        kernel_size=(5, 5),
        padding="VALID",
        kernel_init=xavier_uniform,
        bias_init=zeros,
        rngs=rngs,
      )

    def dense(din: int, dout: int) -> nnx.Linear:
      return nnx.Linear(din, dout, kernel_init=xavier_uniform, bias_init=zeros, rngs=rngs)

    # Spatial size after two (VALID 5x5 conv, 2x2 max pool) stages.
    spatial = ((input_size - 4) // 2 - 4) // 2
    self.conv1 = conv(in_channels, 20)
    self.conv2 = conv(20, 50)
    self.fc1 = dense(spatial * spatial * 50, 500)
    self.fc2 = dense(500, num_classes)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.conv1(x))
    x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nnx.relu(self.conv2(x))
    x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nnx.relu(self.fc1(x))
    return self.fc2(x)

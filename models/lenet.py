"""LeNet models for MNIST, as used in the Global Sparse Momentum paper.

Both follow the GSM reference code (Ding et al., NeurIPS 2019): every kernel is
initialised with Xavier/Glorot uniform and every bias with zeros. Neither model
has batch norm or dropout, so ``model.train()`` / ``model.eval()`` are no-ops.
"""

from __future__ import annotations

import functools

from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp

xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()


class LeNet300100(nnx.Module):
  """LeNet-300-100 (LeCun et al. 1998): MLP 784-300-100-10 with ReLU.

  The NHWC input is flattened, so any image with H*W*C == ``in_features``
  works (28x28x1 MNIST by default).

  Parameters with the default sizes: 784*300 + 300*100 + 100*10 = 266,200
  weights plus 300 + 100 + 10 = 410 biases, 266,610 in total. ``widths``
  sets the two hidden layers (a narrow export, models/narrow.py).
  """

  classifier = "fc3"  # the output layer: its channels are the classes

  def __init__(
    self,
    *,
    num_classes: int = 10,
    in_features: int = 28 * 28 * 1,
    widths: tuple[int, int] = (300, 100),
    rngs: nnx.Rngs,
  ):
    def dense(din: int, dout: int) -> nnx.Linear:
      return nnx.Linear(din, dout, kernel_init=xavier_uniform, bias_init=zeros, rngs=rngs)

    self.fc1 = dense(in_features, widths[0])
    self.fc2 = dense(widths[0], widths[1])
    self.fc3 = dense(widths[1], num_classes)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    x = nnx.relu(self.fc1(x))
    x = nnx.relu(self.fc2(x))
    return self.fc3(x)


class LeNet5(nnx.Module):
  """LeNet-5, Caffe variant (LeCun et al. 1998; Caffe's MNIST example).

  conv 5x5x20 (VALID) - ReLU - maxpool 2x2/2 - conv 5x5x50 (VALID) - ReLU -
  maxpool 2x2/2 - flatten - fc 500 - ReLU - fc ``num_classes``.

  The convolutions are ``nnx.Conv`` modules (their parameters, initialisers
  and checkpoints are those of ``nnx.Conv``), applied by ``conv_valid`` and
  pooled by ``max_pool_2x2``: the same outputs and gradients as ``nnx.Conv``
  and ``nnx.max_pool`` up to float32 rounding, with backward passes that are
  faster on XLA:CPU (benchmarks/bench_torch.py). On other backends (GPU, TPU)
  the model calls ``nnx.Conv`` and ``nnx.max_pool`` themselves.

  Parameters on 28x28x1 inputs (spatial 28 -> 24 -> 12 -> 8 -> 4, so the
  flattened feature has 4*4*50 = 800 entries):
  weights 5*5*1*20 + 5*5*20*50 + 800*500 + 500*10 = 430,500,
  biases 20 + 50 + 500 + 10 = 580, 431,080 in total. ``widths`` sets conv1,
  conv2 and fc1 (a narrow export, models/narrow.py).
  """

  classifier = "fc2"  # the output layer: its channels are the classes

  def __init__(
    self,
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int = 28,
    widths: tuple[int, int, int] = (20, 50, 500),
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
    c1, c2, f1 = widths
    self.conv1 = conv(in_channels, c1)
    self.conv2 = conv(c1, c2)
    self.fc1 = dense(spatial * spatial * c2, f1)
    self.fc2 = dense(f1, num_classes)

  def __call__(self, x: jax.Array) -> jax.Array:
    if jax.default_backend() == "cpu":  # the same values, faster gradients on XLA:CPU
      x = max_pool_2x2(nnx.relu(conv_valid(x, self.conv1.kernel[...]) + self.conv1.bias[...]))
      x = max_pool_2x2(nnx.relu(conv_valid(x, self.conv2.kernel[...]) + self.conv2.bias[...]))
    else:  # GPU/TPU: their own convolution and pooling kernels
      x = nnx.max_pool(nnx.relu(self.conv1(x)), window_shape=(2, 2), strides=(2, 2))
      x = nnx.max_pool(nnx.relu(self.conv2(x)), window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nnx.relu(self.fc1(x))
    return self.fc2(x)


# ----------------------------------------------------------------------------
# LeNet-5's convolution and pooling with backward passes fast on XLA:CPU.
# XLA:CPU's own gradients of a 5x5 convolution (kernel and input) and of
# reduce_window's max (select_and_scatter) cost 2-5x the forward pass; these
# compute the same values with matmuls and elementwise selects.


_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """VALID, stride-1 NHWC x HWIO convolution: what ``nnx.Conv`` computes, bias aside."""
  return lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=_NHWC)


@jax.custom_vjp
def conv_valid(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``_conv(x, kernel)``; its gradients are matmuls (see ``_conv_bwd``)."""
  return _conv(x, kernel)


def _conv_fwd(x: jax.Array, kernel: jax.Array):
  return _conv(x, kernel), (x, kernel)


def _conv_bwd(residuals, g: jax.Array):
  x, kernel = residuals
  return _conv_input_grad(kernel, g), _conv_kernel_grad(x, g, kernel.shape)


conv_valid.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.jit, static_argnums=2)  # one compiled call when run eagerly
def _conv_kernel_grad(x: jax.Array, g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """dL/dkernel[i, j] = sum over (n, h, w) of x[n, h + i, w + j, :]^T g[n, h, w, :].

  One input channel: the kh * kw shifted images stacked, one matmul with g.
  More: one matmul per offset (i, j) on channel-major copies of x and g.
  """
  kh, kw, cin, cout = shape
  n, oh, ow, _ = g.shape
  offsets = [(i, j) for i in range(kh) for j in range(kw)]
  if cin == 1:
    images = x[..., 0]
    patches = jnp.stack([images[:, i : i + oh, j : j + ow] for i, j in offsets])
    return (patches.reshape(kh * kw, -1) @ g.reshape(-1, cout)).reshape(shape)
  xt = x.transpose(3, 0, 1, 2)
  gt = g.transpose(3, 0, 1, 2).reshape(cout, -1)
  rows = [xt[:, :, i : i + oh, j : j + ow].reshape(cin, -1) @ gt.T for i, j in offsets]
  return jnp.stack(rows).reshape(shape)


@jax.jit
def _conv_input_grad(kernel: jax.Array, g: jax.Array) -> jax.Array:
  """dL/dx: g[n, h, w, :] @ kernel[i, j]^T added at x[n, h + i, w + j, :], for every (i, j).

  A loop over the offsets, not unrolled: as fast, and it compiles 5x faster.
  """
  kh, kw, cin, _ = kernel.shape
  n, oh, ow, _ = g.shape

  def add_offset(t: jax.Array, dx: jax.Array) -> jax.Array:
    corner = (0, t // kw, t % kw, 0)
    tap = lax.dynamic_index_in_dim(kernel.reshape(kh * kw, cin, -1), t, keepdims=False)
    window = lax.dynamic_slice(dx, corner, (n, oh, ow, cin))
    return lax.dynamic_update_slice(dx, window + g @ tap.T, corner)

  dx = jnp.zeros((n, oh + kh - 1, ow + kw - 1, cin), g.dtype)
  return lax.fori_loop(0, kh * kw, add_offset, dx)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """``nnx.max_pool(x, (2, 2), strides=(2, 2))`` (VALID, NHWC) as a reshape and a max.

  The gradient goes to the first maximum of each window in row-major order,
  as reduce_window's gradient (select_and_scatter) routes ties.
  """
  return _windows(x).max(axis=(2, 4))


def _windows(x: jax.Array) -> jax.Array:
  """(n, h, w, c) -> (n, h // 2, 2, w // 2, 2, c); an odd last row or column is dropped."""
  n, h, w, c = _even(x.shape)
  return x[:, :h, :w].reshape(n, h // 2, 2, w // 2, 2, c)


def _max_pool_fwd(x: jax.Array):
  y = max_pool_2x2(x)
  return y, (x, y)


@jax.jit
def _max_pool_bwd(residuals, g: jax.Array):
  x, y = residuals
  is_max = _windows(x) == y[:, :, None, :, None, :]
  taken = jnp.zeros_like(y, bool)
  rows = []
  for a in range(2):  # window positions in row-major order: the first maximum wins
    row = []
    for b in range(2):
      row.append(is_max[:, :, a, :, b] & ~taken)
      taken = taken | is_max[:, :, a, :, b]
    rows.append(jnp.stack(row, 3))
  first = jnp.stack(rows, 2)  # (n, h // 2, 2, w // 2, 2, c)
  dx = jnp.where(first, g[:, :, None, :, None, :], 0).reshape(_even(x.shape))
  n, h, w, c = x.shape
  return (jnp.pad(dx, ((0, 0), (0, h - dx.shape[1]), (0, w - dx.shape[2]), (0, 0))),)


def _even(shape: tuple[int, ...]) -> tuple[int, ...]:
  n, h, w, c = shape
  return (n, h // 2 * 2, w // 2 * 2, c)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)

"""Layers shared by the CIFAR/ImageNet models: He-init convs, PyTorch-style dense, BN."""

from __future__ import annotations

from flax import nnx

# He et al. (2015) normal init with fan_out, as torchvision and the Torch DenseNet.
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default nn.Linear weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros = nnx.initializers.zeros_init()

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def conv(cin: int, cout: int, kernel: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
  """Square conv without bias, padded by ``kernel // 2`` on each side (torchvision)."""
  pad = kernel // 2
  return nnx.Conv(
    cin,
    cout,
    kernel_size=(kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    kernel_init=conv_init,
    rngs=rngs,
  )


def batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """BN in training mode; ``model.eval()`` switches it to running averages."""
  return nnx.BatchNorm(
    features,
    use_running_average=False,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPSILON,
    rngs=rngs,
  )

"""Times the GSM train step in JAX (ours) against the reference PyTorch way, same CPU.

For LeNet-5 (Caffe; C = 125) and LeNet-300-100 (C = 60) at batch 256 (28x28x1), and
ResNet-56 (C = 10, option-A shortcuts, batch norm in training mode) at batch 128 (32x32x3):

  * ours: the training program's jitted train step (``training.steps``
    ``make_train_step``) with ``gsm_optax.gsm``;
  * PyTorch: the same architecture as a torch module (NCHW), cross-entropy,
    backward, then the reference code's GSM step: |g * w| over the concatenated
    pooled kernels, ``torch.topk`` for the Q = floor(N / C) greatest, the other
    gradients zeroed, weight decay added to every pooled weight,
    ``torch.optim.SGD`` with momentum.

Steps are timed as training runs them: ``bench_update.CHAIN`` steps back to
back, one block at the end (torch is synchronous on CPU), medians of many
samples, JAX and torch interleaved round-robin, torch on as many threads as
there are cores. Writes JSON and a Markdown table (default: benchmarks/results/).

  pip install -e ".[bench]"  # or: bash scripts/setup_env.sh bench
  python benchmarks/bench_torch.py
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Any
from typing import NamedTuple

# Repository code (models/, training/) is not installed with gsm_optax: run from the checkout.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

try:
  import torch  # noqa: E402
  from torch import nn  # noqa: E402
  import torch.nn.functional as F  # noqa: E402
except ImportError:
  sys.exit(
    'bench_torch.py needs PyTorch: pip install -e ".[bench]" (or bash scripts/setup_env.sh bench)'
  )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import machine  # noqa: E402
from benchmarks.bench_update import CHAIN  # noqa: E402
from benchmarks.bench_update import time_interleaved  # noqa: E402
from benchmarks.bench_update import write_results  # noqa: E402
import gsm_optax  # noqa: E402
from training import steps as steps_lib  # noqa: E402
from training import strict_json  # noqa: E402

LEARNING_RATE, MOMENTUM, WEIGHT_DECAY = 1e-3, 0.98, 5e-4


class Setting(NamedTuple):
  """One timed model: C, batch size and the NHWC input shape."""

  compression: float
  batch: int
  shape: tuple[int, int, int]


MODELS = {
  "lenet5": Setting(125.0, 256, (28, 28, 1)),
  "lenet_300_100": Setting(60.0, 256, (28, 28, 1)),
  "resnet56": Setting(10.0, 128, (32, 32, 3)),
}


# ----------------------------------------------------------------- PyTorch
class TorchLeNet5(nn.Module):
  """LeNet-5 (Caffe) in NCHW: conv 5x5x20, pool, conv 5x5x50, pool, fc 500, fc 10."""

  def __init__(self):
    super().__init__()
    self.conv1, self.conv2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5)
    self.fc1, self.fc2 = nn.Linear(800, 500), nn.Linear(500, 10)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.max_pool2d(F.relu(self.conv1(x)), 2)
    x = F.max_pool2d(F.relu(self.conv2(x)), 2)
    return self.fc2(F.relu(self.fc1(x.flatten(1))))


class TorchLeNet300100(nn.Module):
  """LeNet-300-100: MLP 784-300-100-10 with ReLU."""

  def __init__(self):
    super().__init__()
    self.fc1, self.fc2, self.fc3 = nn.Linear(784, 300), nn.Linear(300, 100), nn.Linear(100, 10)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


class TorchBasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN + option-A shortcut (subsample, zero-pad channels), ReLU."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.stride, self.pad = stride, cout - cin
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    shortcut = x[:, :, :: self.stride, :: self.stride]
    if self.pad:
      shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
    return F.relu(y + shortcut)


class TorchResNet56(nn.Module):
  """ResNet-56 for CIFAR (He et al. 2016), as models/resnet_cifar.py: 853,018 parameters."""

  def __init__(self):
    super().__init__()
    self.conv, self.bn = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
    blocks, cin = [], 16
    for stage, cout in enumerate((16, 32, 64)):
      for i in range(9):
        blocks.append(TorchBasicBlock(cin, cout, 2 if stage and not i else 1))
        cin = cout
    self.blocks, self.fc = nn.Sequential(*blocks), nn.Linear(64, 10)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.blocks(F.relu(self.bn(self.conv(x))))
    return self.fc(x.mean(dim=(2, 3)))


TORCH_MODELS = {"lenet5": TorchLeNet5, "lenet_300_100": TorchLeNet300100, "resnet56": TorchResNet56}


def torch_gsm_step(model, optimizer, pool, keep: int, images, labels) -> torch.Tensor:
  """One step of the reference code's GSM: top-k mask on |g * w|, decay on the pool, SGD."""
  optimizer.zero_grad(set_to_none=False)
  loss = F.cross_entropy(model(images), labels)
  loss.backward()
  with torch.no_grad():
    scores = torch.cat([(w.grad * w).abs().flatten() for w in pool])
    threshold = torch.topk(scores, keep).values[-1]
    for w in pool:
      w.grad.mul_((w.grad * w).abs() >= threshold).add_(w, alpha=WEIGHT_DECAY)
  optimizer.step()
  return loss


def torch_step(name: str, compression: float, batches, device: str = "cpu"):
  """(step(state, i), pool size, Q) for the PyTorch way, on the torch `device`.

  On a GPU the last step of each chain synchronizes (CUDA launches are
  asynchronous), as ``jax.block_until_ready`` does for JAX.
  """
  torch.manual_seed(0)
  model = TORCH_MODELS[name]().to(device)
  optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
  pool = [w for w in model.parameters() if w.ndim in (2, 4)]  # the reference code's pool
  size = sum(w.numel() for w in pool)
  keep = int(size / compression)
  tensors = [
    (torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device), torch.from_numpy(y).to(device))
    for x, y in batches
  ]

  def step(state, i):
    loss = torch_gsm_step(model, optimizer, pool, keep, *tensors[i % len(tensors)]).detach()
    if device != "cpu" and i % CHAIN == CHAIN - 1:
      torch.cuda.synchronize()
    return loss

  return step, size, keep


# --------------------------------------------------------------------- JAX
def jax_step(name: str, compression: float, batches):
  """(step(state, i), initial state) for the training program's jitted GSM train step."""
  graphdef, _, params, batch_stats = steps_lib.init_model(name, 10, 0)
  tx = gsm_optax.gsm(LEARNING_RATE, compression, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
  state = steps_lib.new_train_state(params, batch_stats, 0)._replace(opt_state=tx.init(params))
  train_step = steps_lib.make_train_step(graphdef, tx)
  arrays = [(jnp.asarray(x), jnp.asarray(y)) for x, y in batches]

  def step(state, i):
    return train_step(state, arrays[i % len(arrays)])[0]

  return step, state


def bench_model(name: str, repeats: int, torch_device: str = "cpu") -> dict[str, Any]:
  compression, batch, shape = MODELS[name]
  rng = np.random.default_rng(0)
  batches = [
    (
      rng.standard_normal((batch, *shape)).astype(np.float32),
      rng.integers(0, 10, batch).astype(np.int64),
    )
    for _ in range(4)
  ]
  ours, state = jax_step(name, compression, batches)
  theirs, pool_size, keep = torch_step(name, compression, batches, torch_device)
  times, _ = time_interleaved(
    {"jax": ours, "torch": theirs},
    {"jax": state, "torch": None},
    {"jax": repeats, "torch": repeats},
    CHAIN,
  )
  return dict(
    model=name,
    batch=batch,
    compression=compression,
    pool_size=pool_size,
    keep=keep,
    jax_ms=times["jax"],
    torch_ms=times["torch"],
    ratio=times["jax"] / times["torch"],
  )


def markdown(results: dict[str, Any]) -> str:
  lines = [
    f"GSM train step: {CHAIN} steps back to back, one block at the end;"
    f" median of {results['repeats']} samples, JAX and PyTorch interleaved round-robin.",
    "",
    "| model | batch | C | pooled weights | Q | JAX ms | PyTorch ms | **JAX / PyTorch** |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in results["models"]:
    lines.append(
      f"| {r['model']} | {r['batch']} | {r['compression']:g} | {r['pool_size']:,} | {r['keep']:,} | "
      f"{r['jax_ms']:.1f} | {r['torch_ms']:.1f} | **{r['ratio']:.2f}x** |"
    )
  lines += [
    "",
    f"{results['machine']}; torch threads {results['torch_threads']}; jax {results['jax']},"
    f" torch {results['torch']}. Command: `{results['command']}`.",
  ]
  return "\n".join(lines)


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
  except OSError:
    names = []
  return names[0] if names else platform.processor() or "unknown CPU"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=15, help="timed samples per model and side")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  parser.add_argument(
    "--torch_device", default="cpu", help="cpu, or cuda on a GPU machine (JAX uses its default)"
  )
  parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, of MODELS")
  args = parser.parse_args()
  load = machine.LoadWatch()
  torch.set_num_threads(os.cpu_count())
  results: dict[str, Any] = dict(
    machine=f"{platform.machine()}, {cpu_model()}, {os.cpu_count()} CPU cores,"
    f" jax backend {jax.devices()[0].platform} ({jax.devices()[0].device_kind}),"
    f" torch device {args.torch_device}",
    torch_threads=torch.get_num_threads(),
    jax=jax.__version__,
    torch=torch.__version__,
    repeats=args.repeats,
    command="python benchmarks/bench_torch.py"
    + (f" --repeats {args.repeats}" if args.repeats != 15 else "")
    + (f" --torch_device {args.torch_device}" if args.torch_device != "cpu" else "")
    + (f" --models {args.models}" if args.models != ",".join(MODELS) else ""),
    models=[],
  )
  for name in args.models.split(","):
    results["models"].append(bench_model(name, args.repeats, args.torch_device))
    print(strict_json.dumps(results["models"][-1]), flush=True)
  write_results(args.out, "bench_torch", results, markdown(results), load)


if __name__ == "__main__":
  main()

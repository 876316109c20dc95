"""Devices and hosts: the mesh, the shardings, global batches, ``jax.distributed``.

The program is one SPMD program (``jax.jit`` over a ``Mesh``): a mesh of every
device with the axes ``("data", "fsdp")``. A global batch is split along its
first axis over all devices; the train state (params, batch statistics, the
whole optimizer state) is replicated over ``data`` and, when
``config.mesh.fsdp > 1``, each array is split along its largest axis that the
``fsdp`` size divides (arrays with no such axis, and scalars, are replicated).
GSM's mask then comes from the gradient averaged over the whole global batch,
the same on every device by construction. Many hosts: ``jax.distributed``
connects the processes, each reads only its own part of every global batch,
and ``jax.make_array_from_process_local_data`` assembles the global arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import os
from typing import Any

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from training.config import ConfigError

AXES = ("data", "fsdp")
BATCH_SPEC = P(AXES)

# Environment variables that say this process is one of several (set by SLURM,
# Cloud TPU pods, or by hand for jax.distributed's defaults).
_CLUSTER_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_STEP_NUM_TASKS")


def cluster_detected() -> bool:
  """Whether the environment describes a multi-process job (SLURM, a TPU pod, or JAX's own)."""
  for name in _CLUSTER_VARIABLES:
    value = os.environ.get(name, "")
    if name == "SLURM_STEP_NUM_TASKS":
      if value.isdigit() and int(value) > 1:
        return True
    elif name == "TPU_WORKER_HOSTNAMES":
      if "," in value:
        return True
    elif value:
      return True
  return False


def initialize(
  mode: str,
  *,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> bool:
  """Calls ``jax.distributed.initialize`` for a multi-process run; returns whether it did.

  ``mode`` is "auto" (when arguments are given or ``cluster_detected()``),
  "on" or "off". On CPU the cross-process collectives use gloo.
  """
  if mode not in ("auto", "on", "off"):
    raise ConfigError(f"--distributed must be auto, on or off, got {mode!r}")
  given = any(x is not None for x in (coordinator_address, num_processes, process_id))
  if mode == "off" or (mode == "auto" and not given and not cluster_detected()):
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  return True


@dataclasses.dataclass(frozen=True)
class Topology:
  """The run's mesh and where this process sits in it."""

  mesh: Mesh
  process_index: int
  process_count: int

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  @property
  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, BATCH_SPEC)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def is_main(self) -> bool:
    """Process 0 writes the logs, metrics, plots and the summary."""
    return self.process_index == 0

  def describe(self) -> dict[str, Any]:
    """What summary.json records about the devices."""
    device = self.mesh.devices.flat[0]
    return {
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "num_devices": self.num_devices,
      "num_processes": self.process_count,
      "mesh_shape": dict(self.mesh.shape),
    }


def make_topology(config: Any) -> Topology:
  """The mesh of every device, ``config.mesh.fsdp`` along ``fsdp``; checks the batch sizes.

  Raises:
    ConfigError: fsdp does not divide the device count, or the global batch
      size does not divide over the devices.
  """
  devices = jax.devices()
  count = len(devices)
  fsdp = config.mesh.fsdp
  if fsdp > count or count % fsdp:
    raise ConfigError(
      f"config.mesh.fsdp={fsdp} must divide the {count} devices of this run "
      f"({jax.default_backend()})"
    )
  if config.batch_size % count:
    raise ConfigError(
      f"config.batch_size={config.batch_size} does not divide over the {count} devices of "
      f"this run: use a multiple of {count} (the batch size is global)"
    )
  mesh = jax.make_mesh(
    (count // fsdp, fsdp),
    AXES,
    devices=devices,
    axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),  # shardings by annotation
  )
  return Topology(mesh, jax.process_index(), jax.process_count())


MIN_SHARDED_SIZE = 1024  # smaller arrays (biases, scalars, keys) stay replicated


def _leaf_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """Split the largest axis that ``fsdp`` divides; replicate when none does."""
  if fsdp == 1 or not shape or int(np.prod(shape)) < MIN_SHARDED_SIZE:
    return P()
  axes = sorted(range(len(shape)), key=lambda a: -shape[a])
  for axis in axes:
    if shape[axis] % fsdp == 0 and shape[axis] >= fsdp:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(tree: Any, mesh: Mesh) -> Any:
  """The sharding of every array of a train state (works on abstract arrays too)."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, _leaf_spec(tuple(np.shape(x)), fsdp)), tree)


def place(tree: Any, mesh: Mesh) -> Any:
  """``tree``'s arrays on the mesh with ``state_shardings``.

  Arrays already spread over several processes are resharded on the devices;
  local values (every process holds the same) are split from the host copy.
  """

  def put(x, sharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree, state_shardings(tree, mesh))


def constrain(tree: Any, mesh: Mesh | None) -> Any:
  """Inside ``jax.jit``: pins the state's arrays to ``state_shardings``."""
  if mesh is None:
    return tree
  return jax.lax.with_sharding_constraint(tree, state_shardings(tree, mesh))


def global_batch(local: Mapping[str, np.ndarray] | tuple, topology: Topology) -> Any:
  """The global arrays whose rows on this process are ``local`` (this process's part)."""
  sharding = topology.batch_sharding
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)

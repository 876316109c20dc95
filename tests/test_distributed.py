"""train.py on many devices and many processes, for real: forced CPU devices, gloo collectives.

Every run is a subprocess (the device count is fixed when JAX starts) training
LeNet-300-100 on the synthetic IDX data of ``test_train.py``. Runs on different
meshes are equal to float rounding, not bit for bit: splitting the batch over
devices changes the order in which the per-example gradients are summed, so the
losses and the weights differ in their last bits (measured: losses by 2e-6
relative, weights by 3e-7); the mask, and so the weights kept per layer, is exact.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from test_train import DENSE_EPOCHS  # noqa: E402
from test_train import GSM_EPOCHS  # noqa: E402
from test_train import KEEP  # noqa: E402
from test_train import ROOT  # noqa: E402
from test_train import data_dir  # noqa: E402, F401  (the fixture)
from test_train import tiny_command  # noqa: E402

from training import checkpoints  # noqa: E402

LOSS_RTOL = 1e-4  # relative, per epoch's train and test loss
PARAM_ATOL = 1e-5  # the weights are at most ~0.6


def _command(data_dir, workdir, *extra):
  return tiny_command(data_dir, workdir, "--config.plots=False", *extra)


def _env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _train(data_dir, workdir, devices, *extra):
  result = subprocess.run(
    _command(data_dir, workdir, *extra),
    cwd=ROOT,
    env=_env(devices),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f), result.stdout


def _read(workdir):
  """(summary.json, the rows of metrics.jsonl) of a finished run."""
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return summary, [json.loads(line) for line in f]


def _load_here(path):
  """A model saved on any mesh, as NumPy arrays in this process (its own arrays'
  shapes and dtypes as the target: orbax refuses another topology without one)."""
  tree = checkpoints.model_metadata(path)
  return checkpoints.load_model(path, jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree))


def _assert_close(workdir, reference_dir):
  """What the summation order can change (the losses, the weights) within float
  tolerances; the schedule, the mask and the weights kept per layer exactly."""
  (summary, rows), (reference, reference_rows) = _read(workdir), _read(reference_dir)
  assert summary["nonzeros"] == reference["nonzeros"] == summary["keep"] == KEEP
  assert summary["layers"] == reference["layers"]
  assert len(rows) == len(reference_rows) == DENSE_EPOCHS + GSM_EPOCHS
  for row, ref in zip(rows, reference_rows):
    keys = ("phase", "epoch", "step", "learning_rate")
    assert [row[k] for k in keys] == [ref[k] for k in keys]
    for key in ("train_loss", "test_loss"):
      assert row[key] == pytest.approx(ref[key], rel=LOSS_RTOL), (row["epoch"], key)
  expected = _load_here(os.path.join(reference_dir, "final_model"))
  model = _load_here(os.path.join(workdir, "final_model"))
  for (path, want), got in zip(
    jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(model)
  ):
    want, got = np.asarray(want), np.asarray(got)
    name = jax.tree_util.keystr(path)
    np.testing.assert_array_equal(got != 0, want != 0, err_msg=f"the mask of {name}")
    np.testing.assert_allclose(got, want, rtol=0, atol=PARAM_ATOL, err_msg=name)


@pytest.fixture(scope="module")
def one_device(data_dir, tmp_path_factory):
  """The 1-device run: (its summary, its workdir)."""
  workdir = tmp_path_factory.mktemp("one") / "w"
  return _train(data_dir, workdir, 1)[0], workdir


@pytest.mark.parametrize(
  "fsdp",
  [pytest.param(1, marks=pytest.mark.slow), 4],  # each 15 s: fsdp 4 is the harder case
)
def test_eight_devices_give_the_one_device_result(one_device, data_dir, tmp_path, fsdp):
  summary, stdout = _train(data_dir, tmp_path / "w", 8, f"--config.mesh.fsdp={fsdp}")
  assert stdout.splitlines()[0] == (
    f"devices: 8 cpu (cpu) in 1 process(es), mesh {{'data': {8 // fsdp}, 'fsdp': {fsdp}}}"
  )
  assert summary["devices"] == {
    "backend": "cpu",
    "device_kind": "cpu",
    "num_devices": 8,
    "num_processes": 1,
    "mesh_shape": {"data": 8 // fsdp, "fsdp": fsdp},
  }
  assert one_device[0]["devices"]["num_devices"] == 1
  _assert_close(tmp_path / "w", one_device[1])


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(data_dir, workdir):
  """train.py as 2 processes x 4 CPU devices on localhost (gloo); their stdouts."""
  port = _free_port()
  processes = [
    subprocess.Popen(
      _command(
        data_dir,
        workdir,
        "--distributed=on",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ),
      cwd=ROOT,
      env=_env(4),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600) for p in processes]
  for p, (_, stderr) in zip(processes, outputs):
    assert p.returncode == 0, stderr[-3000:]
  return [stdout for stdout, _ in outputs]


_GLOO_MESSAGE = (
  "[Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1"
)


def _gloo_piece(token: str) -> bool:
  """Whether `token` is a piece of gloo's message, or two pieces run together."""
  return any(token[:i] in _GLOO_MESSAGE and token[i:] in _GLOO_MESSAGE for i in range(len(token)))


@pytest.mark.slow
def test_two_processes_of_four_devices_give_the_eight_device_result(data_dir, tmp_path):
  _train(data_dir, tmp_path / "eight", 8)
  workdir = tmp_path / "two_hosts"
  stdouts = _two_processes(data_dir, workdir)
  # Only process 0 logs. Gloo prints its connections from parallel threads, and
  # their lines can be split mid-word, so what is left must be pieces of that message.
  text = re.sub(r"\d+", "1", stdouts[1].replace("[Gloo]", " "))  # rank and peer counts vary
  ours = [t for t in text.split() if not _gloo_piece(t)]
  assert ours == []
  with open(workdir / "summary.json") as f:
    summary = json.load(f)
  assert summary["devices"]["num_processes"] == 2 and summary["devices"]["num_devices"] == 8
  _assert_close(workdir, tmp_path / "eight")  # one writer: one row per epoch
  # Both processes restore the multi-process checkpoint and reproduce the result.
  stdouts = _two_processes(data_dir, workdir)
  assert "resumed from the checkpoint of step" in stdouts[0]
  with open(workdir / "summary.json") as f:
    again = json.load(f)
  for key in ("accuracy_before_prune", "accuracy_final", "layers"):
    assert again[key] == summary[key], key


def _steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _run_until(data_dir, workdir, devices, step, *extra):
  """Starts train.py, waits for a checkpoint past ``step``, sends SIGTERM (exit 143)."""
  process = subprocess.Popen(
    _command(data_dir, workdir, "--config.checkpoint_every_steps=1", *extra),
    cwd=ROOT,
    env=_env(devices),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.monotonic() + 300
  while not (_steps(workdir) and _steps(workdir)[-1] > step):
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.monotonic() < deadline
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode == 143, stderr[-3000:]
  return stdout


@pytest.mark.slow
def test_a_checkpoint_restores_onto_other_meshes_and_training_goes_on(
  one_device, data_dir, tmp_path
):
  """8 devices (fsdp 2) -> 1 device -> 4 devices (fsdp 4): each restore is
  verified bit for bit by the checkpoint's layout-independent hashes."""
  workdir = tmp_path / "meshes"
  _run_until(data_dir, workdir, 8, 5, "--config.mesh.fsdp=2")
  stdout = _run_until(data_dir, workdir, 1, 20)
  assert "resumed from the checkpoint of step" in stdout and "damaged" not in stdout
  summary, stdout = _train(
    data_dir, workdir, 4, "--config.checkpoint_every_steps=1", "--config.mesh.fsdp=4"
  )
  assert "resumed from the checkpoint of step" in stdout and "damaged" not in stdout
  assert summary["devices"]["mesh_shape"] == {"data": 1, "fsdp": 4}
  _assert_close(workdir, one_device[1])


_MESH_CHECK = r"""
import json
import numpy as np, jax
import gsm_optax
from configs import default
from training import config as config_lib, distributed, stages, steps

def error(fsdp, batch):
  config = default.get_config()
  config.mesh.fsdp, config.batch_size = fsdp, batch
  try:
    distributed.make_topology(config)
  except config_lib.ConfigError as err:
    return str(err)

errors = [error(16, 64), error(3, 64), error(1, 60)]
config = default.get_config()
config.batch_size = 64
topology = distributed.make_topology(config)
train_graphdef, _, params, batch_stats = steps.init_model("lenet_300_100", 10, 0)
phase = steps.make_phase(
  "gsm", stages.gsm_optimizer, config.gsm, 10, train_graphdef, 10.0, mesh=topology.mesh)
state = steps.new_train_state(params, batch_stats, 0)
state = distributed.place(state._replace(opt_state=phase.tx.init(state.params)), topology.mesh)
rng = np.random.default_rng(0)
for _ in range(3):
  images = rng.standard_normal((64, 28, 28, 1)).astype(np.float32)
  labels = rng.integers(0, 10, 64).astype(np.int32)
  state, _ = phase.train_step(state, distributed.global_batch((images, labels), topology))
replicas_equal = all(
  all(np.asarray(s.data).tobytes() == np.asarray(leaf.addressable_shards[0].data).tobytes()
      for s in leaf.addressable_shards)
  for leaf in jax.tree.leaves(state))
copies = min(len(leaf.addressable_shards) for leaf in jax.tree.leaves(state))
stats = gsm_optax.gsm_stats(state.opt_state)
print(json.dumps(dict(errors=errors, replicas_equal=replicas_equal, copies=copies,
                      active=int(stats["num_active"]), keep=int(stats["keep"]))))
"""


def test_gsm_state_is_identical_on_every_device_and_bad_meshes_are_refused():
  """The batch is split over 8 devices; the mask comes from the all-reduced
  gradient, so after GSM steps every device holds bitwise the same params,
  momentum and GSM state (a different mask anywhere would make them differ)."""
  result = subprocess.run(
    [sys.executable, "-c", _MESH_CHECK],
    cwd=ROOT,
    env=_env(8),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["replicas_equal"] and report["copies"] == 8
  assert report["active"] >= report["keep"] == int(266200 / 10.0)
  assert report["errors"] == [
    "config.mesh.fsdp=16 must divide the 8 devices of this run (cpu)",
    "config.mesh.fsdp=3 must divide the 8 devices of this run (cpu)",
    "config.batch_size=60 does not divide over the 8 devices of this run: use a multiple of "
    "8 (the batch size is global)",
  ]


@pytest.mark.parametrize(
  "env, expected",
  [
    ({}, False),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ({"SLURM_STEP_NUM_TASKS": "1"}, False),
    ({"SLURM_STEP_NUM_TASKS": "4"}, True),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),
    ({"TPU_WORKER_HOSTNAMES": "w-0,w-1"}, True),
  ],
)
def test_auto_distributed_follows_the_environment(monkeypatch, env, expected):
  from training import distributed

  for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_STEP_NUM_TASKS", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert distributed.cluster_detected() is expected
  if not expected:
    assert distributed.initialize("auto") is False  # a single-process run: nothing to do

"""Shared fixtures for the gsm_optax tests.

XLA on CPU compiles every new shape (jit) or every new primitive shape (no-jit)
anew, which costs far more than running these small problems. The tests
therefore share a few parameter pytrees of fixed shapes (`make_params`) so that
compiled primitives are reused across tests and modules.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import pytest

# Shapes of the shared multi-leaf problem: conv-shaped 4D kernel, two dense
# kernels and their biases, nested dicts. Pool (default) = the three kernels.
PARAM_SHAPES = {
  "conv": {"kernel": (3, 3, 2, 4), "bias": (4,)},
  "mlp": {
    "dense1": {"kernel": (8, 6), "bias": (6,)},
    "dense2": {"kernel": (6, 3), "bias": (3,)},
  },
}
POOL_SIZE = 3 * 3 * 2 * 4 + 8 * 6 + 6 * 3  # 138: the tests write 138 out


def _map_shapes(fn, shapes):
  if isinstance(shapes, dict):
    return {k: _map_shapes(fn, v) for k, v in shapes.items()}
  return fn(shapes)


def make_params(rng: np.random.Generator, dtype=np.float32, scale: float = 1.0):
  """A fresh random pytree with the shapes of `PARAM_SHAPES` (NumPy arrays)."""
  return _map_shapes(lambda s: (scale * rng.standard_normal(s)).astype(dtype), PARAM_SHAPES)


@pytest.fixture
def rng() -> np.random.Generator:
  return np.random.default_rng(20191209)


@pytest.fixture(params=[False, True], ids=["nojit", "jit"])
def use_jit(request) -> bool:
  return request.param


@pytest.fixture
def params_factory():
  """`make_params(rng, dtype=np.float32, scale=1.0)`: the shared problem's params."""
  return make_params


# ----------------------------------------------------------------------------
# Multi-device checks: tests/multidevice_check.py in a subprocess with 8
# simulated CPU devices (the device count is fixed when JAX starts). When tests
# that use its report are selected it starts at collection time and runs
# alongside the other tests (they are moved to the end of the session);
# `multidevice_report` waits for its JSON report.
# ----------------------------------------------------------------------------

_MULTIDEVICE_SCRIPT = pathlib.Path(__file__).resolve().parent / "multidevice_check.py"
_MULTIDEVICE_TIMEOUT_S = 300
_MULTIDEVICE_KEY = pytest.StashKey[subprocess.Popen]()


def _start_multidevice_check() -> subprocess.Popen:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  repo = str(_MULTIDEVICE_SCRIPT.parent.parent)
  env["PYTHONPATH"] = os.pathsep.join([repo] + [p for p in [env.get("PYTHONPATH")] if p])
  # Files, not pipes: nobody reads the output until the tests need it, and a
  # full pipe would stall the script.
  stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
  process = subprocess.Popen(
    [sys.executable, str(_MULTIDEVICE_SCRIPT)], env=env, stdout=stdout, stderr=stderr
  )
  process.output_files = (stdout, stderr)
  return process


def _read_output(process: subprocess.Popen) -> tuple[str, str]:
  """(stdout, stderr) of the finished script."""
  outputs = []
  for stream in process.output_files:
    stream.seek(0)
    outputs.append(stream.read())
  return outputs[0], outputs[1]


def _is_multidevice(item) -> bool:
  """A test that reads the report (test_multidevice.py, test_selection_backends.py)."""
  return "multidevice_report" in getattr(item, "fixturenames", ())


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(session, config, items):
  del session
  if not any(_is_multidevice(item) for item in items):
    return
  # Run the multi-device tests last, so that the subprocess has the whole
  # session to finish, and start it now.
  items.sort(key=_is_multidevice)  # stable: other tests keep their order
  if os.environ.get("PYTEST_XDIST_WORKER") is None:
    # (Under xdist the worker that runs them starts it when first needed.)
    config.stash[_MULTIDEVICE_KEY] = _start_multidevice_check()


def pytest_unconfigure(config):
  process = config.stash.get(_MULTIDEVICE_KEY, None)
  if process is not None and process.poll() is None:
    process.kill()
    process.wait()


@pytest.fixture(scope="session")
def multidevice_report(pytestconfig) -> dict:
  """The JSON report of tests/multidevice_check.py (see its docstring)."""
  process = pytestconfig.stash.get(_MULTIDEVICE_KEY, None)
  if process is None:
    process = _start_multidevice_check()
    pytestconfig.stash[_MULTIDEVICE_KEY] = process
  try:
    process.wait(timeout=_MULTIDEVICE_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()
    pytest.fail(f"multidevice_check.py timed out:\n{_read_output(process)[1][-4000:]}")
  stdout, stderr = _read_output(process)
  assert process.returncode == 0, (
    f"multidevice_check.py failed ({process.returncode}):\n{stderr[-4000:]}"
  )
  return json.loads(stdout.strip().splitlines()[-1])

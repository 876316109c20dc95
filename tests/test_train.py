"""Tests of the training program: outputs, exact resume, config checks, the CLI.

Everything trains LeNet-300-100 for a few 8-step epochs on a small synthetic,
learnable dataset written as IDX files, so the whole file runs in well under
90 s on 2 CPU cores.
"""

import glob
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import default as default_config  # noqa: E402
from training import checkpoints  # noqa: E402
from training import data  # noqa: E402
from training import stages  # noqa: E402
from training import train_lib  # noqa: E402

NUM_TRAIN, NUM_TEST, BATCH = 512, 200, 64
STEPS_PER_EPOCH = NUM_TRAIN // BATCH
DENSE_EPOCHS, GSM_EPOCHS, COMPRESSION = 2, 3, 10.0
POOL_SIZE = 784 * 300 + 300 * 100 + 100 * 10  # LeNet-300-100 kernels
KEEP = int(POOL_SIZE / COMPRESSION)


# --------------------------------------------------------------------------- #
# Fixtures
# --------------------------------------------------------------------------- #


def _write_idx(path, array):
  """Uncompressed IDX file of uint8 data: magic 0x0800 | ndim, big-endian dims."""
  array = np.ascontiguousarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim])
  header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  with open(path, "wb") as f:
    f.write(header + array.tobytes())


def _synthetic_split(rng, templates, n):
  labels = rng.integers(0, len(templates), n)
  noise = rng.integers(0, 256, (n, 28, 28))
  images = np.clip(templates[labels] * 0.25 + noise * 0.75, 0, 255)
  return images.astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Fashion-MNIST-shaped IDX files: each class is a fixed random pattern plus noise."""
  directory = tmp_path_factory.mktemp("idx")
  rng = np.random.default_rng(0)
  templates = rng.integers(0, 256, (10, 28, 28)).astype(np.float64)
  for prefix, n in (("train", NUM_TRAIN), ("t10k", NUM_TEST)):
    images, labels = _synthetic_split(rng, templates, n)
    _write_idx(directory / f"{prefix}-images-idx3-ubyte", images)
    _write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels)
  return str(directory)


def tiny_config(data_dir):
  config = default_config.get_config()
  config.data_dir = data_dir
  config.batch_size = BATCH
  config.eval_batch_size = 128  # 200 test examples: the last batch is padded
  config.progress_bar = False
  config.log_every_steps = 4
  config.dense.epochs = DENSE_EPOCHS
  config.dense.learning_rate = 0.05
  config.dense.boundaries = (1,)
  config.dense.warmup_epochs = 0.5
  config.gsm.epochs = GSM_EPOCHS
  config.gsm.learning_rate = 0.05
  config.gsm.boundaries = (2,)
  config.compression = COMPRESSION
  return config


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
  """One uninterrupted tiny run: (workdir, summary, printed stdout)."""
  workdir = str(tmp_path_factory.mktemp("run") / "workdir")
  capture = tmp_path_factory.mktemp("stdout") / "out.txt"
  # capsys is function-scoped; capture the module-level run's stdout by hand.
  saved = sys.stdout
  with open(capture, "w") as f:
    sys.stdout = f
    try:
      summary = train_lib.train_and_evaluate(tiny_config(data_dir), workdir)
    finally:
      sys.stdout = saved
  return workdir, summary, capture.read_text()


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _final_state(workdir):
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    return ckpt.restore_raw(), ckpt.restore_meta()
  finally:
    ckpt.close()


def _pool_arrays(params):
  return [np.asarray(layer["kernel"]) for _, layer in sorted(params.items())]


# --------------------------------------------------------------------------- #
# End to end
# --------------------------------------------------------------------------- #


def test_end_to_end_run_writes_all_outputs(finished_run):
  workdir, summary, _ = finished_run
  for name in ("config.json", "metrics.jsonl", "summary.json", "sparsity.png", "curves.png"):
    assert os.path.isfile(os.path.join(workdir, name)), name
  for name in ("checkpoints", "dense_model", "final_model"):
    assert os.path.isdir(os.path.join(workdir, name)), name
  for name in ("sparsity.png", "curves.png"):
    with open(os.path.join(workdir, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f) == json.loads(json.dumps(summary))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["compression"] == COMPRESSION


def test_metrics_have_one_row_per_epoch_with_gsm_stats(finished_run):
  rows = _rows(finished_run[0])
  assert [r["phase"] for r in rows] == ["dense"] * DENSE_EPOCHS + ["gsm"] * GSM_EPOCHS
  assert [r["epoch"] for r in rows] == list(range(1, DENSE_EPOCHS + GSM_EPOCHS + 1))
  assert [r["step"] for r in rows] == [STEPS_PER_EPOCH * e for e in range(1, len(rows) + 1)]
  for row in rows:
    assert 0.0 <= row["train_accuracy"] <= 1.0 and 0.0 <= row["test_accuracy"] <= 1.0
    assert np.isfinite(row["train_loss"]) and np.isfinite(row["test_loss"])
  # lr: 0.05 decayed x0.1 after epoch 1 (dense) and after GSM epoch 2.
  assert [r["learning_rate"] for r in rows] == pytest.approx([0.05, 0.005, 0.05, 0.05, 0.005])
  for row in rows[DENSE_EPOCHS:]:
    assert row["keep"] == KEEP
    assert row["active_weights"] >= KEEP  # ties at the threshold may keep a few more
    assert row["threshold"] > 0.0
    assert row["largest_passive_abs_weight"] >= 0.0


def test_summary_matches_the_saved_pruned_model(finished_run):
  workdir, summary, _ = finished_run
  assert summary["dense_source"] == "trained"
  assert summary["dense_accuracy"] > 0.5  # the synthetic classes are easy
  assert summary["dense_accuracy"] == _rows(workdir)[DENSE_EPOCHS - 1]["test_accuracy"]
  assert summary["accuracy_before_prune"] == _rows(workdir)[-1]["test_accuracy"]
  assert summary["pool_size"] == POOL_SIZE and summary["keep"] == KEEP

  pruned = checkpoints.load_model(os.path.join(workdir, "final_model"))["params"]
  kernels = _pool_arrays(pruned)
  nonzeros = sum(int(np.count_nonzero(k)) for k in kernels)
  assert summary["nonzeros"] == nonzeros <= KEEP
  assert summary["compression_reached"] == pytest.approx(POOL_SIZE / nonzeros)
  layers = {layer["path"]: layer for layer in summary["layers"]}
  for name, kernel in zip(("fc1", "fc2", "fc3"), kernels):
    layer = layers[f"['{name}']['kernel']"]
    assert layer["size"] == kernel.size
    assert layer["density"] == pytest.approx(np.count_nonzero(kernel) / kernel.size)

  # The cut keeps the KEEP largest |w| of the pre-cut model (the last checkpoint).
  state, _ = _final_state(workdir)
  before = np.concatenate([k.ravel() for k in _pool_arrays(state["params"])])
  magnitudes = np.sort(np.abs(before))[::-1]
  assert summary["method_results"]["largest_passive_abs_weight_before_cut"] == pytest.approx(
    magnitudes[KEEP]
  )
  assert summary["method_results"]["smallest_kept_abs_weight_before_cut"] == pytest.approx(
    magnitudes[KEEP - 1]
  )
  after = np.concatenate([k.ravel() for k in kernels])
  kept = after != 0
  assert np.array_equal(after[kept], before[kept])
  assert np.abs(before[kept]).min() >= magnitudes[KEEP]
  # Biases are outside the pool and untouched.
  for name in ("fc1", "fc2", "fc3"):
    np.testing.assert_array_equal(pruned[name]["bias"], state["params"][name]["bias"])


def test_sparsity_table_is_printed(finished_run):
  printed = finished_run[2]
  assert "['fc1']['kernel']" in printed and "compression" in printed
  assert "before pruning" in printed and "after pruning" in printed


# --------------------------------------------------------------------------- #
# Resume
# --------------------------------------------------------------------------- #


class _CtrlCDataset:
  """Delegates to a dataset; sends SIGINT to this process when batch (epoch, index) is read."""

  def __init__(self, inner, at):
    self._inner = inner
    self._at = at

  def __getattr__(self, name):
    return getattr(self._inner, name)

  def train_batches(self, batch_size, *, epoch, seed, start=0, shard=(0, 1)):
    batches = self._inner.train_batches(
      batch_size, epoch=epoch, seed=seed, start=start, shard=shard
    )
    for i, batch in enumerate(batches, start=start):
      if (epoch, i) == self._at:
        os.kill(os.getpid(), signal.SIGINT)
      yield batch


def _load_with_ctrl_c(monkeypatch, at):
  real = data.load_dataset  # the unpatched one: monkeypatch.undo() ran before
  monkeypatch.setattr(data, "load_dataset", lambda *a, **k: _CtrlCDataset(real(*a, **k), at))


def _assert_trees_equal(a, b, path=""):
  if isinstance(a, dict):
    assert a.keys() == b.keys(), path
    for key in a:
      _assert_trees_equal(a[key], b[key], f"{path}/{key}")
  elif isinstance(a, (list, tuple)):
    assert len(a) == len(b), path
    for i, (x, y) in enumerate(zip(a, b)):
      _assert_trees_equal(x, y, f"{path}/{i}")
  elif a is None:
    assert b is None, path
  else:
    x, y = np.asarray(a), np.asarray(b)
    assert x.dtype == y.dtype and x.shape == y.shape, path
    assert x.tobytes() == y.tobytes(), f"{path} differs"


def test_ctrl_c_then_resume_ends_bitwise_equal_to_uninterrupted_run(
  finished_run, data_dir, tmp_path, monkeypatch
):
  workdir = str(tmp_path / "interrupted")
  config = tiny_config(data_dir)
  # Ctrl-C in the middle of dense epoch 2, then in the middle of GSM epoch 2
  # (data epochs are numbered across phases: GSM epoch 2 reads data epoch 3).
  for at, where in (((1, 2), ("dense", 1, 3)), ((DENSE_EPOCHS + 1, 5), ("gsm", 1, 6))):
    monkeypatch.undo()
    _load_with_ctrl_c(monkeypatch, at)
    with pytest.raises(train_lib.TrainingInterrupted, match="run the same command again"):
      train_lib.train_and_evaluate(config, workdir)
    _, meta = _final_state(workdir)
    assert (meta["phase"], meta["epoch"], meta["batch"]) == where
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
  monkeypatch.undo()
  summary = train_lib.train_and_evaluate(config, workdir)

  reference_dir, reference_summary, _ = finished_run
  state, meta = _final_state(workdir)
  reference_state, reference_meta = _final_state(reference_dir)
  _assert_trees_equal(state, reference_state)  # params, batch stats, momentum, step
  _assert_trees_equal(
    checkpoints.load_model(os.path.join(workdir, "final_model")),
    checkpoints.load_model(os.path.join(reference_dir, "final_model")),
  )

  def without_times(rows):
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in rows]

  assert without_times(_rows(workdir)) == without_times(_rows(reference_dir))
  for key in ("dense_accuracy", "accuracy_before_prune", "accuracy_final", "layers"):
    assert summary[key] == reference_summary[key], key


def test_ctrl_c_with_batches_drawn_on_the_device_resumes_on_the_same_batch(
  finished_run, data_dir, tmp_path, monkeypatch
):
  # The finished run without its last checkpoint: it resumes at the end of GSM epoch 2.
  # The dataset is not wrapped, so the batches are drawn on the device; SIGINT arrives
  # as the step of batch 2 of GSM epoch 3 is called, and that step is the last one saved.
  workdir = str(tmp_path / "on_device")
  shutil.copytree(finished_run[0], workdir)
  final_step = STEPS_PER_EPOCH * (DENSE_EPOCHS + GSM_EPOCHS)
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(final_step)))
  real, calls = train_lib.device_data.drawing, []

  def drawing(train_step, mesh):
    draw = real(train_step, mesh)

    def step(*args, **kwargs):
      calls.append(len(calls))
      if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGINT)
      return draw(*args, **kwargs)

    return step

  monkeypatch.setattr(train_lib.device_data, "drawing", drawing)
  with pytest.raises(train_lib.TrainingInterrupted, match="gsm epoch 3, batch 3/8"):
    train_lib.train_and_evaluate(tiny_config(data_dir), workdir)
  monkeypatch.undo()
  train_lib.train_and_evaluate(tiny_config(data_dir), workdir)
  _assert_trees_equal(_final_state(workdir)[0], _final_state(finished_run[0])[0])


def test_rerunning_a_finished_workdir_reproduces_its_summary(finished_run, data_dir):
  workdir, summary, _ = finished_run
  again = train_lib.train_and_evaluate(tiny_config(data_dir), workdir)
  for key in ("dense_accuracy", "accuracy_before_prune", "accuracy_final", "layers"):
    assert again[key] == summary[key], key
  assert len(_rows(workdir)) == DENSE_EPOCHS + GSM_EPOCHS


def test_dense_checkpoint_replaces_dense_training(finished_run, data_dir, tmp_path):
  reference_dir, reference_summary, _ = finished_run
  config = tiny_config(data_dir)
  config.dense_checkpoint = reference_dir  # a workdir: its dense_model/ is used
  config.gsm.epochs = 1
  summary = train_lib.train_and_evaluate(config, str(tmp_path / "from_dense"))
  assert summary["dense_source"].startswith("checkpoint:")
  assert summary["dense_accuracy"] == reference_summary["dense_accuracy"]
  assert [row["phase"] for row in _rows(str(tmp_path / "from_dense"))] == ["gsm"]


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("model", "lenet7", "unknown model 'lenet7' (config.model); choose one of "),
    ("dataset", "svhn", "unknown dataset 'svhn' (config.dataset); choose one of "),
    ("compression", 0.5, "config.compression must be a number >= 1"),
    ("batch_size", 0, "config.batch_size must be a positive integer, got 0"),
    ("dense.epochs", -1, "config.dense.epochs must be an integer >= 0, got -1"),
    ("gsm.momentum", 1.0, "config.gsm.momentum must be in [0, 1), got 1.0"),
    ("gsm.boundaries", (5, 3), "config.gsm.boundaries must be a strictly increasing"),
    ("dense_checkpoint", "/nonexistent/dense", "config.dense_checkpoint='/nonexistent/dense'"),
    ("method", "obd", "unknown method 'obd' (config.method); choose one of gsm, dense, magnitude"),
    ("magnitude.rounds", 0, "config.magnitude.rounds must be an integer >= 1, got 0"),
    ("gmp.initial_sparsity", 1.5, "config.gmp.initial_sparsity must be in [0, 1), got 1.5"),
    ("finetune.learning_rate", -1.0, "config.finetune.learning_rate must be a finite number > 0"),
    ("admm.rho", -1.0, "config.admm.rho must be a finite number >= 0, got -1.0"),
    ("lottery.ticket", "random", "config.lottery.ticket must be one of magnitude, gsm"),
  ],
)
def test_bad_config_is_refused_before_anything_runs(data_dir, tmp_path, field, value, message):
  config = tiny_config(data_dir)
  if field.split(".")[0] in ("magnitude", "gmp", "finetune", "admm", "lottery"):
    config.method = field.split(".")[0] if field.split(".")[0] != "finetune" else "magnitude"
  section, _, key = field.rpartition(".")
  with config.unlocked():
    (config[section] if section else config)[key] = value
  workdir = str(tmp_path / "never_created")
  with pytest.raises(train_lib.ConfigError) as err:
    train_lib.train_and_evaluate(config, workdir)
  assert str(err.value).startswith(message)
  assert "\n" not in str(err.value)
  assert not os.path.exists(workdir)


def test_skip_dense_with_dense_checkpoint_is_refused(data_dir, tmp_path):
  config = tiny_config(data_dir)
  config.skip_dense = True
  config.dense_checkpoint = str(tmp_path)
  with pytest.raises(train_lib.ConfigError, match="exclude each other"):
    train_lib.validate_config(config)


def test_missing_data_is_one_clear_error(tmp_path):
  config = tiny_config(str(tmp_path))  # an empty directory: no IDX files, no TFDS data
  config.dataset = "mnist"
  workdir = str(tmp_path / "never_created")
  with pytest.raises(data.DataNotFoundError, match="^Dataset 'mnist' not found"):
    train_lib.train_and_evaluate(config, workdir)
  assert not os.path.exists(workdir)


def test_workdir_of_another_config_is_refused(finished_run, data_dir):
  workdir = finished_run[0]
  config = tiny_config(data_dir)
  config.compression = 20.0
  config.seed = 1
  with pytest.raises(train_lib.ConfigError) as err:
    train_lib.train_and_evaluate(config, workdir)
  message = str(err.value)
  assert message.startswith(f"workdir {workdir} holds a checkpoint of a different config")
  assert "compression: 10.0 there, 20.0 here" in message
  assert "seed: 0 there, 1 here" in message
  assert "\n" not in message


def test_harmless_fields_may_change_on_resume(finished_run, data_dir, tmp_path):
  # The finished run without its last checkpoint resumes at the end of GSM epoch 2,
  # with every field that may change on resume changed: same training, bit for bit.
  workdir = str(tmp_path / "harmless")
  shutil.copytree(finished_run[0], workdir)
  final_step = STEPS_PER_EPOCH * (DENSE_EPOCHS + GSM_EPOCHS)
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(final_step)))
  config = tiny_config(data_dir)
  config.eval_batch_size = 50
  config.log_every_steps = 1
  config.progress_bar = True
  config.checkpoint_keep = 5
  config.checkpoint_every_steps = 3
  config.plots = False
  summary = train_lib.train_and_evaluate(config, workdir)
  reference_dir, reference, _ = finished_run
  _assert_trees_equal(_final_state(workdir)[0], _final_state(reference_dir)[0])
  _assert_trees_equal(
    checkpoints.load_model(os.path.join(workdir, "final_model")),
    checkpoints.load_model(os.path.join(reference_dir, "final_model")),
  )
  for key in ("accuracy_before_prune", "accuracy_final", "nonzeros", "layers"):
    assert summary[key] == reference[key], key
  # Another eval_batch_size sums the test loss in another order (docs/TRAINING.md).
  assert summary["loss_final"] == pytest.approx(reference["loss_final"], rel=1e-5)


def test_every_config_loads_and_validates():
  paths = glob.glob(os.path.join(ROOT, "configs", "*.py"))
  names = sorted(os.path.splitext(os.path.basename(p))[0] for p in paths)
  expected = {
    "default": ("lenet_300_100", "fashion_mnist", 60),
    "lenet300_c60": ("lenet_300_100", "mnist", 60),
    "lenet5_c125": ("lenet5", "mnist", 125),
    "lenet5_c300": ("lenet5", "mnist", 300),
    "resnet56_c10": ("resnet56", "cifar10", 10),
    "densenet40_c10": ("densenet40", "cifar10", 10),
    "resnet50_c5": ("resnet50", "imagenet2012", 5),
    "passive_age": ("lenet_300_100", "fashion_mnist", 60),
    "evidence_lenet5": ("lenet5", "fashion_mnist", 60),
  }
  assert set(expected) <= set(names)
  for name in names:
    config = importlib.import_module(f"configs.{name}").get_config()
    train_lib.validate_config(config)
    if name in expected:
      assert (config.model, config.dataset, config.compression) == expected[name], name
  preset = importlib.import_module("configs.passive_age").get_config()
  assert (preset.gsm.passive_decay_growth, preset.gsm.passive_decay_horizon_epochs) == (4.0, 1.0)


def test_reference_hyperparameters_of_the_paper_configs():
  lenet = importlib.import_module("configs.lenet300_c60").get_config()
  assert (lenet.dense.epochs, lenet.dense.learning_rate, tuple(lenet.dense.boundaries)) == (
    200,
    3e-2,
    (40, 80, 120, 160),
  )
  assert (lenet.gsm.epochs, lenet.gsm.learning_rate, lenet.gsm.momentum, lenet.gsm.nesterov) == (
    280,
    1e-2,
    0.99,
    True,
  )
  assert tuple(lenet.gsm.boundaries) == (160, 200, 240) and lenet.batch_size == 256
  resnet = importlib.import_module("configs.resnet56_c10").get_config()
  assert (resnet.dense.epochs, resnet.dense.learning_rate, resnet.dense.weight_decay) == (
    500,
    0.1,
    1e-4,
  )
  assert (resnet.gsm.epochs, resnet.gsm.learning_rate, resnet.gsm.momentum) == (600, 5e-3, 0.98)
  assert tuple(resnet.gsm.boundaries) == (400, 500) and resnet.batch_size == 64


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def _train_py(*args, cwd):
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, "train.py"), *args],
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=120,
  )


def tiny_command(data_dir, workdir, *extra):
  """train.py with tiny_config's settings as flags (for subprocess runs)."""
  return [
    sys.executable,
    os.path.join(ROOT, "train.py"),
    f"--workdir={workdir}",
    f"--config.data_dir={data_dir}",
    f"--config.batch_size={BATCH}",
    "--config.eval_batch_size=128",
    "--config.progress_bar=False",
    "--config.log_every_steps=4",
    f"--config.dense.epochs={DENSE_EPOCHS}",
    "--config.dense.learning_rate=0.05",
    "--config.dense.boundaries=(1,)",
    "--config.dense.warmup_epochs=0.5",
    f"--config.gsm.epochs={GSM_EPOCHS}",
    "--config.gsm.learning_rate=0.05",
    "--config.gsm.boundaries=(2,)",
    f"--config.compression={COMPRESSION}",
    *extra,
  ]


@pytest.mark.slow  # a train.py process: 17 s; the SIGTERM resume test runs the CLI too
def test_cli_trains_with_config_overrides(data_dir, tmp_path):
  workdir = tmp_path / "cli"
  result = _train_py(
    f"--workdir={workdir}",
    f"--config={os.path.join(ROOT, 'configs', 'default.py')}",
    f"--config.data_dir={data_dir}",
    "--config.max_train_examples=256",
    f"--config.batch_size={BATCH}",
    "--config.dense.epochs=1",
    "--config.gsm.epochs=1",
    "--config.compression=20",
    cwd=tmp_path,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / "summary.json") as f:
    summary = json.load(f)
  assert summary["compression_target"] == 20.0
  assert summary["num_train"] == 256
  assert "compression" in result.stdout
  with open(workdir / "config.json") as f:
    assert json.load(f)["max_train_examples"] == 256


def test_cli_bad_config_prints_one_error_line_and_exits_1(tmp_path):
  result = _train_py(f"--workdir={tmp_path / 'w'}", "--config.compression=0.5", cwd=tmp_path)
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
  assert errors == [
    "train.py: error: config.compression must be a number >= 1 (pool size / weights kept), got 0.5"
  ]
  assert not (tmp_path / "w").exists()


# --------------------------------------------------------------------------- #
# Baselines (config.method)
# --------------------------------------------------------------------------- #

BASELINE_EPOCHS = 2


def baseline_config(data_dir, method, dense_workdir, **fields):
  """A baseline from the finished run's dense model, every stage 2 epochs."""
  config = tiny_config(data_dir)
  config.method = method
  config.dense_checkpoint = dense_workdir
  for section in ("finetune", "gmp", "admm"):
    config[section].epochs = BASELINE_EPOCHS
    config[section].learning_rate = 0.05
    config[section].boundaries = (1,)
  config.gmp.update_every_steps = 3
  config.admm.steps_per_iteration = 4
  for key, value in fields.items():
    section, name = key.split("__")
    config[section][name] = value
  return config


def _dense_pool(workdir):
  params = checkpoints.load_model(os.path.join(workdir, "dense_model"))["params"]
  return _pool_arrays(params)


def _global_top_keep_mask(kernels, keep):
  """Independent reference: the keep largest |w| over all kernels, by sorting."""
  flat = np.concatenate([np.abs(k).ravel() for k in kernels])
  threshold = np.sort(flat)[::-1][keep - 1]
  return [np.abs(k) >= threshold for k in kernels]


@pytest.mark.parametrize(
  "method, fields, stages",
  [
    ("magnitude", {}, {"finetune": BASELINE_EPOCHS}),
    ("magnitude", {"magnitude__rounds": 2}, {"finetune1": 1, "finetune2": 1}),
    ("gmp", {}, {"gmp": BASELINE_EPOCHS, "finetune": BASELINE_EPOCHS}),
    ("admm", {}, {"admm": BASELINE_EPOCHS, "finetune": BASELINE_EPOCHS}),
    ("lottery", {"lottery__ticket": "magnitude"}, {"ticket": DENSE_EPOCHS}),
    ("lottery", {"lottery__ticket": "gsm"}, {"gsm": GSM_EPOCHS, "ticket": DENSE_EPOCHS}),
  ],
)
def test_every_baseline_reports_accuracies_compression_and_epochs(
  finished_run, data_dir, tmp_path, method, fields, stages
):
  reference_dir, reference_summary, _ = finished_run
  workdir = str(tmp_path / method)
  summary = train_lib.train_and_evaluate(
    baseline_config(data_dir, method, reference_dir, **fields), workdir
  )
  assert summary["method"] == method
  assert summary["epochs"] == stages
  assert summary["dense_accuracy"] == reference_summary["dense_accuracy"]
  for key in ("accuracy_after_prune", "accuracy_final"):
    assert 0.0 <= summary[key] <= 1.0, key
  # Exactly KEEP weights survive: pruned weights stayed at zero during training.
  kernels = _pool_arrays(checkpoints.load_model(os.path.join(workdir, "final_model"))["params"])
  assert sum(int(np.count_nonzero(k)) for k in kernels) == summary["nonzeros"] == KEEP
  assert summary["compression_reached"] == pytest.approx(POOL_SIZE / KEEP)
  assert [layer["nonzeros"] for layer in summary["layers"]] == [
    int(np.count_nonzero(k)) for k in kernels
  ]
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f) == json.loads(json.dumps(summary))
  rows = _rows(workdir)
  assert [r["phase"] for r in rows] == [p for p, n in stages.items() for _ in range(n)]


def test_one_shot_magnitude_keeps_the_global_top_weights_of_the_dense_model(
  finished_run, data_dir, tmp_path
):
  reference_dir = finished_run[0]
  workdir = str(tmp_path / "magnitude")
  train_lib.train_and_evaluate(baseline_config(data_dir, "magnitude", reference_dir), workdir)
  expected = _global_top_keep_mask(_dense_pool(reference_dir), KEEP)
  final = _pool_arrays(checkpoints.load_model(os.path.join(workdir, "final_model"))["params"])
  for mask, kernel in zip(expected, final):
    np.testing.assert_array_equal(kernel != 0, mask)


def test_admm_targets_are_the_per_layer_counts_of_the_gsm_run(finished_run, data_dir, tmp_path):
  reference_dir, reference_summary, _ = finished_run
  config = baseline_config(data_dir, "admm", reference_dir, admm__densities_from=reference_dir)
  summary = train_lib.train_and_evaluate(config, str(tmp_path / "admm"))
  assert [layer["nonzeros"] for layer in summary["layers"]] == [
    layer["nonzeros"] for layer in reference_summary["layers"]
  ]
  assert "summary.json" in summary["method_results"]["admm_targets_source"]


def test_lottery_ticket_starts_from_the_masked_initial_weights(finished_run, data_dir, tmp_path):
  reference_dir = finished_run[0]
  config = baseline_config(data_dir, "lottery", reference_dir)
  config.dense.epochs = 0  # no retraining: the final model is theta_0 * mask
  workdir = str(tmp_path / "ticket")
  train_lib.train_and_evaluate(config, workdir)
  theta_0 = _pool_arrays(
    checkpoints.load_model(os.path.join(reference_dir, "initial_model"))["params"]
  )
  masks = _global_top_keep_mask(_dense_pool(reference_dir), KEEP)
  final = _pool_arrays(checkpoints.load_model(os.path.join(workdir, "final_model"))["params"])
  for kernel, init, mask in zip(final, theta_0, masks):
    np.testing.assert_array_equal(kernel, np.where(mask, init, 0.0))


@pytest.mark.slow  # 7 s; gsm's resume stays in the fast suite
def test_ctrl_c_in_a_baseline_stage_then_resume_is_bitwise_equal(
  finished_run, data_dir, tmp_path, monkeypatch
):
  reference_dir = finished_run[0]
  config = baseline_config(data_dir, "gmp", reference_dir)
  reference = train_lib.train_and_evaluate(config, str(tmp_path / "reference"))
  workdir = str(tmp_path / "interrupted")
  # Data epochs are numbered across stages: finetune epoch 1 reads data epoch 2.
  for at, where in (((1, 4), ("gmp", 1, 5)), ((BASELINE_EPOCHS, 2), ("finetune", 0, 3))):
    monkeypatch.undo()
    _load_with_ctrl_c(monkeypatch, at)
    with pytest.raises(train_lib.TrainingInterrupted):
      train_lib.train_and_evaluate(config, workdir)
    _, meta = _final_state(workdir)
    assert (meta["phase"], meta["epoch"], meta["batch"]) == where
  monkeypatch.undo()
  summary = train_lib.train_and_evaluate(config, workdir)
  _assert_trees_equal(_final_state(workdir)[0], _final_state(str(tmp_path / "reference"))[0])
  for key in ("accuracy_after_prune", "accuracy_final", "layers"):
    assert summary[key] == reference[key], key


# --------------------------------------------------------------------------- #
# The method registry and the summary schema
# --------------------------------------------------------------------------- #


def test_dense_method_reports_the_dense_model_unpruned(finished_run, data_dir, tmp_path):
  reference_dir, reference_summary, _ = finished_run
  config = tiny_config(data_dir)
  config.method = "dense"
  config.dense_checkpoint = reference_dir
  summary = train_lib.train_and_evaluate(config, str(tmp_path / "dense"))
  assert summary["method"] == "dense" and summary["epochs"] == {}
  assert summary["compression_target"] is None
  assert (
    summary["accuracy_final"] == summary["dense_accuracy"] == reference_summary["dense_accuracy"]
  )
  assert summary["accuracy_after_prune"] is None and summary["method_results"] == {}
  dense = _dense_pool(reference_dir)
  assert summary["nonzeros"] == sum(int(np.count_nonzero(k)) for k in dense)


def test_gsm_with_zero_epochs_is_the_global_cut_of_the_dense_model(
  finished_run, data_dir, tmp_path
):
  reference_dir = finished_run[0]
  config = tiny_config(data_dir)
  config.dense_checkpoint = reference_dir
  config.gsm.epochs = 0
  workdir = str(tmp_path / "cut_only")
  summary = train_lib.train_and_evaluate(config, workdir)
  assert summary["epochs"] == {}
  final = _pool_arrays(checkpoints.load_model(os.path.join(workdir, "final_model"))["params"])
  for kernel, mask, dense in zip(
    final, _global_top_keep_mask(_dense_pool(reference_dir), KEEP), _dense_pool(reference_dir)
  ):
    np.testing.assert_array_equal(kernel, np.where(mask, dense, 0.0))
  assert summary["accuracy_before_prune"] == summary["dense_accuracy"]


def test_a_new_method_is_one_registry_entry(finished_run, data_dir, tmp_path, monkeypatch):
  """A one-shot global cut with no training, added without touching the driver."""

  def oneshot_stages(ctx):
    cut = stages._pruning(ctx, lambda params: stages.global_cut(params, ctx.config.compression))
    return [stages.Stage("cut", 0, None, cut)]

  monkeypatch.setitem(
    stages.METHODS, "oneshot", stages.Method(oneshot_stages, check=lambda config: None)
  )
  config = tiny_config(data_dir)
  config.method = "oneshot"
  config.dense_checkpoint = finished_run[0]
  summary = train_lib.train_and_evaluate(config, str(tmp_path / "oneshot"))
  assert summary["method"] == "oneshot" and summary["nonzeros"] == KEEP
  assert summary["accuracy_final"] == summary["accuracy_after_prune"]


def _doc_tables(text: str) -> list[list[list[str]]]:
  """The Markdown tables of `text`: rows of cells (header and separator rows left out)."""
  tables, rows = [], []
  for line in text.replace("\\|", "\x00").splitlines() + [""]:
    if line.startswith("|"):
      cells = [cell.strip().replace("\x00", "|") for cell in line.strip("|").split("|")]
      rows.append(cells)
    elif rows:
      tables.append(rows[2:])
      rows = []
  return tables


def _ticked(cell: str) -> set[str]:
  return set(re.findall(r"`([^`]+)`", cell))


def test_every_summary_field_is_documented(finished_run):
  """Each field of summary.json is a row of docs/TRAINING.md's summary table (its
  parts in that row; a method's results and stages in their tables' row for it)."""
  with open(os.path.join(ROOT, "docs", "TRAINING.md")) as f:
    docs = f.read()
  summary = finished_run[1]
  method = summary["method"]
  fields, results = _doc_tables(docs.split("### summary.json", 1)[1])[:2]
  rows = {name: meaning for name_cell, meaning in fields for name in _ticked(name_cell)}
  methods = _doc_tables(docs.split("## Methods", 1)[1])[0]
  stages = next((meaning for name, meaning in methods if method in _ticked(name)), "")
  method_row = next((meaning for name, meaning in results if method in _ticked(name)), "")
  assert sorted(set(summary) - set(rows)) == []
  for part in ("layers", "devices", "wall_time_s", "method_results"):
    keys = summary[part][0] if part == "layers" else summary[part]
    documented = _ticked(rows[part]) | (_ticked(stages) if part == "wall_time_s" else set())
    documented |= _ticked(method_row) if part == "method_results" else set()
    assert sorted(set(keys) - documented) == [], part


def test_progress_survives_the_checkpoint_round_trip(finished_run):
  _, meta = _final_state(finished_run[0])
  progress = train_lib.Progress.from_json(meta)
  assert progress.to_json() == meta


def test_tensorboard_has_the_run_s_curves_gsm_stats_and_densities(finished_run):
  import pathlib

  from test_tensorboard import _event_files
  from test_tensorboard import _scalars

  logdir = pathlib.Path(finished_run[0]) / "tensorboard"
  values = [value for path in _event_files(logdir) for value in _scalars(path)]
  tags = {tag for _, tag, _ in values}
  expected = {"train/loss", "train/accuracy", "train/learning_rate", "eval/accuracy", "eval/loss"}
  expected |= {"gsm/active", "gsm/keep", "gsm/threshold", "gsm/largest_passive_abs_weight"}
  expected |= {"final/accuracy", "density/fc1/kernel", "density/fc2/kernel", "density/fc3/kernel"}
  assert tags == expected
  rows = _rows(finished_run[0])
  eval_accuracy = sorted((step, v) for step, tag, v in values if tag == "eval/accuracy")
  assert eval_accuracy == [
    (row["step"], pytest.approx(row["test_accuracy"], rel=1e-6)) for row in rows
  ]
  keep = [v for _, tag, v in values if tag == "gsm/keep"]
  assert keep == [KEEP] * GSM_EPOCHS
  densities = {tag: v for _, tag, v in values if tag.startswith("density/")}
  summary_layers = {layer["path"]: layer["density"] for layer in finished_run[1]["layers"]}
  assert densities["density/fc1/kernel"] == pytest.approx(summary_layers["['fc1']['kernel']"])

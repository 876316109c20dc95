"""The structured methods of train.py: channel GSM, L1 filter pruning, N:M GSM, magnitude N:M.

One tiny run per method (LeNet-300-100 from its random init, one epoch per
stage) with exact counts: the channel methods keep exactly Q = int(400 / C)
of the 300 + 100 output channels of fc1 and fc2 (the classifier fc3 is not
pooled: its channels are the classes), and report the MACs of the narrowed
model; the N:M methods conform, with exactly N non-zeros in every group of
M, so |pool| * N / M non-zeros in all.
"""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from test_train import POOL_SIZE  # noqa: E402
from test_train import data_dir  # noqa: E402, F401  (the fixture)
from test_train import tiny_config  # noqa: E402

from configs import default as default_config  # noqa: E402
import gsm_optax  # noqa: E402
from training import checkpoints  # noqa: E402
from training import config as config_lib  # noqa: E402
from training import stages  # noqa: E402
from training import steps  # noqa: E402
from training import train_lib  # noqa: E402

CHANNELS = 300 + 100  # the output features of fc1 and fc2
CHANNEL_C = 10.0
CHANNEL_KEEP = int(CHANNELS / CHANNEL_C)  # 40
HIDDEN = {"fc1": True, "fc2": True, "fc3": False}


def _pool(params, layers=HIDDEN):
  return {k: {"kernel": layers.get(k, False), "bias": False} for k in params}


def _metrics(workdir) -> list[dict]:
  """The rows of the run's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _macs(k1: int, k2: int) -> int:
  """LeNet-300-100 with k1 and k2 hidden neurons: 784 k1 + k1 k2 + 10 k2."""
  return 784 * k1 + k1 * k2 + 10 * k2


def _run(data_dir, tmp_path, method, **channels):  # noqa: F811
  config = tiny_config(data_dir)
  config.method = method
  config.channels.update(channels)
  config.skip_dense = True
  config.plots = False
  config.compression = CHANNEL_C
  config.gsm.epochs = 1
  config.gsm.boundaries = ()
  config.finetune.epochs = 1
  config.finetune.boundaries = ()
  workdir = str(tmp_path / method)
  summary = train_lib.train_and_evaluate(config, workdir)
  params = checkpoints.load_model(os.path.join(workdir, "final_model"))["params"]
  return summary, params


@pytest.mark.parametrize(
  "method,epochs",
  [
    ("gsm_channels", {"gsm": 1}),
    pytest.param("filter_l1", {"finetune": 1}, marks=pytest.mark.slow),  # ~2 s
  ],
)
def test_channel_methods_keep_exactly_q_channels(data_dir, tmp_path, method, epochs):  # noqa: F811
  summary, params = _run(data_dir, tmp_path, method)
  report = gsm_optax.channel_report(params, pool=_pool(params))
  assert report.total_channels == CHANNELS
  assert report.total_channels_kept == CHANNEL_KEEP
  assert (
    gsm_optax.channel_report(params, pool=_pool(params, {"fc3": True})).rows[0].channels_kept == 10
  )
  assert summary["epochs"] == epochs
  assert summary["nonzeros"] == report.total_nonzeros + 100 * 10
  results = summary["method_results"]
  assert results["channels_total"] == CHANNELS
  assert results["channels_kept"] == CHANNEL_KEEP
  k1, k2 = (row.channels_kept for row in report.rows)
  assert results["channels_kept_per_layer"] == {"['fc1']['kernel']": k1, "['fc2']['kernel']": k2}
  dead = [path for path, k in results["channels_kept_per_layer"].items() if k == 0]
  assert results["layers_without_channels"] == dead
  assert results["channel_compression_reached"] == pytest.approx(CHANNELS / CHANNEL_KEEP)
  assert results["macs_dense"] == _macs(300, 100) == 266_200
  assert results["macs_narrow"] == _macs(max(k1, 1), max(k2, 1))  # narrow keeps >= 1 per layer
  if method == "gsm_channels":  # the epoch rows log the channel mask
    row = _metrics(tmp_path / method)[-1]
    assert row["keep_channels"] == CHANNEL_KEEP and row["active_channels"] >= CHANNEL_KEEP
    assert row["invalid_compression_steps"] == 0


def test_channel_layers_and_mean_score(data_dir, tmp_path):  # noqa: F811
  """channels.layers="fc2" pools fc2 only (Q = int(100 / 10)); "mean" ranks by mean |w|."""
  summary, params = _run(data_dir, tmp_path, "gsm_channels", layers="fc2", score="mean")
  report = gsm_optax.channel_report(params, pool=_pool(params, {"fc1": True, "fc2": True}))
  assert [row.channels_kept for row in report.rows] == [300, 10]
  assert summary["method_results"]["channels_total"] == 100
  assert summary["method_results"]["layers_without_channels"] == []
  assert summary["method_results"]["macs_narrow"] == _macs(300, 10)


@pytest.mark.parametrize(
  "method,epochs",
  [
    ("gsm_nm", {"gsm": 1}),
    ("magnitude_nm", {"finetune": 1}),
  ],
)
def test_nm_methods_keep_exactly_n_of_every_m(data_dir, tmp_path, method, epochs):  # noqa: F811
  summary, params = _run(data_dir, tmp_path, method)
  report = gsm_optax.nm_report(params, 2, 4)
  assert report.conforms
  expected = POOL_SIZE * 2 // 4
  assert sum(row.nonzeros for row in report.rows) == expected  # with <= 2 per group: exactly 2
  assert summary["nonzeros"] == expected
  assert summary["epochs"] == epochs
  assert summary["compression_target"] is None  # N:M has no global C
  results = summary["method_results"]
  assert results["nm"] == "2:4" and results["nm_conforms"] is True
  assert results["nm_nonzeros"] == expected and results["nm_groups_over_n"] == 0
  if method == "gsm_nm":  # exactly N of every M get the gradient
    assert _metrics(tmp_path / method)[-1]["active_weights"] == expected


def test_bad_structured_configs_are_refused_before_training():
  params = steps.abstract_params("lenet_300_100", 10)
  config = default_config.get_config()
  config.method, config.nm.n, config.nm.m = "gsm_nm", 3, 2
  with pytest.raises(config_lib.ConfigError, match=r"config.nm.m must be an integer >= "):
    train_lib.validate_config(config)
  config.nm.n, config.nm.m = 2, 3  # 3 divides no kernel's 784 / 300 / 100 inputs
  train_lib.validate_config(config)
  with pytest.raises(
    config_lib.ConfigError, match=r"config.nm.m=3, config.nm.axis=-2: m=3 does not divide"
  ):
    stages.check_params(config, params)
  config = default_config.get_config()
  config.method, config.compression = "filter_l1", float(CHANNELS + 1)
  with pytest.raises(config_lib.ConfigError, match=r"use 1 <= compression <= 400"):
    stages.check_params(config, params)
  config.compression = float(CHANNELS)
  stages.check_params(config, params)  # Q = 1 channel
  config.channels.layers = "fc2, conv9"
  with pytest.raises(
    config_lib.ConfigError,
    match=r"config.channels.layers names 'conv9', which is not a layer of lenet_300_100 with "
    r"a kernel; its layers: fc1, fc2, fc3",
  ):
    stages.check_params(config, params)
  config.channels.layers, config.channels.score = "", "max"
  with pytest.raises(
    config_lib.ConfigError, match=r"config.channels.score must be 'sum' or 'mean'"
  ):
    train_lib.validate_config(config)
  stored = config_lib.config_json(config)  # a workdir from before the structured methods
  del stored["nm"], stored["channels"]
  config.channels.score = "sum"
  assert config_lib.config_differences(stored, config) == []

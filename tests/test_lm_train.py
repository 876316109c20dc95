"""The training program on the language-modelling task: a nano GPT on a tiny text corpus.

The corpus is a UTF-8 file the tests write (a few sentences, each repeated with
small changes, so a one-layer model learns it in a few dozen steps). Every run
starts from configs/austen_gpt.py with the sizes cut down; the module fixture is
one uninterrupted GSM + AdamW run that the other tests compare against.
"""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from test_train import _assert_trees_equal  # noqa: E402
from test_train import _CtrlCDataset  # noqa: E402
from test_train import _final_state  # noqa: E402
from test_train import _rows  # noqa: E402

from configs import austen_gpt  # noqa: E402
import train  # noqa: E402
from training import checkpoints  # noqa: E402
from training import text_data  # noqa: E402
from training import train_lib  # noqa: E402

CONTEXT, BATCH, STEPS = 16, 8, 8
DENSE_EPOCHS, GSM_EPOCHS, COMPRESSION = 3, 3, 10.0
D_MODEL, MLP = 32, 64  # the nano GPT: one block
POOL_SIZE = 4 * D_MODEL * D_MODEL + 2 * D_MODEL * MLP  # query, key, value, out; fc1, fc2
KEEP = int(POOL_SIZE / COMPRESSION)
PROMPT = "the cat "

SENTENCES = (
  "the cat sat on the mat. ",
  "a dog ran in the park. ",
  "she read a book by the fire. ",
  "we ate bread and cheese. ",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A learnable UTF-8 corpus of about 12,000 bytes: the sentences in a random order."""
  rng = np.random.default_rng(0)
  text = "".join(SENTENCES[i] for i in rng.integers(0, len(SENTENCES), 500))
  path = tmp_path_factory.mktemp("text") / "corpus.txt"
  path.write_text(text, encoding="utf-8")
  return str(path)


def lm_config(corpus, method="gsm", **fields):
  config = austen_gpt.get_config()
  config.dataset = "text"
  config.data_dir = corpus
  config.model_size = "nano"
  config.context = CONTEXT
  config.batch_size = BATCH
  config.steps_per_epoch = STEPS
  config.eval_batch_size = 64
  config.sample_prompt = PROMPT
  config.sample_bytes = 24
  config.progress_bar = False
  config.plots = False
  config.log_every_steps = 4
  config.method = method
  config.compression = COMPRESSION
  config.dense.epochs = DENSE_EPOCHS
  config.dense.learning_rate = 1e-2
  config.gsm.epochs = GSM_EPOCHS
  config.gsm.learning_rate = 3e-3
  config.finetune.epochs = 2
  config.gmp.epochs = 1
  config.gmp.update_every_steps = 2
  config.admm.steps_per_iteration = 4
  for name, value in fields.items():
    section, _, key = name.rpartition("__")
    (config[section] if section else config)[key] = value
  return config


@pytest.fixture(scope="module")
def lm_run(corpus, tmp_path_factory):
  """One uninterrupted GSM + AdamW run: (workdir, summary)."""
  workdir = str(tmp_path_factory.mktemp("lm") / "gsm")
  return workdir, train_lib.train_and_evaluate(lm_config(corpus), workdir)


def _pooled(path):
  return re.search(r"attn/(query|key|value|out)/kernel$|mlp/fc[12]/kernel$", path) is not None


def _flat(params, prefix=""):
  """{"blocks/0/attn/query/kernel": array} of a nested dict (list indices as ints)."""
  out = {}
  items = params.items() if isinstance(params, dict) else enumerate(params)
  for key, value in items:
    name = f"{prefix}{key}"
    if isinstance(value, (dict, list)):
      out.update(_flat(value, f"{name}/"))
    else:
      out[name] = np.asarray(value)
  return out


def test_gsm_prunes_exactly_q_of_the_attention_and_mlp_kernels_and_nothing_else(lm_run):
  workdir, summary = lm_run
  assert summary["task"] == "language_modelling"
  assert summary["pool_size"] == POOL_SIZE and summary["keep"] == KEEP
  assert summary["nonzeros"] == KEEP
  params = _flat(checkpoints.load_model(os.path.join(workdir, "final_model"))["params"])
  pooled = {path: x for path, x in params.items() if _pooled(path)}
  assert sum(x.size for x in pooled.values()) == POOL_SIZE
  assert sum(int(np.count_nonzero(x)) for x in pooled.values()) == KEEP
  others = {path: x for path, x in params.items() if not _pooled(path)}
  assert {"embed/embedding", "pos/embedding", "head/kernel", "ln_f/scale"} <= set(others)
  for path, x in others.items():
    if not path.endswith("bias"):  # biases start at zero; everything else is dense
      assert np.count_nonzero(x) == x.size, path
  reported = ["/".join(re.findall(r"\['?([^'\]]+)'?\]", row["path"])) for row in summary["layers"]]
  assert reported == sorted(pooled, key=list(params).index)


def test_the_model_learned_and_the_cut_costs_little(lm_run):
  summary = lm_run[1]
  assert summary["dense_bits_per_byte"] < 4.0  # 8 bits per byte is a uniform guess
  assert summary["bits_per_byte_final"] == summary["bits_per_byte_after_prune"]
  assert summary["bits_per_byte_after_prune"] - summary["bits_per_byte_before_prune"] < 0.05
  assert summary["bits_per_byte_final"] < 4.0
  # The passive weights shrank from the init's scale (std 0.02) to ~0 by the end of GSM.
  assert summary["method_results"]["largest_passive_abs_weight_before_cut"] < 1e-3


def test_bits_per_byte_is_the_loss_in_nats_over_ln_2_everywhere(lm_run):
  workdir, summary = lm_run
  assert summary["bits_per_byte_final"] == pytest.approx(summary["loss_final"] / math.log(2))
  rows = _rows(workdir)
  assert [row["phase"] for row in rows] == ["dense"] * DENSE_EPOCHS + ["gsm"] * GSM_EPOCHS
  for row in rows:
    for split in ("train", "test"):
      expected = row[f"{split}_loss"] / math.log(2)
      assert row[f"{split}_bits_per_byte"] == pytest.approx(expected), split
  assert summary["dense_bits_per_byte"] == rows[DENSE_EPOCHS - 1]["test_bits_per_byte"]


def test_summary_has_every_metric_on_test_and_validation_and_the_samples(lm_run):
  summary = lm_run[1]
  for metric in ("bits_per_byte", "accuracy"):
    for key in (
      f"dense_{metric}",
      f"{metric}_before_prune",
      f"{metric}_after_prune",
      f"{metric}_final",
      f"dense_validation_{metric}",
      f"validation_{metric}_before_prune",
      f"validation_{metric}_final",
    ):
      assert isinstance(summary[key], float), key
  assert summary["num_validation"] > 0 and summary["num_test"] > 0
  assert set(summary["samples"]) == {"dense", "final"}
  for text in summary["samples"].values():
    assert text.startswith(PROMPT) and len(text.encode()) >= len(PROMPT) + 1


@pytest.mark.parametrize("method", [pytest.param("gmp", marks=pytest.mark.slow), "magnitude"])
def test_baselines_with_adamw_prune_the_same_pool_to_q(lm_run, corpus, tmp_path, method):
  config = lm_config(corpus, method, dense_checkpoint=lm_run[0])
  summary = train_lib.train_and_evaluate(config, str(tmp_path / method))
  assert summary["nonzeros"] == summary["keep"] == KEEP and summary["pool_size"] == POOL_SIZE
  assert summary["dense_bits_per_byte"] == lm_run[1]["dense_bits_per_byte"]
  assert summary["bits_per_byte_final"] < 5.0


def test_ctrl_c_mid_epoch_then_resume_is_bitwise_the_uninterrupted_run(
  lm_run, corpus, tmp_path, monkeypatch
):
  workdir = str(tmp_path / "interrupted")
  real = text_data.load_text_dataset
  for at in ((1, 3), (DENSE_EPOCHS + 1, 5)):  # dense epoch 2, then GSM epoch 2
    monkeypatch.setattr(
      text_data, "load_text_dataset", lambda *a, at=at, **k: _CtrlCDataset(real(*a, **k), at)
    )
    with pytest.raises(train_lib.TrainingInterrupted, match="run the same command again"):
      train_lib.train_and_evaluate(lm_config(corpus), workdir)
    monkeypatch.undo()
  summary = train_lib.train_and_evaluate(lm_config(corpus), workdir)
  _assert_trees_equal(_final_state(workdir)[0], _final_state(lm_run[0])[0])

  def without_times(rows):
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in rows]

  assert without_times(_rows(workdir)) == without_times(_rows(lm_run[0]))
  assert summary["bits_per_byte_final"] == lm_run[1]["bits_per_byte_final"]


def _one_error_line(config, tmp_path, capsys):
  assert train.run(config, str(tmp_path / "workdir")) == train.EXIT_ERROR
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  assert not os.path.exists(tmp_path / "workdir" / "checkpoints")
  return err


def test_missing_empty_and_non_utf8_corpora_are_one_error_line(tmp_path, capsys):
  missing = lm_config(str(tmp_path / "nowhere.txt"))
  assert "does not exist" in _one_error_line(missing, tmp_path, capsys)
  empty = tmp_path / "empty.txt"
  empty.write_bytes(b"")
  assert "empty" in _one_error_line(lm_config(str(empty)), tmp_path, capsys)
  latin1 = tmp_path / "latin1.txt"
  latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 100)
  err = _one_error_line(lm_config(str(latin1)), tmp_path, capsys)
  assert "UTF-8" in err and "offset 3" in err


def test_a_context_longer_than_the_corpus_is_one_error_line(corpus, tmp_path, capsys):
  config = lm_config(corpus, context=4096)
  config.model_size = "nano"
  err = _one_error_line(config, tmp_path, capsys)
  assert "context" in err and "split" in err


def test_a_pool_pattern_that_matches_nothing_is_one_error_line(corpus, tmp_path, capsys):
  config = lm_config(corpus)
  config.pool.include = (r"attn/query/kernel$", r"no_such_layer")
  err = _one_error_line(config, tmp_path, capsys)
  assert "config.pool" in err and "no_such_layer" in err


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("model", "lenet5", "does not take the inputs of 'text'"),
    ("context", 0, "config.context must be a positive integer"),
    ("validation_examples", 100, "its validation split is fixed"),
    ("gsm__optimizer", "adam", "config.gsm.optimizer must be 'sgd' or 'adamw'"),
    ("gsm__passive_shrink", 0.0, "config.gsm.passive_shrink must be a finite number > 0"),
    ("gsm__ramp_epochs", 1.0, "a variant of the paper's momentum-SGD rule"),
    ("gsm__passive_rule", "zero", "config.gsm.passive_rule must be 'decay' or 'shrink'"),
    ("gsm__epochs", 1, "config.gsm.passive_shrink=10 over config.gsm.epochs=1 of 8 steps"),
  ],
)
def test_bad_text_config_is_refused_before_anything_runs(
  corpus, tmp_path, capsys, field, value, message
):
  err = _one_error_line(lm_config(corpus, **{field: value}), tmp_path, capsys)
  assert message in err


def test_vit_takes_images_and_pools_its_attention_and_mlp_kernels():
  from configs import vit_fashion
  from training import stages
  from training import steps

  config = vit_fashion.get_config()
  train_lib.validate_config(config)
  params = steps.abstract_params("vit", 10, (("size", config.model_size),))
  pool = stages.model_pool(config)
  import gsm_optax

  mask = gsm_optax.resolve_pool(params, pool)
  paths = {
    gsm_optax.key_path_name(path)
    for path, flag in __import__("jax").tree_util.tree_flatten_with_path(mask)[0]
    if flag
  }
  assert paths and all(_pooled(path) for path in paths)
  assert "patch_embed/kernel" not in paths and "head/kernel" not in paths


@pytest.mark.slow  # two train.py processes: 8 forced CPU devices and 1
def test_eight_devices_give_the_one_device_run(corpus, tmp_path):
  results = {}
  for devices in (1, 8):
    workdir = str(tmp_path / f"d{devices}")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    command = [
      sys.executable,
      "train.py",
      "--config",
      "configs/austen_gpt.py",
      f"--workdir={workdir}",
      "--config.dataset=text",
      f"--config.data_dir={corpus}",
      "--config.model_size=nano",
      f"--config.context={CONTEXT}",
      f"--config.batch_size={BATCH}",
      f"--config.steps_per_epoch={STEPS}",
      "--config.dense.epochs=2",
      "--config.gsm.epochs=3",
      "--config.progress_bar=False",
      "--config.plots=False",
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(workdir, "summary.json")) as f:
      results[devices] = (json.load(f), _rows(workdir))
  (one, rows_one), (eight, rows_eight) = results[1], results[8]
  assert one["devices"]["num_devices"] == 1 and eight["devices"]["num_devices"] == 8
  assert eight["nonzeros"] == one["nonzeros"] == eight["keep"]
  for a, b in zip(rows_one, rows_eight):
    for key in ("train_loss", "test_loss"):
      assert a[key] == pytest.approx(b[key], rel=1e-4), (key, a["epoch"])
  assert eight["bits_per_byte_final"] == pytest.approx(one["bits_per_byte_final"], rel=1e-4)


def test_every_text_summary_field_is_documented(lm_run):
  with open(os.path.join(ROOT, "docs", "TRAINING.md")) as f:
    docs = f.read()
  summary = lm_run[1]
  fields = set(summary) | set(summary["method_results"]) | set(summary["samples"])
  for field in sorted(fields):
    assert f"`{field}`" in docs, field


def _updates_after_steps(tx, params, grads_seq):
  state = tx.init(params)
  for grads in grads_seq:
    updates, state = tx.update(grads, state, params)
    params = {k: params[k] + updates[k] for k in params}
  return params


@pytest.mark.parametrize("rule", ["decay", "shrink"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_gsm_phase_optimizer_is_the_library_preset_of_its_rule(rule, optimizer):
  import optax

  from configs import default
  import gsm_optax
  from training import stages
  from training import steps

  cfg = default.sgd_section(
    epochs=2, optimizer=optimizer, learning_rate=0.05, momentum=0.9, weight_decay=0.01
  )
  cfg.update(passive_rule=rule, passive_shrink=5.0)
  steps_per_epoch, compression = 3, 4.0
  tx, lr = stages.gsm_optimizer(cfg, steps_per_epoch, compression)
  if rule == "shrink":
    rate = gsm_optax.budget_shrink_rate(lr, 6, 5.0)
    expected = (
      gsm_optax.gsm_adamw(
        lr, compression, passive_shrink=rate, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8
      )
      if optimizer == "adamw"
      else gsm_optax.gsm_sgd_shrink(
        lr, compression, passive_shrink=rate, momentum=0.9, weight_decay=0.01
      )
    )
  elif optimizer == "adamw":
    expected = optax.chain(
      gsm_optax.mask_by_global_taylor(compression),
      optax.adamw(lr, weight_decay=0.01, mask=steps.pool_mask),
    )
  else:
    expected = gsm_optax.gsm(lr, compression, momentum=0.9, weight_decay=0.01)
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(6, 5)).astype(np.float32), "b": np.zeros(5, np.float32)}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}] * 4
  got, want = _updates_after_steps(tx, params, grads), _updates_after_steps(expected, params, grads)
  for key in params:
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))


def test_nm_gsm_with_adamw_runs_on_the_lm_and_conforms(lm_run, corpus, tmp_path):
  config = lm_config(corpus, "gsm_nm", dense_checkpoint=lm_run[0], gsm__passive_rule="decay")
  summary = train_lib.train_and_evaluate(config, str(tmp_path / "nm"))
  results = summary["method_results"]
  assert results["nm"] == "2:4" and results["nm_conforms"]
  assert results["nm_nonzeros"] == POOL_SIZE // 2  # every group of 4 keeps exactly 2 non-zeros
  assert summary["bits_per_byte_final"] < 5.0


def test_a_shrink_phase_is_built_for_its_own_epochs_with_any_schedule():
  from training import stages
  from training import steps

  graphdef = steps.init_model("lenet_300_100", 10, 0)[0]
  phases = [
    steps.make_phase(
      "gsm",
      stages.gsm_optimizer,
      austen_gpt.gsm_section(epochs=epochs, schedule="piecewise"),
      10,
      graphdef,
      10.0,
      None,
    )
    for epochs in (2, 8)
  ]
  assert phases[0] is not phases[1]  # the passive shrink's budget is the phase's epochs

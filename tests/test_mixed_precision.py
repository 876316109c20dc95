"""Mixed precision in the training program: ``config.compute_dtype = "bfloat16"``.

The forward and backward run in bfloat16; the params, the gradients handed to
the optimizer, its state and GSM's scores stay float32, so passive weights
still decay to the cut (in bfloat16 they would stall: docs/METHOD.md,
"Mixed precision").
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from test_train import KEEP  # noqa: E402
from test_train import _final_state  # noqa: E402
from test_train import data_dir  # noqa: E402, F401  (the fixture)
from test_train import tiny_config  # noqa: E402

from training import steps  # noqa: E402
from training import train_lib  # noqa: E402


def _decaying_config(data_dir, dtype):
  """The tiny GSM run with a fast passive decay: a weight passive for its 24 GSM steps
  shrinks by at most sqrt(momentum) = 0.71 per step (the trace's complex roots), to ~2e-4."""
  config = tiny_config(data_dir)
  config.compute_dtype = dtype
  config.gsm.momentum = 0.5
  config.gsm.nesterov = False
  config.gsm.weight_decay = 2.5  # lr 0.05 * 2.5 / (1 - 0.5) = 0.25 per step
  config.gsm.boundaries = ()
  return config


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
  """{dtype: (workdir, summary)} of the same run in float32 and in bfloat16 compute."""
  out = {}
  for dtype in ("float32", "bfloat16"):
    workdir = str(tmp_path_factory.mktemp(dtype) / "run")
    out[dtype] = workdir, train_lib.train_and_evaluate(_decaying_config(data_dir, dtype), workdir)
  return out


def _leaves(tree):
  return jax.tree.leaves(tree)


def test_bfloat16_compute_keeps_params_and_optimizer_state_in_float32(runs):
  state, _ = _final_state(runs["bfloat16"][0])
  for leaf in _leaves(state["params"]) + _leaves(state["opt_state"]):
    if np.issubdtype(np.asarray(leaf).dtype, np.floating):
      assert np.asarray(leaf).dtype == np.float32


def test_passive_weights_still_decay_to_the_cut_with_bfloat16_compute(runs):
  for dtype, (_, summary) in runs.items():
    results = summary["method_results"]
    # Passive weights start around the init's scale (~0.05) and shrink by ~0.71 per step.
    assert results["largest_passive_abs_weight_before_cut"] < 1e-3, dtype
    assert summary["nonzeros"] == summary["keep"] == KEEP, dtype
    assert abs(summary["accuracy_after_prune"] - summary["accuracy_before_prune"]) <= 0.01, dtype


def test_bfloat16_compute_really_computes_in_bfloat16(runs):
  """The two runs differ (the cast happens) but stay close (it is the same training)."""
  (_, f32), (_, bf16) = runs["float32"], runs["bfloat16"]
  assert f32["loss_final"] != bf16["loss_final"]
  assert bf16["loss_final"] == pytest.approx(f32["loss_final"], rel=0.1)


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_forward_casts_params_and_inputs_and_returns_float32_logits(dtype):
  graphdef, _, params, batch_stats = steps.init_model("resnet56", 10, 0)
  images = jnp.ones((2, 32, 32, 3), jnp.float32)
  logits, new_stats = steps.forward(graphdef, params, batch_stats, images, dtype)
  assert logits.dtype == jnp.float32
  assert jax.tree.map(lambda x: x.dtype, new_stats) == jax.tree.map(lambda x: x.dtype, batch_stats)
  grads = jax.grad(lambda p: steps.forward(graphdef, p, batch_stats, images, dtype)[0].sum())(
    params
  )
  assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
  reference, _ = steps.forward(graphdef, params, batch_stats, images, None)
  if dtype is None:
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(reference))
  else:  # bfloat16 has 8 bits of mantissa: close to the float32 logits, not equal
    assert not np.array_equal(np.asarray(logits), np.asarray(reference))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference), atol=0.1, rtol=0.1)


def test_compute_dtype_is_checked_before_anything_runs(data_dir, tmp_path):
  config = tiny_config(data_dir)
  config.compute_dtype = "float16"
  with pytest.raises(train_lib.ConfigError, match="config.compute_dtype must be 'float32' or"):
    train_lib.train_and_evaluate(config, str(tmp_path / "bad"))
  assert not os.path.exists(tmp_path / "bad")

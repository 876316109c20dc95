"""Gradual GSM (``gsm.ramp_epochs``): C rises from 1 along Zhu & Gupta's cubic, then stays C."""

import os
import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import default as default_config  # noqa: E402
import gsm_optax  # noqa: E402
from training import config as config_lib  # noqa: E402
from training import stages  # noqa: E402
from training import train_lib  # noqa: E402


def test_the_ramp_is_the_cubic_of_the_kept_fraction_and_exactly_c_from_its_end():
  schedule = stages.gsm_compression(60.0, 10)
  counts = np.arange(15)
  got = np.array([float(schedule(jnp.asarray(c, jnp.int32))) for c in counts])
  density = 1 / 60 + (1 - 1 / 60) * (1 - np.minimum(counts / 10, 1)) ** 3
  np.testing.assert_allclose(got[:10], 1 / density[:10], rtol=1e-6)
  assert got[0] == 1.0 and (got[10:] == 60.0).all()
  assert stages.gsm_compression(60.0, 0) == 60.0  # the paper's constant C, unchanged


def test_gradual_gsm_keeps_every_weight_at_first_and_q_after_the_ramp():
  cfg = default_config.get_config().gsm
  cfg.ramp_epochs = 2.0  # 4 steps at 2 steps per epoch
  tx, _ = stages.gsm_optimizer(cfg, 2, 10.0)
  rng = np.random.default_rng(0)
  params = {"fc": {"kernel": jnp.asarray(rng.standard_normal((20, 10)), jnp.float32)}}
  params["fc"]["bias"] = jnp.zeros(10)
  state = tx.init(params)
  keeps = []
  for _ in range(6):
    grads = {
      "fc": {
        k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in params["fc"].items()
      }
    }
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    keeps.append(int(gsm_optax.gsm_stats(state)["keep"]))
  assert keeps[0] == 200 and keeps[-2:] == [20, 20]
  assert all(a >= b for a, b in zip(keeps, keeps[1:]))


def test_a_ramp_longer_than_the_gsm_phase_is_refused():
  config = default_config.get_config()
  config.gsm.ramp_epochs = config.gsm.epochs + 1.0
  with pytest.raises(config_lib.ConfigError, match="gsm.ramp_epochs"):
    train_lib.validate_config(config)

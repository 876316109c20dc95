"""Byte-level GPT on Jane Austen's novels, pruned with GSM + AdamW to C = 10 (language modelling).

The task is next-byte prediction (``training/tasks/text.py``): random windows of
``context + 1`` bytes of the training split, an epoch is ``steps_per_epoch``
steps, and the metric is bits per byte on the test split (the 5 % before the
last 5 % of every novel; the last 5 % is the validation split). The pool is the
GPT's attention (query, key, value, out) and MLP kernels; embeddings,
positions, LayerNorms, biases and the output head stay dense. C = 10 keeps a
tenth of the pooled kernels.

Every optimizer section is AdamW with a linear warm-up and a cosine decay,
gradient clipping at norm 1 and weight decay 0.1 on the kernels. GSM with AdamW
(``gsm_optax.gsm_adamw``): the Q active weights take the AdamW step, the passive
ones shrink geometrically to exp(-gsm.passive_shrink) of their size over the GSM
epochs, so the final cut is free (docs/METHOD.md, "GSM with Adam").

``model_size``: "tiny" (2 layers, 128 wide; a few minutes on 2 CPU cores) or
"small" (6 layers, 384 wide, context 256: one accelerator). The corpus comes
from Debian's r-cran-janeaustenr (fetched with ``apt-get download`` into a
cache when missing), or ``--config.data_dir`` naming a UTF-8 ``.txt`` file.
"""

import ml_collections

from configs import default


def adamw_section(**fields) -> ml_collections.ConfigDict:
  """An AdamW section: warm-up + cosine, clipping at 1, weight decay 0.1 on the kernels."""
  section = default.sgd_section(
    optimizer="adamw",
    learning_rate=2e-3,
    b1=0.9,
    b2=0.99,
    weight_decay=0.1,
    schedule="cosine",
    warmup_epochs=0.5,
    clip_norm=1.0,
  )
  section.update(fields)
  return section


def gsm_section(**fields) -> ml_collections.ConfigDict:
  """The GSM section with AdamW: passive weights shrink to exp(-10) over its epochs."""
  section = adamw_section(**fields)
  section.update(
    ramp_epochs=0.0,
    score_ema=0.0,
    passive_decay_growth=0.0,
    passive_decay_horizon_epochs=1.0,
    finetune=False,
    passive_rule="shrink",
    passive_shrink=10.0,
  )
  return section


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = "gpt"
  config.model_size = "tiny"
  config.dataset = "austen"
  config.context = 64  # bytes a prediction sees (the model's learned positions)
  config.steps_per_epoch = 100  # an "epoch" of random windows
  config.batch_size = 32
  config.eval_batch_size = 256  # windows per evaluation batch
  config.sample_prompt = "It is a truth universally acknowledged"
  config.sample_bytes = 120  # greedy continuation printed for the dense and the final model

  config.compression = 10.0
  config.dense = adamw_section(epochs=8)
  config.gsm = gsm_section(epochs=8, learning_rate=1e-3, warmup_epochs=0.0)
  # Baselines with the same budget after the dense model: gmp + finetune = gsm epochs.
  config.finetune = adamw_section(epochs=4, learning_rate=1e-3, warmup_epochs=0.0)
  config.gmp = adamw_section(epochs=4, learning_rate=1e-3, warmup_epochs=0.0)
  config.gmp.update(update_every_steps=10, initial_sparsity=0.0, layerwise=False)
  config.admm = adamw_section(epochs=4, learning_rate=1e-3, warmup_epochs=0.0)
  config.admm.update(
    steps_per_iteration=100, rho=3e-3, rho_growth=1.3, densities_from=None, densities=None
  )
  config.log_every_steps = 50
  return config

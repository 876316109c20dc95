"""Default config: LeNet-300-100 on Fashion-MNIST, GSM to C = 60, ~4 minutes on 2 CPU cores.

The schedule is shorter than the reference one (200 dense + 280 GSM epochs) and
GSM uses a larger learning rate held for longer: a passive weight shrinks by
about (1 - lr * wd / (1 - momentum)) per step, and with lr 1e-2 stepped down at
60% of a 60-epoch GSM phase the passive weights stay large enough for the final
cut to cost several points; at lr 3e-2 held to 80% they reach ~0 and the cut is
lossless.

The other configs start from this one and set the reference hyperparameters of
one row of the paper's tables (docs/METHOD.md). Every field is documented in
docs/TRAINING.md; in short:

  model, dataset: names from ``models.MODELS`` and ``training.data.DATASETS``.
  data_dir, download, max_train_examples, max_test_examples: where the data
    come from and how much of it (None: all).
  validation_examples: training examples held out (a fixed draw, the same for
    every seed) and evaluated as a validation set; 0: none.
  seed, batch_size, eval_batch_size.
  compute_dtype: "float32" or "bfloat16" (mixed precision: the forward and
    backward in bfloat16, the params, gradients, optimizer state and GSM's
    scores in float32).
  method: "gsm", "dense", "magnitude", "gmp", "admm", "lottery",
    "gsm_channels", "filter_l1", "gsm_nm" or "magnitude_nm"
    (``training/stages.py``); compression: C, the target of every method
    (keep int(|pool| / C) weights; for gsm_channels and filter_l1 C counts
    output channels: keep int(#pooled channels / C) channels; the N:M methods
    ignore it).
  dense, gsm, finetune, gmp, admm: optimizer sections (``sgd_section``):
    epochs, learning rate x ``decay_factor`` at each of ``boundaries`` (epochs),
    ``warmup_epochs`` of linear warm-up, momentum, Nesterov, weight decay on
    the kernels only; ``optimizer="adamw"`` (b1, b2, eps, decoupled weight
    decay) instead of momentum SGD, ``schedule="cosine"`` (warm-up, then cosine
    to 0 at the section's end) instead of the piecewise-constant rate,
    ``clip_norm`` > 0 clips the gradient's global norm; gmp and admm add their
    own fields. gsm.passive_rule: "decay" (the paper's rule: passive weights
    decay through weight decay only; with AdamW, GSM's mask in front of AdamW)
    or "shrink" (passive weights take no optimizer step and shrink to
    exp(-gsm.passive_shrink) of their size over the GSM epochs:
    ``gsm_optax.gsm_sgd_shrink`` / ``gsm_optax.gsm_adamw``, docs/METHOD.md);
    both rules for gsm, gsm_channels and gsm_nm (``gsm_optax.gsm_nm_adamw``,
    ``gsm_channels_sgd_shrink``, ...).
  pool.include, pool.exclude: the pool as regular expressions over parameter
    key paths (``gsm_optax.path_pool``); empty: the model's default (every
    kernel; for the transformers their attention and MLP kernels).
  magnitude, lottery: the fields of those methods.
  channels.axis: the output-channel axis of every pooled kernel (-1: the
    ``out`` features of Linear and Conv kernels) for gsm_channels and
    filter_l1. channels.layers: the pooled layers, top-level names separated
    by commas ("conv2,fc1"); "" pools every kernel but the classifier's (its
    output channels are the classes). One global ranking of channels over the
    pool, by the SUM over a channel of |g * w| (GSM) or |w| (the cut,
    filter_l1) with channels.score="sum": a channel with a larger fan-in sums
    more weights and tends to rank higher (on LeNet-5, every conv1 channel goes
    first; docs/RESULTS.md); channels.score="mean" divides by the channel's
    number of weights. channels.groups (gpt and vit only): "" per-leaf
    channels as above; "neurons": a channel is an MLP hidden neuron (fc1
    column + fc2 row); "heads": an attention head (its query/key/value columns
    + out rows); ranked over every block, C counts them (C = 2: half).
  nm.n, nm.m, nm.axis: N:M sparsity for gsm_nm and magnitude_nm: N non-zeros
    in every group of M consecutive weights along ``axis`` (-2: the input
    features of Linear and Conv kernels); M must divide that axis of every
    pooled kernel. nm.layers: the pooled layers ("" every kernel; LeNet-5's
    conv1 has one input channel: "conv2,fc1,fc2").
  dense_checkpoint: load this dense model (a run's ``dense_model/`` or its
    workdir) instead of training one; skip_dense: start from the random init.
  mesh.fsdp: devices that split the params and optimizer state (1: replicated).
  log_every_steps, checkpoint_keep, checkpoint_every_steps, progress_bar, plots:
    logging and outputs.

data_dir, download, eval_batch_size, log_every_steps, checkpoint_keep,
checkpoint_every_steps, progress_bar, plots and mesh.fsdp may change when a run is resumed; every other field must
stay as it was (``training.config.HARMLESS_FIELDS``).
"""

import ml_collections
from ml_collections import config_dict


def sgd_section(**fields) -> ml_collections.ConfigDict:
  """An SGD section: momentum SGD, piecewise-constant learning rate, pool weight decay."""
  section = ml_collections.ConfigDict(
    dict(
      epochs=30,
      learning_rate=3e-2,
      momentum=0.9,
      nesterov=False,
      weight_decay=5e-4,
      boundaries=(),
      decay_factor=0.1,
      warmup_epochs=0.0,
      optimizer="sgd",  # or "adamw"
      b1=0.9,  # AdamW's moment decays and epsilon
      b2=0.999,
      eps=1e-8,
      schedule="piecewise",  # or "cosine"
      clip_norm=0.0,  # global-norm gradient clipping (0: off)
    )
  )
  section.update(fields)
  return section


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = "lenet_300_100"
  config.dataset = "fashion_mnist"
  config.data_dir = config_dict.placeholder(str)
  config.download = False
  config.max_train_examples = config_dict.placeholder(int)
  config.max_test_examples = config_dict.placeholder(int)
  config.validation_examples = 0  # training examples held out for validation (0: none)
  config.seed = 0
  config.batch_size = 256
  config.eval_batch_size = 1000
  # "bfloat16": the forward and backward in bfloat16; params, gradients, optimizer state
  # and GSM's scores stay float32 (docs/METHOD.md, "Mixed precision").
  config.compute_dtype = "float32"

  config.method = "gsm"
  config.compression = 60.0

  config.dense = sgd_section(epochs=30, boundaries=(15, 23), warmup_epochs=2.0)
  config.gsm = sgd_section(epochs=60, momentum=0.99, nesterov=True, boundaries=(48,))
  config.gsm.ramp_epochs = 0.0  # gradual GSM: C ramps from 1 over these epochs (0: constant C)
  # Opt-in variants beyond the paper (docs/METHOD.md, section 5); the defaults are the paper's.
  config.gsm.score_ema = 0.0  # B from an EMA of |g * w| with this decay (0: |g * w|)
  config.gsm.passive_decay_growth = 0.0  # extra decay of long-passive weights (0: none)
  config.gsm.passive_decay_horizon_epochs = 1.0  # ... reached after this long passive
  config.gsm.finetune = False  # masked fine-tuning (the finetune section) after the cut
  # Passive weights: "decay" (the paper: weight decay only) or "shrink" (no optimizer step,
  # w <- (1 - r_t) w, ending at exp(-passive_shrink) of their size; docs/METHOD.md section 9),
  # for gsm and the structured gsm_channels (channels, neurons, heads) and gsm_nm alike.
  config.gsm.passive_rule = "decay"
  config.gsm.passive_shrink = 10.0

  # Baselines: SGD like the dense phase, masked where pruned.
  config.finetune = sgd_section(epochs=60, boundaries=(48,))
  config.magnitude = ml_collections.ConfigDict(dict(layerwise=False, rounds=1))
  config.gmp = sgd_section(epochs=30)
  config.gmp.update_every_steps = 50
  config.gmp.initial_sparsity = 0.0
  config.gmp.layerwise = False
  config.admm = sgd_section(epochs=30)
  config.admm.steps_per_iteration = 234  # one epoch of Fashion-MNIST at batch 256
  config.admm.rho = 3e-3
  config.admm.rho_growth = 1.3
  config.admm.densities_from = config_dict.placeholder(str)
  config.admm.densities = config_dict.placeholder(tuple)
  config.lottery = ml_collections.ConfigDict()
  config.lottery.ticket = "magnitude"
  config.lottery.gsm_checkpoint = config_dict.placeholder(str)

  # Structured methods (gsm_channels, filter_l1: C counts output channels; gsm_nm, magnitude_nm).
  # channels.layers / nm.layers: "" (every kernel; channels: but the classifier's) or "conv2,fc1".
  # channels.groups: "" (per-leaf channels), or for gpt / vit "neurons" (MLP) or "heads".
  config.channels = ml_collections.ConfigDict(dict(axis=-1, score="sum", layers="", groups=""))
  config.nm = ml_collections.ConfigDict(dict(n=2, m=4, axis=-2, layers=""))  # N of every M

  # Devices: the batch is split over all of them; fsdp > 1 also splits the params and
  # the optimizer state over that many devices (docs/TRAINING.md, "Devices and hosts").
  config.mesh = ml_collections.ConfigDict(dict(fsdp=1))

  # The pool: regexes over key paths ("blocks/0/attn/query/kernel"); empty: the model's default.
  config.pool = ml_collections.ConfigDict(dict(include=(), exclude=()))

  config.dense_checkpoint = config_dict.placeholder(str)
  config.skip_dense = False

  config.log_every_steps = 50
  config.checkpoint_keep = 3
  config.checkpoint_every_steps = 0  # also checkpoint every N steps inside an epoch (0: off)
  config.progress_bar = True
  config.plots = True
  return config

"""Default config: LeNet-300-100 on Fashion-MNIST, compression 60, ~5 minutes on 2 CPU cores.

The schedule is shorter than the reference one (200 dense + 280 GSM epochs) and
GSM uses a larger learning rate held for longer: a passive weight shrinks by about
(1 - lr * wd / (1 - momentum)) per step, and with lr 1e-2 stepped down at 60% of a
60-epoch GSM phase the passive weights stay large enough for the final cut to cost
several points; at lr 3e-2 held to 80% they reach ~0 and the cut is lossless.

The other configs start from this one and set the reference hyperparameters of
one row of the paper's tables (see PAPER.md).

Fields:
  model, dataset: names from ``models.MODELS`` and ``training.data.DATASETS``.
  data_dir: a directory of MNIST-format IDX files, or a TFDS data_dir (None:
    Debian's Fashion-MNIST, then TFDS's default directory).
  download: let TFDS download and prepare a missing dataset (needs internet).
  max_train_examples, max_test_examples: cut the splits, for smoke runs (None: all).
  seed: model init and data order.
  batch_size, eval_batch_size: examples per training step / per test batch.
  dense.*: SGD with momentum; weight decay on the pool (kernels) only;
    ``boundaries`` in epochs where the learning rate is multiplied by
    ``decay_factor``; ``warmup_epochs`` of linear warm-up.
  gsm.*: GSM from the dense model; ``compression`` is C (keep int(|pool| / C)
    weights); its ``boundaries``/``decay_factor`` as for dense.
  dense_checkpoint: load this dense model (a run's ``dense_model/`` directory or
    its workdir) instead of training one.
  skip_dense: start GSM from the random init. skip_gsm: cut the dense model
    directly (global magnitude pruning without GSM).
  method: "gsm" (default), or a baseline from the dense model (``training/methods.py``):
    "magnitude" (one-shot cut + ``finetune``; ``magnitude.layerwise``,
    ``magnitude.rounds`` for iterative pruning), "gmp" (``gmp.epochs`` of gradual
    magnitude pruning, cubic schedule, mask updated every ``gmp.update_every_steps``,
    then ``finetune``), "admm" (``admm.epochs`` of W-steps, Z/U every
    ``admm.steps_per_iteration`` steps, rho * rho_growth^k; per-layer targets from
    ``admm.densities_from`` (a GSM run's summary.json or workdir), or
    ``admm.densities``, or else the global magnitude cut's; then hard prune +
    ``finetune``), "lottery" (``lottery.ticket`` "magnitude" or "gsm"; theta_0 *
    mask retrained with the dense schedule; ``lottery.gsm_checkpoint`` reuses a
    GSM run instead of a GSM stage). Every method prunes to ``gsm.compression``.
  finetune.*, gmp.*, admm.*: SGD hyperparameters of those stages, as for dense.
  log_every_steps: progress bar refresh of loss/accuracy/GSM stats.
  checkpoint_keep: how many checkpoints the workdir keeps.
  progress_bar: show the per-epoch tqdm bar.
  plots: write sparsity.png and curves.png into the workdir.

data_dir, download, eval_batch_size, log_every_steps, checkpoint_keep,
progress_bar and plots may change when a run is resumed; every other field must stay as it
was (``training.train_lib.HARMLESS_FIELDS``).
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = "lenet_300_100"
  config.dataset = "fashion_mnist"
  config.data_dir = config_dict.placeholder(str)
  config.download = False
  config.max_train_examples = config_dict.placeholder(int)
  config.max_test_examples = config_dict.placeholder(int)
  config.seed = 0
  config.batch_size = 256
  config.eval_batch_size = 1000

  config.dense = ml_collections.ConfigDict()
  config.dense.epochs = 30
  config.dense.learning_rate = 3e-2
  config.dense.momentum = 0.9
  config.dense.nesterov = False
  config.dense.weight_decay = 5e-4
  config.dense.boundaries = (15, 23)
  config.dense.decay_factor = 0.1
  config.dense.warmup_epochs = 2.0

  config.gsm = ml_collections.ConfigDict()
  config.gsm.epochs = 60
  config.gsm.learning_rate = 3e-2
  config.gsm.momentum = 0.99
  config.gsm.nesterov = True
  config.gsm.weight_decay = 5e-4
  config.gsm.boundaries = (48,)
  config.gsm.decay_factor = 0.1
  config.gsm.compression = 60.0

  config.method = "gsm"

  # Baselines (config.method != "gsm"): SGD like the dense phase, masked where pruned.
  config.finetune = ml_collections.ConfigDict()
  config.finetune.epochs = 60
  config.finetune.learning_rate = 3e-2
  config.finetune.momentum = 0.9
  config.finetune.nesterov = False
  config.finetune.weight_decay = 5e-4
  config.finetune.boundaries = (48,)
  config.finetune.decay_factor = 0.1

  config.magnitude = ml_collections.ConfigDict()
  config.magnitude.layerwise = False
  config.magnitude.rounds = 1

  config.gmp = ml_collections.ConfigDict()
  config.gmp.epochs = 30
  config.gmp.learning_rate = 3e-2
  config.gmp.momentum = 0.9
  config.gmp.nesterov = False
  config.gmp.weight_decay = 5e-4
  config.gmp.boundaries = ()
  config.gmp.decay_factor = 0.1
  config.gmp.update_every_steps = 50
  config.gmp.initial_sparsity = 0.0
  config.gmp.layerwise = False

  config.admm = ml_collections.ConfigDict()
  config.admm.epochs = 30
  config.admm.learning_rate = 3e-2
  config.admm.momentum = 0.9
  config.admm.nesterov = False
  config.admm.weight_decay = 5e-4
  config.admm.boundaries = ()
  config.admm.decay_factor = 0.1
  config.admm.steps_per_iteration = 234  # one epoch of Fashion-MNIST at batch 256
  config.admm.rho = 3e-3
  config.admm.rho_growth = 1.3
  config.admm.densities_from = config_dict.placeholder(str)
  config.admm.densities = config_dict.placeholder(tuple)

  config.lottery = ml_collections.ConfigDict()
  config.lottery.ticket = "magnitude"
  config.lottery.gsm_checkpoint = config_dict.placeholder(str)

  config.dense_checkpoint = config_dict.placeholder(str)
  config.skip_dense = False
  config.skip_gsm = False

  config.log_every_steps = 50
  config.checkpoint_keep = 3
  config.progress_bar = True
  config.plots = True
  return config

"""ResNet-50 on ImageNet (ILSVRC 2012), C = 5: the paper's ImageNet row.

docs/METHOD.md (from the paper) gives no ResNet-50 hyperparameters, so these are standard ImageNet ones,
our choice rather than the reference code's. Dense: the usual 90-epoch recipe (SGD
momentum 0.9, lr 0.1 at batch 256, x0.1 at 30/60/80, wd 1e-4, 5 warm-up epochs);
to start from a pretrained model instead pass ``--config.dense_checkpoint=DIR``.
GSM: momentum 0.98 and wd 1e-4 as in the CIFAR runs, lr 1e-2 held for 30 of 40
epochs; a passive weight then shrinks by ~(1 - 5e-5) per step, ~150k steps before
the first decay. Published: 75.72 -> 74.30 top-1 at 5x.
ImageNet must be prepared by TFDS first (see training/data.py).
"""

import ml_collections

from configs import default as default_lib


def get_config() -> ml_collections.ConfigDict:
  config = default_lib.get_config()
  config.model = "resnet50"
  config.dataset = "imagenet2012"
  config.batch_size = 256
  config.eval_batch_size = 250
  config.log_every_steps = 100

  config.dense.epochs = 90
  config.dense.learning_rate = 0.1
  config.dense.momentum = 0.9
  config.dense.nesterov = False
  config.dense.weight_decay = 1e-4
  config.dense.boundaries = (30, 60, 80)
  config.dense.decay_factor = 0.1
  config.dense.warmup_epochs = 5.0

  config.gsm.epochs = 40
  config.gsm.learning_rate = 1e-2
  config.gsm.momentum = 0.98
  config.gsm.nesterov = True
  config.gsm.weight_decay = 1e-4
  config.gsm.boundaries = (30,)
  config.gsm.decay_factor = 0.1
  config.compression = 5.0
  return config

"""ResNet-50 on ImageNet (ILSVRC 2012), C = 5: the paper's ImageNet row.

The paper (docs/METHOD.md) gives no ResNet-50 hyperparameters; these are standard ImageNet ones,
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

  config.dense = default_lib.sgd_section(
    epochs=90,
    learning_rate=0.1,
    momentum=0.9,
    nesterov=False,
    weight_decay=1e-4,
    boundaries=(30, 60, 80),
    decay_factor=0.1,
    warmup_epochs=5.0,
  )

  config.gsm = default_lib.sgd_section(
    epochs=40,
    learning_rate=1e-2,
    momentum=0.98,
    nesterov=True,
    weight_decay=1e-4,
    boundaries=(30,),
    decay_factor=0.1,
  )
  config.compression = 5.0
  return config

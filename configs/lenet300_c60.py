"""LeNet-300-100, C = 60: the paper's MNIST row, with the reference hyperparameters.

Dense: SGD momentum 0.9, lr 3e-2, 200 epochs, x0.1 at 40/80/120/160, wd 5e-4,
batch 256, 5 warm-up epochs. GSM: momentum 0.99, Nesterov, lr 1e-2, 280 epochs,
x0.1 at 160/200/240, wd 5e-4. Published: 98.19 -> 98.18 at 60x (4.4K weights).

MNIST cannot be downloaded on machines without internet; pass
``--config.data_dir=DIR`` (MNIST IDX files) or ``--config.dataset=fashion_mnist``.
"""

import ml_collections

from configs import default as default_lib


def get_config() -> ml_collections.ConfigDict:
  config = default_lib.get_config()
  config.model = "lenet_300_100"
  config.dataset = "mnist"
  config.batch_size = 256

  config.dense = default_lib.sgd_section(
    epochs=200,
    learning_rate=3e-2,
    momentum=0.9,
    nesterov=False,
    weight_decay=5e-4,
    boundaries=(40, 80, 120, 160),
    decay_factor=0.1,
    warmup_epochs=5.0,
  )

  config.gsm = default_lib.sgd_section(
    epochs=280,
    learning_rate=1e-2,
    momentum=0.99,
    nesterov=True,
    weight_decay=5e-4,
    boundaries=(160, 200, 240),
    decay_factor=0.1,
  )
  config.compression = 60.0
  return config

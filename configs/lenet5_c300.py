"""LeNet-5 (Caffe variant), C = 300: the paper's MNIST row, reference hyperparameters.

Same schedules as ``lenet300_c60``. Published: 99.21 -> 99.06 at 300x (1.4K weights).
For MNIST pass ``--config.data_dir=DIR`` (IDX files) or use
``--config.dataset=fashion_mnist``.
"""

import ml_collections

from configs import lenet300_c60


def get_config() -> ml_collections.ConfigDict:
  config = lenet300_c60.get_config()
  config.model = "lenet5"
  config.compression = 300.0
  return config

"""Issue 23's ViT evidence runs: the tiny ViT on Fashion-MNIST, the base of every ViT cell.

``benchmarks/evidence.py --model vit_fashion`` starts from this config and sets
per cell the method, C, the post-dense epochs, the seed and the learning rate
chosen by its sweep. What differs from ``configs/vit_fashion.py``:

* ``validation_examples = 5000``: a fixed, seed-free part of the 60,000
  training images is held out (the dense model never sees it either); the
  learning-rate sweep is selected on it, never on the test set.
* No per-run plots, one checkpoint kept, no progress bar (unattended runs).
"""

import ml_collections

from configs import vit_fashion


def get_config() -> ml_collections.ConfigDict:
  config = vit_fashion.get_config()
  config.validation_examples = 5000
  config.progress_bar = False
  config.plots = False
  config.checkpoint_keep = 1
  config.log_every_steps = 100
  return config

"""Issue 23's evidence runs: the byte-level GPT on Jane Austen, the base of every LM cell.

``benchmarks/evidence.py --model gpt_austen`` starts from this config and sets
per cell the method, C, the post-dense epochs, the seed and the learning rate
chosen by its sweep. What differs from ``configs/austen_gpt.py``:

* The validation split (the last 5 % of every novel, never trained on or
  tested on) selects the learning rates; the test split is the 5 % before it.
* No per-run plots, one checkpoint kept, no progress bar (unattended runs).

Every optimizer section is AdamW (warm-up + cosine, clipping at 1, weight
decay 0.1 on the kernels) unless a cell sets ``optimizer="sgd"``.
"""

import ml_collections

from configs import austen_gpt


def get_config() -> ml_collections.ConfigDict:
  config = austen_gpt.get_config()
  config.progress_bar = False
  config.plots = False
  config.checkpoint_keep = 1
  config.log_every_steps = 100
  return config

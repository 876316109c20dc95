"""Issue 13's LeNet-5 evidence runs: the LeNet-300-100 evidence config with the Caffe LeNet-5.

``benchmarks/evidence.py --model lenet5`` starts from this config. Everything
else (the 5,000-example validation split, the 5-epoch GSM warm-up, unattended
outputs) is ``configs/evidence_lenet300.py``'s. The reference code's final cut
keeps exactly our Q at 125x and 300x (3,444 and 1,435 of 430,500 weights).
"""

import ml_collections

from configs import evidence_lenet300


def get_config() -> ml_collections.ConfigDict:
  config = evidence_lenet300.get_config()
  config.model = "lenet5"
  return config

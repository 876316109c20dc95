#!/usr/bin/env bash
# The main job: install everything, then train LeNet-300-100 on Fashion-MNIST
# with GSM to a 60x global compression (configs/default.py), cut, evaluate.
# Extra arguments go to train.py, e.g. --workdir runs/other --config.seed=1.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" train
python train.py --workdir runs/default "$@"

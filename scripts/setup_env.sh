#!/usr/bin/env bash
# Shared setup for scripts/main.sh and scripts/test.sh:
#   * a virtual environment in .venv (unless one is already active),
#   * gsm_optax installed in editable mode with the given extras,
#   * Debian's Fashion-MNIST (dataset-fashion-mnist) where apt is available.
# Usage: source scripts/setup_env.sh EXTRAS   (EXTRAS: train, test, or bench: train +
# PyTorch for benchmarks/bench_torch.py; `bash scripts/setup_env.sh bench` installs it)
set -euo pipefail
extras="${1:-train}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".[${extras}]"

fmnist_dir=/usr/share/datasets/fashion-mnist
if [[ ! -f "$fmnist_dir/train-images-idx3-ubyte.gz" ]] && command -v apt-get >/dev/null 2>&1; then
  sudo_cmd=""
  if [[ "$(id -u)" != 0 ]] && command -v sudo >/dev/null 2>&1; then sudo_cmd="sudo"; fi
  echo "Installing Debian's dataset-fashion-mnist into $fmnist_dir ..."
  if ! { $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq dataset-fashion-mnist; } >/dev/null; then
    echo "warning: could not install dataset-fashion-mnist; train.py will try TFDS instead." >&2
  fi
fi

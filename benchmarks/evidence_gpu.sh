#!/usr/bin/env bash
# Issue 13's accelerator runs, many cells at a time on one GPU machine:
#   LeNet-5 at 125x and 300x (every method, the GSM variants and the tickets), and
#   LeNet-300-100's GSM variants against gsm, gsm_gradual and GMP at 60x and 120x.
# Both take the learning rates of the LeNet-300-100 sweep (benchmarks/results/evidence_lr.json).
# Usage: bash benchmarks/evidence_gpu.sh OUT_DIR [DATA_DIR] [DEADLINE_S]
# DEADLINE_S: no cell starts after it (the cells running then finish), so a time-limited
# machine returns every finished cell. Rerunning with the same workdirs resumes.
set -u
out=$1
data=${2:-}
deadline=${3:-100000}
runs=${EVIDENCE_RUNS:-/tmp/evidence_gpu_runs}
mkdir -p "$out"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
machine="Run on ${gpu:-no GPU}, $(nproc) CPU cores, several cells at a time."
common=(--rates_from benchmarks/results/evidence_lr.json --out "$out" --deadline "$deadline"
  --machine "$machine" --workdir_root "$runs")
[[ -n "$data" ]] && common+=(--data_dir "$data")
python3 benchmarks/evidence.py --model lenet5 --tag evidence_lenet5 --jobs 8 "${common[@]}" \
  > "$out/evidence_lenet5.log" 2>&1 &
python3 benchmarks/evidence.py --model lenet_300_100 --tag evidence_variants --stage grid \
  --only "method=gsm|gsm_gradual|gmp|gsm_ema|gsm_age|gsm_ft,compression=60|120,budget=60" \
  --jobs 5 "${common[@]}" > "$out/evidence_variants.log" 2>&1 &
wait

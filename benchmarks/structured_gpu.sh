#!/usr/bin/env bash
# Issue 14's structured grids and issue 13's LeNet-5 winning tickets, on one accelerator machine:
#   LeNet-5: channel GSM vs L1 filter pruning at 2x and 4x fewer MACs, 2:4 GSM vs magnitude 2:4;
#   LeNet-300-100: 2:4 GSM vs magnitude 2:4;
#   LeNet-5 tickets at 125x and 300x (the gsm cells they start from, then the tickets).
# Every grid takes the learning rates of the LeNet-300-100 sweep (benchmarks/results/evidence_lr.json).
# Usage: bash benchmarks/structured_gpu.sh OUT_DIR [DATA_DIR] [DEADLINE_S]
# DEADLINE_S: no cell starts after it; rerunning with the same workdirs resumes.
set -u
out=$1
data=${2:-}
deadline=${3:-100000}
runs=${EVIDENCE_RUNS:-/tmp/structured_gpu_runs}
mkdir -p "$out"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
machine="Run on ${gpu:-no GPU}, $(nproc) CPU cores, several cells at a time."
common=(--rates_from benchmarks/results/evidence_lr.json --out "$out" --deadline "$deadline"
  --machine "$machine")
[[ -n "$data" ]] && common+=(--data_dir "$data")
python3 benchmarks/evidence.py --model lenet5 --grid structured --tag structured_lenet5 --jobs 8 \
  --workdir_root "$runs/structured" "${common[@]}" > "$out/structured_lenet5.log" 2>&1 &
python3 benchmarks/evidence.py --model lenet_300_100 --grid structured --tag structured_lenet300 \
  --jobs 3 --workdir_root "$runs/structured" "${common[@]}" > "$out/structured_lenet300.log" 2>&1 &
python3 benchmarks/evidence.py --model lenet5 --tag evidence_lenet5_tickets --jobs 5 \
  --only "method=gsm|ticket_gsm|ticket_magnitude,budget=60|30" --workdir_root "$runs/tickets" \
  "${common[@]}" > "$out/evidence_lenet5_tickets.log" 2>&1 &
wait

#!/usr/bin/env bash
# The accelerator runs of issues 13 and 14, many cells at a time on one GPU machine.
#   PART=evidence (issue 13): LeNet-5 at 125x and 300x (every method, the GSM variants and the
#     tickets), and LeNet-300-100's GSM variants against gsm, gsm_gradual and GMP at 60x and 120x.
#   PART=structured (issue 14, and issue 13's LeNet-5 tickets on new dense models): LeNet-5
#     channel GSM vs L1 filter pruning at 2x and 4x fewer MACs and 2:4 GSM vs magnitude 2:4;
#     LeNet-300-100 2:4 GSM vs magnitude 2:4; the LeNet-5 tickets at 125x and 300x.
# Every grid takes the learning rates of the LeNet-300-100 sweep (benchmarks/results/evidence_lr.json).
# Usage: bash benchmarks/evidence_gpu.sh OUT_DIR [DATA_DIR] [DEADLINE_S] [PART]
# DEADLINE_S: no cell starts after it (the cells running then finish), so a time-limited
# machine returns every finished cell. Rerunning with the same workdirs resumes.
set -u
out=$1
data=${2:-}
deadline=${3:-100000}
part=${4:-evidence}
runs=${EVIDENCE_RUNS:-/tmp/evidence_gpu_runs}
mkdir -p "$out"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
machine="Run on ${gpu:-no GPU}, $(nproc) CPU cores, several cells at a time."
common=(--rates_from benchmarks/results/evidence_lr.json --out "$out" --deadline "$deadline"
  --machine "$machine")
[[ -n "$data" ]] && common+=(--data_dir "$data")
runner() {  # runner LOG_NAME ARGS...: one benchmarks/evidence.py in the background
  local log=$1
  shift
  python3 benchmarks/evidence.py "$@" "${common[@]}" > "$out/$log.log" 2>&1 &
}
case $part in
  evidence)
    runner evidence_lenet5 --model lenet5 --tag evidence_lenet5 --jobs 8 --workdir_root "$runs"
    runner evidence_variants --model lenet_300_100 --tag evidence_variants --stage grid \
      --only "method=gsm|gsm_gradual|gmp|gsm_ema|gsm_age|gsm_ft,compression=60|120,budget=60" \
      --jobs 5 --workdir_root "$runs"
    ;;
  structured)
    runner structured_lenet5 --model lenet5 --grid structured --tag structured_lenet5 --jobs 8 \
      --workdir_root "$runs/structured"
    runner structured_lenet300 --model lenet_300_100 --grid structured \
      --tag structured_lenet300 --jobs 3 --workdir_root "$runs/structured"
    runner evidence_lenet5_tickets --model lenet5 --tag evidence_lenet5_tickets --jobs 5 \
      --only "method=gsm|ticket_gsm|ticket_magnitude,budget=60|30" --workdir_root "$runs/tickets"
    ;;
  *)
    echo "PART must be evidence or structured, got $part" >&2
    exit 2
    ;;
esac
wait

#!/usr/bin/env bash
# The thesis's benchmark protocol on a CUDA GPU (thesis §6.6): every method on the MNIST deep autoencoder,
# minibatch 200, 3×10^5 updates, statistics/inverses every 100 updates for ACP/K-FAC/NNN (their defaults),
# all methods in one command, as concurrent processes on one GPU, under one wall-clock cap.
#
# Every run writes OUT/<run>.jsonl as it goes (one record per evaluation) and a checkpoint under
# OUT/checkpoints/, so a cap or a kill leaves partial results, and running the same command again resumes.
#
# Usage:   OUT=/path/to/results scripts/run_gpu_benchmark.sh
# Settings (environment variables, defaults in brackets):
#   OUT          output folder (required)
#   UPDATES      updates per method [300000]
#   CAP_SECONDS  wall-clock cap for the whole command, evaluations included [3000]
#   PARALLEL     runs at once on the GPU [number of methods]; 1 gives uncontended timings
#   METHODS      space-separated method names [the eleven methods of the CPU race's first group]
#   TUNED        tuned-hyperparameters JSON {autoencoder: {method: {...}}} [data/results/tuned_gpu.json, else the CPU
#                race's data/results/race_cpu/tuned.json, else data/results/tuned_cpu.json, if present]
#   DEVICE       [cuda]   TASK [autoencoder]   EVAL_EVERY [1000]   PYTHON [python]
#   SEED         [1]: the seed of the CPU race's first final run, so that the GPU's curve per update can be laid
#                over the CPU's (same initialization, same minibatches)
#   EXTRA        extra arguments for every run, e.g. "--sample --train-eval-size 500" for a dry run
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the output folder}"
UPDATES=${UPDATES:-300000}
CAP_SECONDS=${CAP_SECONDS:-3000}
METHODS=${METHODS:-"sgd sgd_momentum adam centered_gd mean_only_batchnorm batchnorm acp acp_fixed_alpha kfac kfac_thesis natural_nn_implicit"}
read -r -a METHOD_LIST <<< "$METHODS"
PARALLEL=${PARALLEL:-${#METHOD_LIST[@]}}
DEVICE=${DEVICE:-cuda}
TASK=${TASK:-autoencoder}
SEED=${SEED:-1}
EVAL_EVERY=${EVAL_EVERY:-1000}
PYTHON=${PYTHON:-python}
EXTRA=${EXTRA:-}
if [ -z "${TUNED:-}" ] && [ -f data/results/tuned_gpu.json ]; then TUNED=data/results/tuned_gpu.json; fi
# otherwise the hyperparameters the CPU race tuned (biased random search, see data/results/README.md)
if [ -z "${TUNED:-}" ] && [ -f data/results/race_cpu/tuned.json ]; then TUNED=data/results/race_cpu/tuned.json; fi
if [ -z "${TUNED:-}" ] && [ -f data/results/tuned_cpu.json ]; then TUNED=data/results/tuned_cpu.json; fi
mkdir -p "$OUT/logs"
DEADLINE=$(( $(date +%s) + CAP_SECONDS ))

{
  echo "started $(date -Iseconds) on $(hostname); cap ${CAP_SECONDS}s; ${PARALLEL} at once; tuned: ${TUNED:-none}"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} >> "$OUT/benchmark_info.txt" 2>&1   # appended: a resumed call keeps the first call's lines
cat "$OUT/benchmark_info.txt"

run_one() {
  local method=$1 remaining=$(( DEADLINE - $(date +%s) ))
  if [ "$remaining" -le 5 ]; then echo "skip $method: the cap is reached"; return; fi
  local hp=()
  if [ -n "${TUNED:-}" ] && "$PYTHON" -c "import json,sys; t=json.load(open('$TUNED')); sys.exit(0 if '$method' in t.get('$TASK', t) else 1)"; then
    hp=(--hp-json "$TUNED")
  fi
  # SIGTERM at the cap, SIGKILL 30 s later: what was written so far stays; rerun the script to resume.
  # shellcheck disable=SC2086
  timeout --kill-after=30 "$remaining" "$PYTHON" -m fso_lib.bench --task "$TASK" --method "$method" \
    --updates "$UPDATES" --batch-size 200 --eval-every "$EVAL_EVERY" --device "$DEVICE" --seed "$SEED" \
    --out "$OUT" --resume --note "run_gpu_benchmark.sh: up to $PARALLEL runs shared the device" "${hp[@]}" $EXTRA \
    >> "$OUT/logs/$method.log" 2>&1
  local rc=$?
  echo "$(date -Iseconds) $method exited with $rc$([ $rc -eq 124 ] && echo ' (cap reached: partial results)')" | tee -a "$OUT/benchmark_info.txt"
}

running=0
for method in "${METHOD_LIST[@]}"; do
  run_one "$method" &
  running=$((running + 1))
  if [ "$running" -ge "$PARALLEL" ]; then wait -n; running=$((running - 1)); fi
done
wait
echo "finished $(date -Iseconds); results in $OUT" | tee -a "$OUT/benchmark_info.txt"

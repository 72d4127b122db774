#!/usr/bin/env bash
# The benchmark on this CPU, for the time axis of thesis figures 6.1/6.2: each method in turn (never two at
# once: they would share the cores and distort each other's clock), for SECONDS of training time each,
# with tuned hyperparameters. Run it on a quiet machine.
#
# This is the protocol of the 2026-11-27 race (data/results/cpu/: uneven tuning, one seed), kept to reproduce it.
# The equal-budget race of issue 12 (same trials and horizon for every method, three seeds) is scripts/run_race.sh.
#
# Optional first stage (TUNE=1): biased random search (thesis §4.1) of each method with short trials,
# which writes the tuned-hyperparameters JSON that the long runs read.
#
# Usage:   scripts/run_cpu_benchmark.sh                        # long runs, 600 s per method
#          TUNE=1 TUNE_TRIALS=20 TUNE_SECONDS=60 scripts/run_cpu_benchmark.sh
# Settings (environment variables, defaults in brackets):
#   OUT [data/results/cpu]   SECONDS_PER_METHOD [600]   THREADS [number of cores]   SEED [0]
#   TUNED [data/results/tuned_cpu.json]   METHODS [all ten]   TASK [autoencoder]   PYTHON [python]
#   TUNE [0]   TUNE_TRIALS [20]   TUNE_SECONDS [60]   EXTRA [extra arguments for every run]
# A killed run resumes from its checkpoint when the script is run again (the runs use --resume).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-data/results/cpu}
SECONDS_PER_METHOD=${SECONDS_PER_METHOD:-600}
THREADS=${THREADS:-$(nproc)}
SEED=${SEED:-0}
TUNED=${TUNED:-data/results/tuned_cpu.json}
METHODS=${METHODS:-"sgd sgd_momentum adam centered_gd mean_only_batchnorm batchnorm acp acp_fixed_alpha kfac natural_nn"}
TASK=${TASK:-autoencoder}
PYTHON=${PYTHON:-python}
EXTRA=${EXTRA:-}
mkdir -p "$OUT/logs"

if [ "${TUNE:-0}" = "1" ]; then
  for method in $METHODS; do
    # shellcheck disable=SC2086
    "$PYTHON" -m fso_lib.bench.tune --task "$TASK" --method "$method" --trials "${TUNE_TRIALS:-20}" \
      --seconds "${TUNE_SECONDS:-60}" --workers 1 --threads "$THREADS" --out "$OUT/tuning" --tuned "$TUNED" $EXTRA \
      2> "$OUT/logs/tune-$method.log" || echo "tuning $method failed (see $OUT/logs/tune-$method.log)"
  done
fi

for method in $METHODS; do
  hp=()
  if [ -f "$TUNED" ] && "$PYTHON" -c "import json,sys; t=json.load(open('$TUNED')); sys.exit(0 if '$method' in t.get('$TASK', t) else 1)"; then
    hp=(--hp-json "$TUNED")
  else
    echo "$method: no tuned hyperparameters in $TUNED, using the method's defaults"
  fi
  # shellcheck disable=SC2086
  "$PYTHON" -m fso_lib.bench --task "$TASK" --method "$method" --seconds "$SECONDS_PER_METHOD" --batch-size 200 \
    --threads "$THREADS" --seed "$SEED" --device cpu --out "$OUT" --resume "${hp[@]}" $EXTRA \
    --note "run_cpu_benchmark.sh, one run at a time" 2> "$OUT/logs/$method.log" \
    || echo "$method exited with an error (see $OUT/logs/$method.log)"
done

#!/usr/bin/env bash
# The equal-budget race of issue 12 (fso_lib/bench/race.py): every method tuned with the same number of
# trials of the same length on the same data order, then run on three seeds with its best hyperparameters.
# Resumable: run the same command again after a kill (finished trials and runs are skipped, killed runs
# continue from their checkpoints). Time nothing else on the machine while it runs.
#
# Usage:   scripts/run_race.sh --plan          # the budget arithmetic, nothing run
#          scripts/run_race.sh                 # the whole race with the defaults (see --plan)
#          scripts/run_race.sh --stage tune    # only the tuning; --stage final: only the final runs
# Settings (environment variables, defaults in brackets):
#   OUT [data/results/race_cpu]   PYTHON [.venv/bin/python if present, else python]
# Every other argument goes to `python -m fso_lib.bench race` (see its --help), e.g. --workers 1 --threads 2 --clock wall (the process clock needs 1 thread per run).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-data/results/race_cpu}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
# PASSIVE: idle OpenMP threads sleep instead of spinning against the other run (data/results/speed/README.md)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
mkdir -p "$OUT"
for arg in "$@"; do
  if [ "$arg" = "--plan" ] || [ "$arg" = "--summary" ]; then
    exec "$PYTHON" -m fso_lib.bench race --out "$OUT" "$@"
  fi
done
echo "race in $OUT: log in $OUT/race.out (progress: $OUT/race_log.jsonl)"
"$PYTHON" -m fso_lib.bench race --out "$OUT" "$@" 2>&1 | tee -a "$OUT/race.out"

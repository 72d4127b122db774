#!/usr/bin/env bash
# The whole race of issue 12 in the order that finishes the most useful results first: the ten methods of the first
# race and K-FAC with the thesis's protocol (tuning, then their final runs), then the quadratic-model variants of ACP
# and the natural neural network, then the after-thesis methods of issue 14. Resumable like scripts/run_race.sh,
# whose arguments it passes on (e.g. --plan).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/run_race.sh --methods sgd,sgd_momentum,adam,centered_gd,mean_only_batchnorm,batchnorm,acp,acp_fixed_alpha,kfac,kfac_thesis,natural_nn_implicit "$@"
scripts/run_race.sh --methods acp_quadratic_model,natural_nn_quadratic_model "$@"
scripts/run_race.sh --methods ekfac,shampoo,soap "$@"

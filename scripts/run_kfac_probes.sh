#!/usr/bin/env bash
# Untuned probes of issue 12 (shown in notebook 07, section "K-FAC as its authors run it"): K-FAC with and without
# KL clipping, with the thesis's amortization, with Levenberg-Marquardt damping, and as Martens & Grosse run it
# (quadratic-model step + adaptive damping); the same quadratic-model step offered to ACP and the natural neural
# network beside their plain versions at the same damping. Every run: the deep autoencoder, 1,500 updates of
# minibatch 200, sparse initialization, seed 0, one torch thread; loss against updates does not depend on the
# machine's load (its seconds do). Resumable: run it again after a kill.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-data/results/kfac_probes}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
mkdir -p "$OUT"
run() {  # NAME METHOD --hp ...
  local name=$1 method=$2; shift 2
  echo "== $name"
  "$PYTHON" -m fso_lib.bench --task autoencoder --method "$method" --init sparse --updates 1500 --eval-every 250 \
    --threads 1 --seed 0 --out "$OUT" --name "$name" --resume --quiet "$@"
}
run kfac_kl_clip            kfac        --hp lr=0.1 --hp damping=0.01 --hp momentum=0.9 --hp kl_clip=0.01
run kfac_no_clip            kfac        --hp lr=0.05 --hp damping=0.03 --hp momentum=0.9
run kfac_thesis_protocol    kfac_thesis --hp lr=0.3 --hp damping=0.1 --hp momentum=0.9
run kfac_kl_clip_adaptive   kfac        --hp lr=0.1 --hp damping=0.01 --hp momentum=0.9 --hp kl_clip=0.01 --hp damping_adaptation=true
run kfac_martens_grosse     kfac        --hp damping=0.01 --hp step_rule=quadratic_model --hp damping_adaptation=true
run acp                     acp         --hp lr=0.1 --hp damping=0.01
run acp_quadratic_model     acp_quadratic_model --hp damping=0.01 --hp damping_adaptation=true
run natural_nn              natural_nn_implicit --hp lr=0.1 --hp damping=0.1
run natural_nn_quadratic_model natural_nn_quadratic_model --hp damping=0.1 --hp damping_adaptation=true

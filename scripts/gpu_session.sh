#!/usr/bin/env bash
# The one command of a short GPU lease (issue 15), in order:
#   1. the machine: GPU, driver, torch, float32/TF32 settings;
#   2. a smoke pass: every raced method, 500 updates, one after the other in one process (uncontended ms/update);
#      if most methods fail there, stop at once (the lease's time is better spent on a fix and a second call);
#      then (SPEED=1, the default on a GPU) one update of the chapter-6 methods phase by phase
#      (benchmarks/optimizer_speed.py --device cuda: forward, backward, preconditioning, statistics, inversion);
#   3. the host-read check of the steady-state step (fso_lib.bench.device_check, sync debug mode "error");
#   4. the thesis's protocol (scripts/run_gpu_benchmark.sh): every method at once on the one GPU, 3×10^5 updates
#      each, the tuned hyperparameters of the CPU race, all under one wall-clock cap (FULL_CAP seconds).
# Everything is written under WORK as it goes and packed into OUT/gpu_results.tgz every 30 s and at the end
# (checkpoints left out), so a command cut by the lease's limit still brings back what was done.
#
# Usage (device machine):  OUT=/where/to/pack scripts/gpu_session.sh
# Dry run on a CPU:        OUT=/tmp/o DEVICE=cpu FSO_FAST=1 SMOKE_UPDATES=40 UPDATES=300 FULL_CAP=60 scripts/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results are packed into}"
WORK=${WORK:-/tmp/gpu_work}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
TUNED=${TUNED:-data/results/race_cpu/tuned.json}
METHODS=${METHODS:-"sgd sgd_momentum adam centered_gd mean_only_batchnorm batchnorm acp acp_fixed_alpha kfac kfac_thesis natural_nn_implicit"}
SMOKE_UPDATES=${SMOKE_UPDATES:-500}
SMOKE_CAP=${SMOKE_CAP:-90}
CHECK_CAP=${CHECK_CAP:-45}
FULL_CAP=${FULL_CAP:-330}
SPEED=${SPEED:-$([ "$DEVICE" = cpu ] && echo 0 || echo 1)}
SPEED_CAP=${SPEED_CAP:-60}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$WORK" "$OUT"
exec > >(tee -a "$WORK/console.log") 2>&1

pack() {
  tar czf "$OUT/gpu_results.tgz.part" --warning=no-file-changed -C "$WORK" --exclude=checkpoints . 2>/dev/null
  [ $? -le 1 ] && mv -f "$OUT/gpu_results.tgz.part" "$OUT/gpu_results.tgz"
}
( while sleep 30; do pack; done ) >/dev/null 2>&1 &   # its sleep must not hold the output pipe open at exit
PACKER=$!
trap 'kill $PACKER 2>/dev/null; pack' EXIT

# The full MNIST cache travels compressed (the working tree's size limit); the loader checks every array's hash.
if [ ! -f data/mnist.npz ] && [ -f .gpu/mnist.npz ]; then
  "$PYTHON" -c "import numpy as np; a = np.load('.gpu/mnist.npz'); np.savez('data/mnist.npz', **a)" || exit 1
fi

echo "== 1. machine $(date -Iseconds)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
"$PYTHON" - <<'EOF'
import json, os, torch
from fso_lib.bench.smoke import float32_settings
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "cpu_count": os.cpu_count(),
        "float32": float32_settings()}
print(json.dumps(info))
EOF

echo "== 2. smoke $(date -Iseconds)"
# shellcheck disable=SC2086
timeout -k 5 "$SMOKE_CAP" "$PYTHON" -m fso_lib.bench.smoke --device "$DEVICE" --updates "$SMOKE_UPDATES" \
  --hp-json "$TUNED" --out "$WORK/smoke" --methods $METHODS
"$PYTHON" - "$WORK/smoke/smoke.json" <<'EOF' || { echo "most methods failed the smoke pass: stopping here"; exit 1; }
import json, sys
rows = json.load(open(sys.argv[1]))["results"]
failed = [r["method"] for r in rows if r["status"] == "error"]
print(f"smoke: {len(rows) - len(failed)} of {len(rows)} methods ran" + (f"; failed: {failed}" if failed else ""))
sys.exit(1 if len(failed) * 2 > len(rows) or not rows else 0)
EOF

if [ "$SPEED" = 1 ]; then
  echo "== 2b. one update, phase by phase, each optimizer alone $(date -Iseconds)"
  timeout -k 5 "$SPEED_CAP" "$PYTHON" benchmarks/optimizer_speed.py --device "$DEVICE" --threads 1 --rounds 2 \
    --window 100 --only acp,kfac,kfac_quadratic_model,kfac_thesis_protocol,natural_nn_implicit --out "$WORK/speed_gpu.json"
fi

echo "== 3. host reads in the steady-state step $(date -Iseconds)"
# shellcheck disable=SC2086
timeout -k 5 "$CHECK_CAP" "$PYTHON" -m fso_lib.bench.device_check --device "$DEVICE" --updates 30 --methods $METHODS \
  | tee "$WORK/device_check.txt"

echo "== 4. the protocol, cap ${FULL_CAP}s $(date -Iseconds)"
OUT="$WORK/full" CAP_SECONDS="$FULL_CAP" TUNED="$TUNED" DEVICE="$DEVICE" PYTHON="$PYTHON" METHODS="$METHODS" \
  EXTRA="--threads 1 --quiet ${EXTRA:-}" scripts/run_gpu_benchmark.sh
"$PYTHON" - "$WORK/full" <<'EOF'
import sys
from pathlib import Path
from fso_lib.bench.runner import read_records
for path in sorted(Path(sys.argv[1]).glob("*.jsonl")):
    evals = [r for r in read_records(path) if r.get("type") == "eval"]
    last = evals[-1] if evals else {}
    print(f"{path.stem:40s} {last.get('update', 0):7d} updates {last.get('time_s', 0):7.1f} s "
          f"train SE {last.get('train_loss')} test SE {last.get('test_loss')}")
EOF
echo "== done $(date -Iseconds)"

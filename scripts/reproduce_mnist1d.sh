#!/usr/bin/env bash
# The MNIST-1D table on a CPU: every kdx method × 3 seeds, then kdx-table.
#
#   scripts/reproduce_mnist1d.sh                       # -> results/mnist1d/table.{md,csv,png}
#   SEEDS=0,1,2,3,4 JOBS=2 scripts/reproduce_mnist1d.sh trainer.max_epochs=30
#
# Environment: OUT (output prefix folder, default results/mnist1d), SEEDS (default 0,1,2),
# METHODS (default: every conf/method/*.yaml), JOBS (parallel jobs through Hydra's joblib
# launcher; default 1 = Hydra's basic sequential launcher, measured faster on a busy 2-core machine),
# KDX_BIN (folder holding kdx-train and kdx-table; default: .venv/bin if present, else PATH).
# Extra arguments are Hydra overrides passed to every job.
# Measured on 2 CPU cores: see docs/reproduce.md.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${KDX_BIN:-}" && -x .venv/bin/kdx-train ]]; then KDX_BIN=.venv/bin; fi
train=${KDX_BIN:+$KDX_BIN/}kdx-train
table=${KDX_BIN:+$KDX_BIN/}kdx-table

OUT=${OUT:-results/mnist1d}
SEEDS=${SEEDS:-0,1,2}
JOBS=${JOBS:-1}
if [[ -z "${METHODS:-}" ]]; then
  METHODS=$(for f in conf/method/*.yaml; do basename "$f" .yaml; done | paste -sd, -)
fi
SWEEP_DIR=${SWEEP_DIR:-logs/mnist1d_table/multiruns/$(date +%Y-%m-%d_%H-%M-%S)}

launcher=()
if [[ "$JOBS" -gt 1 ]]; then
  launcher=(hydra/launcher=joblib "hydra.launcher.n_jobs=$JOBS")
fi

echo "methods: $METHODS"
echo "seeds:   $SEEDS   parallel jobs: $JOBS   runs in: $SWEEP_DIR"
start=$(date +%s)
status=0
"$train" -m experiment=mnist1d/table "method=$METHODS" "seed=$SEEDS" "${launcher[@]}" \
  "hydra.sweep.dir=$SWEEP_DIR" "$@" || status=$?
echo "training: $(( $(date +%s) - start )) s (exit status $status)"

mkdir -p "$OUT"
"$table" "$SWEEP_DIR" --out "$OUT"
echo "total: $(( $(date +%s) - start )) s"
exit "$status"

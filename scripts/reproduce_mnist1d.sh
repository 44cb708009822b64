#!/usr/bin/env bash
# The MNIST-1D table on a CPU: every method that applies to a CNN teacher and an MLP student, 5 seeds,
# the backward-pass controls (method.step_size=0, method.direction=random) and two ProKT variants as
# rows of their own, then kdx-table. Batches run one after the other, most important first, and the table is rewritten after
# each batch, so a run cut short still leaves a table of what finished.
#
#   scripts/reproduce_mnist1d.sh                      # -> results/mnist1d/table.{md,csv,png}
#   SEEDS=0,1,2 BATCHES="core control" scripts/reproduce_mnist1d.sh
#
# Environment: OUT (output folder, default results/mnist1d), SEEDS (default 0,1,2,3,4),
# BATCHES (default "core control prokt baselines embedding"), CORE (the seed methods + none + kd),
# BASELINES (the other methods that run on an MLP student; default below), JOBS (parallel jobs
# through Hydra's joblib launcher, one thread each; default 2 = the 2 cores of the machine the
# table was measured on; 1 = Hydra's sequential launcher), SWEEP_DIR (where the runs go), KDX_BIN
# (folder holding kdx-train and kdx-table; default: .venv/bin if present, else PATH).
# Extra arguments are Hydra overrides passed to every job. Wall time: docs/mnist1d.md.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${KDX_BIN:-}" && -x .venv/bin/kdx-train ]]; then KDX_BIN=.venv/bin; fi
train=${KDX_BIN:+$KDX_BIN/}kdx-train
table=${KDX_BIN:+$KDX_BIN/}kdx-table

OUT=${OUT:-results/mnist1d}
SEEDS=${SEEDS:-0,1,2,3,4}
BATCHES=${BATCHES:-core control prokt baselines embedding}
CORE=${CORE:-none,kd,kda,backward,ls,kd_pt,kd_sim,kd_pt_sim,rdim,prokt}
# the baselines that take a vector (MLP) student against a CNN teacher at their defaults; at, vid, ab,
# ft, fsp and nst pair stage maps one to one and stop with a KDXError on this pair
BASELINES=${BASELINES:-fitnet,sp,cc,rkd,pkt,crd,dkd,dist}
JOBS=${JOBS:-2}
SWEEP_DIR=${SWEEP_DIR:-logs/mnist1d_table/multiruns/$(date +%Y-%m-%d_%H-%M-%S)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
launcher=()
if [[ "$JOBS" -gt 1 ]]; then
  launcher=(hydra/launcher=joblib "hydra.launcher.n_jobs=$JOBS")
fi

echo "batches: $BATCHES   seeds: $SEEDS   parallel jobs: $JOBS   runs in: $SWEEP_DIR"
start=$(date +%s)
status=0

versus() {  # every row against the scratch student, once the sweep holds a `none` run
  python3 - "$SWEEP_DIR" <<'PY'
import json, pathlib, sys
for path in pathlib.Path(sys.argv[1]).rglob("metrics.json"):
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        continue
    if record.get("method") == "none" and not record.get("label"):
        print("--versus none")
        break
PY
}

sweep() {  # sweep <name> <overrides...>
  local name=$1
  shift
  local t0
  t0=$(date +%s)
  "$train" -m experiment=mnist1d/table "seed=$SEEDS" "${launcher[@]}" "hydra.sweep.dir=$SWEEP_DIR/$name" "$@" ||
    status=$?
  echo "batch $name: $(($(date +%s) - t0)) s"
  mkdir -p "$OUT"
  "$table" "$SWEEP_DIR" $(versus) --out "$OUT" >/dev/null || status=$?
}

for batch in $BATCHES; do
  case $batch in
    core) sweep core "method=$CORE" "$@" ;;
    # backward with step size 0: x_aux = x, i.e. KD re-weighted (0.1·CE + 1.9·T²·KL), no backward-pass knowledge
    # backward with a random direction of the same length: teacher-labelled points near the data,
    # without the direction the backward pass finds
    control)
      sweep control method=backward method.step_size=0 label=backward-step0 "$@"
      sweep control_random method=backward method.direction=random label=backward-random "$@"
      ;;
    # ProKT with a train-mode teacher snapshot, and from an early (2-epoch) teacher checkpoint
    prokt)
      sweep prokt_train method=prokt method.teacher_snapshot=train label=prokt-train-snapshot "$@"
      sweep prokt_early method=prokt method.teacher_init=checkpoint teacher.train.epochs=2 teacher.min_acc=0.5 \
        label=prokt-early-teacher "$@"
      ;;
    baselines) sweep baselines "method=$BASELINES" "$@" ;;
    # VID and AB pair stages one to one; on a vector student they read the embedding only (layers=-1)
    embedding)
      sweep vid_embedding method=vid method.layers=-1 label=vid-embedding "$@"
      sweep ab_embedding method=ab method.layers=-1 label=ab-embedding "$@"
      ;;
    *) echo "unknown batch $batch (core, control, prokt, baselines, embedding)" >&2; status=2 ;;
  esac
done

"$table" "$SWEEP_DIR" $(versus) --out "$OUT" || status=$?
echo "total: $(($(date +%s) - start)) s (exit status $status)"
exit "$status"

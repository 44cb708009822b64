#!/usr/bin/env bash
# The language-model table on a CPU (docs/lm.md): a tiny GPT-2 student (1 layer × 32) alone and
# distilled from a tiny GPT-2 teacher (2 layers × 64, trained once by its recipe and cached) on the
# generated corpus (dataset=lm, no files) with forward KL, reverse KL, JSD(0.5), skew KL
# (α 0.1), on-policy JSD (gkd, λ 0.5) and forward KL from the top-k teacher cache at k = 8 and 32;
# 3 seeds, one job at a time on one thread, then kdx-table with Welch's t against the student alone
# on held-out perplexity and on the KL to the teacher.
#
#   scripts/reproduce_lm.sh                 # -> results/lm_synthetic/table.{md,csv,png}, versus_*.md
#   SEEDS="0 1" scripts/reproduce_lm.sh
#
# Environment: OUT (default results/lm_synthetic), SEEDS (default "0 1 2"), RUNS (where the run
# folders go, default $OUT/runs), KDX_BIN (folder holding kdx-train and kdx-table; default .venv/bin
# if present, else PATH). Extra arguments are Hydra overrides passed to every job.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${KDX_BIN:-}" && -x .venv/bin/kdx-train ]]; then KDX_BIN=.venv/bin; fi
train=${KDX_BIN:+$KDX_BIN/}kdx-train
table=${KDX_BIN:+$KDX_BIN/}kdx-table
OUT=${OUT:-results/lm_synthetic}
SEEDS=${SEEDS:-0 1 2}
RUNS=${RUNS:-$OUT/runs}

run() {  # name seed overrides...
  local name=$1 seed=$2
  shift 2
  [[ -f "$RUNS/${name}_s${seed}/metrics.json" ]] && return
  OMP_NUM_THREADS=1 "$train" experiment=lm/synthetic seed="$seed" print_summary=false \
    hydra.run.dir="$RUNS/${name}_s${seed}" "$@" "${EXTRA[@]}"
}
EXTRA=("$@")
for seed in $SEEDS; do  # seed-major: a run cut short still leaves every method with the same seeds
  run none "$seed" method=none
  run fkl "$seed" method=fkl
  run rkl "$seed" method=rkl
  run jsd "$seed" method=jsd method.beta=0.5
  run skl "$seed" method=skl method.alpha=0.1
  run gkd "$seed" method=gkd method.beta=0.5 method.lmbda=0.5
  run fkl_top8 "$seed" method=fkl teacher.cache=topk teacher.cache_topk=8 label=fkl_top8
  run fkl_top32 "$seed" method=fkl teacher.cache=topk teacher.cache_topk=32 label=fkl_top32
done
"$table" "$RUNS" --out "$OUT" --versus none --metric student/ppl_best
"$table" "$RUNS" --out "$OUT/versus_kl" --versus none --metric fidelity/kl_best --no-plot

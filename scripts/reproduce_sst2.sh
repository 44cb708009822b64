#!/usr/bin/env bash
# The SST-2 table on a CPU (README, docs/text.md): experiment=sst2/table — a 2-layer/64 BERT teacher
# trained on the whole training file, a 2-layer/32 BERT student with 8,000 labelled sentences, both
# from random initialisation with a WordPiece tokenizer trained on the training file; the best epoch
# selected on 872 sentences held out of the training file, GLUE's dev split reported as the test.
# Rows: the student alone, kd, dkd, dist, kd_pt (Tang et al.), prokt, backward-pass KD in embedding
# space and its two controls (no move: step_size=0; a random direction of the same length), and the
# teacher (seed s distils from the teacher trained with seed s). One thread per job, JOBS jobs at a
# time (seed-major, so a run cut short leaves every method with the same seeds), then kdx-table.
#
#   scripts/reproduce_sst2.sh ../shared/data/glue           # -> results/sst2/table.{md,csv,png}
#   SEEDS="0 1 2 3 4" JOBS=1 scripts/reproduce_sst2.sh /data/glue
#
# Argument: the GLUE folder (holding SST-2/train.tsv and dev.tsv, or the Hub's sst2/ parquet files).
# Environment: OUT (default results/sst2), SEEDS (default "0 1 2"), JOBS (default 2), RUNS (run
# folders, default $OUT/runs), KDX_BIN (folder holding kdx-train and kdx-table; default .venv/bin if
# present, else PATH). Extra arguments are Hydra overrides passed to every job.
set -uo pipefail
if [[ $# -lt 1 || ! -d "$1" ]]; then
  echo "usage: scripts/reproduce_sst2.sh <GLUE folder> [overrides...]  (e.g. ../shared/data/glue)" >&2
  exit 2
fi
GLUE=$(cd "$1" && pwd)
shift
cd "$(dirname "$0")/.."

if [[ -z "${KDX_BIN:-}" && -x .venv/bin/kdx-train ]]; then KDX_BIN=.venv/bin; fi
train=${KDX_BIN:+$KDX_BIN/}kdx-train
table=${KDX_BIN:+$KDX_BIN/}kdx-table
OUT=${OUT:-results/sst2}
SEEDS=${SEEDS:-0 1 2}
JOBS=${JOBS:-2}
RUNS=${RUNS:-$OUT/runs}
CACHE=${CACHE:-$OUT/cache}
mkdir -p "$RUNS"

job() {  # name seed overrides... -> one line of the job list (skipped when its metrics.json exists)
  local name=$1 seed=$2
  shift 2
  [[ -f "$RUNS/${name}_s${seed}/metrics.json" ]] && return
  printf '%q ' "$train" experiment=sst2/table dataset.root="$GLUE" seed="$seed" \
    teacher.train.seed="$seed" print_summary=false paths.cache_dir="$CACHE" \
    hydra.run.dir="$RUNS/${name}_s${seed}" "$@" "${EXTRA[@]}"
  printf '> %q 2>&1\n' "$RUNS/${name}_s${seed}.log"
}
EXTRA=("$@")
jobs_file=$(mktemp)
trap 'rm -f "$jobs_file"' EXIT
for seed in $SEEDS; do
  {
    job none "$seed" method=none
    job kd "$seed" method=kd
    job dkd "$seed" method=dkd
    job dist "$seed" method=dist
    job kd_pt "$seed" method=kd_pt
    job prokt "$seed" method=prokt
    job backward "$seed" method=backward method.space=embedding label=backward
    job backward_step0 "$seed" method=backward method.space=embedding method.step_size=0 label=backward_step0
    job backward_random "$seed" method=backward method.space=embedding method.direction=random \
      label=backward_random
  } >>"$jobs_file"
done
# the first job of each seed trains that seed's teacher; the others wait on its lock and reuse it
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 xargs -d '\n' -P "$JOBS" -I{} bash -c '{}' <"$jobs_file"
"$table" "$RUNS" "$CACHE/teachers" --by method --versus none --out "$OUT"

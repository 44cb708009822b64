#!/usr/bin/env bash
# kdx-bench on a GPU: absolute samples/s of the plain PyTorch KD loop, kdx, and kdx with each speed
# switch (teacher cache, channels_last, torch.compile, bf16-mixed), for fp32 and bf16-mixed as the
# base precision, plus (first configuration only) kdx's fixed per-step overhead on the GPU with tiny
# models, where the step is bound by the host. One JSON line per configuration goes to $OUT.
#
#   scripts/bench_gpu.sh                         # resnet56 -> resnet20, batch 64 and 256
#   PAIRS="resnet110:resnet32 resnet32x4:resnet8x4" BATCHES="128" scripts/bench_gpu.sh
#   OUT=results/bench_gpu.jsonl ROUNDS=6 STEPS=50 scripts/bench_gpu.sh method=dkd
#
# Environment: PAIRS (teacher:student zoo names), BATCHES (batch sizes), PRECISIONS (base precisions,
# default "32-true bf16-mixed"), ROUNDS (alternating rounds, even), STEPS (timed steps per segment),
# WARMUP (steps before timing; compile happens here), OUT (JSONL file, default
# results/bench_gpu.jsonl), KDX_BIN (folder holding kdx-bench; default .venv/bin if present, else
# PATH). Extra arguments are Hydra overrides for every configuration. Docs: docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${KDX_BIN:-}" && -x .venv/bin/kdx-bench ]]; then KDX_BIN=.venv/bin; fi
bench=${KDX_BIN:+$KDX_BIN/}kdx-bench

PAIRS=${PAIRS:-resnet56:resnet20}
BATCHES=${BATCHES:-64 256}
PRECISIONS=${PRECISIONS:-32-true bf16-mixed}
ROUNDS=${ROUNDS:-4}
STEPS=${STEPS:-50}
WARMUP=${WARMUP:-10}
OUT=${OUT:-results/bench_gpu.jsonl}

python=${KDX_BIN:+$KDX_BIN/}python
[[ -x "$python" ]] || python=python3
if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "bench_gpu.sh: no CUDA device visible to torch; run it where a GPU exists (kdx-bench measures the CPU)" >&2
  exit 2
fi

mkdir -p "$(dirname "$OUT")"
overhead_done=0
for pair in $PAIRS; do
  teacher=${pair%%:*}
  student=${pair##*:}
  for batch in $BATCHES; do
    for precision in $PRECISIONS; do
      # the bf16 variant is the base precision already when PRECISIONS says bf16-mixed
      variants="cache,channels_last,compile"
      [[ "$precision" == "32-true" ]] && variants="$variants,bf16"
      # the overhead section does not depend on the pair: once per script run
      overhead=$([[ $overhead_done == 0 ]] && echo true || echo false)
      echo "== $teacher -> $student, batch $batch, $precision, variants [$variants]"
      "$bench" accelerator=gpu "teacher=$teacher" "student=$student" "batch_size=$batch" \
        "precision=$precision" "variants=[$variants]" "rounds=$ROUNDS" "steps=$STEPS" \
        "warmup_steps=$WARMUP" torch_threads=null "overhead.enabled=$overhead" "$@" | tee /dev/stderr |
        tail -n 1 >>"$OUT"
      overhead_done=1
    done
  done
done
echo "results appended to $OUT"

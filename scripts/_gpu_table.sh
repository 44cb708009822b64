# Shared by the GPU reproduction scripts (sourced, not run): one Hydra multirun over the given
# experiment configs × $METHODS × $SEEDS, then kdx-table into $OUT. Honours KDX_BIN,
# KDX_TEACHER_DIR (<teacher name>.ckpt files instead of auto-trained teachers), DOWNLOAD=1 and
# LAUNCHER (Hydra launcher overrides). Usage: run_gpu_table <experiment,experiment,...> [overrides]
run_gpu_table() {
  local experiments=$1
  shift
  if [[ -z "${KDX_BIN:-}" && -x .venv/bin/kdx-train ]]; then KDX_BIN=.venv/bin; fi
  local train=${KDX_BIN:+$KDX_BIN/}kdx-train table=${KDX_BIN:+$KDX_BIN/}kdx-table
  local extra=(trainer=gpu "trainer.precision=32-true") launcher status=0
  if [[ -n "${KDX_TEACHER_DIR:-}" ]]; then
    extra+=("teacher.ckpt='\${oc.env:KDX_TEACHER_DIR}/\${teacher.name}.ckpt'")
  fi
  if [[ "${DOWNLOAD:-0}" == 1 ]]; then
    extra+=(dataset.datamodule.download=true)
  fi
  read -r -a launcher <<<"${LAUNCHER:-}"
  echo "experiments: $experiments"
  echo "methods: $METHODS   seeds: $SEEDS   runs in: $SWEEP_DIR"
  "$train" -m "experiment=$experiments" "method=$METHODS" "seed=$SEEDS" "${extra[@]}" "${launcher[@]}" \
    "hydra.sweep.dir=$SWEEP_DIR" "$@" || status=$?
  mkdir -p "$OUT"
  "$table" "$SWEEP_DIR" --out "$OUT"
  return "$status"
}

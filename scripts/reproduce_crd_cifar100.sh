#!/usr/bin/env bash
# The CRD / RepDistiller CIFAR-100 comparison table: 13 teacher -> student rows × methods × seeds,
# then kdx-table with each cell's difference to its published number (the rows' `published` blocks:
# RepDistiller README, the CRD paper's CRD+KD row, mdistiller's DKD, the DIST README). For a GPU
# machine or a SLURM cluster: one run is 240 epochs of CIFAR-100 (about 1-3 GPU-hours).
#
#   scripts/reproduce_crd_cifar100.sh                                    # the whole matrix, 5 seeds
#   scripts/reproduce_crd_cifar100.sh --rows resnet32x4_resnet8x4,vgg13_vgg8 --methods kd,crd,dkd,dist
#   scripts/reproduce_crd_cifar100.sh --methods crd_kd --seeds 0,1,2     # one column
#   scripts/reproduce_crd_cifar100.sh --rows vgg13_vgg8 --dry-run        # print the commands only
#   scripts/reproduce_crd_cifar100.sh --rows vgg13_vgg8 --check          # compose every job (CPU, no run)
#   LAUNCHER="hydra/launcher=submitit_slurm hydra.launcher.gpus_per_node=1 hydra.launcher.cpus_per_task=8 \
#     hydra.launcher.timeout_min=1440 hydra.launcher.partition=gpu" scripts/reproduce_crd_cifar100.sh
#
# Methods: none (the student alone), kd, fitnet, at, sp, cc, vid, rkd, pkt, ab, ft, fsp, nst, crd,
# crd_kd (CRD+KD: method=crd method.kd_weight=1 label=crd_kd), dkd (β per row: the row's dkd_beta),
# dist. fsp runs on the same-family rows only (RepDistiller reports it for those alone).
#
# Options (each also read from the environment variable of the same name in capitals):
#   --rows     comma-separated rows of conf/experiment/crd_cifar100/ (default: all 13)
#   --methods  comma-separated methods (default: all of the above; any kdx method may be added,
#              e.g. kda or rdim: they run with the row's recipe and have no published cell)
#   --seeds    default 0,1,2,3,4 (the published numbers average several runs; the count is unverified)
#   --dry-run  print the kdx-train / kdx-table commands instead of running them
#   --check    compose every (row, method) job with `kdx-train ... --cfg job` and report any that fails
# Environment:
#   LAUNCHER  Hydra launcher overrides (default: Hydra's basic launcher, one job after the other on
#             one GPU). On a workstation with k GPUs, start k copies with CUDA_VISIBLE_DEVICES=i and
#             disjoint --rows, each with its own SWEEP_DIR, then run kdx-table over all of them.
#   KDX_TEACHER_DIR  folder with <teacher name>.ckpt (kdx / Lightning checkpoint or plain state_dict)
#             for every teacher; unset: teacher.ckpt=auto trains each teacher once (240 epochs, the
#             same recipe) and caches it under $KDX_CACHE_DIR, shared by every row that uses it.
#   KDX_DATA_DIR  holds cifar/cifar-100-python/ (DOWNLOAD=1 lets torchvision fetch it first)
#   OUT       output folder (default results/crd_cifar100); SWEEP_DIR the multirun folder (every
#             batch of jobs below writes into it or a subfolder, and the table covers them all)
#   KDX_BIN   folder holding kdx-train / kdx-table (default .venv/bin if present, else PATH)
# Arguments after `--` are Hydra overrides for every job (e.g. -- trainer.precision=bf16-mixed to
# trade exactness of the fp32 protocol for speed).
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_METHODS=none,kd,fitnet,at,sp,cc,vid,rkd,pkt,ab,ft,fsp,nst,crd,crd_kd,dkd,dist
SAME_FAMILY=" wrn_40_2_wrn_16_2 wrn_40_2_wrn_40_1 resnet56_resnet20 resnet110_resnet20 resnet110_resnet32 resnet32x4_resnet8x4 vgg13_vgg8 "
DRY_RUN=0
CHECK=0
OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rows) ROWS=$2; shift 2 ;;
    --methods) METHODS=$2; shift 2 ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --check) CHECK=1; shift ;;
    --) shift; OVERRIDES=("$@"); break ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    *) echo "reproduce_crd_cifar100: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

if [[ -z "${ROWS:-}" ]]; then
  ROWS=$(for f in conf/experiment/crd_cifar100/[!_]*.yaml; do basename "$f" .yaml; done | paste -sd, -)
fi
METHODS=${METHODS:-$ALL_METHODS}
SEEDS=${SEEDS:-0,1,2,3,4}
OUT=${OUT:-results/crd_cifar100}
SWEEP_DIR=${SWEEP_DIR:-logs/crd_cifar100/multiruns/$(date +%Y-%m-%d_%H-%M-%S)}

for row in ${ROWS//,/ }; do
  if [[ ! -f conf/experiment/crd_cifar100/$row.yaml ]]; then
    echo "reproduce_crd_cifar100: no row '$row' in conf/experiment/crd_cifar100/" >&2
    exit 2
  fi
done
for method in ${METHODS//,/ }; do
  if [[ "$method" != crd_kd && ! -f conf/method/$method.yaml ]]; then
    echo "reproduce_crd_cifar100: unknown method '$method'; the table's are $ALL_METHODS" >&2
    exit 2
  fi
done

experiments_of() { tr ' ' '\n' <<<"$*" | sed '/^$/d; s|^|crd_cifar100/|' | paste -sd, -; }
ALL_ROWS=${ROWS//,/ }
SAME_ROWS=$(for row in $ALL_ROWS; do if [[ "$SAME_FAMILY" == *" $row "* ]]; then echo "$row"; fi; done | paste -sd' ' -)
# The jobs, as batches that share their overrides: "<rows>|<methods>|<extra overrides>|<subfolder>"
PLAIN=$(tr ',' '\n' <<<"$METHODS" | { grep -vx -e fsp -e crd_kd || true; } | paste -sd, -)
BATCHES=()
if [[ -n "$PLAIN" ]]; then BATCHES+=("$ALL_ROWS|$PLAIN||"); fi
if [[ ",$METHODS," == *",fsp,"* && -n "$SAME_ROWS" ]]; then BATCHES+=("$SAME_ROWS|fsp||fsp"); fi
if [[ ",$METHODS," == *",crd_kd,"* ]]; then
  BATCHES+=("$ALL_ROWS|crd|method.kd_weight=1.0 label=crd_kd|crd_kd")
fi
if [[ ${#BATCHES[@]} == 0 ]]; then
  echo "reproduce_crd_cifar100: nothing to run (fsp applies to same-family rows only)" >&2
  exit 2
fi

echo "rows:    $ROWS"
echo "methods: $METHODS   seeds: $SEEDS"

if [[ "$CHECK" == 1 ]]; then
  bin=${KDX_BIN:-$([[ -x .venv/bin/kdx-train ]] && echo .venv/bin || true)}
  failed=0
  for batch in "${BATCHES[@]}"; do
    IFS='|' read -r rows methods extra _ <<<"$batch"
    read -r -a extra_args <<<"$extra"
    for row in $rows; do
      for method in ${methods//,/ }; do
        if "${bin:+$bin/}kdx-train" "experiment=crd_cifar100/$row" "method=$method" "${extra_args[@]}" \
          trainer=gpu "${OVERRIDES[@]}" --cfg job >/dev/null 2>"${TMPDIR:-/tmp}/kdx-check.err"; then
          echo "ok      $row $method $extra"
        else
          echo "FAILED  $row $method $extra: $(tail -1 "${TMPDIR:-/tmp}/kdx-check.err")"
          failed=1
        fi
      done
    done
  done
  exit "$failed"
fi

if [[ "$DRY_RUN" == 1 ]]; then
  # run_gpu_table calls $KDX_BIN/kdx-train and kdx-table: point it at stand-ins that print the command
  shim=$(mktemp -d)
  trap 'rm -rf "$shim"' EXIT
  for tool in kdx-train kdx-table; do
    printf '#!/usr/bin/env bash\nprintf "%%q " %s "$@"; echo\n' "$tool" >"$shim/$tool"
    chmod +x "$shim/$tool"
  done
  KDX_BIN=$shim
  mkdir() { :; }  # run_gpu_table creates $OUT; a dry run writes nothing
fi

source scripts/_gpu_table.sh
status=0
MAIN_SWEEP=$SWEEP_DIR
# the extra batches first, into subfolders; the last batch's kdx-table then covers every job
ORDERED=()
for batch in "${BATCHES[@]}"; do if [[ -n "${batch##*|}" ]]; then ORDERED+=("$batch"); fi; done
for batch in "${BATCHES[@]}"; do if [[ -z "${batch##*|}" ]]; then ORDERED+=("$batch"); fi; done
for batch in "${ORDERED[@]}"; do
  IFS='|' read -r rows METHODS extra sub <<<"$batch"
  read -r -a extra_args <<<"$extra"
  SWEEP_DIR=$MAIN_SWEEP${sub:+/$sub}
  run_gpu_table "$(experiments_of "$rows")" "${extra_args[@]}" "${OVERRIDES[@]}" || status=$?
done
if [[ -n "${ORDERED[-1]##*|}" ]]; then  # no plain batch ran last: one table over everything
  SWEEP_DIR=$MAIN_SWEEP
  "${KDX_BIN:+$KDX_BIN/}kdx-table" "$MAIN_SWEEP" --out "$OUT" || status=$?
fi
exit "$status"

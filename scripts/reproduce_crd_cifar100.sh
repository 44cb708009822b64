#!/usr/bin/env bash
# The CRD / RepDistiller CIFAR-100 table (methods.md §6.1-6.2): 13 teacher -> student rows ×
# methods × seeds, then kdx-table with the difference to the published numbers. For a GPU machine
# or a SLURM cluster: one run is 240 epochs of CIFAR-100 (about 1-3 GPU-hours each).
#
#   scripts/reproduce_crd_cifar100.sh                                  # every row, none+kd, 5 seeds
#   ROWS=resnet56_resnet20,vgg13_vgg8 METHODS=none,kd,kda SEEDS=0,1,2 scripts/reproduce_crd_cifar100.sh
#   LAUNCHER="hydra/launcher=submitit_slurm hydra.launcher.gpus_per_node=1 hydra.launcher.cpus_per_task=8 \
#     hydra.launcher.timeout_min=1440 hydra.launcher.partition=gpu" scripts/reproduce_crd_cifar100.sh
#
# Environment:
#   ROWS      comma-separated rows of conf/experiment/crd_cifar100/ (default: all 13)
#   METHODS   kdx methods to run on every row (default none,kd: the scratch and KD columns)
#   SEEDS     default 0,1,2,3,4 (the published numbers average several runs; the count is unverified)
#   LAUNCHER  Hydra launcher overrides (default: Hydra's basic launcher, one job after the other on
#             one GPU). On a workstation with k GPUs, start k copies with CUDA_VISIBLE_DEVICES=i and
#             disjoint ROWS, each with its own SWEEP_DIR, then run kdx-table over all of them.
#   KDX_TEACHER_DIR  folder with <teacher name>.ckpt (kdx / Lightning checkpoint or plain state_dict)
#             for every teacher; unset: teacher.ckpt=auto trains each teacher once (240 epochs, the
#             same recipe) and caches it under $KDX_CACHE_DIR, shared by every row that uses it.
#   KDX_DATA_DIR  holds cifar/cifar-100-python/ (DOWNLOAD=1 lets torchvision fetch it first)
#   OUT       output folder (default results/crd_cifar100); SWEEP_DIR the multirun folder
#   KDX_BIN   folder holding kdx-train / kdx-table (default .venv/bin if present, else PATH)
# Extra arguments are Hydra overrides for every job (e.g. trainer.precision=bf16-mixed to trade
# exactness of the fp32 protocol for speed).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${ROWS:-}" ]]; then
  ROWS=$(for f in conf/experiment/crd_cifar100/[!_]*.yaml; do basename "$f" .yaml; done | paste -sd, -)
fi
EXPERIMENTS=$(tr ',' '\n' <<<"$ROWS" | sed 's|^|crd_cifar100/|' | paste -sd, -)
METHODS=${METHODS:-none,kd}
SEEDS=${SEEDS:-0,1,2,3,4}
OUT=${OUT:-results/crd_cifar100}
SWEEP_DIR=${SWEEP_DIR:-logs/crd_cifar100/multiruns/$(date +%Y-%m-%d_%H-%M-%S)}

echo "rows:    $ROWS"
source scripts/_gpu_table.sh
run_gpu_table "$EXPERIMENTS" "$@"

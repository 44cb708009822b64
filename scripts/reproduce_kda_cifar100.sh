#!/usr/bin/env bash
# KDA's CIFAR-100 row (arXiv 2009.14416 v1, Table 2): ResNet34 -> ResNet18 (CIFAR stem), 120 epochs,
# batch 256, warm-up + cosine; the student alone, KD and KDA over seeds, then kdx-table against
# the v1 numbers. For a GPU machine (about 1-2 GPU-hours per run).
#
#   scripts/reproduce_kda_cifar100.sh                          # none,kd,kda × seeds 0,1,2
#   METHODS=kda SEEDS=0,1,2,3,4 scripts/reproduce_kda_cifar100.sh method.layer=logits   # "after FC"
#
# Environment: METHODS (default none,kd,kda), SEEDS (default 0,1,2), LAUNCHER (Hydra launcher
# overrides, e.g. "hydra/launcher=submitit_slurm hydra.launcher.gpus_per_node=1 ..."),
# KDX_TEACHER_DIR (holds resnet34_cifar.ckpt; unset: the teacher is trained once with the same
# 120-epoch recipe and cached), KDX_DATA_DIR, DOWNLOAD=1, OUT (default results/kda_cifar100),
# SWEEP_DIR, KDX_BIN. Extra arguments are Hydra overrides for every job.
set -euo pipefail
cd "$(dirname "$0")/.."

METHODS=${METHODS:-none,kd,kda}
SEEDS=${SEEDS:-0,1,2}
OUT=${OUT:-results/kda_cifar100}
SWEEP_DIR=${SWEEP_DIR:-logs/kda_cifar100/multiruns/$(date +%Y-%m-%d_%H-%M-%S)}

source scripts/_gpu_table.sh
run_gpu_table kda_cifar100/resnet34_resnet18 "$@"

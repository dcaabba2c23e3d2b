#!/usr/bin/env bash
# The GPU suite (issues 17, 26): one command, < 8 minutes on one GPU, one table.
#
#   bash benchmarks/gpu_suite.sh            # on a machine with a GPU
#   TINY=1 bash benchmarks/gpu_suite.sh     # toy sizes: checks the script on CPU
#
# Rows (each its own process, timed after compilation): distillation step at
# 32x32x3 for 10/20/40/80 unrolled steps; 4 and 8 trajectories batched per step
# (vmapped, 10 steps); 8 experts batched (vmap) vs one after another (one
# epoch on 5,120 images); 5 evaluation models (300 epochs on 100 images)
# vmapped vs sequential, and one model alone; the same 5 models on AlexNet,
# VGG11 and ResNet18 (cross-architecture evaluation); one distillation
# iteration of every backbone with its CIFAR-10 ipc-10 row
# (benchmarks/backbone_step.py). Writes
# benchmarks/results/gpu_suite.{md,json} (OUT=prefix to change it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_suite}
ARGS=(--out="$OUT")
if [[ "${TINY:-0}" != 0 ]]; then
  ARGS+=(--tiny)
fi
PY=${PYTHON:-python}
"$PY" -c 'import jax; print("backend:", jax.default_backend(), jax.devices())'
start=$(date +%s)
"$PY" -m benchmarks.gpu_suite "${ARGS[@]}" "$@"
echo "gpu_suite: $(( $(date +%s) - start )) s"

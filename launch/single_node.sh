#!/usr/bin/env bash
# One machine, all its GPUs, one process. Each device unrolls its own expert
# trajectory per iteration (distill.trajectories_per_step defaults to the number
# of devices); evaluation models and vmapped experts are sharded over them.
#
#   bash launch/single_node.sh configs/cifar10.py:ipc=10 runs/c10
set -euo pipefail
CONFIG=${1:?config, e.g. configs/cifar10.py:ipc=10}
WORKDIR=${2:?workdir}
shift 2
python -m seqmatch_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  --config.dataset.data_dir="${DATA_DIR:-$HOME/tensorflow_datasets}" "$@"

#!/usr/bin/env bash
# A Cloud TPU VM pod slice (e.g. v4-32): the same command on every worker;
# jax.distributed finds the other workers through the TPU metadata.
#
#   bash launch/tpu_pod.sh my-tpu us-central2-b configs/cifar100.py:ipc=50 /mnt/shared/runs/c100
#
# Before: clone this repository to ~/seqmatch_jax on every worker and install
# it (`gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command=
# "cd ~/seqmatch_jax && pip install -e . 'jax[tpu]'"`). The workdir must be a
# filesystem all workers share (Filestore/NFS, or a gcsfuse mount): process 0
# writes results, each process writes the experts it trains, and all write
# the distillation checkpoint. To stop cleanly (every worker saves and exits
# 130; the same command resumes), signal the workers, e.g.
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all \
#     --command="pkill -TERM -f seqmatch_jax.main"
# (Ctrl-C on this script only ends the ssh sessions.)
set -euo pipefail
TPU=${1:?TPU name}
ZONE=${2:?zone}
CONFIG=${3:?config, e.g. configs/cifar100.py:ipc=50}
WORKDIR=${4:?workdir on a shared filesystem}
shift 4
ARGS=$(printf ' %q' "--config=$CONFIG" "--workdir=$WORKDIR" \
  --config.parallel.distributed=yes "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  cd ~/seqmatch_jax && python -m seqmatch_jax.main$ARGS \
    --config.dataset.data_dir=\${DATA_DIR:-\$HOME/tensorflow_datasets}"

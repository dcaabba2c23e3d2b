#!/usr/bin/env bash
# N processes on this machine joined by jax.distributed: the multi-host code
# path without a cluster. With GPUs, give each process its own through
# CUDA_VISIBLE_DEVICES; on a CPU, DEVICES=d gives each process d forced host
# devices. Ctrl-C (or SIGTERM to this script) stops every process cleanly:
# they agree on a step, save and exit with 130; the same command resumes.
# Logs: WORKDIR.process<i>.log.
#
#   bash launch/local_processes.sh 2 configs/digits.py runs/digits_2proc
#   DEVICES=2 bash launch/local_processes.sh 2 configs/digits.py runs/x --config.ipc=5
set -euo pipefail
N=${1:?number of processes}
CONFIG=${2:?config}
WORKDIR=${3:?workdir}
shift 3
PORT=${PORT:-$((20000 + RANDOM % 20000))}
if [[ -n "${DEVICES:-}" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES"
fi
mkdir -p "$(dirname "$WORKDIR")"
pids=()
for ((i = 0; i < N; i++)); do
  python -m seqmatch_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    --config.parallel.coordinator_address="localhost:$PORT" \
    --config.parallel.num_processes="$N" --config.parallel.process_id="$i" \
    "$@" >"$WORKDIR.process$i.log" 2>&1 &
  pids+=($!)
  echo "process $i: pid ${pids[-1]}, log $WORKDIR.process$i.log"
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
for p in "${pids[@]}"; do
  rc=0
  wait "$p" || rc=$?
  while kill -0 "$p" 2>/dev/null; do  # wait was cut short by the trap
    rc=0
    wait "$p" || rc=$?
  done
  if (( rc > status )); then status=$rc; fi
done
exit "$status"

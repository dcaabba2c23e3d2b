#!/usr/bin/env bash
# N processes on this machine joined by jax.distributed: the multi-host code
# path without a cluster (the 2-process test uses this script). On a CPU,
# DEVICES=d gives each process d forced host devices; on a multi-GPU machine
# GPUS=1 gives process i the GPU i (CUDA_VISIBLE_DEVICES=i). Ctrl-C (or
# SIGTERM to this script) stops every process cleanly: they agree on a step,
# save and exit with 130; the same command resumes. If one process fails, the
# others are stopped too. Logs: WORKDIR.process<i>.log.
#
#   DEVICES=2 bash launch/local_processes.sh 2 configs/digits.py runs/digits_2proc
#   GPUS=1 bash launch/local_processes.sh 4 configs/cifar10.py runs/c10 --config.ipc=10
set -euo pipefail
# Ctrl-C must reach this script even when it was started with SIGINT ignored,
# as every background job of a non-interactive shell is (nohup, CI runners,
# `cmd &` in a script): bash can neither trap nor reset a signal ignored at
# entry, so the trap below would silently do nothing. Re-exec once with SIGINT
# restored to its default.
if [[ -z "${SEQMATCH_LAUNCHER_REEXEC:-}" ]]; then
  export SEQMATCH_LAUNCHER_REEXEC=1
  exec "${PYTHON:-python}" -c 'import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
os.execvp("bash", ["bash"] + sys.argv[1:])' "$0" "$@"
fi
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
  # Own session: a terminal's Ctrl-C reaches only this script, which passes
  # one SIGTERM on (a second signal would abort a process mid-save).
  if [[ -n "${GPUS:-}" ]]; then export CUDA_VISIBLE_DEVICES=$i; fi
  setsid python -m seqmatch_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    --config.parallel.coordinator_address="localhost:$PORT" \
    --config.parallel.num_processes="$N" --config.parallel.process_id="$i" \
    "$@" >"$WORKDIR.process$i.log" 2>&1 &
  pids+=($!)
  echo "process $i: pid ${pids[-1]}, log $WORKDIR.process$i.log"
done
stop() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap stop INT TERM
status=0
left=$N
while (( left > 0 )); do
  rc=0
  wait -n "${pids[@]}" 2>/dev/null || rc=$?
  alive=0
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
  if (( alive == left )); then continue; fi  # wait was cut short by the trap
  left=$alive
  if (( rc > status )); then status=$rc; fi
  if (( rc != 0 && rc != 130 )); then stop; fi  # one failed: stop the others
done
for p in "${pids[@]}"; do  # statuses of processes that ended together
  rc=0
  wait "$p" 2>/dev/null || rc=$?
  if (( rc != 127 && rc > status )); then status=$rc; fi
done
exit "$status"

#!/usr/bin/env bash
# Runs N rlnas search processes on this machine, joined by JAX's distributed
# runtime (jax.distributed.initialize) through a coordinator on 127.0.0.1.
#
# This is the multi-host code path on one machine: a test and a demo of what
# tpu_vm.sh and slurm_gpu.sbatch do across machines. See launch/README.md.
set -euo pipefail

readonly PROG="${0##*/}"

usage() {
  cat <<EOF
Usage: $PROG --config=FILE --workdir=DIR [flags] [--] [extra rlnas.main args]

Starts N processes of 'python -m rlnas.main' on localhost with
  --config.distributed.coordinator_address=127.0.0.1:PORT
  --config.distributed.num_processes=N
  --config.distributed.process_id=I       (I = 0..N-1)
prefixes every output line with the process id, also writes one log file per
process, waits for all of them and exits non-zero if any fails. If one process
fails, the others are stopped (they would otherwise wait on the dead peer).
Run it from the repository root (or with rlnas installed).

Required:
  --config=FILE        config file, e.g. configs/NAME.py
  --workdir=DIR        shared work directory (all processes write here)
Optional:
  --num_processes=N    number of processes (default: 2)
  --port=PORT          coordinator port (default: a free port picked by Python)
  --python=BIN         Python interpreter (default: python)
  --data_dir=DIR       TFDS data_dir, passed as --config.data.data_dir=DIR
  --log_dir=DIR        per-process logs (default: WORKDIR/launch_logs)
  --dry_run            print the commands, one per line, and exit
                       (same as DRY_RUN=1 in the environment)
  -h, --help           show this help
Every other argument (e.g. --config.search.num_children=8) and everything
after '--' is passed through to each process.

Example:
  JAX_PLATFORMS=cpu $PROG --num_processes=2 --config=configs/NAME.py \\
      --workdir=/tmp/rlnas_local -- --config.search.max_children=16
EOF
}

# Helpers: die, log, quote, print_cmd, is_true, run (launch/common.sh).
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# ---------------------------------------------------------------- flags
NUM_PROCESSES=2
CONFIG=""
WORKDIR=""
PORT=""
PYTHON="python"
DATA_DIR=""
LOG_DIR=""
DRY_RUN="${DRY_RUN:-0}"
EXTRA=()

while (($#)); do
  case "$1" in
    # "--flag value" is rewritten to "--flag=value" and parsed again.
    --num_processes|--config|--workdir|--port|--python|--data_dir|--log_dir)
      (($# >= 2)) || die "$1 needs a value"
      set -- "$1=$2" "${@:3}"
      continue
      ;;
    --num_processes=*) NUM_PROCESSES="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --data_dir=*) DATA_DIR="${1#*=}" ;;
    --log_dir=*) LOG_DIR="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA+=("$@"); break ;;
    *) EXTRA+=("$1") ;;
  esac
  shift
done

[[ -n $CONFIG ]] || die "--config is required (e.g. --config=configs/NAME.py)"
[[ -n $WORKDIR ]] || die "--workdir is required (e.g. --workdir=/tmp/rlnas_local)"
[[ $NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] ||
  die "--num_processes must be a positive integer, got '$NUM_PROCESSES'"
if [[ -n $PORT ]]; then
  if ! [[ $PORT =~ ^[1-9][0-9]*$ ]] || ((PORT > 65535)); then
    die "--port must be an integer in [1, 65535], got '$PORT'"
  fi
fi

# Asks the OS for a free port. Another program could take it before process 0
# binds it; pass --port if that ever matters.
pick_free_port() {
  local port
  port="$("$PYTHON" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])' 2>/dev/null)" || true
  if [[ $port =~ ^[0-9]+$ ]]; then
    printf '%s\n' "$port"
  else
    printf '%s\n' $((20000 + RANDOM % 20000))
  fi
}
[[ -n $PORT ]] || PORT="$(pick_free_port)"

if [[ -z $LOG_DIR ]]; then
  case "$WORKDIR" in
    *://*) LOG_DIR="launch_logs" ;;  # a gs:// workdir is no place for tee.
    *) LOG_DIR="$WORKDIR/launch_logs" ;;
  esac
fi

process_cmd() {  # process_cmd I -> sets CMD to the argv of process I.
  CMD=("$PYTHON" -m rlnas.main
       "--config=$CONFIG"
       "--workdir=$WORKDIR"
       "--config.distributed.coordinator_address=127.0.0.1:$PORT"
       "--config.distributed.num_processes=$NUM_PROCESSES"
       "--config.distributed.process_id=$1")
  if [[ -n $DATA_DIR ]]; then
    CMD+=("--config.data.data_dir=$DATA_DIR")
  fi
  # ${EXTRA[@]+...} keeps bash < 4.4 quiet about an empty array under set -u.
  CMD+=(${EXTRA[@]+"${EXTRA[@]}"})
}

if is_true "$DRY_RUN"; then
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    process_cmd "$i"
    print_cmd "${CMD[@]}"
  done
  exit 0
fi

# ---------------------------------------------------------------- launch
PIDS=()        # PIDS[i] is the pid of process i, "" once it was reaped.

# Each process runs in its own process group (set -m below), so that
# 'kill -- -PID' also reaches anything it started.
stop_all() {
  local pid alive=0 waited
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      alive=1
    fi
  done
  ((alive)) || return 0
  # Give JAX a few seconds to shut down cleanly, then insist.
  for ((waited = 0; waited < 50; waited++)); do
    alive=0
    for pid in ${PIDS[@]+"${PIDS[@]}"}; do
      if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then alive=1; fi
    done
    ((alive)) || return 0
    sleep 0.1
  done
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do
    if [[ -n $pid ]]; then
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}
# A read loop, not awk or sed: mawk and BSD sed hold back input lines, which
# would hide the live output and lose the tail of a killed process.
prefix_lines() {
  local line
  while IFS= read -r line || [[ -n $line ]]; do
    printf '%s%s\n' "$1" "$line"
  done
}

trap stop_all EXIT
trap 'log "interrupted, stopping all processes"; exit 130' INT
trap 'log "terminated, stopping all processes"; exit 143' TERM

mkdir -p "$LOG_DIR"
# Job control gives every background process its own process group. It also
# keeps Ctrl-C away from them; the INT trap above stops them instead.
set -m
log "coordinator 127.0.0.1:$PORT, $NUM_PROCESSES processes, logs in $LOG_DIR"
for ((i = 0; i < NUM_PROCESSES; i++)); do
  process_cmd "$i"
  log "process $i: $(print_cmd "${CMD[@]}")"
  # stdout+stderr go to the log file verbatim and to our stdout prefixed.
  "${CMD[@]}" > >(tee "$LOG_DIR/process_$i.log" |
                  prefix_lines "[process $i] ") 2>&1 &
  PIDS+=("$!")
done
set +m  # The groups stay; this only silences bash's "Terminated" notices.

# Polls instead of 'wait -n' so that it works with bash 3.2 (macOS) and
# knows which process ended.
EXIT_CODE=0
remaining=$NUM_PROCESSES
while ((remaining > 0)); do
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    pid="${PIDS[i]}"
    [[ -n $pid ]] || continue
    kill -0 "$pid" 2>/dev/null && continue
    if wait "$pid"; then rc=0; else rc=$?; fi
    PIDS[i]=""
    remaining=$((remaining - 1))
    if ((rc == 0)); then
      log "process $i finished"
    elif ((EXIT_CODE == 0)); then
      EXIT_CODE=$rc
      log "process $i failed with exit code $rc; stopping the others"
      stop_all
    else
      log "process $i exited with code $rc"
    fi
  done
  ((remaining == 0)) || sleep 0.2
done
wait  # lets the log pipes flush before we return.

if ((EXIT_CODE != 0)); then
  log "FAILED (exit code $EXIT_CODE); logs in $LOG_DIR"
else
  log "all $NUM_PROCESSES processes finished"
fi
exit "$EXIT_CODE"

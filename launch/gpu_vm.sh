#!/usr/bin/env bash
# Runs an rlnas search on one machine with several GPUs: a single process that
# sees all local GPUs (no jax.distributed needed). Run it on the GPU machine,
# from the repository root.
set -euo pipefail

readonly PROG="${0##*/}"

usage() {
  cat <<EOF
Usage: $PROG SUBCOMMAND [flags] [--] [extra rlnas.main args]

Subcommands (each prints the commands it runs):
  setup   make a venv, install the project and jax[cuda12] into it
  run     python -m rlnas.main --config=FILE --workdir=DIR on all local GPUs
  all     setup, then run

Required for run (and all):
  --config=FILE       config file, e.g. configs/NAME.py
  --workdir=DIR       where checkpoints and metrics go
Optional:
  --venv=DIR          virtual environment (default: .venv)
  --python=BIN        interpreter for run (default: VENV/bin/python)
  --base_python=BIN   interpreter setup makes the venv with (default: python3;
                      JAX needs Python >= 3.11)
  --jax_spec=SPEC     pip requirement for JAX (default: jax[cuda12]; jax[cuda13]
                      for CUDA 13 drivers)
  --gpus=LIST         only these GPUs, e.g. 0,1,2,3 (sets CUDA_VISIBLE_DEVICES)
  --data_dir=DIR      TFDS data_dir, passed as --config.data.data_dir=DIR
  --dry_run           print the commands, one per line, and exit
                      (same as DRY_RUN=1 in the environment)
  -h, --help          show this help
Every other argument and everything after '--' goes to rlnas.main.

Example:
  $PROG all --config=configs/NAME.py --workdir=\$HOME/rlnas_runs/run1
EOF
}

# Helpers: die, log, quote, print_cmd, is_true, run (launch/common.sh).
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# ---------------------------------------------------------------- flags
SUBCOMMAND=""
CONFIG=""
WORKDIR=""
VENV=".venv"
PYTHON=""
BASE_PYTHON="python3"
JAX_SPEC="jax[cuda12]"
GPUS=""
DATA_DIR=""
DRY_RUN="${DRY_RUN:-0}"
EXTRA=()

while (($#)); do
  case "$1" in
    # "--flag value" is rewritten to "--flag=value" and parsed again.
    --config|--workdir|--venv|--python|--base_python|--jax_spec|--gpus|--data_dir)
      (($# >= 2)) || die "$1 needs a value"
      set -- "$1=$2" "${@:3}"
      continue
      ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --venv=*) VENV="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --base_python=*) BASE_PYTHON="${1#*=}" ;;
    --jax_spec=*) JAX_SPEC="${1#*=}" ;;
    --gpus=*) GPUS="${1#*=}" ;;
    --data_dir=*) DATA_DIR="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    setup|run|all)
      [[ -z $SUBCOMMAND ]] || die "two subcommands given: '$SUBCOMMAND' and '$1'"
      SUBCOMMAND="$1"
      ;;
    --) shift; EXTRA+=("$@"); break ;;
    *) EXTRA+=("$1") ;;
  esac
  shift
done

[[ -n $SUBCOMMAND ]] || die "a subcommand is required: setup, run or all"
case "$SUBCOMMAND" in
  run|all)
    [[ -n $CONFIG ]] || die "--config is required for '$SUBCOMMAND' (e.g. --config=configs/NAME.py)"
    [[ -n $WORKDIR ]] || die "--workdir is required for '$SUBCOMMAND'"
    ;;
esac
if [[ -n $GPUS ]] && ! [[ $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  die "--gpus must be a comma-separated list of GPU indices, e.g. 0,1,2,3; got '$GPUS'"
fi

do_setup() {
  local vpy="$VENV/bin/python"
  run "$BASE_PYTHON" -m venv "$VENV"
  run "$vpy" -m pip install --upgrade pip
  # The project and the CUDA build of JAX in one pip call, so that one
  # resolver picks a jax version that satisfies both.
  if [[ -f pyproject.toml || -f setup.py ]]; then
    run "$vpy" -m pip install -e . "$JAX_SPEC"
  elif [[ -f requirements.txt ]]; then
    run "$vpy" -m pip install -r requirements.txt "$JAX_SPEC"
  else
    die "no pyproject.toml, setup.py or requirements.txt here; run from the repository root"
  fi
  run "$vpy" -c "import jax; print(jax.__version__, jax.devices())"
}

do_run() {
  local py="${PYTHON:-$VENV/bin/python}"
  local cmd=()
  if [[ -n $GPUS ]]; then
    cmd+=(env "CUDA_VISIBLE_DEVICES=$GPUS")
  fi
  # One process drives every visible GPU, so no --config.distributed.* here.
  cmd+=("$py" -m rlnas.main "--config=$CONFIG" "--workdir=$WORKDIR")
  if [[ -n $DATA_DIR ]]; then
    cmd+=("--config.data.data_dir=$DATA_DIR")
  fi
  cmd+=(${EXTRA[@]+"${EXTRA[@]}"})
  run "${cmd[@]}"
}

case "$SUBCOMMAND" in
  setup) do_setup ;;
  run) do_run ;;
  all) do_setup; do_run ;;
esac

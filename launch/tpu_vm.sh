#!/usr/bin/env bash
# Runs an rlnas search on a Cloud TPU VM (one host or a multi-host slice):
# create the TPU, copy and install the project on every worker, start the
# search on all workers at once, delete the TPU. Each step is a subcommand.
#
# Every worker runs the same command; jax.distributed.initialize() finds its
# peers from the TPU metadata (--config.distributed.enabled=True). The workdir
# and the TFDS data_dir live in a gs:// bucket that all workers can read.
set -euo pipefail

readonly PROG="${0##*/}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
# On each worker, relative to the login user's home directory.
readonly REMOTE_SRC_TAR="rlnas-src.tar.gz"
readonly REMOTE_DIR="rlnas"
readonly REMOTE_VENV="rlnas-venv"
readonly REMOTE_LOG="rlnas-run.log"

usage() {
  cat <<EOF
Usage: $PROG SUBCOMMAND --name=TPU --zone=ZONE [flags] [--] [extra rlnas.main args]

Subcommands (each prints the gcloud commands it runs):
  create   gcloud compute tpus tpu-vm create
  setup    copy this checkout (or clone --repo_url) to every worker, make a
           Python venv there and install the project and jax[tpu]
  run      start 'python -m rlnas.main' on all workers (--worker=all)
  delete   gcloud compute tpus tpu-vm delete --quiet
  all      create, setup, run, then delete (also on failure, unless --keep)

Required for every subcommand:
  --name=TPU              TPU VM name
  --zone=ZONE             e.g. us-central2-b (v4), us-west4-a (v5e)
Required for run (and all):
  --config=FILE           config file, relative to the repository root
  --workdir=gs://...      where checkpoints and metrics go
  --data_dir=gs://...     TFDS data_dir (--config.data.data_dir)
  or --bucket=gs://B      sets --workdir=gs://B/rlnas/TPU and
                          --data_dir=gs://B/tensorflow_datasets
Optional:
  --project=PROJECT       passed to every gcloud command
  --accelerator_type=T    default: v4-8 (also v5litepod-8, v5p-8, v6e-8, v4-32, ...)
  --runtime_version=V     TPU software version (alias --version); default:
                          v6e: v2-alpha-tpuv6e, v5p: v2-alpha-tpuv5,
                          v5e: v2-alpha-tpuv5-lite, v4 and older: tpu-ubuntu2204-base
  --spot                  create a Spot TPU (cheaper, may be preempted)
  --repo_url=URL          setup clones this git repo instead of copying the
                          local checkout; --git_ref=REF (default: main)
  --jax_spec=SPEC         pip requirement for JAX (default: jax[tpu])
  --python_version=X.Y    Python for the worker venv, fetched by uv (default: 3.11)
  --detach                run: start in the background (nohup) and return;
                          output goes to \$HOME/$REMOTE_LOG on each worker
  --keep                  all: do not delete the TPU at the end
  --dry_run               print the commands, one per line, and exit
                          (same as DRY_RUN=1 in the environment)
  -h, --help              show this help
Every other argument (e.g. --config.search.num_children=8) and everything
after '--' is passed through to rlnas.main.

Example:
  $PROG all --name=rlnas-v4 --zone=us-central2-b --accelerator_type=v4-8 \\
      --config=configs/NAME.py --bucket=gs://MY_BUCKET
EOF
}

# Helpers: die, log, quote, print_cmd, is_true, run (launch/common.sh).
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# ---------------------------------------------------------------- flags
SUBCOMMAND=""
NAME=""
ZONE=""
PROJECT=""
ACCELERATOR_TYPE="v4-8"
VERSION=""
SPOT=0
REPO_URL=""
GIT_REF="main"
JAX_SPEC="jax[tpu]"
PYTHON_VERSION="3.11"
CONFIG=""
WORKDIR=""
DATA_DIR=""
BUCKET=""
DETACH=0
KEEP=0
DRY_RUN="${DRY_RUN:-0}"
EXTRA=()

while (($#)); do
  case "$1" in
    # "--flag value" is rewritten to "--flag=value" and parsed again.
    --name|--zone|--project|--accelerator_type|--runtime_version|--version|\
    --repo_url|--git_ref|\
    --jax_spec|--python_version|--config|--workdir|--data_dir|--bucket)
      (($# >= 2)) || die "$1 needs a value"
      set -- "$1=$2" "${@:3}"
      continue
      ;;
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --accelerator_type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --runtime_version=*|--version=*) VERSION="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --repo_url=*) REPO_URL="${1#*=}" ;;
    --git_ref=*) GIT_REF="${1#*=}" ;;
    --jax_spec=*) JAX_SPEC="${1#*=}" ;;
    --python_version=*) PYTHON_VERSION="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --data_dir=*) DATA_DIR="${1#*=}" ;;
    --bucket=*) BUCKET="${1#*=}" ;;
    --detach) DETACH=1 ;;
    --keep) KEEP=1 ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    create|setup|run|delete|all)
      [[ -z $SUBCOMMAND ]] || die "two subcommands given: '$SUBCOMMAND' and '$1'"
      SUBCOMMAND="$1"
      ;;
    --) shift; EXTRA+=("$@"); break ;;
    *) EXTRA+=("$1") ;;
  esac
  shift
done

# ---------------------------------------------------------------- checks
[[ -n $SUBCOMMAND ]] || die "a subcommand is required: create, setup, run, delete or all"
[[ -n $NAME ]] || die "--name is required (the TPU VM name)"
[[ -n $ZONE ]] || die "--zone is required (e.g. --zone=us-central2-b)"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name must be lowercase letters, digits and '-', starting with a letter; got '$NAME'"

if [[ -n $BUCKET ]]; then
  [[ $BUCKET == gs://* ]] || die "--bucket must start with gs://, got '$BUCKET'"
  BUCKET="${BUCKET%/}"
  [[ -n $WORKDIR ]] || WORKDIR="$BUCKET/rlnas/$NAME"
  [[ -n $DATA_DIR ]] || DATA_DIR="$BUCKET/tensorflow_datasets"
fi

case "$SUBCOMMAND" in
  run|all)
    [[ -n $CONFIG ]] || die "--config is required for '$SUBCOMMAND' (e.g. --config=configs/NAME.py)"
    [[ -n $WORKDIR ]] || die "--workdir=gs://... (or --bucket=gs://...) is required for '$SUBCOMMAND'"
    [[ -n $DATA_DIR ]] || die "--data_dir=gs://... (or --bucket=gs://...) is required for '$SUBCOMMAND'"
    # Every worker and the user must see the same files: local paths would
    # give each worker its own copy.
    [[ $WORKDIR == gs://* ]] || die "--workdir must be a gs:// path, got '$WORKDIR'"
    [[ $DATA_DIR == gs://* ]] || die "--data_dir must be a gs:// path, got '$DATA_DIR'"
    ;;
esac

if [[ $SUBCOMMAND == all ]] && ((DETACH)); then
  die "--detach cannot be used with 'all': the TPU would be deleted under the running search"
fi

case "$SUBCOMMAND" in
  create|all)
    [[ $ACCELERATOR_TYPE =~ ^[a-z0-9]+-[0-9]+$ ]] ||
      die "--accelerator_type looks wrong: '$ACCELERATOR_TYPE' (e.g. v4-8, v5litepod-8, v6e-8)"
    if [[ -z $VERSION ]]; then
      # From Google's "TPU software versions" page (JAX and PyTorch rows).
      case "$ACCELERATOR_TYPE" in
        v6e-*) VERSION="v2-alpha-tpuv6e" ;;
        v5p-*) VERSION="v2-alpha-tpuv5" ;;
        v5litepod-*|v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
        v2-*|v3-*|v4-*) VERSION="tpu-ubuntu2204-base" ;;
        *) die "no default runtime version for '$ACCELERATOR_TYPE'; pass --runtime_version (see 'gcloud compute tpus tpu-vm versions list')" ;;
      esac
    fi
    ;;
esac

if ! is_true "$DRY_RUN"; then
  command -v gcloud >/dev/null || die "gcloud not found; install the Google Cloud CLI"
fi

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
COMMON=("--zone=$ZONE")
if [[ -n $PROJECT ]]; then
  COMMON+=("--project=$PROJECT")
fi

# ---------------------------------------------------------------- steps
do_create() {
  local cmd=("${GCLOUD_TPU[@]}" create "$NAME" "${COMMON[@]}"
             "--accelerator-type=$ACCELERATOR_TYPE" "--version=$VERSION")
  if ((SPOT)); then
    cmd+=(--spot)
  fi
  run "${cmd[@]}"
}

# The worker script is one line: gcloud passes it to ssh as --command. \$HOME
# is left for the worker's shell to expand; user values are quoted.
setup_script() {
  local steps=()
  steps+=("set -euo pipefail")
  if [[ -n $REPO_URL ]]; then
    steps+=("rm -rf \$HOME/$REMOTE_DIR"
            "git clone --depth=1 --branch=$(quote "$GIT_REF") $(quote "$REPO_URL") \$HOME/$REMOTE_DIR")
  else
    steps+=("rm -rf \$HOME/$REMOTE_DIR"
            "mkdir -p \$HOME/$REMOTE_DIR"
            "tar -xzf \$HOME/$REMOTE_SRC_TAR -C \$HOME/$REMOTE_DIR")
  fi
  # The TPU images ship Python 3.10; current JAX needs >= 3.11, so uv fetches
  # one. The project and jax[tpu] go in one pip call, so that one resolver
  # picks a jax that satisfies both. gcsfs lets etils/TFDS/orbax open gs://
  # paths without TensorFlow. $src is split into words on purpose.
  steps+=("python3 -m pip install --user --quiet --upgrade uv"
          "\$HOME/.local/bin/uv venv --seed --allow-existing --python=$(quote "$PYTHON_VERSION") \$HOME/$REMOTE_VENV"
          "cd \$HOME/$REMOTE_DIR"
          "if [ -f pyproject.toml ] || [ -f setup.py ]; then src=\"-e .\"; elif [ -f requirements.txt ]; then src=\"-r requirements.txt\"; else echo \"no pyproject.toml, setup.py or requirements.txt\" >&2; exit 1; fi"
          "\$HOME/$REMOTE_VENV/bin/python -m pip install \$src $(quote "$JAX_SPEC") gcsfs"
          "\$HOME/$REMOTE_VENV/bin/python -c \"import jax; print(jax.__version__)\"")
  local joined="" step
  for step in "${steps[@]}"; do
    joined+="${joined:+; }$step"
  done
  printf '%s' "$joined"
}

do_setup() {
  if [[ -z $REPO_URL ]]; then
    local tarball="${TMPDIR:-/tmp}/rlnas-src-$NAME.tar.gz"
    run tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=__pycache__ \
      --exclude=workdirs --exclude=launch_logs --exclude=.pytest_cache \
      --exclude="*.egg-info" -C "$REPO_ROOT" .
    run "${GCLOUD_TPU[@]}" scp "$tarball" "$NAME:$REMOTE_SRC_TAR" "${COMMON[@]}" --worker=all
  fi
  run "${GCLOUD_TPU[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all "--command=$(setup_script)"
}

run_script() {
  local main
  main=("-m" rlnas.main
        "--config=$CONFIG"
        "--workdir=$WORKDIR"
        "--config.distributed.enabled=True"
        "--config.data.data_dir=$DATA_DIR"
        ${EXTRA[@]+"${EXTRA[@]}"})
  local py
  py="\$HOME/$REMOTE_VENV/bin/python $(print_cmd "${main[@]}")"
  if ((DETACH)); then
    printf "cd \$HOME/%s && nohup %s > \$HOME/%s 2>&1 < /dev/null &" \
      "$REMOTE_DIR" "$py" "$REMOTE_LOG"
  else
    printf "cd \$HOME/%s && %s" "$REMOTE_DIR" "$py"
  fi
}

do_run() {
  run "${GCLOUD_TPU[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all "--command=$(run_script)"
}

do_delete() {
  run "${GCLOUD_TPU[@]}" delete "$NAME" "${COMMON[@]}" --quiet
}

delete_on_exit() {
  local status=$?
  log "deleting $NAME (pass --keep to keep it)"
  do_delete || true
  exit "$status"
}

case "$SUBCOMMAND" in
  create) do_create ;;
  setup) do_setup ;;
  run) do_run ;;
  delete) do_delete ;;
  all)
    do_create
    if ! ((KEEP)) && ! is_true "$DRY_RUN"; then
      # A forgotten TPU keeps billing; delete it even when a step fails.
      trap delete_on_exit EXIT
    fi
    do_setup
    do_run
    if ! ((KEEP)) && is_true "$DRY_RUN"; then
      do_delete
    fi
    ;;
esac

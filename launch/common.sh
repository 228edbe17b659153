# shellcheck shell=bash
# Shell helpers shared by the launch scripts (sourced; not run on its own).
# Each script sets PROG (its name for messages) and DRY_RUN before using them.
# slurm_gpu.sbatch keeps its own copy: SLURM runs a spooled copy of the batch
# file, away from this directory.

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  printf "Run '%s --help' for usage.\n" "$PROG" >&2
  exit 2
}

log() { printf '[%s] %s\n' "$PROG" "$*" >&2; }

# Quotes one word exactly like Python's shlex.quote, so dry-run lines can be
# pasted into a shell or read back with shlex.split.
readonly SAFE_WORD_RE='^[A-Za-z0-9_@%+=:,./-]+$'
quote() {
  local s=$1
  if [[ -z $s ]]; then
    printf "''"
  elif [[ $s =~ $SAFE_WORD_RE ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\"\'\"\'}"
  fi
}

# Prints a command as one shell-quoted line on stdout.
print_cmd() {
  local line="" word
  for word in "$@"; do
    line+="${line:+ }$(quote "$word")"
  done
  printf '%s\n' "$line"
}

is_true() {
  case "${1:-}" in
    1|true|True|TRUE|yes|on) return 0 ;;
    *) return 1 ;;
  esac
}

# Prints the command (stdout in a dry run, stderr otherwise) and runs it
# unless this is a dry run.
run() {
  if is_true "$DRY_RUN"; then
    print_cmd "$@"
  else
    log "+ $(print_cmd "$@")"
    "$@"
  fi
}

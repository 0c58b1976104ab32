# Shared by launch/*.sh: argument helpers and `run`, which prints every command exactly as a
# shell would read it ("+ cmd args") and executes it unless --dry-run was given.
# shellcheck shell=bash

DRY_RUN=${DRY_RUN:-0}

# Quotes one word for copy-paste: bare when safe, else in single quotes.
quote() {
  local s=$1
  if [[ -n "$s" && "$s" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Prints a command line (with a leading "+ ") quoted so that pasting it runs the same thing.
show() {
  local out="+" w
  for w in "$@"; do out+=" $(quote "$w")"; done
  printf '%s\n' "$out"
}

run() {
  show "$@"
  if [ "$DRY_RUN" != 1 ]; then "$@"; fi
}

die() {
  echo "error: $*" >&2
  exit 2
}

need() {  # need NAME VALUE HINT: one clear line when a required option is missing
  [ -n "$2" ] || die "$1 is required ($3)"
}

#!/usr/bin/env bash
# One host: CPU, one GPU box, or a single-host TPU VM (v5e-8, v4-8...). One process drives
# every local device, so this is just the trainer:
#
#   launch/local.sh -- --workdir runs/text_base --config configs/text.py:variant=base
#
# --num-processes N starts N processes on this host joined by jax.distributed (coordinator
# localhost:PORT): the multi-host code path (per-process data shards, global arrays,
# cross-process collectives, orbax writes from every process) without a cluster. Each
# process gets --coordinator_address / --num_processes / --process_id appended. A command
# may replace the trainer (first word after -- not an option); with N > 1 any failing
# process stops the others. (The trainer needs no launcher for that: its processes agree on a
# SIGTERM that reaches any of them and stop after the same step, and a process that dies is
# named by the others, which exit 1 within --peer_timeout; see d2v_jax/distributed.py.)
#
#   XLA_FLAGS=--xla_force_host_platform_device_count=2 launch/local.sh --num-processes 2 -- \
#       --workdir /tmp/mp --config configs/text.py:variant=tiny,runlocal
#
# --dry-run prints the commands. PYTHON defaults to .venv/bin/python (else python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
source "$ROOT/launch/common.sh"

N=1 PORT=${D2V_PORT:-12355}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --num-processes) N=$2; shift ;;
    --port) PORT=$2; shift ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (trainer arguments go after --)" ;;
  esac
  shift
done
[ $# -gt 0 ] || die "give the trainer's arguments after --, e.g. -- --workdir DIR --config configs/text.py:variant=tiny"
[[ "$N" =~ ^[1-9][0-9]*$ ]] || die "--num-processes=$N must be a positive integer"

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
if [[ "$1" == -* ]]; then CMD=("$PYTHON" -m d2v_jax.train "$@"); else CMD=("$@"); fi

if [ "$N" = 1 ]; then
  show "${CMD[@]}"
  [ "$DRY_RUN" = 1 ] || exec "${CMD[@]}"
  exit 0
fi

pids=()
stop_all() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap 'stop_all' TERM INT
for ((i = 0; i < N; i++)); do
  proc=("${CMD[@]}" --coordinator_address="localhost:$PORT" --num_processes="$N" --process_id="$i")
  echo "$(show "${proc[@]}") &"
  if [ "$DRY_RUN" != 1 ]; then
    "${proc[@]}" &
    pids+=($!)
  fi
done
[ "$DRY_RUN" != 1 ] || exit 0
# Reap in completion order: a failed process stops the others, which would otherwise wait
# for it in a collective until JAX's heartbeat timeout.
status=0 left=("${pids[@]}")
while [ "${#left[@]}" -gt 0 ]; do
  done_pid=""
  if ! wait -n -p done_pid "${left[@]}"; then
    [ "$status" != 0 ] || echo "error: process $done_pid failed; stopping the others" >&2
    status=1
    stop_all
  fi
  rest=()
  for p in "${left[@]}"; do [ "$p" = "$done_pid" ] || rest+=("$p"); done
  left=("${rest[@]}")
done
exit "$status"

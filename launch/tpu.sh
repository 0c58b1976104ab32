#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (or several slices): every step runs the same command on
# every worker through `gcloud compute tpus tpu-vm ssh --worker=all`.
#
#   launch/tpu.sh create --name d2v --zone us-west4-a --type v5litepod-16
#   launch/tpu.sh setup  --name d2v --zone us-west4-a
#   launch/tpu.sh run    --name d2v --zone us-west4-a --workdir gs://BUCKET/runs/text_base \
#                        -- --config configs/text.py:variant=base --config.data.path='gs://BUCKET/text/*.txt'
#   launch/tpu.sh logs   --name d2v --zone us-west4-a
#   launch/tpu.sh stop   --name d2v --zone us-west4-a     # SIGTERM: the trainer saves, exits 0
#   launch/tpu.sh delete --name d2v --zone us-west4-a
#
# Any command with --dry-run prints the exact commands instead of running them.
# Multislice: `create --num-slices 2` makes a queued resource of 2 slices named NAME-0, NAME-1;
# give the same --num-slices to setup / run / logs / stop / delete.
# The run directory must be on storage every worker sees (gs://...): orbax writes each
# shard from the worker that holds it, and process 0 writes metrics.
# Options default to the environment: TPU_NAME, TPU_ZONE, TPU_PROJECT, TPU_TYPE.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "$HERE/common.sh"

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

CMD="" NAME=${TPU_NAME:-} ZONE=${TPU_ZONE:-} PROJECT=${TPU_PROJECT:-} TYPE=${TPU_TYPE:-}
# shellcheck disable=SC2088  # REMOTE_DIR is expanded by the workers' shells, not here
VERSION="" SLICES=1 SPOT=0 WORKDIR="" PYTHON_BIN=python3.11 REMOTE_DIR='~/d2v_jax'
TRAIN_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --name) NAME=$2; shift ;;
    --zone) ZONE=$2; shift ;;
    --project) PROJECT=$2; shift ;;
    --type) TYPE=$2; shift ;;
    --version) VERSION=$2; shift ;;
    --num-slices) SLICES=$2; shift ;;
    --spot) SPOT=1 ;;
    --workdir) WORKDIR=$2; shift ;;
    --python) PYTHON_BIN=$2; shift ;;
    -h|--help) usage 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    create|setup|run|logs|stop|delete) CMD=$1 ;;
    *) die "unknown argument '$1' (see launch/tpu.sh --help)" ;;
  esac
  shift
done
[ -n "$CMD" ] || usage 2
need --name "$NAME" "the TPU name, or set TPU_NAME"
need --zone "$ZONE" "e.g. us-west4-a, or set TPU_ZONE"
[[ "$SLICES" =~ ^[1-9][0-9]*$ ]] || die "--num-slices=$SLICES must be a positive integer"

GLOBAL=(--zone="$ZONE")
[ -z "$PROJECT" ] || GLOBAL+=(--project="$PROJECT")

# Node names: one slice is NAME; a multislice queued resource holds NAME-0 .. NAME-(N-1).
NODES=("$NAME")
if [ "$SLICES" -gt 1 ]; then
  NODES=()
  for ((i = 0; i < SLICES; i++)); do NODES+=("$NAME-$i"); done
fi

# Software image per generation (Cloud TPU "TPU software versions" page).
runtime_version() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default --version for --type=$1; pass --version" ;;
  esac
}

# The same shell command on every worker of every slice (slices in parallel).
on_all_workers() {
  local remote=$1 node pids=()
  for node in "${NODES[@]}"; do
    if [ "${#NODES[@]}" -gt 1 ] && [ "$DRY_RUN" != 1 ]; then
      run gcloud compute tpus tpu-vm ssh "$node" "${GLOBAL[@]}" --worker=all --command="$remote" &
      pids+=($!)
    else
      run gcloud compute tpus tpu-vm ssh "$node" "${GLOBAL[@]}" --worker=all --command="$remote"
    fi
  done
  for p in "${pids[@]}"; do wait "$p"; done
}

case "$CMD" in
  create)
    need --type "$TYPE" "an accelerator type such as v5litepod-16, v4-32, v5p-8, v6e-8"
    VERSION=${VERSION:-$(runtime_version "$TYPE")}
    if [ "$SLICES" -gt 1 ]; then
      args=(gcloud compute tpus queued-resources create "$NAME" "${GLOBAL[@]}"
            --accelerator-type="$TYPE" --runtime-version="$VERSION"
            --node-count="$SLICES" --node-prefix="$NAME")
      [ "$SPOT" = 1 ] && args+=(--spot)
      run "${args[@]}"
    else
      args=(gcloud compute tpus tpu-vm create "$NAME" "${GLOBAL[@]}"
            --accelerator-type="$TYPE" --version="$VERSION")
      [ "$SPOT" = 1 ] && args+=(--spot)
      run "${args[@]}"
    fi
    ;;
  setup)
    # This checkout's committed tree (git archive HEAD) on every worker, then a venv with
    # the exact pins plus libtpu. torch (export checks only) comes from the CPU index.
    ROOT="$(cd "$HERE/.." && pwd)"
    TARBALL=/tmp/d2v_jax-src.tar.gz
    run git -C "$ROOT" archive --format=tar.gz -o "$TARBALL" HEAD
    for node in "${NODES[@]}"; do
      run gcloud compute tpus tpu-vm scp "$TARBALL" "$node:d2v_jax-src.tar.gz" "${GLOBAL[@]}" --worker=all
    done
    on_all_workers "set -e; command -v $PYTHON_BIN >/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq $PYTHON_BIN $PYTHON_BIN-venv; }; mkdir -p $REMOTE_DIR && tar -xzf ~/d2v_jax-src.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR && { [ -x .venv/bin/python ] || $PYTHON_BIN -m venv .venv; } && .venv/bin/pip install -q -r requirements.txt -r requirements-tpu.txt --extra-index-url https://download.pytorch.org/whl/cpu"
    ;;
  run)
    need --workdir "$WORKDIR" "the run directory on shared storage, e.g. gs://BUCKET/runs/NAME"
    [ "${#TRAIN_ARGS[@]}" -gt 0 ] || die "give the trainer's arguments after --, e.g. -- --config configs/text.py:variant=base"
    [[ "$WORKDIR" == gs://* ]] || echo "warning: --workdir=$WORKDIR is not on gs://; every worker must see the same directory" >&2
    train=".venv/bin/python -m d2v_jax.train --workdir=$(quote "$WORKDIR")"
    for a in "${TRAIN_ARGS[@]}"; do train+=" $(quote "$a")"; done
    # Detached (setsid nohup) so the ssh session can end; its pid (the trainer's: setsid and
    # nohup exec) goes to a file for `stop`. D2V_DISTRIBUTED=1: jax.distributed.initialize()
    # finds the other workers through the TPU metadata server.
    on_all_workers "cd $REMOTE_DIR; D2V_DISTRIBUTED=1 setsid nohup $train > train.log 2>&1 < /dev/null & echo \$! > train.pid"
    ;;
  logs)
    for node in "${NODES[@]}"; do
      run gcloud compute tpus tpu-vm ssh "$node" "${GLOBAL[@]}" --worker=0 --command="tail -n 50 $REMOTE_DIR/train.log"
    done
    ;;
  stop)
    on_all_workers "kill -TERM \$(cat $REMOTE_DIR/train.pid) 2>/dev/null || echo 'no trainer running'"
    ;;
  delete)
    if [ "$SLICES" -gt 1 ]; then
      run gcloud compute tpus queued-resources delete "$NAME" "${GLOBAL[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$NAME" "${GLOBAL[@]}" --quiet
    fi
    ;;
esac

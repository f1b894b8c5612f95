#!/usr/bin/env bash
# m3jax on a Cloud TPU VM or pod slice: the same command on every worker, via gcloud ssh.
#
#   launch/tpu_vm.sh TPU_NAME ZONE sync                 # copy this checkout to every worker
#   launch/tpu_vm.sh TPU_NAME ZONE setup                # venv + pip install -e . jax[tpu]
#   launch/tpu_vm.sh TPU_NAME ZONE run -- m3jax train --config=... --workdir=/mnt/shared/run
#   launch/tpu_vm.sh TPU_NAME ZONE start -- m3jax train ...   # detached (nohup), log per worker
#   launch/tpu_vm.sh TPU_NAME ZONE logs                 # tail the detached job's logs
#   launch/tpu_vm.sh TPU_NAME ZONE stop                 # SIGTERM: save a checkpoint, exit
#
# JAX finds the coordinator, process count and process id itself on TPU VMs
# (jax.distributed cluster detection), so no M3JAX_* variables are needed. The workdir
# must be shared by all workers (Filestore/NFS, or a gcsfuse mount at the same path):
# every worker writes its shards of each checkpoint.
#
# Environment: PROJECT (gcloud project, default: gcloud's), REMOTE_DIR (default:
# ~/m3jax on the workers), EXTRA_GCLOUD_FLAGS (e.g. "--tunnel-through-iap").

set -euo pipefail

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

[[ $# -ge 3 ]] || usage
TPU_NAME="$1"; ZONE="$2"; ACTION="$3"; shift 3
if [[ "${1:-}" == "--" ]]; then shift; fi
REMOTE_DIR="${REMOTE_DIR:-~/m3jax}"
gcloud_flags=(--zone "$ZONE" --worker=all)
[[ -n "${PROJECT:-}" ]] && gcloud_flags+=(--project "$PROJECT")
# shellcheck disable=SC2206
[[ -n "${EXTRA_GCLOUD_FLAGS:-}" ]] && gcloud_flags+=($EXTRA_GCLOUD_FLAGS)

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_flags[@]}" --command "$1"
}

quoted_command() {
  [[ $# -gt 0 ]] || { echo "tpu_vm.sh: give the command after --" >&2; exit 2; }
  printf '%q ' "$@"
}

activate="cd $REMOTE_DIR && source .venv/bin/activate"

case "$ACTION" in
  sync)
    repo="$(cd "$(dirname "$0")/.." && pwd)"
    tar -C "$repo" --exclude=.venv --exclude=.git --exclude='*.pyc' -czf /tmp/m3jax-src.tgz .
    gcloud compute tpus tpu-vm scp /tmp/m3jax-src.tgz "$TPU_NAME":/tmp/m3jax-src.tgz \
      "${gcloud_flags[@]}"
    on_all_workers "mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf /tmp/m3jax-src.tgz"
    ;;
  setup)
    on_all_workers "cd $REMOTE_DIR && python3 -m venv .venv && source .venv/bin/activate \
      && pip install -q --upgrade pip && pip install -q -e . 'jax[tpu]'"
    ;;
  run)
    cmd="$(quoted_command "$@")"
    on_all_workers "$activate && $cmd"
    ;;
  start)
    cmd="$(quoted_command "$@")"
    # The pid file lets `stop` signal exactly this job; the log stays on each worker.
    on_all_workers "$activate || exit 1; nohup $cmd > ~/m3jax.log 2>&1 < /dev/null & echo \$! > ~/m3jax.pid; \
      echo \"worker \$(hostname): started pid \$(cat ~/m3jax.pid), log ~/m3jax.log\""
    ;;
  logs)
    on_all_workers "tail -n ${LINES_TO_SHOW:-20} ~/m3jax.log"
    ;;
  stop)
    on_all_workers "test -f ~/m3jax.pid && kill -TERM \$(cat ~/m3jax.pid) && echo \"worker \$(hostname): SIGTERM sent\" || echo \"worker \$(hostname): no job\""
    ;;
  *)
    usage
    ;;
esac

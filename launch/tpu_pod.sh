#!/usr/bin/env bash
# Launch one `vist2 train` stage on every worker of a Cloud TPU VM slice.
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--dry-run] -- RECIPE [key=value ...]
#
# Steps: sync this checkout to every worker (tar over `gcloud ... ssh --worker=all`),
# install it into a venv with the TPU extra, then start the same program on every worker;
# JAX finds the other workers itself (jax.distributed.initialize on TPU VMs).
set -euo pipefail
TPU="" ZONE="" PROJECT="" DRY_RUN=0 REMOTE_DIR="vist2-jax"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) TPU="$2"; shift 2;;
    --zone) ZONE="$2"; shift 2;;
    --project) PROJECT="$2"; shift 2;;
    --remote-dir) REMOTE_DIR="$2"; shift 2;;
    --dry-run) DRY_RUN=1; shift;;
    --) shift; break;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
[[ -n "$TPU" && -n "$ZONE" && $# -ge 1 ]] || { echo "usage: $0 --tpu NAME --zone ZONE [--project P] [--dry-run] -- RECIPE [key=value ...]" >&2; exit 2; }
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
SSH=(gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" ${PROJECT_FLAG:+"$PROJECT_FLAG"} --worker=all)
TRAIN_ARGS=$(printf '%q ' "$@")
SYNC="tar czf - --exclude=.venv --exclude=runs --exclude=.jax_cache . | ${SSH[*]} --command='mkdir -p $REMOTE_DIR && tar xzf - -C $REMOTE_DIR'"
INSTALL="cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
RUN="cd $REMOTE_DIR && JAX_PLATFORMS=tpu nohup .venv/bin/vist2 train $TRAIN_ARGS > train.log 2>&1 &"
cd "$(dirname "$0")/.."
if [[ $DRY_RUN -eq 1 ]]; then
  echo "$SYNC"
  echo "${SSH[*]} --command=\"$INSTALL\""
  echo "${SSH[*]} --command=\"$RUN\""
  exit 0
fi
eval "$SYNC"
"${SSH[@]}" --command="$INSTALL"
"${SSH[@]}" --command="$RUN"
echo "started on every worker of $TPU; logs: $REMOTE_DIR/train.log on each worker"

#!/usr/bin/env bash
# Launch one `vist2 train` stage on every worker of a Cloud TPU VM slice and watch it.
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--workers N] [--log-dir DIR]
#                     [--remote-dir DIR] [--no-sync] [--dry-run] -- RECIPE [key=value ...]
#
# Steps: sync this checkout to every worker (tar over `gcloud ... ssh --worker=all`) and
# install it into a venv with the TPU extra (both skipped with --no-sync), then run the same
# program on every worker, one ssh per worker in parallel; JAX finds the other workers itself
# (jax.distributed.initialize on TPU VMs). Each worker's output goes to DIR/worker-<i>.log
# (default logs/<tpu>-<UTC time>/ in this checkout) and to train.log on the worker; worker 0's
# is also shown here. The script waits for every worker, reports each one that failed with the
# end of its log, and exits non-zero if any did. N defaults to the slice's worker count
# (`gcloud compute tpus tpu-vm describe`).
set -euo pipefail
USAGE="usage: $0 --tpu NAME --zone ZONE [--project P] [--workers N] [--log-dir DIR] [--remote-dir DIR] [--no-sync] [--dry-run] -- RECIPE [key=value ...]"
TPU="" ZONE="" PROJECT="" WORKERS="" LOG_DIR="" DRY_RUN=0 SYNC=1 REMOTE_DIR="vist2-jax"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) TPU="$2"; shift 2;;
    --zone) ZONE="$2"; shift 2;;
    --project) PROJECT="$2"; shift 2;;
    --workers) WORKERS="$2"; shift 2;;
    --log-dir) LOG_DIR="$2"; shift 2;;
    --remote-dir) REMOTE_DIR="$2"; shift 2;;
    --no-sync) SYNC=0; shift;;
    --dry-run) DRY_RUN=1; shift;;
    --) shift; break;;
    *) echo "unknown option $1" >&2; echo "$USAGE" >&2; exit 2;;
  esac
done
[[ -n "$TPU" && -n "$ZONE" && $# -ge 1 ]] || { echo "$USAGE" >&2; exit 2; }
[[ -z "$WORKERS" || "$WORKERS" =~ ^[1-9][0-9]*$ ]] || { echo "--workers must be a positive integer" >&2; exit 2; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOG_DIR=${LOG_DIR:-$ROOT/logs/$TPU-$(date -u +%Y%m%dT%H%M%SZ)}
TPU_ARGS=("$TPU" --zone="$ZONE" ${PROJECT:+"--project=$PROJECT"})
SSH=(gcloud compute tpus tpu-vm ssh "${TPU_ARGS[@]}")
DESCRIBE=(gcloud compute tpus tpu-vm describe "${TPU_ARGS[@]}")
COUNT_FORMAT='value(networkEndpoints.len())'  # one network endpoint per worker
TRAIN_ARGS=$(printf '%q ' "$@")
UNPACK="mkdir -p $REMOTE_DIR && tar xzf - -C $REMOTE_DIR"
INSTALL="cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
# pipefail: the ssh exits with the training's status, not tee's.
RUN="set -o pipefail; cd $REMOTE_DIR && JAX_PLATFORMS=tpu .venv/bin/vist2 train ${TRAIN_ARGS% } 2>&1 | tee train.log"
STOP="${SSH[*]} --worker=all --command='pkill -f \"vist2 train\"'"
PACK=(tar czf - -C "$ROOT" --exclude=.venv --exclude=runs --exclude=.jax_cache --exclude=logs .)

if [[ $DRY_RUN -eq 1 ]]; then
  if [[ $SYNC -eq 1 ]]; then
    echo "${PACK[*]} | ${SSH[*]} --worker=all --command=\"$UNPACK\""
    echo "${SSH[*]} --worker=all --command=\"$INSTALL\""
  fi
  [[ -n "$WORKERS" ]] || echo "WORKERS=\$(${DESCRIBE[*]} --format='$COUNT_FORMAT')"
  LAST=${WORKERS:+$((WORKERS - 1))}
  echo "for each worker i in 0..${LAST:-\$((WORKERS - 1))}, in parallel, output to $LOG_DIR/worker-\$i.log:"
  echo "  ${SSH[*]} --worker=\$i --command=\"$RUN\""
  exit 0
fi

if [[ -z "$WORKERS" ]]; then
  WORKERS=$("${DESCRIBE[@]}" --format="$COUNT_FORMAT")
  [[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || { echo "could not read the worker count of $TPU (got '$WORKERS'); pass --workers N" >&2; exit 1; }
fi
if [[ $SYNC -eq 1 ]]; then
  "${PACK[@]}" | "${SSH[@]}" --worker=all --command="$UNPACK"
  "${SSH[@]}" --worker=all --command="$INSTALL" < /dev/null
fi
mkdir -p "$LOG_DIR"

run_worker() {
  local log="$LOG_DIR/worker-$1.log"
  if [[ $1 -eq 0 ]]; then
    "${SSH[@]}" --worker=0 --command="$RUN" < /dev/null 2>&1 | tee "$log"
  else
    "${SSH[@]}" --worker="$1" --command="$RUN" < /dev/null > "$log" 2>&1
  fi
}

watch_worker() {  # runs as a background job: reports its worker's failure as soon as it happens
  local status=0
  run_worker "$1" || status=$?
  if [[ $status -ne 0 ]]; then
    {
      local how="exited with status $status"
      [[ $status -gt 128 ]] && how="$how (killed by signal $((status - 128)), or its host was lost)"
      echo "worker $1 $how; log: $LOG_DIR/worker-$1.log"
      tail -n 20 "$LOG_DIR/worker-$1.log" | sed 's/^/    /'
    } >&2
  fi
  return "$status"
}

kill_tree() {  # background jobs ignore SIGINT, and gcloud runs ssh as its own child
  local children
  children=$(pgrep -P "$1" || true)
  kill "$1" 2>/dev/null || true
  for child in $children; do kill_tree "$child"; done
}

PIDS=()
on_interrupt() {
  trap - INT TERM
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill_tree "$pid"; done
  echo >&2
  echo "interrupted: stopped the local ssh sessions, but the training may still run on the workers." >&2
  echo "to stop it: $STOP" >&2
  echo "logs so far: $LOG_DIR" >&2
  exit 130
}
trap on_interrupt INT TERM

echo "starting $WORKERS workers of $TPU; showing worker 0, every worker logs to $LOG_DIR/worker-<i>.log"
for ((i = 0; i < WORKERS; i++)); do
  watch_worker "$i" &
  PIDS+=("$!")
done

# Poll, not block in `wait`: a signal that lands while bash enters `wait` is handled only when
# the awaited job ends (a bash race, seen with 5.2 under load: Ctrl-C then did nothing for as
# long as the training ran); a foreground `sleep` delays the trap by at most its length.
while [[ -n "$(jobs -rp)" ]]; do sleep 0.5; done
FAILED=0
for pid in "${PIDS[@]}"; do
  wait "$pid" || FAILED=$((FAILED + 1))
done
if [[ $FAILED -gt 0 ]]; then
  echo "$FAILED of $WORKERS workers failed (reported above); all logs: $LOG_DIR" >&2
  echo "workers still running can be stopped with: $STOP" >&2
  exit 1
fi
echo "all $WORKERS workers finished; logs: $LOG_DIR"

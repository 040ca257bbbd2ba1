#!/usr/bin/env bash
# Fill launch/k8s/jobset.yaml and apply it with kubectl.
#
#   launch/gke.sh --name N --image IMG --accelerator tpu-v5p-slice --topology 4x4x4 \
#                 --workers 16 --chips-per-worker 4 [--dry-run] -- RECIPE [key=value ...]
set -euo pipefail
NAME="" IMAGE="" ACCELERATOR="" TOPOLOGY="" WORKERS="" CHIPS_PER_WORKER=4 DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2;;
    --image) IMAGE="$2"; shift 2;;
    --accelerator) ACCELERATOR="$2"; shift 2;;
    --topology) TOPOLOGY="$2"; shift 2;;
    --workers) WORKERS="$2"; shift 2;;
    --chips-per-worker) CHIPS_PER_WORKER="$2"; shift 2;;
    --dry-run) DRY_RUN=1; shift;;
    --) shift; break;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
[[ -n "$NAME" && -n "$IMAGE" && -n "$ACCELERATOR" && -n "$TOPOLOGY" && -n "$WORKERS" && $# -ge 1 ]] || {
  echo "usage: $0 --name N --image IMG --accelerator A --topology T --workers W [--chips-per-worker C] [--dry-run] -- RECIPE [key=value ...]" >&2; exit 2; }
RECIPE="$1"; shift
OVERRIDES=""
for o in "$@"; do OVERRIDES+=", \"$o\""; done
export NAME IMAGE ACCELERATOR TOPOLOGY WORKERS CHIPS_PER_WORKER RECIPE OVERRIDES
MANIFEST=$(python3 -c 'import os, string, sys; print(string.Template(open(sys.argv[1]).read()).substitute(os.environ))' \
  "$(dirname "$0")/k8s/jobset.yaml")
if [[ $DRY_RUN -eq 1 ]]; then
  echo "kubectl apply -f - <<'MANIFEST'"; echo "$MANIFEST"; echo "MANIFEST"; exit 0
fi
echo "$MANIFEST" | kubectl apply -f -

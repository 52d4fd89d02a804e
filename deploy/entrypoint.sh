#!/usr/bin/env bash
# The container's entry point (deploy/Dockerfile), also usable on a bare host:
#   entrypoint.sh worker    ComfyUI with the pack on this machine's GPU + a queue worker beside it (default)
#   entrypoint.sh gateway   ComfyUI with the pack as the cluster's front door: the service routes (/v1/jobs,
#                           /sdapi/v1/txt2img, /metrics, /v1/cluster) put jobs on the queue instead of sampling
# Environment: SD35FP8_QUEUE_URL (redis://queue:6379/0, required), COMFYUI_DIR (/opt/ComfyUI), PYTHON (python3),
# COMFY_PORT (8188), COMFY_ARGS (extra ComfyUI flags, e.g. --cpu), SD35FP8_WORKER_LEASE (10),
# SD35FP8_WORKER_NAME (the host name), and the service's SD35FP8_API_* settings (docs/api.md).
#
# SIGTERM (docker stop, a pod ending): the worker takes no new job and finishes the running one, then ComfyUI
# stops; give the container a grace period longer than the longest job (compose: stop_grace_period; Kubernetes:
# terminationGracePeriodSeconds). A dead ComfyUI or worker ends the container (its orchestrator restarts it; the
# running job is handed on when its lease runs out).
set -uo pipefail
mode="${1:-worker}"
COMFYUI_DIR="${COMFYUI_DIR:-/opt/ComfyUI}"
PYTHON="${PYTHON:-python3}"
PORT="${COMFY_PORT:-8188}"
PACK="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${SD35FP8_QUEUE_URL:?set SD35FP8_QUEUE_URL, e.g. redis://queue:6379/0}"
export SD35FP8_QUEUE_URL

case "$mode" in
  gateway)
    export SD35FP8_API_QUEUE="$SD35FP8_QUEUE_URL"
    cd "$COMFYUI_DIR" && exec "$PYTHON" main.py --listen 0.0.0.0 --port "$PORT" ${COMFY_ARGS:---cpu} ;;
  worker) ;;
  *) echo "entrypoint.sh: unknown mode '$mode' (use worker or gateway)" >&2; exit 2 ;;
esac

export SD35FP8_API_WARMUP="${SD35FP8_API_WARMUP:-1}"  # ready = model loaded and calibrated
(cd "$COMFYUI_DIR" && exec "$PYTHON" main.py --listen 0.0.0.0 --port "$PORT" ${COMFY_ARGS:-}) &
comfy=$!
(cd "$PACK" && exec "$PYTHON" -m service.worker --queue "$SD35FP8_QUEUE_URL" --comfy "http://127.0.0.1:$PORT" \
   --lease "${SD35FP8_WORKER_LEASE:-10}" --name "${SD35FP8_WORKER_NAME:-$(hostname)}") &
worker=$!

stopping=0
on_term() {
  stopping=1
  echo "entrypoint: SIGTERM: the worker finishes its job, then ComfyUI stops" >&2
  kill -TERM "$worker" 2>/dev/null
}
trap on_term TERM INT

# wait for either to end; on SIGTERM wait for the worker to finish its job first
while kill -0 "$worker" 2>/dev/null && kill -0 "$comfy" 2>/dev/null; do
  wait -n "$worker" "$comfy" 2>/dev/null
done
rc=0
if [ "$stopping" = 1 ]; then
  wait "$worker"; rc=$?
elif ! kill -0 "$worker" 2>/dev/null; then
  wait "$worker"; rc=$?; echo "entrypoint: the worker ended (exit $rc)" >&2; [ "$rc" = 0 ] && rc=1
else
  echo "entrypoint: ComfyUI ended: stopping the worker (its job is handed on)" >&2
  kill -TERM "$worker" 2>/dev/null; sleep 2; kill -TERM "$worker" 2>/dev/null  # the second: a cold stop
  wait "$worker" 2>/dev/null; rc=1
fi
kill -TERM "$comfy" 2>/dev/null
wait "$comfy" 2>/dev/null
exit "$rc"

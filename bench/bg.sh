#!/usr/bin/env bash
# Long GPU runs past a remote runner's per-call time limit (the device tool here: 10 minutes a call, and the machine
# stays held only while calls follow each other): start the job detached from the calling shell, then poll its log.
#
#   bash bench/bg.sh start /tmp/large.log python3 bench/sd35_bench.py --variants large --out /tmp/large.md
#   bash bench/bg.sh wait /tmp/large.log 540     # follows the log up to 540 s; exit 0 once the job has ended
#
# The job runs in its own process session (setsid), so it outlives the call that started it; its last log line is
# "[bg] exit N". ``wait`` prints the log's tail and exits 0 when the job has ended, 3 while it still runs.
set -euo pipefail
what=${1:?usage: bg.sh start LOG CMD... | bg.sh wait LOG [SECONDS]}
log=${2:?log file}
shift 2
case "$what" in
  start)
    [ "$#" -gt 0 ] || { echo "bg.sh start: no command" >&2; exit 2; }
    setsid bash -c '"$@"; echo "[bg] exit $?"' bg "$@" > "$log" 2>&1 < /dev/null &
    echo "[bg] started pid $! -> $log"
    ;;
  wait)
    limit=${1:-540}
    waited=0
    while ! grep -q '^\[bg\] exit' "$log" 2>/dev/null && [ "$waited" -lt "$limit" ]; do
      sleep 5
      waited=$((waited + 5))
    done
    tail -n 40 "$log"
    grep -q '^\[bg\] exit' "$log" || { echo "[bg] still running after ${waited}s"; exit 3; }
    ;;
  *)
    echo "bg.sh: unknown verb $what (start | wait)" >&2
    exit 2
    ;;
esac

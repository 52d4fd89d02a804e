#!/usr/bin/env bash
# The benchmark of record on a lent GPU machine whose calls are capped (the device tool: 10 minutes a call; the machine
# is released ~30 s after a call ends). The log lives in /tmp on the machine; every ``wait`` copies it (and the table,
# once written) to $OUT (or ./device-out), so a process that crashes still brings back every row and note it printed.
# Give ``wait`` fewer seconds than the call's limit, so that the copy runs.
#
#   bash bench/device_run.sh start [VARIANTS] [EXTRA SKIPS]   # e.g. start large,medium  -> starts in the background
#   bash bench/device_run.sh wait [SECONDS]                   # follow it (call again until "[bg] exit")
#
# Skipped by default: rows the targets do not need (TransformerEngine, stock fp8_e4m3fn, our E4M3 loader, INT8 adaLN
# only, the INT8 row with cuDNN attention, Large's BF16 + compile, Medium's fp8_fast + compile).
set -uo pipefail
out=${OUT:-./device-out}
mkdir -p "$out"
log=/tmp/sd35_bench.log
case "${1:-}" in
  start)
    variants=${2:-large,medium}
    skip=te,fp8,e4m3,int8_adaln,int8_mlp_cudnn,large:bf16_compile,medium:fast_compile${3:+,$3}
    echo "variants $variants; skip $skip" | tee "$out/run.txt"
    bash bench/bg.sh start "$log" python3 bench/sd35_bench.py --variants "$variants" --host-profile --skip "$skip" \
      --out /tmp/sd35_bench.md --json /tmp/sd35_bench.json
    ;;
  wait)
    bash bench/bg.sh wait "$log" "${2:-540}"
    rc=$?
    cp "$log" /tmp/sd35_bench.md /tmp/sd35_bench.json "$out/" 2>/dev/null
    exit $rc
    ;;
  *)
    echo "usage: bench/device_run.sh start [VARIANTS] [EXTRA SKIPS] | wait [SECONDS]" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# The benchmark of record against stock ComfyUI 0.30.0 on a lent GPU machine (the device tool: 10 minutes a call,
# the machine given back ~30 s after a call, at most 64 MiB carried a call). Three verbs, each its own call:
#
#   bash bench/record_030.sh setup1   # carry .carry1: ComfyUI 0.30.0's source (tar.xz) + the wheels it needs there
#   SD35FP8_COMMIT=<git rev-parse --short HEAD here> bash bench/record_030.sh start    # carry .carry2: comfy-kitchen; installs it, then starts the whole job detached
#   bash bench/record_030.sh wait [S] # follow it; copies the log and every finished table to $OUT (call again)
#
# The job (one GPU, one step after the other, each writing its own table to /tmp/rec):
#   1. end to end through /prompt, SD3.5 Large, 1024², batch 4, 28 steps: stock BF16, ours (the bundled workflow),
#      stock UNETLoader on our saved calibrated file (eager; + TorchCompileModel last: it failed in 0.30.0 on
#      2026-12-05), stock fp8_e4m3fn_fast + TorchCompileModel;
#   2. the same server set-up under a 16 GiB cap: ours (calibration from the cache of step 1), stock on our file;
#   3. denoiser calls (bench/sd35_bench.py), Large: stock BF16, stock fp8_e4m3fn_fast eager and compiled, stock on
#      our file eager and compiled, ours default and most faithful (BF16 + compile left out: 1.36x in 0.3.75, behind
#      fp8_e4m3fn_fast + compile's 1.72x, and ~3 min of compiling);
#   4. the same for Medium (no compiled stock rows but BF16's);
#   5. Medium end to end under a 12 GiB cap: ours.
# Calibration in all of them: the first RECORD_CAL_PROMPTS (2) prompts of the shipped set, 28 steps (the cost of
# the shipped 8 is 4x the calibration time reported).
set -uo pipefail
out=${OUT:-./device-out}
mkdir -p "$out" /tmp/rec
log=/tmp/rec/record.log
site=/tmp/site
comfy=/tmp/c030
cal=${RECORD_CAL_PROMPTS:-2}
case "${1:-}" in
  setup1)
    df -h /tmp | tail -1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site .carry1/*.whl \
      || exit 1
    mkdir -p $comfy && tar xJf .carry1/comfyui-0.30.0.tar.xz -C $comfy && rm -f $comfy/extra_model_paths.yaml
    mkdir -p /tmp/web && echo '<html>benchmark server: no UI</html>' > /tmp/web/index.html
    PYTHONPATH=$site python3 -c "import av, sqlalchemy, alembic, pydantic, websocket, torchsde, comfy_aimdo; print('deps ok')"
    grep __version__ $comfy/comfyui_version.py
    ;;
  start)
    [ -f $comfy/main.py ] || { echo "no ComfyUI at $comfy: this machine is fresh, run setup1 first"; exit 4; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site .carry2/*.whl \
      || exit 1
    export PYTHONPATH=$site
    export SD35FP8_COMMIT=${SD35FP8_COMMIT:-}  # the records' commit: the device's git metadata can be stale
    python3 -c "import comfy_kitchen; print('comfy_kitchen', comfy_kitchen.__version__ if hasattr(comfy_kitchen, '__version__') else '?')"
    models=/tmp/e2e-models work=/tmp/e2e-work
    e2e="python3 bench/e2e_bench.py --comfy $comfy --models $models --workdir $work --calib-prompts $cal --comfy-arg=--front-end-root=/tmp/web"
    bench="python3 bench/sd35_bench.py --comfy $comfy --cal-prompts $cal"
    bash bench/bg.sh start $log bash -c "
      $e2e --variant large --modes stock_bf16,ours,stock_file,stock_fast_compile,stock_file_compile --out /tmp/rec/e2e_large.md --json /tmp/rec/e2e_large.json;
      $e2e --variant large --modes ours,stock_file --vram-cap-gib 16 --out /tmp/rec/e2e_large_16gib.md;
      rm -f $models/diffusion_models/sd3.5_large.safetensors $models/diffusion_models/sd35_fp8/e2e_calibrated_large.safetensors;
      $bench --variants large --skip te,fp8,eager,cudagraphs,fp8_attention,int8_adaln,int8_mlp_cudnn,bf16_compile --out /tmp/rec/denoiser_large.md --json /tmp/rec/denoiser_large.json;
      $bench --variants medium --skip te,fp8,eager,cudagraphs,fp8_attention,int8_adaln,int8_mlp_cudnn,fast_compile,file_compile --out /tmp/rec/denoiser_medium.md;
      $e2e --variant medium --modes ours --vram-cap-gib 12 --out /tmp/rec/e2e_medium_12gib.md"
    ;;
  start_rest)
    # what 2026-12-05's first record left: the denoiser tables, stock on our file uncompiled end to end, the caps
    [ -f $comfy/main.py ] || { echo "no ComfyUI at $comfy: this machine is fresh, run setup1 first"; exit 4; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site .carry2/*.whl \
      || exit 1
    export PYTHONPATH=$site
    export SD35FP8_COMMIT=${SD35FP8_COMMIT:-}
    models=/tmp/e2e-models work=/tmp/e2e-work
    e2e="python3 bench/e2e_bench.py --comfy $comfy --models $models --workdir $work --calib-prompts $cal --comfy-arg=--front-end-root=/tmp/web"
    bench="python3 bench/sd35_bench.py --comfy $comfy --cal-prompts $cal"
    bash bench/bg.sh start $log bash -c "
      $bench --variants large --skip te,fp8,eager,cudagraphs,fp8_attention,int8_adaln,int8_mlp_cudnn,bf16_compile --out /tmp/rec/denoiser_large.md --json /tmp/rec/denoiser_large.json;
      $e2e --variant large --modes ours,stock_file --out /tmp/rec/e2e_large_file.md --json /tmp/rec/e2e_large_file.json;
      $e2e --variant large --modes ours,stock_file --vram-cap-gib 16 --out /tmp/rec/e2e_large_16gib.md;
      $bench --variants medium --skip te,fp8,eager,cudagraphs,fp8_attention,int8_adaln,int8_mlp_cudnn,fast_compile,file_compile --out /tmp/rec/denoiser_medium.md"
    ;;
  wait)
    bash bench/bg.sh wait $log "${2:-540}"
    rc=$?
    cp $log /tmp/rec/*.md /tmp/rec/*.json "$out/" 2>/dev/null
    exit $rc
    ;;
  *)
    echo "usage: bench/record_030.sh setup1 | start | start_rest | wait [SECONDS]" >&2
    exit 2
    ;;
esac

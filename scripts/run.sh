#!/usr/bin/env bash
# The main job: build the environment if needed, start a real ComfyUI with this pack and generate a
# batch through the bundled workflow via POST /prompt (tiny embedded model unless --ckpt is given).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# the same environment variables as setup_env.sh: SD35FP8_VENV (the virtualenv), COMFYUI_DIR (the ComfyUI)
bash scripts/setup_env.sh
exec "${SD35FP8_VENV:-.venv}/bin/python" scripts/run_batch.py "$@"

#!/usr/bin/env bash
# The test command: builds the environment if needed (torch, a real ComfyUI), then runs every test.
# COMFYUI_DIR / COMFYUI_PYTHON point the end-to-end tests at another ComfyUI (e.g. newest upstream).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${COMFYUI_PYTHON:-}" ]; then bash scripts/setup_env.sh --browser; fi
PY="${COMFYUI_PYTHON:-.venv/bin/python}"
"$PY" scripts/make_workflows.py --check
exec "$PY" -m pytest -q -rs tests "$@"

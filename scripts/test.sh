#!/usr/bin/env bash
# The test command: builds the environment if needed (torch, a real ComfyUI), lints, checks the generated
# workflows, then runs every test (GPU tests skip on a CPU machine: `-m gpu` selects them on a GPU; `-m "not comfy"`
# runs only the library's tests). COMFYUI_DIR / COMFYUI_PYTHON point the end-to-end tests at another ComfyUI
# (e.g. newest upstream).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${COMFYUI_PYTHON:-}" ]; then bash scripts/setup_env.sh --browser; fi
PY="${COMFYUI_PYTHON:-.venv/bin/python}"
# the linter runs from the pack's own environment where it exists (an external ComfyUI's Python may lack it)
if [ -x .venv/bin/python ]; then .venv/bin/python -m ruff check .; else "$PY" -m ruff check .; fi
"$PY" scripts/make_workflows.py --check
exec "$PY" -m pytest -q -rs tests "$@"

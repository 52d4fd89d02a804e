#!/usr/bin/env bash
# The batch client (scripts/sd35_batch.py): a prompt list (.txt / .csv / .jsonl) -> images + manifest.jsonl.
#   bash scripts/batch.sh prompts.csv                                  # starts a ComfyUI (tiny model unless --ckpt)
#   bash scripts/batch.sh prompts.csv --server http://127.0.0.1:8188   # drives a running ComfyUI with the pack
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SD35FP8_VENV:-$here/.venv}"
if [[ " $* " != *" --server "* && " $* " != *" --server="* ]]; then
  bash "$here/scripts/setup_env.sh"
fi
PY="$VENV/bin/python"
[ -x "$PY" ] || PY=python3
exec "$PY" "$here/scripts/sd35_batch.py" "$@"

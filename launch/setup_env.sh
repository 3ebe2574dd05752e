#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the project into it.
# Sourced by launch/test.sh and launch/demo.sh so both commands work on a fresh machine.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DDM_VENV:-$repo_root/.venv}"
python_bin="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment at $venv"
  "$python_bin" -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"

stamp="$venv/.ddm-installed"
if [ ! -f "$stamp" ] || [ "$repo_root/pyproject.toml" -nt "$stamp" ]; then
  echo "[setup] installing the CPU build of torch 2.13.0 and the project (pip install -e .[dev,interop])"
  pip_quiet() {  # pip's output only when it fails (this machine's index prints many harmless warnings)
    local log; log="$(mktemp)"
    if ! python -m pip install --quiet "$@" >"$log" 2>&1; then
      grep -v '^WARNING: Location' "$log" >&2; rm -f "$log"; return 1
    fi
    rm -f "$log"
  }
  pip_quiet --upgrade pip
  # Pinned so pip takes the local CPU wheel instead of a multi-GB CUDA build.
  pip_quiet "torch==2.13.0"
  pip_quiet -e "$repo_root[dev,interop]"
  python -c "import torch, lightning, transformers, webdataset, av, cv2, diffusers" \
    || { echo "[setup] installation failed: see pip's output above" >&2; exit 1; }
  touch "$stamp"
fi

#!/usr/bin/env bash
# Make (or reuse) ./.venv with Python 3.12 and install this project with its test extras.
# Usage: bash scripts/setup.sh            (idempotent; a second run only re-checks the install)
set -euo pipefail
cd "$(dirname "$0")/.."

find_python312() {
  local c
  for c in "${PYTHON:-}" python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12 \
           "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    [ -n "$c" ] || continue
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  return 1
}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
  PY=$(find_python312) || { echo "error: Python 3.12 not found (megatron-core >= 0.17 needs it); set PYTHON=/path/to/python3.12" >&2; exit 1; }
  echo "[setup] creating .venv with $PY"
  rm -rf .venv
  "$PY" -m venv .venv
fi
# PyPI's torch for Python 3.12 is the CUDA build; it runs on CPU too. pip's cache makes re-installs quick.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
.venv/bin/python - <<'PY'
import torch, megatron.core, hydra
print(f"[setup] ok: python {__import__('sys').version.split()[0]}, torch {torch.__version__}, "
      f"megatron-core {megatron.core.__version__}, hydra {hydra.__version__}, cuda={torch.cuda.is_available()}")
PY

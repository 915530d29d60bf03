#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) and install the pinned requirements.
# Idempotent: pip runs only when a requirements file changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
REQ="${1:-requirements.txt}"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $PY"
  "$PY" -m venv .venv
fi
stamp=".venv/.installed-$(basename "$REQ" .txt)"
want=$(cat requirements*.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing $REQ into .venv (first time: about 2 minutes)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r "$REQ"
  echo "$want" > "$stamp"
fi

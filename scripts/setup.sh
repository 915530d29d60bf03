#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) and install the exact pins for REQ:
# requirements.txt -> requirements.lock (the app), requirements-dev.txt -> requirements-dev.lock (tests, CI).
# The locks are generated from the loose requirements*.txt by scripts/lock.sh.
# Idempotent: pip runs only when the lock changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
REQ="${1:-requirements.txt}"
LOCK="${REQ%.txt}.lock"
if [ ! -f "$LOCK" ]; then
  echo "no lock $LOCK for $REQ (scripts/lock.sh makes requirements.lock and requirements-dev.lock)" >&2
  exit 1
fi
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $PY"
  "$PY" -m venv .venv
fi
stamp=".venv/.installed-$(basename "$REQ" .txt)"
want=$(sha256sum "$LOCK" | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing $LOCK into .venv (first time: about 2 minutes)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r "$LOCK"
  echo "$want" > "$stamp"
fi

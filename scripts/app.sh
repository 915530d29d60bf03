#!/usr/bin/env bash
# Set up (first time only) and start the MergeLens app on the built-in offline suite mini8.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements.txt
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$PWD/cache/numba}"
exec .venv/bin/python -m streamlit run app.py "$@"

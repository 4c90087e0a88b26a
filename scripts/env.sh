#!/usr/bin/env bash
# Creates or updates the project's virtual environment (.venv) and builds ssl_fast into it (editable).
# Usage: bash scripts/env.sh        (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
stamp=.venv/.ssl_fast-deps
if [ ! -f "$stamp" ] || [ requirements-dev.txt -nt "$stamp" ]; then
  "$PY" -m pip install --disable-pip-version-check -q -r requirements-dev.txt
  touch "$stamp"
fi
# Build the C++ extension against the installed torch (no isolated build: it would have no torch).
"$PY" -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e .
"$PY" -c "import ssl_fast; print('ssl_fast', ssl_fast.__version__, '| C++ extension:', ssl_fast.HAS_EXT)"

#!/usr/bin/env bash
# Creates or updates the project's virtual environment (.venv) and builds ssl_fast into it (editable).
#
# Usage: bash scripts/env.sh
#   SSL_FAST_DEPS=pinned (default)  the exact versions CI tested: requirements-dev.txt with constraints.txt
#   SSL_FAST_DEPS=latest            the newest releases the package index serves (no constraints): run the
#                                   suite this way before bumping the pins (see README, "Versions")
#   PYTHON=python3.11               the interpreter for a new .venv
# Switching modes reinstalls in place (pinned after latest downgrades back to the pins).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MODE=${SSL_FAST_DEPS:-pinned}
case "$MODE" in
  pinned) constraints=(-c constraints.txt) ;;
  latest) constraints=(--upgrade --upgrade-strategy eager) ;;
  *) echo "SSL_FAST_DEPS must be 'pinned' or 'latest', got '$MODE'" >&2; exit 2 ;;
esac
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
stamp=.venv/.ssl_fast-deps
want="$MODE $(cat requirements-dev.txt constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$PY" -m pip install --disable-pip-version-check -q -r requirements-dev.txt "${constraints[@]}"
  echo "$want" > "$stamp"
  rm -rf build  # objects built against other torch headers must not be linked again
fi
# Build the C++ extension against the installed torch (no isolated build: it would have no torch).
"$PY" -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e .
"$PY" - <<'EOF'
import importlib.metadata as md
import ssl_fast
import torch
try:
    triton = md.version("triton")
except md.PackageNotFoundError:
    triton = "-"
print(f"ssl_fast {ssl_fast.__version__} | torch {torch.__version__} | triton {triton} | C++ extension: {ssl_fast.HAS_EXT}")
import os, sys
if os.environ.get("CI", "").lower() == "true" or os.environ.get("SSL_FAST_REQUIRE_EXT") == "1":
    if not ssl_fast.HAS_EXT:
        sys.exit(f"error: ssl_fast._C did not load ({ssl_fast._ext.IMPORT_ERROR}); CI needs the C++ extension")
    if triton == "-":
        sys.exit("error: triton is not installed; CI needs it")
EOF

#!/usr/bin/env bash
# The project's test command: sets up .venv (scripts/env.sh), then runs pytest (extra args pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
set +e
.venv/bin/python -m pytest -q -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then  # pytest: no tests collected (e.g. a -k filter matched nothing)
  echo "pytest collected no tests"
  exit 0
fi
exit "$rc"

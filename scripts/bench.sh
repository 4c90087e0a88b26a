#!/usr/bin/env bash
# A quick side-by-side benchmark of the NT-Xent loss on this
# machine (eager torch, torch.compile, lightly, pytorch-metric-learning, ssl_fast). No downloads of data.
# Extra arguments go to bench/bench_ntxent.py (e.g. --preset target).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
if [ "$#" -eq 0 ]; then set -- --preset quick; fi
exec .venv/bin/python bench/bench_ntxent.py "$@"

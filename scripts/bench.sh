#!/usr/bin/env bash
# The benchmark suite on this machine: every provider of an op side by side (eager torch, torch.compile,
# lightly, pytorch-metric-learning, open_clip, timm, Inf-CL on CUDA, ssl_fast's backends), after a
# correctness gate against the float64 reference. No downloads. Extra arguments go to `ssl-fast bench`
# (bench/suite.py): e.g. `bash scripts/bench.sh all --preset cpu`, `bash scripts/bench.sh --list`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
if [ "$#" -eq 0 ]; then set -- ntxent --preset quick; fi
exec .venv/bin/ssl-fast bench "$@"

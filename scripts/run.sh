#!/usr/bin/env bash
# The main job: self-supervised training (SimCLR, the fused NT-Xent loss) on the embedded default data set
# (scikit-learn's digits, upscaled to 32 px; no download) on this machine's CPU, then the kNN accuracy of
# the trained encoder next to the same encoder at initialization. A few minutes on a 2-core CPU.
# Extra arguments go to `ssl-fast train` (e.g. --method byol, --epochs 10, --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
exec .venv/bin/ssl-fast train --method simclr --data digits --epochs 8 --run-dir runs/default "$@"

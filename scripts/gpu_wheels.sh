#!/usr/bin/env bash
# Downloads the wheels of the benchmark peers that the GPU machine's image lacks into wheels/ (ignored by git),
# for scripts/gpu_check.sh to install there offline (`pip install --no-index --no-deps`). Pure-Python only:
# lightly, pytorch-metric-learning, open_clip_torch, inf-cl, and the pure-Python dependencies the image does
# not have (hydra-core, omegaconf, antlr4-python3-runtime, ftfy, wcwidth). The image already has torch,
# torchvision, numpy, tqdm, scikit-learn, pytorch-lightning, timm, regex, huggingface-hub and safetensors.
# antlr4-python3-runtime 4.9.3 exists only as a source archive: it is built here into a py3-none-any wheel
# (pure Python, nothing compiled). Versions: constraints.txt's. About 3 MiB in all.
#   PYTHON=...   the interpreter whose pip downloads (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEST=wheels
pin() { grep -i "^$1==" constraints.txt | head -1; }
mkdir -p "$DEST"
PURE=(lightly pytorch-metric-learning open_clip_torch inf-cl hydra-core omegaconf ftfy)
specs=()
for name in "${PURE[@]}"; do
  spec=$(pin "$name"); specs+=("${spec:-$name}")
done
specs+=("wcwidth==0.2.13")  # the last pure-Python wcwidth (0.9 ships a compiled module)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${specs[@]}"
antlr=$(pin antlr4-python3-runtime); antlr=${antlr:-antlr4-python3-runtime==4.9.3}
tmp=$(mktemp -d)
"$PY" -m pip download -q --no-deps --no-binary :all: -d "$tmp" "$antlr"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$tmp"/*
rm -rf "$tmp"
for w in "$DEST"/*.whl; do
  case "$w" in *-none-any.whl) ;; *) echo "not pure Python: $w" >&2; exit 1 ;; esac
done
ls -la "$DEST"
du -sh "$DEST"

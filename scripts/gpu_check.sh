#!/usr/bin/env bash
# One call on a lent GPU machine (the GPU validation issue): build with the CUDA sources, run the GPU test
# tier, then the GPU benchmark presets; every log and result goes under $OUT (the device tool brings it back).
#   OUT=...            output folder (default gpu_out/)
#   TEST_S / BENCH_S   time caps in seconds for the tests (240) and each op's benchmark (90): one device call
#                      is capped at 600 s, so split the stages across calls with STAGES
#   STAGES             any of: build test bench (default: all three; build is needed once per fresh machine)
#   BENCH_OPS          ops to benchmark (default: ntxent info_nce sinkhorn ema)
#   wheels/*.whl       pure-Python peers the GPU image lacks (lightly, pytorch-metric-learning, open_clip_torch,
#                      inf-cl), carried beside the checkout and installed offline without dependencies
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
if compgen -G "wheels/*.whl" > /dev/null; then
  "$PY" -m pip install --no-index --no-deps wheels/*.whl > "$OUT/wheels.log" 2>&1 || echo "wheels: see $OUT/wheels.log"
fi
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}
STAGES=${STAGES:-build test bench}
if [[ " $STAGES " == *" build "* ]]; then
  SSL_FAST_CUDA_ARCHS=${SSL_FAST_CUDA_ARCHS:-9.0} "$PY" -m pip install --no-build-isolation --no-deps -e . \
    > "$OUT/build.log" 2>&1 || { echo "build failed"; tail -40 "$OUT/build.log"; exit 1; }
fi
"$PY" -m ssl_fast.cli info | tee "$OUT/info.txt"
if [[ " $STAGES " == *" test "* ]]; then
  timeout "${TEST_S:-240}" "$PY" -m pytest -q -ra -m requires_cuda tests > "$OUT/tests_gpu.log" 2>&1
  echo "GPU test tier: rc=$?"; tail -15 "$OUT/tests_gpu.log"
fi
if [[ " $STAGES " == *" bench "* ]]; then
  for op in ${BENCH_OPS:-ntxent info_nce sinkhorn ema}; do
    timeout "${BENCH_S:-90}" "$PY" bench/suite.py "$op" --preset gpu --save --out "$OUT/results" --no-plot \
      > "$OUT/bench_$op.log" 2>&1
    echo "bench $op: rc=$?"; grep -A14 "^$op " "$OUT/bench_$op.log" | cut -c1-160 | head -40
  done
fi

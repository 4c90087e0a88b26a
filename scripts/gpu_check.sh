#!/usr/bin/env bash
# The GPU runbook: two self-contained calls for a lent GPU machine (one H200, 16 cores, no network; python3 with
# torch, triton, nvcc), each finishing inside BUDGET_S seconds (default 450 of the 600 a device call allows):
#
#   bash scripts/gpu_check.sh prove   env, build (CUDA sources for sm_90), ssl-fast info, the GPU correctness
#                                     matrix on CUDA tensors (a time cap per test file), the target benchmarks
#                                     (bench preset gpu-target: eager torch, ssl_fast, torch.compile)
#   bash scripts/gpu_check.sh tune    env, build, the carried peers' wheels, the Triton tile sweep at the target
#                                     shapes (bench/tune.py), the peers at the target shapes (preset gpu-peers)
#
# Everything lands under $OUT in three files per call, rewritten after every stage (a call cut short keeps
# what its finished stages wrote): <call>_summary.txt (the table printed at the end), <call>_logs.tgz (every
# stage's log), <call>_results.tgz (CSVs: benchmark rows appended as they are measured, tune.csv, junit XML).
# Without a CUDA device (or with CUDA_VISIBLE_DEVICES="") every stage still runs, and each GPU part says
# "skipped (no CUDA)" and does what it can without one: the tests are collected, not run; the benchmarks print
# their plan; the sweep runs in the Triton interpreter at tiny shapes. tests/test_gpu_runbook.py runs it so.
#
#   OUT=gpu_out       output folder
#   PYTHON=python3    the interpreter (the machine's, which has torch)
#   BUDGET_S=450      the whole call's seconds; every stage's cap is cut to what is left
#   CAP_SCALE=1       multiplies every stage's own cap (the suite's dry run on a busy CPU machine uses 20)
#   STAGES="..."      a subset of the call's stages, in its order (default: all of them)
#   XDIST=8           pytest-xdist workers for the tests when pytest-xdist is installed (0: none)
#   TUNE_ARGS=...     extra arguments for bench/tune.py (e.g. --families infonce_fwd ema --max-configs 4)
#   wheels/*.whl      scripts/gpu_wheels.sh's download, carried along (the device tool's `carry`)
set -uo pipefail
cd "$(dirname "$0")/.."
CALL=${1:-}
case "$CALL" in
  prove) ALL="env build info tests bench" ;;
  tune) ALL="env build wheels sweep peers" ;;
  *) echo "usage: bash scripts/gpu_check.sh prove|tune   (see the header of this script)" >&2; exit 2 ;;
esac
STAGES=${STAGES:-$ALL}
OUT=${OUT:-gpu_out}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-450}
XDIST=${XDIST:-8}
CAP_SCALE=${CAP_SCALE:-1}  # multiplies every stage's own cap (the dry run on a loaded machine); BUDGET_S still rules
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ssl_fast_gpu_${CALL}_XXXX")
mkdir -p "$WORK/logs" "$WORK/results"
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
RESERVE=8  # seconds kept for packing and the summary
printf "stage\tstatus\tseconds\tcap\tnote\n" > "$WORK/stages.tsv"

pack() {
  tar -czf "$OUT/${CALL}_logs.tgz" -C "$WORK" logs stages.tsv 2>/dev/null
  tar -czf "$OUT/${CALL}_results.tgz" -C "$WORK" results 2>/dev/null
  "$PY" scripts/gpu_summary.py "$WORK" "$CALL" > "$OUT/${CALL}_summary.txt" 2>&1
}
record() { printf "%s\t%s\t%s\t%s\t%s\n" "$1" "$2" "$3" "$4" "$5" >> "$WORK/stages.tsv"; pack; }
left() { echo $((DEADLINE - $(date +%s) - RESERVE)); }
# run NAME CAP NOTE CMD...: CMD under `timeout` (cap cut to the time left), output to logs/NAME.log
run() {
  local name=$1 cap=$(($2 * CAP_SCALE)) note=$3; shift 3
  local l; l=$(left)
  if ((cap > l)); then cap=$l; fi
  if ((cap < 5)); then record "$name" skipped 0 0 "the call's budget is spent"; return 1; fi
  local t0 rc status; t0=$(date +%s)
  timeout --kill-after=10 "$cap" "$@" > "$WORK/logs/$name.log" 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status="fail rc=$rc" ;; esac
  if ((rc == 0)) && [[ $note == "$NO_CUDA"* ]]; then status=skipped; fi
  record "$name" "$status" $(($(date +%s) - t0)) "$cap" "$note"
  return $rc
}
skip() { record "$1" "skipped" 0 0 "$2"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }
trap 'pack' EXIT

CUDA=0
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && CUDA=1
NO_CUDA="skipped (no CUDA)"

if has env; then
  run env 30 "" bash -c "nvidia-smi; nproc; free -g; df -h .; $PY -V; \
    $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"device\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'; \
    command -v nvcc && nvcc --version; command -v ninja || $PY -c 'import ninja; print(\"ninja (python)\", ninja.__version__)'; \
    $PY -m pip list 2>/dev/null | grep -i -E '^(torch|triton|numpy|pytest|pytest-xdist|pytest-timeout|setuptools|ninja|pybind11|torchvision|timm|lightly|open.clip|pytorch-metric|inf-cl) '"
fi

if has build; then
  # CUDA sources for sm_90 when nvcc, ninja and a CUDA torch are there; otherwise (or if that build fails) the
  # C++ extension alone; then the pure-Python package: the Triton tests run in every case
  pip_e=("$PY" -m pip install --no-build-isolation --no-deps --no-index -e .)
  cuda_tools=1
  command -v nvcc > /dev/null || cuda_tools=0
  { command -v ninja > /dev/null || "$PY" -c "import ninja" 2>/dev/null; } || cuda_tools=0
  "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null || cuda_tools=0
  # the later stages keep KEEP_S seconds: a slow build must not eat the Triton tests
  KEEP_S=${KEEP_S:-240}
  built=0 rc=1
  if ((cuda_tools)) && [ -z "${CUDA_HOME:-}" ]; then  # the toolkit whose lib holds libcudart (nvcc may be a wrapper)
    for c in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"; do
      if [ -x "$c/bin/nvcc" ] && compgen -G "$c/lib*/libcudart.so*" > /dev/null; then export CUDA_HOME=$c; break; fi
    done
    [ -n "${CUDA_HOME:-}" ] || { cuda_tools=0; skip build_cuda "nvcc found, but no toolkit folder with libcudart"; }
  fi
  if ((cuda_tools)); then
    SSL_FAST_FORCE_CUDA=1 SSL_FAST_CUDA_ARCHS=9.0 run build $(($(left) - KEEP_S)) "C++ and CUDA sources, sm_90" \
      "${pip_e[@]}"
    rc=$?; ((rc == 0)) && built=1
  else
    skip build_cuda "no nvcc, ninja or CUDA torch: building without the CUDA sources"
  fi
  if ((!built && rc != 124 && rc != 137)); then  # a build that failed fast: the C++ sources alone
    SSL_FAST_SKIP_CUDA_BUILD=1 run build_cpp $(($(left) - KEEP_S)) "C++ sources only (no CUDA sources)" "${pip_e[@]}"
    rc=$?; ((rc == 0)) && built=1
  fi
  if ((!built)); then  # out of time, or no compiler: the package without ssl_fast._C (seconds)
    SSL_FAST_NO_EXT=1 run build_python 60 "pure Python (no ssl_fast._C): the Triton kernels still run" \
      "${pip_e[@]}" && built=1
  fi
fi

if has info; then
  run info 60 "" "$PY" -m ssl_fast.cli info
fi

WARM_PID=
if has bench && ((CUDA)); then
  # the caches warm once, beside the tests: torch.compile and the Triton kernels at the target shapes (inductor's
  # FX-graph / autograd caches and the Triton cache on disk), so the timed run below compiles from them; its
  # rows (results/warm/: compile_ms = cold compiles) are not timings
  warm_cap=$(($(left) - 90)); ((warm_cap < 30)) && warm_cap=30
  TORCHINDUCTOR_COMPILE_THREADS=${WARM_THREADS:-8} timeout --kill-after=10 "$warm_cap" "$PY" bench/suite.py all \
    --preset gpu-target --providers torch_compile ssl_fast_triton ssl_fast_nn --repeats 1 --cuda-rep-ms 5 \
    --out "$WORK/results/warm" --no-plot --warm-compile-cache --timeout 200 > "$WORK/logs/bench_warm.log" 2>&1 &
  WARM_PID=$!
  WARM_T0=$(date +%s)
fi

if has tests; then
  files=(tests/test_infonce_triton.py tests/test_infonce_rect.py tests/test_sinkhorn.py tests/test_ema.py)
  caps=(150 60 60 60)
  flags=(-q -ra -p no:cacheprovider)
  "$PY" -c "import pytest_timeout" 2>/dev/null && flags+=(--timeout 120)
  if ((XDIST > 0)) && "$PY" -c "import xdist" 2>/dev/null; then flags+=(-n "$XDIST"); fi
  for i in "${!files[@]}"; do
    f=${files[$i]}; name=test_$(basename "$f" .py | sed 's/^test_//')
    if ((CUDA)); then
      run "$name" "${caps[$i]}" "on CUDA tensors" "$PY" -m pytest "${flags[@]}" "$f" \
        --junitxml="$WORK/results/junit_$name.xml"
    else
      run "$name" 60 "$NO_CUDA: collected, not run" "$PY" -m pytest -q -p no:cacheprovider --collect-only "$f"
    fi
  done
  ignore=(); for f in "${files[@]}"; do ignore+=(--ignore "$f"); done
  if ((CUDA)); then
    run test_requires_cuda 90 "-m requires_cuda, the other files" "$PY" -m pytest "${flags[@]}" -m requires_cuda \
      tests "${ignore[@]}" --junitxml="$WORK/results/junit_requires_cuda.xml"
  else
    run test_requires_cuda 60 "$NO_CUDA: collected, not run" "$PY" -m pytest -q -p no:cacheprovider --collect-only \
      -m requires_cuda tests "${ignore[@]}"
  fi
fi

bench() {  # NAME PRESET: every op of the preset in one runner, an equal share of the time left per op
  local name=$1 preset=$2 l; l=$(left)
  if ((CUDA)); then
    run "$name" "$l" "preset $preset" "$PY" bench/suite.py all --preset "$preset" --out "$WORK/results" --no-plot \
      --warm-compile-cache --timeout 150 --time-budget-s $((l - 15))
  else
    run "$name" 60 "$NO_CUDA: the plan only" "$PY" bench/suite.py all --preset "$preset" --plan --device cpu \
      --child-per op --threads default
  fi
}

if [ -n "$WARM_PID" ]; then
  l=$(left); cap=$((l / 3)); t0=$(date +%s)
  ( sleep "$cap"; kill "$WARM_PID" 2>/dev/null ) & killer=$!
  wait "$WARM_PID"; rc=$?
  kill "$killer" 2>/dev/null
  record bench_warm "$( ((rc == 0)) && echo ok || echo "stopped rc=$rc")" $(($(date +%s) - WARM_T0)) "$cap" \
    "compile caches at the target shapes, beside the tests (waited $(($(date +%s) - t0)) s after them)"
fi
if has bench; then bench bench gpu-target; fi

if has wheels; then
  if compgen -G "wheels/*.whl" > /dev/null; then
    SITE="$WORK/site"
    run wheels 60 "pip install --no-index --no-deps" "$PY" -m pip install -q --no-index --no-deps --no-compile \
      --target "$SITE" wheels/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    run peer_imports 60 "" "$PY" -c "
import importlib
for m in ('lightly.loss', 'lightly.models.utils', 'pytorch_metric_learning.losses', 'open_clip.loss', 'inf_cl', 'timm.utils'):
    try:
        importlib.import_module(m)
        print('import ok  ', m)
    except Exception as e:
        print('import FAIL', m, type(e).__name__, str(e).splitlines()[0][:150])
"
  else
    skip wheels "no wheels/ folder (bash scripts/gpu_wheels.sh, then carry wheels)"
  fi
fi

if has sweep; then
  # shellcheck disable=SC2086
  if ((CUDA)); then
    l=$(left); share=$l
    if has peers; then share=$((l * 2 / 3)); fi
    run sweep "$share" "bench/tune.py" "$PY" bench/tune.py --out "$WORK/results" --time-budget-s $((share - 10)) \
      ${TUNE_ARGS:-}
  else
    run sweep 120 "$NO_CUDA: the Triton interpreter at tiny shapes" "$PY" bench/tune.py --smoke --out "$WORK/results" \
      ${TUNE_ARGS:---max-configs 2}
  fi
fi

if has peers; then bench peers gpu-peers; fi

trap - EXIT
record total done $(($(date +%s) - START)) "$BUDGET_S" "wall time of the call"
cat "$OUT/${CALL}_summary.txt"
rm -rf "$WORK"

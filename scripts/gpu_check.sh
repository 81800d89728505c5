#!/usr/bin/env bash
# The GPU check (issue 21), one prepared run on a machine with a CUDA GPU: the README's set-up, the GPU tests
# (`pytest -m gpu`) and the short GPU benchmark (benchmarks/gpu.py), everything written under $OUT.
#
#   scripts/gpu_check.sh            # OUT=./gpu-out unless set
#   scripts/gpu_check.sh --dry-run  # the checks that need no GPU, and the plan; runs no test and no benchmark
#
# Environment: OUT (where results go), IMGTUNE_SHARED (the shared data; default ./shared, else ../shared),
# GPU_CHECK_BUDGET_S (the whole run's limit, default 460 s: under 8 minutes with margin), GPU_CHECK_SKIP_SETUP=1
# (use the python already on PATH instead of .venv).
#
# Each step has a timeout taken from what is left of the budget (keeping time for the steps after it); a step
# that fails or times out is recorded and the next one runs: the benchmark runs even when tests fail. The exit
# code is non-zero when any step failed. $OUT gets: gpu-check.log (everything printed), summary.txt (each step,
# its exit code and seconds), nvidia-smi.txt, torch-cuda.txt, setup.log, gpu-tests.xml (JUnit), artifacts/
# (the GPU test jobs' reports and profiler files), gpu-benchmark.txt and gpu-benchmark.json.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUDGET=${GPU_CHECK_BUDGET_S:-460}
START=$SECONDS
exec > >(tee -a "$OUT/gpu-check.log") 2>&1

FAILED=()
: > "$OUT/summary.txt"

left() { echo $((BUDGET - (SECONDS - START))); }

# step_timeout CAP RESERVE: at most CAP seconds, leaving RESERVE for the steps after it (at least 10 s)
step_timeout() {
  local t=$(($(left) - $2))
  ((t > $1)) && t=$1
  ((t < 10)) && t=10
  echo "$t"
}

# record NAME RC SECONDS [NOTE]; a dry run (on any machine) does not count the GPU's absence as a failure
record() {
  local note=${4:-}
  if ((DRY_RUN)) && [[ $1 == cuda || $1 == nvidia-smi ]] && [[ $2 != 0 ]]; then
    note="$note (dry run: not counted)"
  elif [[ $2 != 0 ]]; then
    FAILED+=("$1")
  fi
  printf '%-12s rc=%-4s %5ss  %s\n' "$1" "$2" "$3" "$note" >> "$OUT/summary.txt"
}

# run NAME TIMEOUT COMMAND...: the command under `timeout` (SIGINT first, so pytest writes its report), recorded
run() {
  local name=$1 limit=$2 started=$SECONDS rc=0
  shift 2
  echo "== $name (timeout ${limit}s): $*"
  if timeout --signal=INT --kill-after=20 "$limit" "$@"; then rc=0; else rc=$?; fi
  local note=""
  if ((rc == 124 || rc == 137)); then note="timed out after ${limit}s"; fi
  record "$name" "$rc" "$((SECONDS - started))" "$note"
  echo "== $name: exit $rc after $((SECONDS - started))s ${note}"
  return 0
}

echo "== imgtune GPU check in $ROOT, results in $OUT, budget ${BUDGET}s, $(date -u +%FT%TZ)"
git -C "$ROOT" log -1 --format='== commit %H %s' 2>/dev/null || true

# -- the shared data (the tests fail, never skip, without it) ------------------------------------------------
if [[ -z ${IMGTUNE_SHARED:-} ]]; then
  for candidate in "$ROOT/shared" "$ROOT/../shared"; do
    if [[ -d $candidate/data/dogs-mini ]]; then IMGTUNE_SHARED=$(cd "$candidate" && pwd); break; fi
  done
fi
if [[ -n ${IMGTUNE_SHARED:-} && -d ${IMGTUNE_SHARED}/data/dogs-mini ]]; then
  export IMGTUNE_SHARED
  echo "== shared data: $IMGTUNE_SHARED"
  record shared 0 0 "$IMGTUNE_SHARED"
else
  echo "== shared data NOT FOUND (looked at \$IMGTUNE_SHARED, ./shared, ../shared): the tests will fail"
  record shared 1 0 "not found"
fi

# -- the machine ----------------------------------------------------------------------------------------------
if command -v nvidia-smi > /dev/null; then
  if timeout 30 nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1; then smi=0; else smi=$?; fi
  cat "$OUT/nvidia-smi.txt"
  record nvidia-smi "$smi" 0
else
  echo "nvidia-smi not found: no NVIDIA driver on this machine" | tee "$OUT/nvidia-smi.txt"
  record nvidia-smi 127 0 "not found"
fi
echo "== $(nproc) CPU cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 2^20}' /proc/meminfo) memory"

# -- set-up: the README's Quickstart (its first command without `imgtune demo`) ------------------------------
setup() {
  if [[ ${GPU_CHECK_SKIP_SETUP:-0} == 1 ]]; then
    echo "GPU_CHECK_SKIP_SETUP=1: using $(command -v python)"
    return 0
  fi
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import imgtune, torch, pytest, httpx" 2> /dev/null \
    && [[ $(.venv/bin/python -c "import imgtune; print(imgtune.__file__)") == "$ROOT/src/"* ]]; then
    echo ".venv already holds this checkout's imgtune: no install"
    return 0
  fi
  # shellcheck disable=SC1091
  python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]"
}
if ((DRY_RUN)); then
  echo "== setup (dry run): python3 -m venv .venv && . .venv/bin/activate && pip install -e \".[dev]\""
  echo "   (skipped when .venv already holds this checkout's imgtune)"
else
  started=$SECONDS
  limit=$(step_timeout 240 200)
  echo "== setup (timeout ${limit}s), log in $OUT/setup.log"
  export -f setup
  export ROOT
  if timeout "$limit" bash -c setup > "$OUT/setup.log" 2>&1; then rc=0; else rc=$?; fi
  tail -5 "$OUT/setup.log"
  record setup "$rc" "$((SECONDS - started))"
fi
if [[ ${GPU_CHECK_SKIP_SETUP:-0} != 1 && -f .venv/bin/activate ]]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
PYTHON=$(command -v python || command -v python3)

# -- torch and CUDA as the tests will see them ---------------------------------------------------------------
cuda_info='
import os, torch
print("torch", torch.__version__, "CUDA build", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
print("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"))
available = torch.cuda.is_available()
print("cuda available", available, "devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
if available:
    print("bf16 supported", torch.cuda.is_bf16_supported())
try:
    import onnxruntime as ort
    print("onnxruntime", ort.__version__, ort.get_available_providers())
except ImportError as exc:
    print("onnxruntime missing:", exc)
try:
    import pynvml
    pynvml.nvmlInit()
    print("NVML driver", pynvml.nvmlSystemGetDriverVersion(), "GPUs", pynvml.nvmlDeviceGetCount())
except Exception as exc:
    print("NVML unavailable:", type(exc).__name__, exc)
raise SystemExit(0 if available else 3)
'
started=$SECONDS
if timeout 120 "$PYTHON" -c "$cuda_info" > "$OUT/torch-cuda.txt" 2>&1; then rc=0; else rc=$?; fi
cat "$OUT/torch-cuda.txt"
if ((rc == 3)); then
  echo "== NO CUDA GPU visible to torch: the GPU tests will fail (loudly) and the benchmark will refuse"
fi
record cuda "$rc" "$((SECONDS - started))"

# -- the GPU tests ------------------------------------------------------------------------------------------------
BASETEMP=${TMPDIR:-/tmp}/imgtune-gpu-pytest
pytest_args=(-m gpu -p no:cacheprovider -v -rA --durations=20 --basetemp="$BASETEMP" --junitxml="$OUT/gpu-tests.xml" tests)
if ((DRY_RUN)); then
  echo "== tests (dry run): $PYTHON -m pytest ${pytest_args[*]}"
  run collect 120 "$PYTHON" -m pytest --collect-only -q -m gpu -p no:cacheprovider tests
else
  run tests "$(step_timeout 280 130)" "$PYTHON" -m pytest "${pytest_args[@]}"
  # the jobs the tests made: their reports and profiler records (small files only; caches and models stay)
  if [[ -d $BASETEMP ]]; then
    mkdir -p "$OUT/artifacts"
    (cd "$BASETEMP" && find . -type f \( -name report.html -o -path '*/profiler/*.json' -o -name job.json \
      -o -name logs.txt \) -size -8M -print0 | xargs -0 -r cp --parents -t "$OUT/artifacts") || true
  fi
fi

# -- the GPU benchmark --------------------------------------------------------------------------------------------
if ((DRY_RUN)); then
  echo "== benchmark (dry run): $PYTHON benchmarks/gpu.py --budget-s N --out $OUT/gpu-benchmark.txt --json $OUT/gpu-benchmark.json"
else
  limit=$(step_timeout 240 5)
  budget=$((limit - 25))
  ((budget < 30)) && budget=30
  run benchmark "$limit" "$PYTHON" benchmarks/gpu.py --budget-s "$budget" \
    --out "$OUT/gpu-benchmark.txt" --json "$OUT/gpu-benchmark.json"
fi

echo "== summary ($((SECONDS - START))s of ${BUDGET}s)"
cat "$OUT/summary.txt"
if ((${#FAILED[@]})); then
  echo "== FAILED: ${FAILED[*]}"
  exit 1
fi
echo "== all steps passed"

#!/usr/bin/env bash
# The one command to run when a CUDA GPU is lent (H100/H200, CUDA 13, torch 2.11, Triton, nvcc; no
# network): build the native extension, run the GPU tests, the kernel and end-to-end benchmarks.
#
#   scripts/gpu_check.sh OUTDIR                  (or: make gpu-check OUT=OUTDIR)
#   WHEELHOUSE=.whl scripts/gpu_check.sh OUTDIR   (install offline wheels first; see below)
#
# Steps, each under `timeout`, each logged with timestamps to OUTDIR/gpu_check.log; a failing step is
# recorded and the next one runs; a summary (per step: ok / FAILED / TIMEOUT / skipped) ends it:
#   env          nvidia-smi, nvcc, torch/CUDA/Triton versions; no CUDA device: everything below is
#                skipped and the script exits 3 at once
#   wheelhouse   only with WHEELHOUSE=DIR: pip install --no-index --find-links DIR --no-deps DIR/*.whl
#   build        pip install --no-build-isolation --no-deps -e . : chatterbox_rt._C with its CUDA ops
#                (setup.py; nvcc from CUDA_HOME), then checks that the CUDA ops load
#   tests        pytest -m "not slow" over GPU_CHECK_TESTS (default tests/kernels: every op against its
#                reference on CUDA, Triton and native) -> OUTDIR/tests.xml
#   bench-kernels  profiling/bench_kernels.py --device cuda -> OUTDIR/kernels.json
#   bench        chatterbox-rt bench --dummy-weights --device cuda --compare-upstream --concurrency
#                1,8,32 --stream -> OUTDIR/bench.json, OUTDIR/concurrency.png (without
#                --compare-upstream, and a note saying so, when the reference does not import)
#   tests-precision  pytest tests/unit/test_precision.py -k cuda (every mode on CUDA, the quality bounds)
#   bench-MODE   chatterbox-rt bench --precision MODE (bf16, int8, fp8) at concurrency 1 and 16
#                -> OUTDIR/bench_MODE.json
#   tests-engine pytest tests/engine (CPU today: the engine on this machine's torch), last, in the
#                time left
# The whole run keeps inside GPU_CHECK_BUDGET_S (default 450 s, under 8 minutes): each step's timeout
# is the smaller of its own cap and the time left; a step with under 10 s left is skipped.
# Environment: PYTHON (default .venv/bin/python if present, else python3), GPU_CHECK_TESTS,
# GPU_CHECK_BUDGET_S, GPU_CHECK_BENCH_ARGS (appended to the bench's arguments, e.g. "--dtype bf16").
# Exit status: 0 when every step that ran passed, 1 when one failed or timed out, 3 without CUDA.
#
# Offline wheels. The GPU machine's image has torch, numpy, transformers, matplotlib ... but not
# chatterbox-rt's soundfile/soxr/pyloudnorm/resemble-perth, jsonschema, nor the reference package
# (chatterbox-tts 0.1.7) and its pure-Python imports. Build the wheelhouse on a machine with PyPI
# access, inside the repository and ignored by git, and carry it with the working tree:
#   echo /.whl/ >> .git/info/exclude
#   scripts/build_wheelhouse.sh .whl           # ~40 MiB; it must stay under 64 MiB with the tree
#   WHEELHOUSE=.whl scripts/gpu_check.sh out   # on the GPU machine (device call: carry [".whl"])
set -uo pipefail  # not -e: a failing step is recorded and the next one runs

if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: scripts/gpu_check.sh OUTDIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
LOG="$OUT/gpu_check.log"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
: > "$LOG"

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"
TESTS="${GPU_CHECK_TESTS:-tests/kernels}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
START=$SECONDS
STEPS=() STATUS=() TIMES=()
FAILED=0

log() {  # a line to the log and to stdout
  printf '[%(%H:%M:%S)T] %s\n' -1 "$*" | tee -a "$LOG"
}

stamp() {  # prefix each line of stdin with the time (bash's printf builtin: no process per line)
  local line
  while IFS= read -r line || [ -n "$line" ]; do printf '[%(%H:%M:%S)T] %s\n' -1 "$line"; done
}

record() {
  STEPS+=("$1") STATUS+=("$2") TIMES+=("$3")
}

# step NAME CAP_S CMD...: run CMD under timeout (its cap or the time left), output to the log.
step() {
  local name="$1" cap="$2"
  shift 2
  local left=$((BUDGET_S - (SECONDS - START)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 10 ]; then
    log "SKIP  $name: the ${BUDGET_S} s budget is spent"
    record "$name" "skipped (no time left)" 0
    return 0
  fi
  local cmd="$*"
  cmd="${cmd//$'\n'/ }"
  log "START $name (timeout ${limit} s): ${cmd:0:240}"
  local t0=$SECONDS rc first
  first=$(($(wc -l < "$LOG") + 1))
  timeout --kill-after=10 "$limit" "$@" 2>&1 | stamp >> "$LOG"
  rc=${PIPESTATUS[0]}
  local dt=$((SECONDS - t0))
  if [ "$rc" -eq 0 ]; then
    log "OK    $name (${dt} s)"
    record "$name" ok "$dt"
  else
    local what="FAILED (exit $rc)"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && what="TIMEOUT after ${limit} s"
    local tail_lines
    tail_lines="$(tail -n "+$first" "$LOG" | tail -n 15)"
    log "$what: $name (${dt} s); its last lines:"
    printf '%s\n' "$tail_lines" | sed 's/^/        /'
    record "$name" "$what" "$dt"
    FAILED=1
  fi
  return "$rc"
}

summary() {
  log "---------------------------------------------------------------- summary"
  local i
  for i in "${!STEPS[@]}"; do
    printf '[%(%H:%M:%S)T] %-14s %-26s %4s s\n' -1 "${STEPS[$i]}" "${STATUS[$i]}" "${TIMES[$i]}" | tee -a "$LOG"
  done
  log "total $((SECONDS - START)) s; log: $LOG"
  if [ -s "$OUT/bench.json" ]; then
    "$PY" - "$OUT/bench.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from chatterbox_rt.profiling.bench import format_report
print(format_report(json.load(open(sys.argv[1]))))
EOF
  fi
  if [ -s "$OUT/kernels.json" ]; then
    "$PY" - "$OUT/kernels.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
r = json.load(open(sys.argv[1]))
best = {}
for row in r["rows"]:
    if row["backend"] != "eager" and row.get("speedup"):
        key = (row["op"], row["dtype"])
        best[key] = max(best.get(key, 0.0), row["speedup"])
print("kernels: best speed-up over eager per op/dtype:",
      ", ".join(f"{op} {dt} {s:.2f}x" for (op, dt), s in sorted(best.items())) or "none")
EOF
  fi
}

# ------------------------------------------------------------------------------ env
log "gpu_check: $ROOT -> $OUT (budget ${BUDGET_S} s, python $PY)"
ENV_INFO="nvidia-smi || echo 'nvidia-smi: not available'; nvcc --version | tail -n 2 || echo 'nvcc: not on PATH';
  $PY -c 'import sys, torch; print(\"python\", sys.version.split()[0], \"| torch\", torch.__version__, \"| CUDA\",
  torch.version.cuda, \"| devices\", torch.cuda.device_count())'; $PY -c 'import triton; print(\"triton\",
  triton.__version__)' || echo 'triton: not importable'"
step env 30 bash -c "$ENV_INFO"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >> "$LOG" 2>&1; then
  log "gpu_check: NO CUDA DEVICE: torch (from $PY) sees no GPU, so the build, GPU tests and benchmarks are" \
      "skipped. Run this on a machine with a CUDA GPU and a CUDA build of torch."
  record "gpu steps" "skipped (no CUDA)" 0
  summary
  exit 3
fi
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0)
print(f'gpu_check: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB')" \
  2>&1 | tee -a "$LOG"

# ------------------------------------------------------------------------------ install
if [ -n "${WHEELHOUSE:-}" ]; then
  if compgen -G "$WHEELHOUSE/*.whl" > /dev/null; then
    step wheelhouse 120 "$PY" -m pip install -q --disable-pip-version-check --no-index --find-links "$WHEELHOUSE" \
      --no-deps "$WHEELHOUSE"/*.whl
  else
    log "wheelhouse: WHEELHOUSE=$WHEELHOUSE holds no .whl files: nothing installed"
    record wheelhouse "FAILED (no wheels)" 0
    FAILED=1
  fi
fi
step build 240 env MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" -m pip install --disable-pip-version-check \
  --no-build-isolation --no-deps -e .
step native 30 "$PY" -c "
from chatterbox_rt.kernels import _native, dispatch
print('native CUDA ops:', _native.available('cuda'), '| dispatch on cuda:', dispatch.summary('cuda'))
raise SystemExit(0 if _native.available('cuda') else 'chatterbox_rt._C has no CUDA ops: see the build step')"

# ------------------------------------------------------------------------------ tests, benchmarks
# shellcheck disable=SC2086  # TESTS is a list of paths
step tests 150 "$PY" -m pytest -q -m "not slow" -rs -p no:cacheprovider --junitxml "$OUT/tests.xml" $TESTS
step bench-kernels 90 "$PY" profiling/bench_kernels.py --device cuda --json "$OUT/kernels.json"

BENCH=(--dummy-weights --device cuda --concurrency 1,8,32 --stream --json "$OUT/bench.json"
       --plot "$OUT/concurrency.png")
left=$((BUDGET_S - (SECONDS - START)))
if [ "$left" -ge 30 ] && timeout $((left < 60 ? left : 60)) "$PY" -c "
from chatterbox_rt.profiling.upstream import load_reference, ref_tts_class
load_reference(); ref_tts_class('chatterbox')" >> "$LOG" 2>&1; then
  BENCH+=(--compare-upstream)
else
  log "bench: NOTE: the reference (chatterbox-tts 0.1.7) does not import here (see the log above; install it" \
      "with WHEELHOUSE=...): running the bench without --compare-upstream"
fi
# shellcheck disable=SC2206  # extra bench arguments, space-separated
BENCH+=(${GPU_CHECK_BENCH_ARGS:-})
step bench 240 "$PY" -m chatterbox_rt.cli bench "${BENCH[@]}"
step tests-precision 60 "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml "$OUT/tests_precision.xml" \
  tests/unit/test_precision.py -k cuda
for mode in bf16 int8 fp8; do  # issue 13: each mode against the fp32 bench above, batch 1 and 16
  step "bench-$mode" 45 "$PY" -m chatterbox_rt.cli bench --dummy-weights --device cuda --precision "$mode" \
    --tokens 100 --runs 2 --concurrency 1,16 --json "$OUT/bench_$mode.json"
done
step tests-engine 120 "$PY" -m pytest -q -m "not slow" -rs -p no:cacheprovider --junitxml "$OUT/tests_engine.xml" \
  tests/engine

summary
if [ "$FAILED" -ne 0 ]; then
  log "gpu_check: SOME STEPS FAILED (see above and $LOG)"
  exit 1
fi
log "gpu_check: all steps passed"

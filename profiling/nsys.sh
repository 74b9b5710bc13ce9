#!/usr/bin/env bash
# Profile a command under Nsight Systems with chatterbox-rt's NVTX ranges on (CHATTERBOX_RT_NVTX=1).
#
#   profiling/nsys.sh [-o OUT] [--whole] [-- COMMAND ...]
#
# Runs from the repository root (relative paths in OUT and COMMAND are taken from there).
# -o OUT   report path without extension (default: profiling/reports/nsys_<date>); nsys writes OUT.nsys-rep
# --whole  capture the whole run instead of only the cudaProfilerStart/Stop window
#          (chatterbox_rt.profiling.nvtx.profiler_start()/profiler_stop() open and close that window)
#
# COMMAND defaults to `chatterbox-rt bench --dummy-weights --tokens 100 --runs 2` (CUDA when torch sees a GPU).
# The bench brackets its timed runs with profiler_start()/profiler_stop(), so only they are captured; without
# CUDA there is no profiler API to open that window, and the default command is captured whole.
set -euo pipefail

cd "$(dirname "$0")/.."
out="profiling/reports/nsys_$(date +%Y%m%d_%H%M%S)"
whole=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        -o) out="$2"; shift 2 ;;
        --whole) whole=1; shift ;;
        --) shift; break ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) break ;;
    esac
done

if [[ $# -eq 0 ]]; then
    py="python"
    [[ -x .venv/bin/python ]] && py=".venv/bin/python"
    set -- "$py" -m chatterbox_rt.cli bench --dummy-weights --tokens 100 --runs 2
    "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || whole=1
fi

if ! command -v nsys >/dev/null 2>&1; then
    echo "nsys.sh: 'nsys' (Nsight Systems CLI) is not on PATH. Install Nsight Systems (it ships with the CUDA" >&2
    echo "toolkit under nsight-systems-*/bin, or from https://developer.nvidia.com/nsight-systems) and add it to PATH." >&2
    exit 127
fi

capture=(--capture-range=cudaProfilerApi --capture-range-end=stop)
[[ $whole -eq 1 ]] && capture=()

mkdir -p "$(dirname "$out")"
echo "nsys.sh: profiling: $*" >&2
CHATTERBOX_RT_NVTX=1 nsys profile -t cuda,nvtx,osrt ${capture[@]+"${capture[@]}"} --force-overwrite=true -o "$out" "$@"

report="$out.nsys-rep"
if [[ -f "$report" ]]; then
    echo "nsys.sh: report: $report"
    echo "nsys.sh: open it in nsys-ui, or summarise: nsys stats --report nvtx_sum,cuda_gpu_kern_sum $report"
else
    echo "nsys.sh: no report at $report (with cudaProfilerApi capture, did the command call profiler_start()?)" >&2
    exit 1
fi

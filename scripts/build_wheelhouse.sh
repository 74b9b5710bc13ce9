#!/usr/bin/env bash
# Download the wheels that scripts/gpu_check.sh installs offline on a lent GPU machine.
#
#   scripts/build_wheelhouse.sh DIR        (on a machine with PyPI access, e.g. a developer's)
#
# The GPU machine's image (Python 3.12, torch 2.11 + CUDA 13, Triton, numpy, scipy, transformers,
# matplotlib, ...; see .library/device/KINDS.md "Python packages already there") lacks:
#   - chatterbox-rt's own runtime dependencies: soundfile (+ cffi, pycparser), soxr, pyloudnorm,
#     resemble-perth (its watermark weights: most of the wheelhouse's size);
#   - the bench JSON's schema check: jsonschema (+ jsonschema-specifications, referencing, rpds-py);
#   - the reference for --compare-upstream, installed as `make test` does, without its pins
#     (tests/requirements-reference.txt): chatterbox-tts 0.1.7, s3tokenizer, librosa (+ audioread,
#     decorator, pooch, platformdirs), diffusers (+ importlib-metadata), conformer, omegaconf.
# Each is fetched with --no-deps at the version this environment has installed (so the GPU run
# uses what the CPU tests used), else the newest; binary wheels for CPython 3.12 manylinux x86_64.
# A package PyPI has no wheel for is built here with `pip wheel` (pure Python only). EXTRA="a==1 b"
# adds requirement specifiers. torch, torchaudio and numpy are never fetched: the image's stay.
#
# The wheelhouse travels with the working tree to the GPU machine, whose limit is 64 MiB in all:
# keep DIR inside the repository, ignored by git (e.g. `echo /.whl/ >> .git/info/exclude`,
# DIR=.whl), name it in the device call's carry, and run WHEELHOUSE=.whl scripts/gpu_check.sh OUT.
# This script fails if DIR grows past WHEELHOUSE_MAX_MIB (default 56, leaving room for the tree).
set -euo pipefail

DIR="${1:?usage: scripts/build_wheelhouse.sh DIR}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
PY_VERSION="${WHEELHOUSE_PYTHON_VERSION:-3.12}"
MAX_MIB="${WHEELHOUSE_MAX_MIB:-56}"
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)

RUNTIME=(soundfile cffi pycparser soxr pyloudnorm resemble-perth)
SCHEMA=(jsonschema jsonschema-specifications referencing rpds-py)
REFERENCE=(chatterbox-tts s3tokenizer librosa audioread decorator pooch platformdirs diffusers importlib-metadata
           conformer omegaconf)
# shellcheck disable=SC2206  # EXTRA is a space-separated list on purpose
EXTRA_SPECS=(${EXTRA:-})

mkdir -p "$DIR"
platform_args=(--only-binary=:all: --implementation cp --python-version "$PY_VERSION")
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done

# name -> name==version as installed here (pinned by tests/requirements-reference.txt or the test extra).
spec_of() {
  "$PY" - "$1" <<'EOF'
import importlib.metadata as md, sys
name = sys.argv[1]
try:
    print(f"{name}=={md.version(name)}")
except md.PackageNotFoundError:
    print(name)
EOF
}

fetch() {
  local spec="$1"
  if "$PY" -m pip download -q --disable-pip-version-check --no-deps "${platform_args[@]}" -d "$DIR" "$spec"; then
    return 0
  fi
  echo "wheelhouse: no wheel on the index for $spec; building one here (pure Python only)"
  "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$DIR" "$spec"
}

for name in "${RUNTIME[@]}" "${SCHEMA[@]}" "${REFERENCE[@]}"; do
  spec="$(spec_of "$name")"
  echo "wheelhouse: $spec"
  fetch "$spec"
done
for spec in "${EXTRA_SPECS[@]}"; do
  echo "wheelhouse: $spec (EXTRA)"
  fetch "$spec"
done

# A wheel built here from source must be pure Python, or it would not load on the GPU machine.
cp_tag="cp${PY_VERSION/./}"
for whl in "$DIR"/*.whl; do
  case "$(basename "$whl")" in
    *-none-any.whl) ;;
    *-"$cp_tag"-*manylinux*x86_64*.whl|*-abi3-manylinux*x86_64*.whl|*-none-manylinux*x86_64*.whl) ;;
    *) echo "wheelhouse: WARNING: $(basename "$whl") does not fit the GPU machine's CPython $PY_VERSION" \
            "manylinux x86_64" >&2 ;;
  esac
done
size_mib=$(du -sm "$DIR" | cut -f1)
echo "wheelhouse: $(ls "$DIR"/*.whl | wc -l) wheels, ${size_mib} MiB in $DIR"
if [ "$size_mib" -gt "$MAX_MIB" ]; then
  echo "wheelhouse: $DIR is ${size_mib} MiB, over WHEELHOUSE_MAX_MIB=$MAX_MIB: it would not travel" \
       "(the GPU machine takes 64 MiB of working tree in all)" >&2
  exit 1
fi

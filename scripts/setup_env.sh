#!/usr/bin/env bash
# Create the project's virtual environment and install chatterbox-rt into it (editable).
#
#   scripts/setup_env.sh [VENV] [--test]
#
# torch: a CUDA build of torch that the base interpreter ($PYTHON, default python3) already has
# is left alone and used (the venv sees the base site-packages). Otherwise the venv is isolated
# and gets torch==2.13.0; on a machine without CUDA that should be the CPU build: set
# TORCH_INDEX_URL to your CPU wheel index if your pip does not already resolve to it.
# --test also installs the test extra and the reference implementation (test-only oracle).
set -euo pipefail

VENV=".venv"
TEST=0
for arg in "$@"; do
  case "$arg" in
    --test) TEST=1 ;;
    *) VENV="$arg" ;;
  esac
done
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    echo "setup: using the CUDA torch of $PYTHON ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==$TORCH_VERSION"
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
  else
    "${PIP[@]}" "torch==$TORCH_VERSION"
  fi
fi

# setup.py imports torch to build the native extension (csrc/), so the package is installed without
# build isolation: the build tools must be in the venv already.
"${PIP[@]}" "setuptools>=68,<81" wheel

if [ "$TEST" = 1 ]; then
  echo "setup: installing chatterbox-rt with the test extra"
  "${PIP[@]}" --no-build-isolation -e ".[test]"
  # The reference pins torch/torchaudio versions that must not replace ours: no dependencies.
  "${PIP[@]}" --no-deps -r tests/requirements-reference.txt
  # Upstream HEAD (5de7a54), the oracle for Multilingual V3 and the Single Language Pack, from the
  # archive in tests/oracle/ as the test-only package chatterbox_head.
  "$PY" tests/oracle/install.py
else
  echo "setup: installing chatterbox-rt"
  "${PIP[@]}" --no-build-isolation -e .
fi
"$PY" -c "import torch, chatterbox_rt; print('setup: torch', torch.__version__, '| chatterbox_rt', chatterbox_rt.__version__)"

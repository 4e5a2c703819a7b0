#!/usr/bin/env bash
# Creates (once) a venv at target/pyenv-cuda holding NVRTC and the CUDA headers from
# PyPI, then prints `export` lines for the kernel compile test:
#   eval "$(bash scripts/cuda-venv.sh)"
# Pinned to CUDA 13.0 (the release cudarc's `cuda-13000` bindings and the r580 driver
# match). Progress goes to stderr; stdout carries only the export lines.
set -euo pipefail
cd "$(dirname "$0")/.."

NVRTC_VERSION=13.0.88
RUNTIME_VERSION=13.0.96
VENV=target/pyenv-cuda
STAMP="$VENV/.stral-nvrtc-$NVRTC_VERSION-runtime-$RUNTIME_VERSION"

if [ ! -f "$STAMP" ]; then
  python3 -m venv "$VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvrtc==$NVRTC_VERSION" "nvidia-cuda-runtime==$RUNTIME_VERSION" >&2
  touch "$STAMP"
fi

CU13="$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
[ -f "$CU13/lib/libnvrtc.so.13" ] || { echo "cuda-venv: no libnvrtc.so.13 under $CU13/lib" >&2; exit 1; }
[ -f "$CU13/include/cuda_bf16.h" ] || { echo "cuda-venv: no cuda_bf16.h under $CU13/include" >&2; exit 1; }
echo "export LD_LIBRARY_PATH=\"$CU13/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
echo "export STRAL_CUDA_INCLUDE_DIR=\"$CU13/include\""

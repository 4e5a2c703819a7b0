#!/usr/bin/env bash
# Runs every test of the project on a bare machine: installs what the tests need
# (pinned PyPI packages into venvs cached under target/), then `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# NVRTC + CUDA headers from PyPI, so every CUDA kernel is compiled for sm_80/sm_90
# even without a GPU; the kernel compile test fails (not skips) when this is set.
if [ -f scripts/cuda-venv.sh ]; then
  eval "$(bash scripts/cuda-venv.sh)"
  export STRAL_REQUIRE_NVRTC=1
fi

# Keep generated models out of the user's cache.
export STRAL_CACHE_DIR="${STRAL_CACHE_DIR:-$PWD/target/stral-cache}"

cargo test --workspace --all-targets "$@"

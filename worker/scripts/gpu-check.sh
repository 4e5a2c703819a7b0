#!/usr/bin/env bash
# The CUDA worker backend on a GPU machine — one command (see worker/README.md).
# Builds, then runs (logs and results under target/gpu-check/worker/):
#   1. the worker's GPU tests (STRAL_GPU=1): CUDA vs the CPU reference, host-staged
#      TP=2 on one GPU = TP=1, NCCL world size 1;
#   2. the end-to-end `stral serve --device cuda` FIM test (tests/cuda_serve.rs);
#   3. the step benchmark on synthetic:codestral-22b (markdown in bench.md).
# Needs: an sm_80+ GPU and driver, NVRTC + CUDA headers (scripts/cuda-venv.sh), and
# libcublasLt / libnccl on LD_LIBRARY_PATH. STAGES="test e2e bench" picks stages.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=target/gpu-check/worker
mkdir -p "$OUT"
STAGES=${STAGES:-"test e2e bench"}
export STRAL_GPU=1 STRAL_CACHE_DIR=${STRAL_CACHE_DIR:-target/stral-cache}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
cargo build --release --bin stral -p worker --example cuda_step_bench
for stage in $STAGES; do
  case $stage in
    test)  cargo test --release -p worker --test cuda_gpu -- --test-threads=1 --nocapture 2>&1 | tee "$OUT/test.log" ;;
    e2e)   cargo test --release --test cuda_serve -- --test-threads=1 --nocapture 2>&1 | tee "$OUT/e2e.log" ;;
    bench) cargo run --release -p worker --example cuda_step_bench 2>"$OUT/bench.log" | tee "$OUT/bench.md" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
echo "results in $OUT" >&2

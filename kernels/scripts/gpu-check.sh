#!/usr/bin/env bash
# GPU verification of the CUDA kernels: the kernel tests against the CPU reference,
# compute-sanitizer (memcheck + racecheck) on the short tests, the microbenchmarks,
# and PyTorch SDPA on the same shapes when torch is installed. Logs go to $OUT
# (default target/gpu-check).
#
#   bash kernels/scripts/gpu-check.sh            # builds with cargo, runs everything
#   TEST_BIN=... BENCH_BIN=... bash kernels/scripts/gpu-check.sh   # prebuilt binaries
#                                                 # (a GPU machine without Rust)
# Set STAGES to a subset of "test sanitize bench sdpa" to run only those.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-target/gpu-check}"
STAGES="${STAGES:-test sanitize bench sdpa}"
mkdir -p "$OUT"

# NVRTC and the CUDA headers: the toolkit's, or the pip wheels next to PyTorch.
find_first() { for d in "$@"; do [ -e "$d" ] && { echo "$d"; return; }; done; }
if [ -z "${STRAL_CUDA_INCLUDE_DIR:-}" ]; then
  hdr="$(find_first /usr/local/cuda/include/cuda_bf16.h \
    $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, "cu13/include/cuda_bf16.h") for p in nvidia.__path__))' 2>/dev/null))"
  export STRAL_CUDA_INCLUDE_DIR="$(dirname "${hdr:-/nonexistent/x}")"
fi
nvrtc="$(find_first /usr/local/cuda/lib64/libnvrtc.so.13 /usr/local/cuda/targets/x86_64-linux/lib/libnvrtc.so.13 \
  $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, "cu13/lib/libnvrtc.so.13") for p in nvidia.__path__))' 2>/dev/null))"
[ -n "$nvrtc" ] && export LD_LIBRARY_PATH="$(dirname "$nvrtc")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export STRAL_GPU=1 STRAL_CACHE_DIR="${STRAL_CACHE_DIR:-$OUT/cache}"
echo "nvrtc: ${nvrtc:-not found}; headers: $STRAL_CUDA_INCLUDE_DIR" | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >> "$OUT/env.txt" 2>&1

if [ -z "${TEST_BIN:-}" ] || [ -z "${BENCH_BIN:-}" ]; then
  cargo build --release -p kernels --tests --examples || exit 1
  TEST_BIN="$(ls -t target/release/deps/cuda_gpu-* | grep -v '\.d$' | head -1)"
  BENCH_BIN=target/release/examples/cuda_bench
fi

status=0
for stage in $STAGES; do
  case "$stage" in
    test)
      "$TEST_BIN" --ignored --test-threads=1 2>&1 | tee "$OUT/tests.log" || status=1 ;;
    sanitize)
      if command -v compute-sanitizer >/dev/null; then
        for tool in memcheck racecheck; do
          timeout "${SANITIZE_TIMEOUT:-240}" compute-sanitizer --tool "$tool" --error-exitcode 9 "$TEST_BIN" --ignored --test-threads=1 \
            --skip long --skip 257 2>&1 | tail -25 | tee "$OUT/sanitizer-$tool.log" || status=1
        done
      else
        echo "compute-sanitizer not installed" | tee "$OUT/sanitizer.log"
      fi ;;
    bench)
      "$BENCH_BIN" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.md" || status=1 ;;
    sdpa)
      if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
        PYTHONUNBUFFERED=1 python3 kernels/scripts/sdpa_bench.py ${BENCH_ARGS:-} 2>&1 | tee "$OUT/sdpa.md" || status=1
      else
        echo "no CUDA PyTorch: SDPA comparison skipped" | tee "$OUT/sdpa.md"
      fi ;;
  esac
done
exit $status

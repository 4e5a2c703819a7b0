#!/usr/bin/env bash
# The whole GPU run, on the GPU machine, from binaries built elsewhere and carried in
# devcarry/ (worker/scripts/device-pack.sh builds that folder; this file is its run.sh).
# No Rust toolchain, no network: the CUDA libraries come from python3's NVIDIA wheels.
#
#   bash devcarry/run.sh            # results in $OUT (the device tool's), else ./device-results
#
# Stages, each under its own time limit (seconds, override with T_<STAGE>=N; the
# defaults sum to 450 s, so the whole run stays under 8 minutes) so one hang cannot
# eat the rest; STAGES="tests e2e sanitize bench peer" picks some:
#   tests     kernels (--include-ignored) + worker (--ignored) GPU tests   -> tests.log
#   e2e       stral serve --device cuda vs --device cpu over HTTP          -> e2e.log
#   sanitize  compute-sanitizer --tool memcheck on one short forward       -> sanitizer.log
#   bench     cuda_step_bench on synthetic:codestral-22b                   -> bench.md
#   peer      PyTorch MistralForCausalLM of the same shape (+ stral ratio) -> peer.md
# plus nvidia-smi.txt and run.log (setup, per-stage status and times): 7 files.
#
# Environment: STRAL_CARRY_BIN=DIR takes the binaries from DIR instead of
# devcarry/bin (the CPU test points it at debug builds); OUT=DIR for the results;
# STRAL_PYTHON for the python whose NVIDIA wheels hold the libraries (python3).
# Exit status: 0 all stages passed; 1 some stage failed; 3 no GPU here; 2 bad setup.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN="${STRAL_CARRY_BIN:-$HERE/bin}"
RES="${OUT:-$PWD/device-results}"
mkdir -p "$RES"
LOG="$RES/run.log"
: > "$LOG"
say() { echo "[device-run] $*" | tee -a "$LOG" >&2; }
T0=$SECONDS

# ---- the carried binaries ---------------------------------------------------------
for b in stral cuda_step_bench kernels_cuda_gpu worker_cuda_gpu cuda_serve; do
  if [ ! -x "$BIN/$b" ]; then
    say "error: $BIN/$b missing or not executable (build devcarry/ with worker/scripts/device-pack.sh)"
    exit 2
  fi
done
if ! "$BIN/stral" --version >> "$LOG" 2>&1; then
  say "error: $BIN/stral does not run on this machine (glibc too old? see run.log)"
  exit 2
fi
say "binaries: $BIN ($(cat "$HERE/MANIFEST" 2>/dev/null | head -1 || echo 'no MANIFEST'))"

# ---- CUDA libraries from the Python wheels (blocker 2) ---------------------------
# cudarc dlopens libcublasLt.so*, libnccl.so[.13,.12,..,.1] and libnvrtc.so*; the
# nccl wheel ships only libnccl.so.2, so a private folder first on LD_LIBRARY_PATH
# holds a libnccl.so link. Wheel layouts differ (CUDA 13: nvidia/cu13/lib; older:
# nvidia/cublas/lib, nvidia/cuda_nvrtc/lib; nccl: nvidia/nccl/lib), so we search
# python's site-packages/nvidia by file name. STRAL_PYTHON picks the python.
PY="${STRAL_PYTHON:-python3}"
NV="$("$PY" - <<'PYEOF' 2>/dev/null
import site
dirs = site.getsitepackages() + [site.getusersitepackages()]
print(" ".join(d + "/nvidia" for d in dirs))
PYEOF
)"
find_in_wheels() { # $1 = file name glob; prints the folder of the first match
  local d f
  for d in $NV; do
    [ -d "$d" ] || continue
    f="$(find "$d" -maxdepth 4 -name "$1" 2>/dev/null | sort | head -1)"
    [ -n "$f" ] && { dirname "$f"; return 0; }
  done
  return 1
}
LIBDIR="$(mktemp -d "${TMPDIR:-/tmp}/stral-libs.XXXXXX")"
LD_EXTRA="$LIBDIR"
for lib in 'libcublasLt.so*' 'libnccl.so*' 'libnvrtc.so*'; do
  if d="$(find_in_wheels "$lib")"; then
    case ":$LD_EXTRA:" in *":$d:"*) ;; *) LD_EXTRA="$LD_EXTRA:$d" ;; esac
    say "libs: $lib in $d: $(cd "$d" && ls $lib | tr '\n' ' ')"
  else
    say "libs: no $lib in python's wheels (searched: ${NV:-no site-packages})"
  fi
done
if d="$(find_in_wheels 'libnccl.so.2')" && [ ! -e "$d/libnccl.so" ]; then
  ln -sf "$d/libnccl.so.2" "$LIBDIR/libnccl.so"
  say "libs: $LIBDIR/libnccl.so -> $d/libnccl.so.2 (cudarc never asks for .so.2)"
fi
export LD_LIBRARY_PATH="$LD_EXTRA${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if d="$(find_in_wheels cuda_bf16.h)"; then
  export STRAL_CUDA_INCLUDE_DIR="$d"
elif [ -e /usr/local/cuda/include/cuda_bf16.h ]; then
  export STRAL_CUDA_INCLUDE_DIR=/usr/local/cuda/include
else
  say "headers: no cuda_bf16.h in python's wheels or /usr/local/cuda/include"
fi
say "headers: ${STRAL_CUDA_INCLUDE_DIR:-none}; LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

# ---- is there a GPU? ---------------------------------------------------------------
if ! command -v nvidia-smi > /dev/null 2>&1; then
  say "no GPU here: nvidia-smi not found (this is the CPU dry run; setup above is what a GPU run would use)"
  exit 3
fi
if ! nvidia-smi > "$RES/nvidia-smi.txt" 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  say "no GPU here: nvidia-smi lists no GPU (see nvidia-smi.txt)"
  exit 3
fi
nvidia-smi -q >> "$RES/nvidia-smi.txt" 2>&1 || true
say "gpu: $(nvidia-smi -L | head -1)"

# ---- stages ------------------------------------------------------------------------
export STRAL_GPU=1 RUST_BACKTRACE=1
export STRAL_BIN="$BIN/stral"
export STRAL_CACHE_DIR="${STRAL_CACHE_DIR:-/tmp/stral-cache}"
export STRAL_TEST_TMPDIR="${STRAL_TEST_TMPDIR:-/tmp/stral-test-tmp}"
mkdir -p "$STRAL_CACHE_DIR" "$STRAL_TEST_TMPDIR"
STAGES="${STAGES:-tests e2e sanitize bench peer}"
FAILED=""

# run_stage NAME LIMIT_S LOGFILE CMD...: appends CMD's output to LOGFILE under a limit.
run_stage() {
  local name=$1 limit=$2 log=$3; shift 3
  local t=$SECONDS rc
  echo "=== $name: $* (limit ${limit}s)" >> "$log"
  timeout -k 10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) say "$name: ok ($((SECONDS - t)) s)" ;;
    124|137) say "$name: TIMED OUT after ${limit}s (see $(basename "$log"))"; FAILED="$FAILED $name" ;;
    *) say "$name: FAILED rc=$rc ($((SECONDS - t)) s, see $(basename "$log"))"; FAILED="$FAILED $name" ;;
  esac
}

for stage in $STAGES; do
  case $stage in
    tests)
      run_stage kernels-tests "${T_KERNELS:-60}" "$RES/tests.log" \
        "$BIN/kernels_cuda_gpu" --include-ignored --test-threads=1 --nocapture
      run_stage worker-tests "${T_WORKER:-75}" "$RES/tests.log" \
        "$BIN/worker_cuda_gpu" --ignored --test-threads=1 --nocapture \
        --skip synthetic_codestral_shape_fills_on_the_device ;;
    e2e)
      run_stage e2e "${T_E2E:-60}" "$RES/e2e.log" \
        "$BIN/cuda_serve" --ignored --test-threads=1 --nocapture ;;
    sanitize)
      if command -v compute-sanitizer > /dev/null 2>&1; then
        run_stage sanitize "${T_SANITIZE:-60}" "$RES/sanitizer.log" \
          compute-sanitizer --tool memcheck --error-exitcode 9 \
          "$BIN/worker_cuda_gpu" --ignored --exact one_short_forward --test-threads=1
      else
        say "sanitize: compute-sanitizer not found (skipped)"; FAILED="$FAILED sanitize"
      fi ;;
    bench)
      run_stage bench "${T_BENCH:-120}" "$RES/run.log" \
        bash -c '"$0" > "$1.tmp"; rc=$?; mv "$1.tmp" "$1"; exit $rc' "$BIN/cuda_step_bench" "$RES/bench.md" ;;
    peer)
      run_stage peer "${T_PEER:-75}" "$RES/run.log" \
        python3 "$HERE/peers/torch_mistral.py" --shapes "$HERE/peers/shapes.json" \
        --stral "$RES/bench.md" --out "$RES/peer.md" ;;
    *) say "unknown stage $stage"; exit 2 ;;
  esac
done

say "done in $((SECONDS - T0)) s; results in $RES: $(cd "$RES" && ls | tr '\n' ' ')"
if [ -n "$FAILED" ]; then
  say "failed stages:$FAILED"
  exit 1
fi
exit 0

#!/usr/bin/env bash
# stral's CPU backend against llama.cpp's `llama-bench` on the same GGUF files: one
# synthetic checkpoint converted by llama.cpp's own convert_hf_to_gguf.py to f32,
# f16 and q8_0; prefill of a 512-token prompt and greedy decode at batch 1, TP 1,
# all cores; the two alternated ROUNDS times. Prints both tools' Markdown tables.
#
# stral loads each file as `stral serve --dtype auto` would: F32 as f32, F16 as
# bf16 (stral has no f16 storage; same bytes per weight), Q8_0 as its stored blocks.
#
# Needs the llama.cpp build of benches/peers/llama-cpp.sh (about 40 minutes the
# first time; this script runs it with --no-serve, which skips what is built).
# Settings (environment): ROUNDS (2), THREADS (all cores), PRESET (tiny), SEED (0).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
ROUNDS="${ROUNDS:-2}"
THREADS="${THREADS:-$(nproc 2>/dev/null || echo 2)}"
PRESET="${PRESET:-tiny}"
SEED="${SEED:-0}"

for t in f32 f16 q8_0; do
  OUTTYPE="$t" PRESET="$PRESET" SEED="$SEED" bash benches/peers/llama-cpp.sh --no-serve >&2
done
BUILD="$(ls -d target/peers/llama.cpp-build-* | head -n1)"
cargo build --release -p worker --example cpu_speed >&2
CPU_SPEED=target/release/examples/cpu_speed

stral_dtype() {
  case "$1" in f32) echo f32 ;; f16) echo bf16 ;; q8_0) echo q8_0 ;; esac
}

echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $THREADS threads"
for r in $(seq 1 "$ROUNDS"); do
  for t in f32 f16 q8_0; do
    gguf="target/peers/models/$PRESET-seed$SEED-$t.gguf"
    echo
    echo "## round $r, $t: llama-bench"
    LD_LIBRARY_PATH="$BUILD/bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
      "$BUILD/bin/llama-bench" -m "$gguf" -t "$THREADS" -p 512 -n 64 -r 3 -o md
    echo
    echo "## round $r, $t: stral cpu_speed --dtype $(stral_dtype "$t")"
    RAYON_NUM_THREADS="$THREADS" "$CPU_SPEED" --model "$gguf" --dtype "$(stral_dtype "$t")" --tp 1
  done
done

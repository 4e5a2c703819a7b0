#!/bin/bash
# Speculative decoding on the CPU (issue #19's Benchmark section): release build, the
# embedded model (`stral serve` with no --model: tiny synthetic checkpoint, 2 CPU ranks),
# speculation off vs on alternated on one server (off = `"speculative": false`), cases
# (a)–(d) single stream and batch 16 with (a). Run from anywhere; prints a Markdown table.
#   benches/scripts/spec_single_stream.sh [ROUNDS] [MAX_TOKENS] [extra `stral serve` flags…]
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
max_tokens=${2:-256}
shift $(( $# > 2 ? 2 : $# ))
cargo build --release --bin stral
port=${SPEC_BENCH_PORT:-18931}
log=$(mktemp -t spec_bench_serve.XXXXXX.log)
./target/release/stral serve --port "$port" "$@" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  curl -sf "localhost:$port/ready" >/dev/null && break
  kill -0 $pid 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.5
done
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $(git rev-parse --short HEAD), $(nproc) cores, stral serve $*"
python3 benches/scripts/spec_bench.py "$port" "$rounds" "$max_tokens"

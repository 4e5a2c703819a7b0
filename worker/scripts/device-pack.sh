#!/usr/bin/env bash
# Builds everything the GPU machine runs and packs it into devcarry/ (gitignored),
# for ONE device command: `run` with carry ["devcarry"] and `bash devcarry/run.sh`
# (worker/README.md). The GPU machine has no Rust toolchain, so nothing there builds.
#
#   bash worker/scripts/device-pack.sh
#   PROFILE=dev bash worker/scripts/device-pack.sh   # debug build: a quick dry run only
#
# Builds (release): the `stral` binary, the CUDA step benchmark
# (worker/examples/cuda_step_bench.rs) and the GPU test binaries (kernels/tests/cuda_gpu.rs,
# worker/tests/cuda_gpu.rs, tests/cuda_serve.rs; found via --message-format=json),
# strips them into devcarry/bin/, adds devcarry/run.sh (worker/scripts/device-run.sh),
# the PyTorch peer (benches/peers/torch_mistral.py) with the model shapes read from
# worker/src/config.rs (devcarry/peers/shapes.json) and a MANIFEST. Fails if the
# folder exceeds 40 MB (the device tool carries at most 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=devcarry
LIMIT=$((40 * 1000 * 1000))
CARGO="${CARGO:-cargo}"
PROFILE="${PROFILE:-release}"
case $PROFILE in dev) DIR=target/debug ;; *) DIR=target/$PROFILE ;; esac

rm -rf "$DEST"
mkdir -p "$DEST/bin" "$DEST/peers"

echo "[device-pack] building $PROFILE binaries (release is slow on few cores)" >&2
nice "$CARGO" build --profile "$PROFILE" --locked -p stral --bin stral -p worker --example cuda_step_bench
cp "$DIR/stral" "$DEST/bin/stral"
cp "$DIR/examples/cuda_step_bench" "$DEST/bin/cuda_step_bench"

echo "[device-pack] building the GPU test binaries" >&2
nice "$CARGO" test --profile "$PROFILE" --locked --no-run --message-format=json \
  -p kernels --test cuda_gpu -p worker --test cuda_gpu -p stral --test cuda_serve \
  > target/device-pack-tests.json
python3 - "$DEST/bin" target/device-pack-tests.json <<'PY'
import json, shutil, sys
dest = sys.argv[1]
want = {"kernels/tests/cuda_gpu.rs": "kernels_cuda_gpu", "worker/tests/cuda_gpu.rs": "worker_cuda_gpu",
        "tests/cuda_serve.rs": "cuda_serve"}
root = __import__("os").getcwd() + "/"
found = {}
for line in open(sys.argv[2]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    src = m["target"]["src_path"].removeprefix(root)
    if src in want:
        found[want[src]] = m["executable"]
missing = sorted(set(want.values()) - set(found))
if missing:
    sys.exit(f"device-pack: test binaries not found in cargo's output: {missing}")
for name, exe in sorted(found.items()):
    shutil.copy(exe, f"{dest}/{name}")
    print(f"[device-pack] {name} <- {exe}", file=sys.stderr)
PY

strip "$DEST"/bin/*
cp worker/scripts/device-run.sh "$DEST/run.sh"
cp benches/peers/torch_mistral.py "$DEST/peers/"
python3 benches/peers/torch_mistral.py --config-rs worker/src/config.rs --print-shape \
  > "$DEST/peers/shapes.json"
{
  echo "stral ($PROFILE) $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!devcarry' || echo '+dirty'), built $(date -u +%FT%TZ) on $(uname -m), glibc $(ldd --version | head -1 | awk '{print $NF}')"
  (cd "$DEST" && find . -type f ! -name MANIFEST -printf '%s %p\n' | sort -k2)
} > "$DEST/MANIFEST"

SIZE=$(du -sb "$DEST" | cut -f1)
echo "[device-pack] $DEST: $SIZE bytes ($((SIZE / 1000000)) MB; limit $((LIMIT / 1000000)) MB)" >&2
cat "$DEST/MANIFEST" >&2
if [ "$SIZE" -gt "$LIMIT" ]; then
  if [ "$PROFILE" = release ]; then
    echo "[device-pack] error: $DEST is larger than $((LIMIT / 1000000)) MB" >&2
    exit 1
  fi
  echo "[device-pack] warning: a $PROFILE pack over $((LIMIT / 1000000)) MB is for a local dry run only" >&2
fi
echo "[device-pack] ready: run with carry [\"devcarry\"] and the command: bash devcarry/run.sh" >&2

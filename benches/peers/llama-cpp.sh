#!/usr/bin/env bash
# llama.cpp as a peer for `stral bench`, rebuilt from a pinned PyPI sdist.
#
# 1. downloads the llama-cpp-python sdist (it vendors llama.cpp) with pip,
# 2. builds llama.cpp's `llama-server` and `llama-bench` with CMake (CPU,
#    -DGGML_NATIVE=ON) under target/peers/,
# 3. writes a stral synthetic checkpoint (HF layout, f32) with `stral synth`, copies
#    the Codestral v3 SentencePiece model in as `tokenizer.model` (from the pinned
#    mistral-common wheel, the file coordinator/assets/tokenizer.json was converted
#    from; checked by sha256), and converts it to GGUF with the vendored
#    convert_hf_to_gguf.py,
# 4. serves it on loopback with `llama-server` and prints the `stral bench` line.
#
# Every step is skipped when its output is already there, so a rerun goes straight
# to serving. About 40 minutes of build on 2 busy cores the first time; not part of
# CI. See benches/peers/README.md.
#
# Usage: benches/peers/llama-cpp.sh [--fetch-only | --no-serve]
#   --fetch-only: download and unpack the sdist, check its layout, stop.
#   --no-serve:   build and convert, print the commands, do not start the server.
# Settings (environment): PORT (8081), PARALLEL (16 slots), CTX_PER_SLOT (1024),
# THREADS (all cores), JOBS (build jobs, all cores), PRESET (tiny), SEED (0),
# OUTTYPE (f32), STRAL (the stral binary; default target/release or target/debug,
# else `cargo build --release`), LLAMA_CPP_PYTHON_VERSION, MISTRAL_COMMON_VERSION.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS="$ROOT/target/peers"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
MISTRAL_COMMON_VERSION="${MISTRAL_COMMON_VERSION:-1.13.1}"
# sha256 of mistral_common/data/mistral_instruct_tokenizer_240323.model.v3, as
# recorded in coordinator/assets/TOKENIZER_LICENSE.md.
TOKENIZER_SHA256="9addc8bdce5988448ae81b729336f43a81262160ae8da760674badab9d4c7d33"
PORT="${PORT:-8081}"
PARALLEL="${PARALLEL:-16}"
CTX_PER_SLOT="${CTX_PER_SLOT:-1024}"
CORES="$(nproc 2>/dev/null || echo 2)"
THREADS="${THREADS:-$CORES}"
JOBS="${JOBS:-$CORES}"
PRESET="${PRESET:-tiny}"
SEED="${SEED:-0}"
OUTTYPE="${OUTTYPE:-f32}"
SERVE=1
FETCH_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --no-serve) SERVE=0 ;;
    --fetch-only) FETCH_ONLY=1 ;;
    -h | --help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "llama-cpp.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

DL="$PEERS/downloads"
SRC="$PEERS/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
LLAMA="$SRC/vendor/llama.cpp"
BUILD="$PEERS/llama.cpp-build-$LLAMA_CPP_PYTHON_VERSION"
VENV="$PEERS/venv"
MODEL="$PEERS/models/$PRESET-hf-f32-seed$SEED"
GGUF="$PEERS/models/$PRESET-seed$SEED-$OUTTYPE.gguf"

step() { printf '\n==> %s\n' "$*"; }
skip() { printf '    (already done: %s)\n' "$*"; }
die() { printf 'llama-cpp.sh: %s\n' "$*" >&2; exit 1; }

mkdir -p "$DL" "$PEERS/models"

step "Python environment ($VENV)"
if [[ -x "$VENV/bin/python" ]]; then
  skip "venv exists"
else
  python3 -m venv "$VENV" || die "python3 -m venv failed (install python3-venv)"
  "$VENV/bin/pip" install --quiet --upgrade pip
  echo "    created $VENV"
fi
PIP="$VENV/bin/pip"
export PATH="$VENV/bin:$PATH"

step "CMake"
if command -v cmake >/dev/null; then
  skip "$(cmake --version | head -n1)"
else
  "$PIP" install --quiet cmake
  command -v cmake >/dev/null || die "cmake is still not on PATH after pip install cmake"
  echo "    installed from pip: $(cmake --version | head -n1)"
fi

step "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist (vendors llama.cpp)"
SDIST="$DL/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
if [[ -f "$SDIST" ]]; then
  skip "$SDIST"
else
  # Only this package from source: `--no-binary :all:` would also build its build
  # dependencies (cmake, ninja) from source just to read its metadata.
  "$PIP" download --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$DL"
  [[ -f "$SDIST" ]] || die "pip did not leave $SDIST"
fi
if [[ -f "$LLAMA/CMakeLists.txt" ]]; then
  skip "unpacked in $SRC"
else
  tar -xzf "$SDIST" -C "$PEERS"
fi
for f in CMakeLists.txt convert_hf_to_gguf.py conversion/llama.py gguf-py/gguf/__init__.py \
  requirements/requirements-convert_hf_to_gguf.txt tools/server/CMakeLists.txt \
  tools/llama-bench/CMakeLists.txt; do
  [[ -e "$LLAMA/$f" ]] || die "the sdist has no vendor/llama.cpp/$f (another layout? pin LLAMA_CPP_PYTHON_VERSION)"
  echo "    found vendor/llama.cpp/$f"
done
if [[ "$FETCH_ONLY" == 1 ]]; then
  exit 0
fi

step "Build llama-server and llama-bench (CPU, GGML_NATIVE=ON, $JOBS jobs; ~40 min on 2 cores)"
SERVER_BIN="$BUILD/bin/llama-server"
BENCH_BIN="$BUILD/bin/llama-bench"
if [[ -x "$SERVER_BIN" && -x "$BENCH_BIN" ]]; then
  skip "$SERVER_BIN, $BENCH_BIN"
else
  # No prebuilt web UI: it would be fetched from the network at build time.
  cmake -S "$LLAMA" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DGGML_CUDA=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_USE_PREBUILT_UI=OFF
  cmake --build "$BUILD" --config Release -j "$JOBS" --target llama-server llama-bench
  [[ -x "$SERVER_BIN" && -x "$BENCH_BIN" ]] || die "the build left no $SERVER_BIN / $BENCH_BIN"
fi

step "stral synthetic checkpoint ($PRESET, HF layout, f32, seed $SEED)"
if [[ -f "$MODEL/config.json" ]]; then
  skip "$MODEL"
else
  STRAL="${STRAL:-}"
  if [[ -z "$STRAL" ]]; then
    for b in "$ROOT/target/release/stral" "$ROOT/target/debug/stral"; do
      [[ -x "$b" ]] && { STRAL="$b"; break; }
    done
  fi
  if [[ -z "$STRAL" ]]; then
    (cd "$ROOT" && cargo build --release --bin stral)
    STRAL="$ROOT/target/release/stral"
  fi
  rm -rf "$MODEL.tmp"
  "$STRAL" synth --preset "$PRESET" --format hf --dtype f32 --seed "$SEED" --out "$MODEL.tmp"
  mv "$MODEL.tmp" "$MODEL"
fi

step "Codestral v3 tokenizer.model (mistral-common $MISTRAL_COMMON_VERSION)"
if [[ -f "$MODEL/tokenizer.model" ]]; then
  skip "$MODEL/tokenizer.model"
else
  WHEEL="$(ls "$DL"/mistral_common-"$MISTRAL_COMMON_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
  if [[ -z "$WHEEL" ]]; then
    "$PIP" download --no-deps "mistral-common==$MISTRAL_COMMON_VERSION" -d "$DL"
    WHEEL="$(ls "$DL"/mistral_common-"$MISTRAL_COMMON_VERSION"-*.whl | head -n1)"
  fi
  "$VENV/bin/python" - "$WHEEL" "$MODEL/tokenizer.model" "$TOKENIZER_SHA256" <<'PY'
import hashlib, sys, zipfile
wheel, out, want = sys.argv[1:]
data = zipfile.ZipFile(wheel).read("mistral_common/data/mistral_instruct_tokenizer_240323.model.v3")
got = hashlib.sha256(data).hexdigest()
if got != want:
    sys.exit(f"tokenizer model sha256 {got}, expected {want}")
open(out, "wb").write(data)
PY
fi

step "GGUF ($OUTTYPE) with the vendored convert_hf_to_gguf.py"
if [[ -f "$GGUF" ]]; then
  skip "$GGUF"
else
  if [[ ! -f "$VENV/.convert-deps-$LLAMA_CPP_PYTHON_VERSION" ]]; then
    # torch (CPU), transformers, sentencepiece, numpy: what the converter imports.
    "$PIP" install -r "$LLAMA/requirements/requirements-convert_hf_to_gguf.txt"
    touch "$VENV/.convert-deps-$LLAMA_CPP_PYTHON_VERSION"
  fi
  "$VENV/bin/python" "$LLAMA/convert_hf_to_gguf.py" "$MODEL" --outtype "$OUTTYPE" \
    --outfile "$GGUF.tmp"
  mv "$GGUF.tmp" "$GGUF"
fi

CTX=$((PARALLEL * CTX_PER_SLOT))
cat <<EOF

Ready:
  llama-server $SERVER_BIN
  llama-bench  $BENCH_BIN
  model        $GGUF

Kernel-level numbers (no server):
  $BENCH_BIN -m $GGUF -t $THREADS -p 512 -n 64

From another shell, the same client against it as against stral:
  stral bench --url http://127.0.0.1:$PORT --endpoint completions --model codestral-latest \\
    --workload fixed --input-tokens 512 --output-tokens 64 --concurrency 16 --num-requests 64
EOF

if [[ "$SERVE" == 0 ]]; then
  exit 0
fi
step "Serving on http://127.0.0.1:$PORT ($PARALLEL slots × $CTX_PER_SLOT tokens, $THREADS threads); Ctrl-C stops it"
exec "$SERVER_BIN" -m "$GGUF" --host 127.0.0.1 --port "$PORT" -t "$THREADS" \
  -np "$PARALLEL" -c "$CTX" --alias codestral-latest

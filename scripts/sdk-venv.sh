#!/usr/bin/env bash
# Creates (once) a venv at target/pyenv-sdk holding the real API clients the HTTP API
# must serve unmodified (the `mistralai` and `openai` Python SDKs) and `schemathesis`,
# all pinned with their dependencies in tests/clients/requirements.txt, then prints the
# venv's directory on stdout:
#   VENV="$(bash scripts/sdk-venv.sh)"; "$VENV/bin/python" tests/clients/sdk_check.py ...
# The venv is rebuilt when the requirements change (stamp keyed by their hash); a lock
# keeps concurrent test binaries from installing twice. Progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=target/pyenv-sdk
REQUIREMENTS=tests/clients/requirements.txt
STAMP="$VENV/.stral-sdk-$(sha256sum "$REQUIREMENTS" | cut -c1-16)"

install_clients() {
  if [ ! -f "$STAMP" ]; then
    echo "sdk-venv: installing $REQUIREMENTS into $VENV" >&2
    rm -rf "$VENV"
    python3 -m venv "$VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
      -r "$REQUIREMENTS" >&2
    "$VENV/bin/python" -m pip check --disable-pip-version-check >&2
    touch "$STAMP"
  fi
}

mkdir -p target
if command -v flock >/dev/null; then
  exec 9>target/.pyenv-sdk.lock
  flock 9
fi
install_clients
if command -v flock >/dev/null; then
  flock -u 9
fi

echo "$(pwd)/$VENV"

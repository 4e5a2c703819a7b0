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
source scripts/pinned-venv.sh
ensure_pinned_venv "$VENV" tests/clients/requirements.txt sdk

echo "$(pwd)/$VENV"

#!/usr/bin/env bash
# Offline checks of the Helm chart, its rendered examples and the Dockerfile: helm lint,
# helm template, Kubernetes schema validation, yamllint, hadolint, the stral command
# lines (k8s/tests/check.py says what each check covers).
#
#   bash k8s/test.sh            # check; exits non-zero on any failure
#   bash k8s/test.sh --update   # re-render k8s/examples/rendered/*.yaml, then check
#
# STRAL_BIN=/path/to/stral also parses every rendered command line with the binary
# (tests/k8s_chart.rs sets it). The pinned tools (k8s/tests/requirements.txt, all from
# PyPI, about 170 MB) are installed once into target/pyenv-k8s.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=target/pyenv-k8s
source scripts/pinned-venv.sh
ensure_pinned_venv "$VENV" k8s/tests/requirements.txt k8s

PYTHONDONTWRITEBYTECODE=1 exec "$VENV/bin/python" k8s/tests/check.py "$@"

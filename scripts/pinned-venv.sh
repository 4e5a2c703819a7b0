# Sourced, not run: defines `ensure_pinned_venv VENV REQUIREMENTS LABEL`, which creates
# VENV (once) holding exactly the pinned REQUIREMENTS (`--no-deps`, then `pip check`).
# The venv is rebuilt when the requirements change (a stamp keyed by their hash); a lock
# under target/ keeps concurrent callers (parallel test binaries) from installing twice.
# Progress goes to stderr. Call it from the repository root.
ensure_pinned_venv() {
  local venv="$1" requirements="$2" label="$3"
  local stamp
  stamp="$venv/.stral-$label-$(sha256sum "$requirements" | cut -c1-16)"
  mkdir -p target
  if command -v flock >/dev/null; then
    exec 9>"target/.$(basename "$venv").lock"
    flock 9
  fi
  if [ ! -f "$stamp" ]; then
    echo "$label: installing $requirements into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
      -r "$requirements" >&2
    "$venv/bin/python" -m pip check --disable-pip-version-check >&2
    touch "$stamp"
  fi
  if command -v flock >/dev/null; then
    flock -u 9
    exec 9>&-
  fi
}

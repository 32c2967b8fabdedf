#!/usr/bin/env bash
# Create <repo>/.venv and install the pinned dependencies (plus any extra requirement files
# given as arguments) when they are missing or older than the requirement files.
# Usage: source scripts/ensure_venv.sh [requirements-test.txt ...]; then $VENV_PY is the python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setting up $VENV (first run: installs pinned dependencies, a few minutes)" >&2
  "$PYTHON" -m venv "$VENV"
fi
VENV_PY="$VENV/bin/python"
stamp="$VENV/.installed"
needs_install=0
[ -f "$stamp" ] || needs_install=1
for f in "$ROOT/requirements.txt" "$ROOT/pyproject.toml" "$@"; do
  [ "$f" -nt "$stamp" ] 2>/dev/null && needs_install=1
  grep -qxF "$f" "$stamp" 2>/dev/null || needs_install=1
done
if [ "$needs_install" = 1 ]; then
  reqs=(-r "$ROOT/requirements.txt")
  for f in "$@"; do reqs+=(-r "$f"); done
  "$VENV_PY" -m pip install --disable-pip-version-check -q "${reqs[@]}" -e "$ROOT"
  printf '%s\n' "$ROOT/requirements.txt" "$ROOT/pyproject.toml" "$@" > "$stamp"
fi
export VENV_PY

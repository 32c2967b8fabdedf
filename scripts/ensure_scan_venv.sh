#!/usr/bin/env bash
# Create <repo>/.venv-scan with checkov (requirements-scan.txt) when it is missing or older than
# that file; prints the path of its checkov. tests/test_kubernetes.py runs it before the scan.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-scan"
REQS="$ROOT/requirements-scan.txt"
stamp="$VENV/.installed"
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$REQS" -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$REQS" >&2
  touch "$stamp"
fi
echo "$VENV/bin/checkov"

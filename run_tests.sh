#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: sets up .venv (pinned), then pytest.
#   bash run_tests.sh            # everything
#   bash run_tests.sh -k batch   # any pytest arguments
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# requirements-test.txt includes requirements-ray.txt; naming it too reinstalls when only it changes.
source "$ROOT/scripts/ensure_venv.sh" "$ROOT/requirements-test.txt" "$ROOT/requirements-ray.txt"
cd "$ROOT"
exec "$VENV_PY" -m pytest "$@"

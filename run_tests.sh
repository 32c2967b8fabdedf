#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: sets up .venv (pinned), then pytest.
#   bash run_tests.sh            # everything
#   bash run_tests.sh -k batch   # any pytest arguments
#   bash run_tests.sh -n 0       # in one process (e.g. to debug with -x or pdb)
# Tests run on one pytest-xdist worker per core (at most 4; each with its share of torch threads);
# --dist loadgroup keeps the tests that share a server, a browser or a Ray cluster on one worker.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# requirements-test.txt includes requirements-ray.txt; naming it too reinstalls when only it changes.
source "$ROOT/scripts/ensure_venv.sh" "$ROOT/requirements-test.txt" "$ROOT/requirements-ray.txt"
cd "$ROOT"
exec "$VENV_PY" -m pytest -n auto --maxprocesses 4 --dist loadgroup "$@"

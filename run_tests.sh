#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: sets up .venv (pinned), then the guards and pytest.
#   bash run_tests.sh                    # everything
#   bash run_tests.sh -k batch           # any pytest arguments
#   bash run_tests.sh tests/test_api.py  # some files (in one run, as given)
#   bash run_tests.sh -n 0               # in one process (e.g. to debug with -x or pdb)
# Tests run on one pytest-xdist worker per core (at most 4; each with its share of torch threads);
# --dist loadgroup keeps the tests that share a server, a browser or a model on one worker.
# Given no files, the guards run beside the tests (ruff, the layers' import contract with
# lint-imports, mypy on the package), and the Ray files run afterwards, on their own: their
# clusters are processes of their own, and their backpressure and routing tests need the cores
# the other tests would take.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# requirements-test.txt includes requirements-ray.txt, -s3.txt, -redis.txt and -docs.txt; naming
# them too reinstalls when only they change.
source "$ROOT/scripts/ensure_venv.sh" "$ROOT/requirements-test.txt" "$ROOT/requirements-ray.txt" \
  "$ROOT/requirements-s3.txt" "$ROOT/requirements-redis.txt" "$ROOT/requirements-docs.txt"
cd "$ROOT"
BIN="$(dirname "$VENV_PY")"
PYTEST=("$VENV_PY" -m pytest -n auto --maxprocesses 4 --dist loadgroup)
for arg in "$@"; do
  case "$arg" in
    tests*|*.py|*::*) exec "${PYTEST[@]}" "$@" ;;  # files named: run just those
  esac
done
guards_log="$(mktemp)"
( "$BIN/ruff" check --quiet . && "$BIN/lint-imports" --no-cache && "$BIN/mypy" ) >"$guards_log" 2>&1 &
guards_pid=$!
first=0
"${PYTEST[@]}" --ignore-glob='tests/test_ray*' "$@" || first=$?
[ "$first" -eq 5 ] && first=0  # -k or -m selected none of these: nothing failed
guards=0
wait "$guards_pid" || guards=$?
if [ "$guards" -ne 0 ]; then
  echo "guards failed (ruff, lint-imports, mypy):" >&2
  cat "$guards_log" >&2
fi
rm -f "$guards_log"
ray=0
"$VENV_PY" -m pytest -n 0 tests/test_ray.py tests/test_ray_cluster.py "$@" || ray=$?
[ "$ray" -eq 5 ] && ray=0
[ "$first" -ne 0 ] && exit "$first"
[ "$guards" -ne 0 ] && exit "$guards"
exit "$ray"

#!/usr/bin/env bash
# Download bench/device-wheels.txt's wheels for the GPU machine (Linux x86-64, CPython 3.12) into
# .whl/ at the repository root (git-ignored), to be carried with a device run:
#   bash bench/device_wheels.sh            # then name .whl in the run's carry list
# The run installs them first:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-.venv/bin/pip}"
mkdir -p .whl
rm -f .whl/*.whl  # one version of each: two of one package stop the install
grep -v '^#' bench/device-wheels.txt | grep -v '^$' | xargs "$PIP" download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl
count=$(ls .whl/*.whl | wc -l)
expected=$(grep -cv -e '^#' -e '^$' bench/device-wheels.txt)
[ "$count" -eq "$expected" ] || { echo "expected $expected wheels in .whl, found $count" >&2; exit 1; }
du -sh .whl

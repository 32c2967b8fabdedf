"""Schemathesis against /openapi.json: positive and negative data on every route, zero 5xx.

The server runs the real app over a real socket with the fake engine (images are instant), so
the fuzzer can send hundreds of requests; what is tested is the HTTP contract, not the model.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes import FakeEngine


@pytest.fixture
def fake_server(server):
    return server(engine=FakeEngine, max_queue=64)


def test_fuzzing_every_route_finds_no_server_error(fake_server, tmp_path):
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert st, "schemathesis is in requirements-test.txt"
    done = subprocess.run(
        [st, "run", f"{fake_server.url}/openapi.json", "--mode", "all", "--checks",
         "not_a_server_error", "--max-examples", "25", "--seed", "1", "--no-color",
         "--request-timeout", "30", "--suppress-health-check", "all"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "No issues found" in done.stdout or " passed" in done.stdout, done.stdout[-3000:]

"""Shared fixtures: a real server on a real socket, in-process (fast, inspectable) or as a
subprocess (for signals, exit codes and the start scripts)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from qwen_image_server.api.app import create_app
from qwen_image_server.serving import GracefulServer
from qwen_image_server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 180.0


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `predicate` until it is true; fail the test naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class LiveServer:
    """A real uvicorn server (GracefulServer) in a thread of this process, on a free port."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = GracefulServer(config)
        self.thread = threading.Thread(target=self.server.run, name="live-server", daemon=True)

    def start(self, wait_ready: bool = True) -> LiveServer:
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "the server to listen")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        if wait_ready:
            wait_until(self.is_ready, READY_TIMEOUT, "the model to load", interval=0.2)
        return self

    def is_ready(self) -> bool:
        return httpx.get(f"{self.url}/ready").status_code == 200

    @property
    def ctx(self):
        return self.app.state.ctx

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def tiny_settings(tmp_path: Path, **overrides) -> Settings:
    """Settings for the embedded tiny model, output under tmp_path, nothing from the env.

    Batching is on (up to 4) although the CPU default is 1, so the tests exercise it."""
    values = dict(model="tiny", output_dir=tmp_path / "out", threads=2, log_level="warning",
                  max_batch_size=4)
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory) -> Iterator[LiveServer]:
    """One in-process server on the tiny model, shared by the tests that only send requests."""
    tmp = tmp_path_factory.mktemp("tiny-server")
    server = LiveServer(create_app(tiny_settings(tmp))).start()
    yield server
    server.stop()


@pytest.fixture
def server(tmp_path: Path) -> Iterator:
    """Start private in-process servers on the tiny model with the settings a test chooses
    (counters start at zero, faults stay private); all are stopped at the end."""
    made: list[LiveServer] = []

    def start(**settings) -> LiveServer:
        live = LiveServer(create_app(tiny_settings(tmp_path, **settings))).start()
        made.append(live)
        return live

    yield start
    for live in made:
        live.stop()


@pytest.fixture
def client(tiny_server: LiveServer) -> Iterator[httpx.Client]:
    with tiny_server.client() as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`qwen-image serve` (or any command) as a subprocess with its own port and cwd."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str], port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = cwd / "server.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> ServerProcess:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                return httpx.get(f"{self.url}/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout, "the server to become ready", interval=0.25)
        return self

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode


def server_env(port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_IMAGE_")}
    env.update(PORT=str(port), HOST="127.0.0.1", WORKERS="1", THREADS="2",
               QWEN_IMAGE_MODEL="tiny", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator:
    """Start `qwen-image serve` subprocesses in tmp_path; all are stopped at the end."""
    started: list[ServerProcess] = []

    def start(*args: str, cmd: list[str] | None = None, **env: str) -> ServerProcess:
        port = free_port()
        command = cmd or [sys.executable, "-m", "qwen_image_server", "serve", *args]
        proc = ServerProcess(command, tmp_path, server_env(port, **env), port)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()

#!/usr/bin/env python3
"""Job store benchmark: POST /v1/jobs latency (p50, p99) under concurrent clients, per store.

Each store gets a fresh server (a process of its own) on the tests' fake engine (instant solid
images: what is measured is the front and its store, not the model), a queue large enough that
nothing is refused, and `--clients` clients (on their own connections, in this process) each
sending their share of `--requests` submissions back to back. The jobs
run and end meanwhile, so the store also takes their ends and images, as in service.

    .venv/bin/python bench/job_store_bench.py [--clients 16] [--requests 1600] [--stores sqlite,memory,redis]
    .venv/bin/python bench/job_store_bench.py --held    # jobs only queue: the submit path alone

`redis` starts a redis-server of its own (Debian's `redis-server`, on a free port, nothing kept
on disk); a `redis://host:port/db` URL in --stores uses that Redis instead (it must be empty).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import redis
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_image_server.api.app import create_app
from qwen_image_server.config.settings import Settings
from qwen_image_server.launch.http import GracefulServer
from tests.fakes import FakeEngine

BODY = {"prompt": "A cute cat sitting on a windowsill", "aspect_ratio": "s1:1", "num_inference_steps": 2,
        "add_overlay": False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(store: str, folder: Path, port: int, max_queue: int, held: bool) -> None:
    """The server, in a process of its own (the clients' work stays out of its GIL)."""
    settings = Settings(_env_file=None, store=store, data_dir=folder / "data", output_dir=folder / "out",
                        log_level="warning", max_queue=max_queue, host="127.0.0.1", port=port)
    app = create_app(settings, engine_factory=lambda: FakeEngine(held=held))
    GracefulServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")).run()


async def submit_all(url: str, clients: int, count: int) -> list[float]:
    """`clients` clients, each on its own connection, sending `count` submissions back to back."""

    async def client_run() -> list[float]:
        times = []
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            for _ in range(count):
                start = time.perf_counter()
                r = await client.post("/v1/jobs", json=BODY)
                times.append(time.perf_counter() - start)
                assert r.status_code == 202, r.text
        return times

    shares = await asyncio.gather(*(client_run() for _ in range(clients)))
    return [t * 1000 for times in shares for t in times]


def measure(store: str, folder: Path, clients: int, requests: int, held: bool) -> dict[str, float | int | str]:
    port = free_port()
    server = multiprocessing.get_context("spawn").Process(target=serve,
                                                          args=(store, folder, port, requests + 64, held))
    server.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/ready").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the server on {store} did not start")
        time.sleep(0.1)
    try:
        asyncio.run(submit_all(url, 1, 32))  # warm-up: first writes, caches
        start = time.perf_counter()
        latencies = asyncio.run(submit_all(url, clients, requests // clients))
        elapsed = time.perf_counter() - start
    finally:
        server.kill()  # nothing of it is kept
        server.join(30)
    ordered = sorted(latencies)
    return {"store": store.split("://")[0], "engine": "held" if held else "instant", "clients": clients,
            "requests": len(latencies),
            "p50_ms": round(statistics.median(ordered), 2),
            "p99_ms": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], 2),
            "max_ms": round(ordered[-1], 2), "submits_per_s": round(len(latencies) / elapsed, 1)}


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A fresh redis-server for one measurement: its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is missing: apt-get install -y redis-server")
    port = free_port()
    folder.mkdir(parents=True)
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise SystemExit("redis-server did not start") from None
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=1600)
    parser.add_argument("--stores", default="sqlite,memory")
    parser.add_argument("--held", action="store_true", help="the engine runs nothing: every job stays queued, "
                        "so only the submit path is measured (not the jobs' ends and images)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="job-store-bench-") as tmp:
        folder = Path(tmp)
        rows = []
        for store in args.stores.split(","):
            with contextlib.ExitStack() as stack:
                where = store.split("://")[0]
                if store == "redis":
                    store = stack.enter_context(redis_server(folder / "redis-server"))
                rows.append(measure(store, folder / where, args.clients, args.requests, args.held))
            print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

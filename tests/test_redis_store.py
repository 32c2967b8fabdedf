"""The Redis job store: two real servers (subprocesses, real HTTP, the tiny model in engine
processes that tests/gated_app.py can hold) share one `redis-server` this module starts. A job
submitted to one is read, streamed and cancelled through the other; when one is killed with jobs
queued and running, the other adopts them once its lease lapses, and runs each once.

Debian's `redis-server` is needed (`.ci/run` installs it). Where it is missing the tests fail,
unless QWEN_TEST_SKIP_REDIS is set, which skips them instead."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import (
    ROOT,
    LiveServer,
    ServerProcess,
    final_status,
    free_port,
    run_cli,
    start_process,
    tiny_settings,
    wait_until,
)
from tests.fakes import FakeEngine
from tests.test_layered import KEY, OTHER_KEY, client, events, small_layers, start_job
from tests.test_webhooks import Receiver

FAST = {"num_inference_steps": 2, "add_overlay": False}
LEASE_S = "2"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A redis-server of its own, on a free port, keeping nothing on disk."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("QWEN_TEST_SKIP_REDIS"):
            pytest.skip("redis-server is missing (QWEN_TEST_SKIP_REDIS is set)")
        pytest.fail("redis-server is missing: apt-get install -y redis-server (or set QWEN_TEST_SKIP_REDIS=1 "
                    "to skip the Redis tests)")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_until(answers, 30, "redis-server to answer")
        yield url
    finally:
        client.close()
        proc.terminate()
        proc.wait(30)


@pytest.fixture
def servers(redis_url, tmp_path) -> Iterator:
    """Start gated servers (tests/gated_app.py) on the shared Redis, each in a folder of its own."""
    started: list[ServerProcess] = []
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    cmd = [gunicorn, "-c", str(ROOT / "gunicorn_config.py"), "tests.gated_app:create_app()"]

    def start(name: str) -> tuple[ServerProcess, Path]:
        folder = tmp_path / name
        folder.mkdir()
        gate = folder / "gate"
        proc = start_process(folder, cmd=cmd, PYTHONPATH=str(ROOT), QWEN_TEST_GATE=str(gate),
                             QWEN_IMAGE_MAX_BATCH_SIZE="1", QWEN_IMAGE_STORE=redis_url,
                             QWEN_IMAGE_STORE_LEASE_S=LEASE_S, QWEN_IMAGE_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
                             QWEN_IMAGE_WEBHOOK_BACKOFF_S="0.05")
        started.append(proc)
        return proc, gate

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def submit(url: str, prompt: str, **extra) -> str:
    r = httpx.post(f"{url}/v1/jobs", json={"prompt": prompt, **FAST, **extra}, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def seen_from_b(b: ServerProcess, ids: list[str], states: list[str]) -> None:
    """Wait until B shows the jobs (run by A) in `states`: B hears A's events a moment later."""
    seen: list[str] = []

    def matches() -> bool:
        seen[:] = [httpx.get(f"{b.url}/v1/jobs/{i}", timeout=30).json()["status"] for i in ids]
        return seen == states

    try:
        wait_until(matches, 30, f"B to show {states}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; B showed {seen}") from None


class EventStream:
    """An SSE client in a thread: the events' names and data, as they come."""

    def __init__(self, url: str) -> None:
        self.events: list[tuple[str, str]] = []
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(url,), daemon=True)
        self.thread.start()

    def _read(self, url: str) -> None:
        name = ""
        with httpx.stream("GET", url, timeout=httpx.Timeout(30, read=180)) as r:
            for line in r.iter_lines():
                if line.startswith("event:"):
                    name = line.removeprefix("event:").strip()
                elif line.startswith("data:"):
                    self.events.append((name, line.removeprefix("data:").strip()))
                    self.first.set()

    def names(self) -> list[str]:
        return [name for name, _ in self.events]


def test_any_server_reads_streams_and_cancels_a_job_another_runs(servers, redis_url, receiver: Receiver):
    (a, gate_a), (b, _) = servers("a"), servers("b")
    a.wait_ready()
    b.wait_ready()

    receiver.answers.extend([500, 500])  # two servers poll the shared outbox: still one try at a time
    done = submit(a.url, "made on a", webhook_url=receiver.url())
    assert final_status(b.url, done)["status"] == "succeeded"  # B reads A's job from the store
    image = httpx.get(f"{b.url}/v1/jobs/{done}/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content == httpx.get(f"{a.url}/v1/jobs/{done}/image").content  # kept in Redis, shared
    assert httpx.get(f"{b.url}/v1/images/job-{done}").content == image.content
    wait_until(lambda: len(receiver.got) >= 3, 30, "the webhook's third try")
    secret = redis.Redis.from_url(redis_url).get("qwen-image:webhook-secret").decode()  # both servers sign with it
    assert [r.answered for r in receiver.got] == [500, 500, 200]
    assert len({r.headers["webhook-id"] for r in receiver.got}) == 1
    assert receiver.got[-1].verified(secret)["data"]["id"] == done

    gate_a.write_text("")  # A's steps wait: its first job runs, the others queue
    running, cancelled, streamed = (submit(a.url, f"job {i}", seed=i) for i in range(3))
    wait_until(lambda: any(gate_a.parent.glob("gate.held-*")), 120, "A's first job to be running")
    seen_from_b(b, [running, cancelled, streamed], ["running", "queued", "queued"])

    # A queued job cancelled through B never runs; the running one stops at its next step.
    r = httpx.delete(f"{b.url}/v1/jobs/{cancelled}", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert httpx.get(f"{a.url}/v1/jobs/{cancelled}").json()["status"] == "cancelled"
    assert httpx.delete(f"{b.url}/v1/jobs/{running}", timeout=30).status_code == 200

    stream = EventStream(f"{b.url}/v1/jobs/{streamed}/events")  # through B, run by A
    assert stream.first.wait(30) and stream.names() == ["queued"]
    gate_a.unlink()
    assert final_status(b.url, running)["status"] == "cancelled"
    stream.thread.join(120)
    names = stream.names()
    assert names[0] == "queued" and "started" in names and names.count("step") == 2, names
    assert names[-1] == "succeeded", names
    assert f'"image_url":"{b.url}/v1/jobs/{streamed}/image"' in stream.events[-1][1].replace(" ", "")
    assert a.scheduler()["processed"] == 2  # the finished one and the streamed one; B ran nothing
    assert b.scheduler()["processed"] == 0
    assert len(receiver.got) == 3  # one job end, one delivery: no server sent it again


def test_a_live_server_adopts_the_jobs_of_a_killed_one_and_runs_each_once(servers):
    (a, gate_a), (b, _) = servers("a"), servers("b")
    a.wait_ready()
    b.wait_ready()
    gate_a.write_text("")
    ids = [submit(a.url, f"adopted {i}", seed=i) for i in range(4)]
    wait_until(lambda: any(gate_a.parent.glob("gate.held-*")), 120, "A's first job to be running")
    seen_from_b(b, ids, ["running"] + ["queued"] * 3)
    time.sleep(float(LEASE_S))  # while A lives, its lease holds: B has run nothing of it
    assert b.scheduler()["processed"] == 0 and b.scheduler()["queue_length"] == 0

    os.killpg(a.proc.pid, signal.SIGKILL)  # front and engines, with no chance to clean up
    a.proc.wait(30)
    ends = [final_status(b.url, job_id) for job_id in ids]
    assert [end["status"] for end in ends] == ["succeeded"] * 4
    assert [end["id"] for end in ends] == ids and [end["seed"] for end in ends] == list(range(4))
    for job_id in ids:
        r = httpx.get(f"{b.url}/v1/jobs/{job_id}/image")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert b.scheduler()["processed"] == 4  # each once, the one A was running from the start


def test_a_full_redis_refuses_new_jobs_with_507_and_still_serves_waiting_requests(redis_url, tmp_path):
    url = redis_url.rsplit("/", 1)[0] + "/1"  # a database of its own
    live = LiveServer(tiny_settings(tmp_path, store=url), FakeEngine).start()  # the store is at stake, not pixels
    admin = redis.Redis.from_url(url)
    try:
        admin.config_set("maxmemory", 1)  # Redis past its maxmemory: it refuses every write
        try:
            r = httpx.post(f"{live.url}/v1/jobs", json={"prompt": "no room", **FAST}, timeout=30)
            assert r.status_code == 507, r.text
            error = r.json()["error"]
            assert (error["type"], error["code"]) == ("insufficient_storage", "job_store_full")
            assert "Redis" in error["message"]
            assert live.scheduler()["queue_length"] == 0
            r = httpx.post(f"{live.url}/generate", json={"prompt": "waits for its image", **FAST}, timeout=120)
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        finally:
            admin.config_set("maxmemory", 0)
        assert final_status(live.url, submit(live.url, "room again"))["status"] == "succeeded"
    finally:
        admin.close()
        live.stop()


def test_serve_says_in_one_line_when_the_redis_store_cannot_be_reached(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    closed = free_port()  # nothing listens there
    assert run_cli("serve", "--model", "tiny", "--port", str(free_port()),
                   "--store", f"redis://:hunter2@127.0.0.1:{closed}/0") == 2
    error = capsys.readouterr().err
    assert f"QWEN_IMAGE_STORE=redis://***@127.0.0.1:{closed}/0: cannot reach Redis" in error
    assert "hunter2" not in error  # the password never shows


def test_with_a_results_url_redis_keeps_the_records_and_the_storage_the_images(redis_url, tmp_path):
    url = redis_url.rsplit("/", 1)[0] + "/2"
    shared = tmp_path / "shared"
    live = LiveServer(tiny_settings(tmp_path, store=url, results_url=shared.as_uri()), FakeEngine).start()
    admin = redis.Redis.from_url(url)
    try:
        job_id = submit(live.url, "kept in the shared folder")
        assert final_status(live.url, job_id)["status"] == "succeeded"
        image = httpx.get(f"{live.url}/v1/jobs/{job_id}/image", timeout=30)
        assert image.status_code == 200
        assert (shared / "jobs" / job_id).read_bytes() == image.content
        assert admin.exists(f"qwen-image:job:{job_id}") and not admin.exists(f"qwen-image:image:{job_id}")
    finally:
        admin.close()
        live.stop()


def test_a_layered_jobs_zip_is_kept_in_redis_and_read_by_another_server(redis_url, tmp_path):
    url = redis_url.rsplit("/", 1)[0] + "/3"
    admin = redis.Redis.from_url(url)
    with small_layers():
        a = LiveServer(tiny_settings(tmp_path / "a", store=url, api_keys=[KEY, OTHER_KEY])).start()
        b = LiveServer(tiny_settings(tmp_path / "b", store=url, api_keys=[KEY, OTHER_KEY])).start()
        try:
            with client(a) as http:
                job_id = start_job(http, seed=5, layers=2)["id"]
                assert events(http, job_id)[-1][0] == "succeeded"
                archive = http.get(f"/v1/jobs/{job_id}/layers.zip").content
            with client(b) as http:  # B never ran it: the ZIP comes from Redis
                r = http.get(f"/v1/jobs/{job_id}/layers.zip")
                assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
                assert r.content == archive
            with client(b, OTHER_KEY) as other:
                assert other.get(f"/v1/jobs/{job_id}/layers.zip").json()["error"]["code"] == "job_not_found"
            assert 0 < admin.pttl(f"qwen-image:layers:{job_id}") <= a.settings.result_ttl_s * 1000  # the job's TTL
        finally:
            admin.close()
            a.stop()
            b.stop()

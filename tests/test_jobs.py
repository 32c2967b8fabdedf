"""Async jobs over real HTTP: create, poll, SSE progress, image, cancel, expiry."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from httpx_sse import connect_sse
from PIL import Image

from tests.conftest import LiveServer, tiny_settings, wait_until
from tests.test_concurrency import hold_engine
from qwen_image_server.api.app import create_app


def events_of(url: str, job_id: str) -> list[tuple[str, dict]]:
    with httpx.Client(timeout=120) as client, connect_sse(client, "GET", f"{url}/v1/jobs/{job_id}/events") as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        return [(e.event, json.loads(e.data)) for e in source.iter_sse()]


def test_job_lifecycle_with_every_step_streamed(tiny_server):
    url = tiny_server.url
    r = httpx.post(f"{url}/v1/jobs", json={"prompt": "a kite", "num_inference_steps": 4, "add_overlay": False})
    assert r.status_code == 202
    created = r.json()
    assert created["status"] in ("queued", "running") and r.headers["Location"].endswith(created["id"])
    events = events_of(url, created["id"])
    names = [name for name, _ in events]
    assert names[-1] == "succeeded"
    steps = [data["progress"]["step"] for name, data in events if name == "step"]
    # A subscriber that connects late gets the current state first, then every later step.
    assert steps == list(range(steps[0], 5)) if steps else names[0] in ("started", "succeeded")
    final = events[-1][1]
    assert final["progress"] == {"step": 4, "total": 4}
    assert final["inference_time"] > 0 and final["queue_time"] >= 0
    image = httpx.get(final["image_url"])
    assert image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (512, 512)
    status = httpx.get(f"{url}/v1/jobs/{created['id']}").json()
    assert status["status"] == "succeeded" and status["queue_position"] is None
    # Same body through /generate gives the same image.
    same = httpx.post(f"{url}/generate", json={"prompt": "a kite", "num_inference_steps": 4, "add_overlay": False},
                      timeout=120)
    assert same.content == image.content


@pytest.fixture
def held(tmp_path):
    live = LiveServer(create_app(tiny_settings(tmp_path))).start()
    release, restore = hold_engine(live)
    yield live, release
    release.set()
    restore()
    live.stop()


def test_queue_position_events_then_started_steps_and_succeeded(held):
    live, release = held
    url = live.url
    blocker = httpx.post(f"{url}/v1/jobs", json={"prompt": "blocker", "num_inference_steps": 2}).json()
    wait_until(lambda: live.ctx.scheduler.stats().running_batch_size == 1, 30, "the blocker to run")
    # Different shapes, so they cannot share a batch: b waits behind a.
    a = httpx.post(f"{url}/v1/jobs", json={"prompt": "a", "num_inference_steps": 3}).json()
    b = httpx.post(f"{url}/v1/jobs", json={"prompt": "b", "num_inference_steps": 4}).json()
    assert (a["queue_position"], b["queue_position"]) == (0, 1)
    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(events_of, url, b["id"])
        wait_until(lambda: live.ctx.jobs.get(b["id"]).subscribers, 30, "the SSE subscriber")
        release.set()
        events = stream.result(timeout=120)
    names = [name for name, _ in events]
    positions = [data["queue_position"] for name, data in events if name == "queued"]
    assert positions == [1, 0]  # first the current state, then the move when the blocker ended
    assert names[positions.__len__()] == "started"
    assert [d["progress"]["step"] for n, d in events if n == "step"] == [1, 2, 3, 4]
    assert names[-1] == "succeeded"
    for job in (blocker, a):
        wait_until(lambda: httpx.get(f"{url}/v1/jobs/{job['id']}").json()["status"] == "succeeded", 60, "jobs")


def test_cancel_queued_job_never_runs_and_running_job_stops(held):
    live, release = held
    url = live.url
    running = httpx.post(f"{url}/v1/jobs", json={"prompt": "long", "num_inference_steps": 50}).json()
    wait_until(lambda: live.ctx.scheduler.stats().running_batch_size == 1, 30, "the job to run")
    queued = httpx.post(f"{url}/v1/jobs", json={"prompt": "never", "num_inference_steps": 3}).json()
    r = httpx.delete(f"{url}/v1/jobs/{queued['id']}")
    assert r.status_code == 200
    # The DELETE's own answer already says so: a queued job ends the moment it is cancelled.
    assert r.json()["status"] == "cancelled" and r.json()["error"]["type"] == "cancelled"
    assert httpx.get(f"{url}/v1/jobs/{queued['id']}").json()["status"] == "cancelled"
    assert httpx.get(f"{url}/v1/jobs/{queued['id']}/image").status_code == 409
    httpx.delete(f"{url}/v1/jobs/{running['id']}")
    release.set()
    wait_until(lambda: httpx.get(f"{url}/v1/jobs/{running['id']}").json()["status"] == "cancelled", 60,
               "the running job to stop")
    status = httpx.get(f"{url}/v1/jobs/{running['id']}").json()
    assert status["progress"]["step"] < 50  # stopped at a step boundary, well before the end
    assert status["error"]["type"] == "cancelled"
    events = events_of(url, running["id"])  # a late subscriber gets the final state at once
    assert [n for n, _ in events] == ["cancelled"]
    assert live.ctx.scheduler.stats().processed == 0


def test_failed_job_reports_its_error(tiny_server, monkeypatch):
    transformer = tiny_server.ctx.model.pipeline.transformer

    def evil_forward(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(transformer, "forward", evil_forward)
    job = httpx.post(f"{tiny_server.url}/v1/jobs", json={"prompt": "x", "num_inference_steps": 2}).json()
    events = events_of(tiny_server.url, job["id"])
    assert events[-1][0] == "failed" and events[-1][1]["error"]["type"] == "inference_error"
    assert httpx.get(f"{tiny_server.url}/v1/jobs/{job['id']}/image").status_code == 409


def test_unknown_job_is_404_and_bad_body_is_400(client):
    for path in ("/v1/jobs/nope", "/v1/jobs/nope/image", "/v1/jobs/nope/events"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    assert client.delete("/v1/jobs/nope").status_code == 404
    r = client.post("/v1/jobs", json={"prompt": "x", "seed": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"


def test_finished_jobs_expire_and_memory_stays_bounded(tmp_path):
    live = LiveServer(create_app(tiny_settings(tmp_path, max_stored_results=2))).start()
    try:
        ids = []
        for i in range(4):
            job = httpx.post(f"{live.url}/v1/jobs", json={"prompt": f"p{i}", "num_inference_steps": 2}).json()
            assert events_of(live.url, job["id"])[-1][0] == "succeeded"
            ids.append(job["id"])
        assert [httpx.get(f"{live.url}/v1/jobs/{i}").status_code for i in ids] == [404, 404, 200, 200]
        assert len(live.ctx.results) <= 2
    finally:
        live.stop()

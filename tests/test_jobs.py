"""Async jobs over real HTTP: create, poll, SSE progress, image, cancel, expiry."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from httpx_sse import connect_sse
from PIL import Image

from tests.conftest import LiveServer, hold_engine, wait_until
from tests.fakes import FakeEngine


@contextmanager
def event_stream(url: str, job_id: str) -> Iterator[Iterator[tuple[str, dict]]]:
    """The job's SSE events as they come; the first one arriving means the subscriber is in."""
    with httpx.Client(timeout=120) as client, connect_sse(client, "GET", f"{url}/v1/jobs/{job_id}/events") as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        yield ((e.event, json.loads(e.data)) for e in source.iter_sse())


def events_of(url: str, job_id: str) -> list[tuple[str, dict]]:
    with event_stream(url, job_id) as events:
        return list(events)


def test_job_lifecycle_with_every_step_streamed_to_a_late_subscriber(tiny_server, tiny_hook):
    url = tiny_server.url
    with hold_engine(tiny_server):
        r = httpx.post(f"{url}/v1/jobs", json={"prompt": "a kite", "num_inference_steps": 4, "add_overlay": False})
        assert r.status_code == 202
        created = r.json()
        assert created["status"] in ("queued", "running") and r.headers["Location"].endswith(created["id"])
        tiny_server.wait_running(what="the job to start")
        # A subscriber that connects after the start gets the current state first...
        with event_stream(url, created["id"]) as stream:
            first_name, first = next(stream)
            assert first_name == "started" and first["status"] == "running"
            assert first["progress"] == {"step": 0, "total": 4, "phase": "denoising"}
            tiny_hook.release()
            events = list(stream)
    # ...then every step, then the end.
    assert [name for name, _ in events] == ["step"] * 4 + ["succeeded"]
    assert [data["progress"]["step"] for name, data in events if name == "step"] == [1, 2, 3, 4]
    final = events[-1][1]
    assert final["progress"] == {"step": 4, "total": 4, "phase": None}
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
def held(server) -> Iterator[LiveServer]:
    """A private server on the fake engine (the events are at stake, not the pixels), held until
    the test releases it (or ends)."""
    live = server(engine=FakeEngine)
    with hold_engine(live):
        yield live


def test_queue_position_events_then_started_steps_and_succeeded(held):
    live = held
    url = live.url
    blocker = httpx.post(f"{url}/v1/jobs", json={"prompt": "blocker", "num_inference_steps": 2}).json()
    live.wait_running(what="the blocker to run")
    # Different shapes, so they cannot share a batch: b waits behind a.
    a = httpx.post(f"{url}/v1/jobs", json={"prompt": "a", "num_inference_steps": 3}).json()
    b = httpx.post(f"{url}/v1/jobs", json={"prompt": "b", "num_inference_steps": 4}).json()
    assert (a["queue_position"], b["queue_position"]) == (0, 1)
    with event_stream(url, b["id"]) as stream:
        events = [next(stream)]  # the current state: the subscriber is in
        # a leaves the queue while the engine is still held: b moves up, provably before it starts.
        assert httpx.delete(f"{url}/v1/jobs/{a['id']}").json()["status"] == "cancelled"
        events.append(next(stream))
        live.hook.release()
        events += list(stream)
    names = [name for name, _ in events]
    positions = [data["queue_position"] for name, data in events if name == "queued"]
    assert positions == [1, 0]  # first the current state, then the move when a left the queue
    assert names == ["queued", "queued", "started", "step", "step", "step", "step", "succeeded"]
    assert [d["progress"]["step"] for n, d in events if n == "step"] == [1, 2, 3, 4]
    wait_until(lambda: httpx.get(f"{url}/v1/jobs/{blocker['id']}").json()["status"] == "succeeded",
               60, "the blocker to finish")


def test_cancel_queued_job_never_runs_and_running_job_stops(held):
    live = held
    url = live.url
    running = httpx.post(f"{url}/v1/jobs", json={"prompt": "long", "num_inference_steps": 50}).json()
    live.wait_running(what="the job to run")
    queued = httpx.post(f"{url}/v1/jobs", json={"prompt": "never", "num_inference_steps": 3}).json()
    r = httpx.delete(f"{url}/v1/jobs/{queued['id']}")
    assert r.status_code == 200
    # The DELETE's own answer already says so: a queued job ends the moment it is cancelled.
    assert r.json()["status"] == "cancelled" and r.json()["error"]["type"] == "cancelled"
    assert httpx.get(f"{url}/v1/jobs/{queued['id']}").json()["status"] == "cancelled"
    not_ready = httpx.get(f"{url}/v1/jobs/{queued['id']}/image")
    assert not_ready.status_code == 409 and not_ready.json()["error"]["type"] == "job_not_ready"
    assert "cancelled" in not_ready.json()["error"]["message"]
    httpx.delete(f"{url}/v1/jobs/{running['id']}")
    live.hook.release()
    wait_until(lambda: httpx.get(f"{url}/v1/jobs/{running['id']}").json()["status"] == "cancelled", 60,
               "the running job to stop")
    status = httpx.get(f"{url}/v1/jobs/{running['id']}").json()
    assert status["progress"]["step"] < 50  # stopped at a step boundary, well before the end
    assert status["error"]["type"] == "cancelled"
    events = events_of(url, running["id"])  # a late subscriber gets the final state at once
    assert [n for n, _ in events] == ["cancelled"]
    assert live.scheduler()["processed"] == 0
    assert len(live.hook.calls) == 1  # the queued job never reached the engine


def test_unfinished_and_failed_jobs_have_no_image_yet(tiny_server, tiny_hook):
    url = tiny_server.url
    with hold_engine(tiny_server):
        job = httpx.post(f"{url}/v1/jobs", json={"prompt": "x", "num_inference_steps": 2}).json()
        tiny_server.wait_running(what="the job to start")
        early = httpx.get(f"{url}/v1/jobs/{job['id']}/image")
        assert early.status_code == 409 and early.json()["error"]["type"] == "job_not_ready"
        assert "running" in early.json()["error"]["message"]
        tiny_hook.fail_next(RuntimeError("injected"))
        failed = httpx.post(f"{url}/v1/jobs", json={"prompt": "y", "num_inference_steps": 3}).json()
    events = events_of(url, failed["id"])
    assert events[-1][0] == "failed" and events[-1][1]["error"]["type"] == "inference_error"
    late = httpx.get(f"{url}/v1/jobs/{failed['id']}/image")
    assert late.status_code == 409 and late.json()["error"]["type"] == "job_not_ready"
    assert httpx.get(f"{url}/v1/jobs/{job['id']}/image").status_code == 200


def test_unknown_job_is_404_and_bad_body_is_400(client):
    for path in ("/v1/jobs/nope", "/v1/jobs/nope/image", "/v1/jobs/nope/events"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    assert client.delete("/v1/jobs/nope").status_code == 404
    r = client.post("/v1/jobs", json={"prompt": "x", "seed": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_at_most_max_stored_results_finished_jobs_are_kept_in_memory(server, store):
    """Memory holds at most max_stored_results finished jobs; with a job store the older ones are
    read back from it, with their images, until their TTL."""
    live = server(engine=FakeEngine, max_stored_results=2, store=store)
    ids = []
    for i in range(4):
        job = httpx.post(f"{live.url}/v1/jobs", json={"prompt": f"p{i}", "num_inference_steps": 2}).json()
        assert events_of(live.url, job["id"])[-1][0] == "succeeded"
        ids.append(job["id"])
    older = 404 if store == "memory" else 200
    assert [httpx.get(f"{live.url}/v1/jobs/{i}").status_code for i in ids] == [older, older, 200, 200]
    assert [httpx.get(f"{live.url}/v1/jobs/{i}/image").status_code for i in ids] == [older, older, 200, 200]


def test_finished_jobs_and_url_images_expire_after_the_result_ttl(server):
    ttl = 2.0
    live = server(engine=FakeEngine, result_ttl_s=ttl)
    sent_at = time.monotonic()
    job = httpx.post(f"{live.url}/v1/jobs", json={"prompt": "kept for a while", "num_inference_steps": 2}).json()
    assert events_of(live.url, job["id"])[-1][0] == "succeeded"
    image = httpx.post(f"{live.url}/v1/images/generations", timeout=60, json={
        "prompt": "kept for a while", "size": "256x256", "response_format": "url",
        "num_inference_steps": 2}).json()["data"][0]["url"]
    paths = [f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/image", image.removeprefix(live.url)]
    assert [httpx.get(live.url + p).status_code for p in paths] == [200, 200, 200]  # kept...

    def all_gone() -> bool:
        return all(httpx.get(live.url + p).status_code == 404 for p in paths)

    wait_until(all_gone, ttl + 30, "the results to expire")  # ...then forgotten
    assert time.monotonic() - sent_at >= ttl
    gone = httpx.get(f"{live.url}/v1/jobs/{job['id']}").json()["error"]
    assert gone["type"] == "not_found" and f"finished more than {ttl:g} s ago" in gone["message"]

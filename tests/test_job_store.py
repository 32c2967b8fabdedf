"""The job store (SQLite, the default): what a client was promised survives the server. Jobs are
killed with the whole server (kill -9 of its process group) while running and queued, and the
server started again on the same data folder."""

from __future__ import annotations

import io
import os
import shutil
import signal
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import ROOT, LiveServer, final_status, tiny_settings, wait_until
from tests.test_layered import KEY, OTHER_KEY, client, events, small_layers, start_job

FAST = {"num_inference_steps": 2, "add_overlay": False}


def test_a_killed_server_runs_its_unfinished_jobs_again_and_keeps_its_finished_ones(spawn, tmp_path):
    gate = tmp_path / "gate"
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    cmd = [gunicorn, "-c", str(ROOT / "gunicorn_config.py"), "tests.gated_app:create_app()"]
    env = dict(PYTHONPATH=str(ROOT), QWEN_TEST_GATE=str(gate), QWEN_IMAGE_MAX_BATCH_SIZE="1")
    first = spawn(cmd=cmd, **env).wait_ready()

    before = httpx.post(f"{first.url}/v1/jobs", json={"prompt": "finished before the kill", **FAST}).json()
    done = final_status(first.url, before["id"])
    image = httpx.get(f"{first.url}/v1/jobs/{before['id']}/image").content

    gate.write_text("")  # every denoising step waits: the first job runs, the others queue
    ids = [httpx.post(f"{first.url}/v1/jobs", json={"prompt": f"job {i}", "seed": i, **FAST}).json()["id"]
           for i in range(6)]
    wait_until(lambda: any(tmp_path.glob("gate.held-*")), 120, "the first job to be running")
    states = [httpx.get(f"{first.url}/v1/jobs/{i}").json()["status"] for i in ids]
    assert states == ["running"] + ["queued"] * 5
    os.killpg(first.proc.pid, signal.SIGKILL)  # front and engines, with no chance to clean up
    first.proc.wait(30)
    gate.unlink()

    second = spawn(cmd=cmd, **env).wait_ready()
    ends = [final_status(second.url, job_id) for job_id in ids]
    assert [end["status"] for end in ends] == ["succeeded"] * 6
    assert [end["id"] for end in ends] == ids and [end["seed"] for end in ends] == list(range(6))
    for job_id in ids:
        r = httpx.get(f"{second.url}/v1/jobs/{job_id}/image")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert second.scheduler()["processed"] == 6  # each ran once after the restart, the finished one not again
    kept = httpx.get(f"{second.url}/v1/jobs/{before['id']}").json()
    assert kept["status"] == "succeeded" and kept["finished_at"] == done["finished_at"]
    assert httpx.get(f"{second.url}/v1/jobs/{before['id']}/image").content == image
    # The request counter goes on from the store's: a new request never reuses an old number.
    assert httpx.post(f"{second.url}/v1/jobs", json={"prompt": "after", **FAST}).json()["request_id"] > max(
        end["request_id"] for end in ends)


@pytest.fixture
def restartable(tmp_path):
    """Start, stop and start again in-process servers on one data folder."""
    made: list[LiveServer] = []

    def start(**settings) -> LiveServer:
        live = LiveServer(tiny_settings(tmp_path, **settings)).start()
        made.append(live)
        return live

    yield start
    for live in made:
        live.stop()


def test_finished_jobs_outlive_the_process_until_their_ttl_then_answer_expired(restartable):
    live = restartable(result_ttl_s=600)
    with live.client() as c:
        ok = c.post("/v1/jobs", json={"prompt": "kept", **FAST}).json()["id"]
        final_status(live.url, ok)
        png = c.get(f"/v1/jobs/{ok}/image").content
        cancelled = c.post("/v1/jobs", json={"prompt": "cancelled", **FAST, "num_inference_steps": 50}).json()["id"]
        c.delete(f"/v1/jobs/{cancelled}")
        assert final_status(live.url, cancelled)["status"] == "cancelled"
    live.stop()

    again = restartable(result_ttl_s=600)
    with again.client() as c:
        assert c.get(f"/v1/jobs/{ok}").json()["status"] == "succeeded"
        assert c.get(f"/v1/jobs/{ok}/image").content == png
        assert c.get(f"/v1/images/job-{ok}").content == png
        assert c.get(f"/v1/jobs/{cancelled}").json()["status"] == "cancelled"
        events = c.get(f"/v1/jobs/{ok}/events").text
        assert "event: succeeded" in events  # a finished job's stream: its end, at once
        unknown = c.get("/v1/jobs/0123456789abcdef0123456789abcdef")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "job_not_found"
    again.stop()

    short = restartable(result_ttl_s=1)
    with short.client() as c:
        fresh = c.post("/v1/jobs", json={"prompt": "short-lived", **FAST}).json()["id"]
        final_status(short.url, fresh)
        wait_until(lambda: c.get(f"/v1/jobs/{fresh}").status_code == 404, 30, "the job to expire")
        gone = c.get(f"/v1/jobs/{fresh}")
        assert gone.json()["error"]["code"] == "job_expired"  # not "unknown": it existed
        assert c.get(f"/v1/jobs/{fresh}/image").json()["error"]["code"] == "job_expired"


def test_a_layered_jobs_zip_outlives_the_process_for_its_owner_only(restartable, tmp_path):
    with small_layers():
        live = restartable(api_keys=[KEY, OTHER_KEY])
        with client(live) as http:
            job_id = start_job(http, seed=5, layers=2)["id"]
            assert events(http, job_id)[-1][0] == "succeeded"
            archive = http.get(f"/v1/jobs/{job_id}/layers.zip").content
        live.stop()

        again = restartable(api_keys=[KEY, OTHER_KEY])
        with client(again) as http:
            kept = http.get(f"/v1/jobs/{job_id}/layers.zip")
            assert kept.status_code == 200 and kept.headers["content-type"] == "application/zip"
            assert kept.content == archive  # byte for byte, read back from the data folder
        with client(again, OTHER_KEY) as other:
            r = other.get(f"/v1/jobs/{job_id}/layers.zip")
            assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    assert (tmp_path / "data" / "results" / "layers" / job_id).read_bytes() == archive


def test_a_memory_store_keeps_no_job_on_disk(restartable, tmp_path):
    live = restartable(store="memory")
    with live.client() as c:
        job_id = c.post("/v1/jobs", json={"prompt": "ephemeral", **FAST}).json()["id"]
        assert final_status(live.url, job_id)["status"] == "succeeded"
    data = tmp_path / "data"
    assert not (data / "jobs.sqlite3").exists() and not (data / "results").exists()


def test_a_job_the_data_folder_cannot_keep_is_refused_with_507_and_not_queued(restartable, tmp_path):
    live = restartable()
    inputs = tmp_path / "data" / "inputs"
    shutil.rmtree(inputs)
    inputs.write_text("")  # a file where the folder of the uploads must be: nothing can be written there
    photo = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(photo, "PNG")
    with live.client() as c:
        r = c.post("/v1/jobs/edit", data={"prompt": "make it blue", "num_inference_steps": "2"},
                   files=[("image", ("photo.png", photo.getvalue(), "image/png"))])
        assert r.status_code == 507, r.text
        error = r.json()["error"]
        assert (error["type"], error["code"]) == ("insufficient_storage", "job_store_full")
        assert "QWEN_IMAGE_DATA_DIR" in error["message"]
        assert live.scheduler()["queue_length"] == 0 and live.scheduler()["processed"] == 0
        # Jobs without uploads, and requests that wait for their image, are still served.
        assert final_status(live.url, c.post("/v1/jobs", json={"prompt": "still served", **FAST}).json()["id"])[
            "status"] == "succeeded"

"""Results belong to the API key that made them, and each key has its limits: attacks on a
running keyed server over real HTTP (enumerating saved files, reading another key's jobs and
images, flooding the queue, the result store or a job's event stream)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from qwen_image_server.serving.file_links import FileLinks
from tests.conftest import LiveServer, hold_engine, tiny_settings, wait_until

FAST = {"num_inference_steps": 2, "add_overlay": False, "aspect_ratio": "s1:1"}
KEYS = {
    "alice": "alice-4f0c2b9e81d7a6",  # at most 2 images in flight
    "bob": "bob-7d1e93a0c54b28f1",  # the server-wide defaults
    "carol": "carol-b5a8e0172d9c3f",  # at most 2 image requests a minute
    "dave": "dave-29c7f1e0a4b8d53",
}
KEYS_FILE = f"""
[[keys]]
key = "{KEYS['alice']}"
name = "alice"
max_jobs = 2

[[keys]]
key = "{KEYS['bob']}"
name = "bob"

[[keys]]
key = "{KEYS['carol']}"
name = "carol"
requests_per_minute = 2

[[keys]]
key = "{KEYS['dave']}"
"""


@pytest.fixture(scope="module")
def keyed(tmp_path_factory) -> LiveServer:
    tmp = tmp_path_factory.mktemp("keyed")
    keys_file = tmp / "keys.toml"
    keys_file.write_text(KEYS_FILE)
    live = LiveServer(tiny_settings(tmp, api_keys_file=keys_file, max_subscribers_per_job=2,
                                    results_max_bytes=1024 * 1024)).start()
    live.headers = {"Authorization": f"Bearer {KEYS['dave']}"}
    yield live
    live.stop()


def as_(live: LiveServer, who: str) -> httpx.Client:
    return live.client(headers={"Authorization": f"Bearer {KEYS[who]}"})


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def finished(c: httpx.Client, job_id: str) -> dict:
    status: dict = {}

    def done() -> bool:
        status.update(c.get(f"/v1/jobs/{job_id}").json())
        return status["status"] in ("succeeded", "failed", "cancelled")

    wait_until(done, 120, f"job {job_id} to finish")
    return status


# -- saved files ----------------------------------------------------------------------------


def test_a_saved_file_opens_only_through_its_link_and_only_for_the_key_that_saved_it(keyed):
    with as_(keyed, "alice") as alice, as_(keyed, "bob") as bob:
        saved = alice.post("/generate", json={"prompt": "a lighthouse", "save_to_file": True, **FAST}).json()
        on_disk = Path(saved["file_path"])
        link = saved["file_url"]
        got = alice.get(link)
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert got.content == on_disk.read_bytes()

        assert error_of(bob.get(link), 404)["type"] == "not_found"  # the link is alice's
        name = on_disk.name
        assert alice.get(f"/files/{name}").status_code == 404  # the name alone opens nothing
        query = {k: v[0] for k, v in parse_qs(urlsplit(link).query).items()}
        later = {**query, "expires": str(int(query["expires"]) + 3600)}
        forged = {**query, "signature": query["signature"][:-2] + ("AA" if query["signature"][-2:] != "AA" else "BB")}
        for tampered in (later, forged):
            assert alice.get(f"/files/{name}?{urlencode(tampered)}").status_code == 404

        other = alice.post("/v1/jobs", json={"prompt": "a boat", "save_to_file": True, **FAST}).json()
        other_status = finished(alice, other["id"])
        assert alice.get(other_status["file_url"]).status_code == 200  # a job's saved file has its link too
        other_name = Path(other_status["file_path"]).name
        assert alice.get(f"/files/{other_name}?{urlencode(query)}").status_code == 404  # one link, one file


def test_enumerating_saved_names_from_the_request_counter_finds_nothing(keyed):
    """The attack on predictable names: every response tells the request counter and the clock,
    and the seed's names are built from exactly those."""
    with as_(keyed, "alice") as alice, as_(keyed, "bob") as attacker:
        for _ in range(2):
            alice.post("/generate", json={"prompt": "a private photo", "save_to_file": True, **FAST})
        own = attacker.post("/generate", json={"prompt": "a probe", **FAST})
        counter = int(own.headers["X-Request-ID"])
        out = keyed.settings.output_dir
        on_disk = {p.name for p in out.glob("Qwen-Image-*.png")}
        assert on_disk  # there is something to find
        now = datetime.now()
        probes = {f"Qwen-Image-{now - timedelta(seconds=s):%Y%m%d_%H%M%S}-req{k}.png"
                  for s in range(0, 90) for k in range(1, counter + 1)}
        assert on_disk <= probes  # the enumeration covers every saved name...
        for name in sorted(on_disk):  # ...and each of them is refused, as every other probe
            assert attacker.get(f"/files/{name}").status_code == 404
        hits = [name for name in sorted(probes)[:300] if attacker.get(f"/files/{name}").status_code != 404]
        assert hits == []


def test_file_links_expire():
    now = [1_000_000.0]
    links = FileLinks(b"s" * 48, ttl_s=60, clock=lambda: now[0])
    query = {k: v[0] for k, v in parse_qs(links.query("Qwen-Image-x.png", "alice")).items()}
    args = ("Qwen-Image-x.png", int(query["expires"]), query["signature"])
    assert links.valid(*args, "alice") and not links.valid(*args, "bob") and not links.valid(*args, None)
    now[0] += 61
    assert not links.valid(*args, "alice")


# -- jobs and url images ------------------------------------------------------------------------


def test_another_keys_jobs_and_url_images_do_not_exist(keyed):
    with as_(keyed, "alice") as alice, as_(keyed, "bob") as bob:
        job = alice.post("/v1/jobs", json={"prompt": "a secret", **FAST}).json()
        assert finished(alice, job["id"])["status"] == "succeeded"
        for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/image", f"/v1/jobs/{job['id']}/events",
                     f"/v1/images/job-{job['id']}"):
            assert error_of(bob.get(path), 404)["type"] == "not_found", path
            assert alice.get(path).status_code == 200, path
        assert bob.delete(f"/v1/jobs/{job['id']}").status_code == 404

        made = alice.post("/v1/images/generations", json={
            "prompt": "a secret", "response_format": "url", "size": "512x512", "num_inference_steps": 2})
        url = made.json()["data"][0]["url"]
        assert bob.get(url).status_code == 404
        assert alice.get(url).status_code == 200


# -- limits per key -----------------------------------------------------------------------------


def test_a_key_at_its_jobs_in_flight_gets_429_while_other_keys_are_served(keyed):
    job = {"prompt": "a queue filler", **FAST}
    with as_(keyed, "alice") as alice, as_(keyed, "bob") as bob, hold_engine(keyed):
        ids = [alice.post("/v1/jobs", json=job).json()["id"] for _ in range(2)]
        refused = alice.post("/v1/jobs", json=job)
        error = error_of(refused, 429)
        assert (error["type"], error["code"]) == ("rate_limit_exceeded", "too_many_jobs")
        assert int(refused.headers["Retry-After"]) >= 1
        assert error_of(alice.post("/v1/images/generations", json={"prompt": "x", "n": 3}), 400)["param"] == "n"
        other = bob.post("/v1/jobs", json=job)
        assert other.status_code == 202
        ids.append(other.json()["id"])
    with as_(keyed, "alice") as alice, as_(keyed, "bob") as bob:
        for job_id, c in zip(ids, (alice, alice, bob), strict=True):
            assert finished(c, job_id)["status"] == "succeeded"
        assert alice.post("/v1/jobs", json=job).status_code == 202  # room again once they ended


def test_a_key_over_its_requests_per_minute_gets_429_with_retry_after(keyed):
    with as_(keyed, "carol") as carol:
        for _ in range(2):
            assert carol.post("/generate", json={"prompt": "a cat", **FAST}).status_code == 200
        refused = carol.post("/generate", json={"prompt": "a cat", **FAST})
        assert error_of(refused, 429)["code"] == "too_many_requests"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert carol.get("/info").status_code == 200  # reading is not limited


def test_a_job_takes_a_bounded_number_of_event_streams(keyed):
    with as_(keyed, "bob") as bob, hold_engine(keyed):
        job_id = bob.post("/v1/jobs", json={"prompt": "a watched pot", **FAST}).json()["id"]
        streams = [bob.stream("GET", f"/v1/jobs/{job_id}/events") for _ in range(2)]
        opened = [s.__enter__() for s in streams]
        # Kept: dropping a response's iterator closes the connection (the client leaving).
        readers = [r.iter_text() for r in opened]
        try:
            assert all(r.status_code == 200 for r in opened)
            for reader in readers:
                assert re.search(r"event: (queued|started)", next(reader))
            refused = bob.get(f"/v1/jobs/{job_id}/events")
            assert error_of(refused, 429)["code"] == "too_many_subscribers"
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    with as_(keyed, "bob") as bob:
        assert finished(bob, job_id)["status"] == "succeeded"


def test_a_key_flooding_the_result_store_evicts_its_own_images_not_anothers(keyed):
    body = {"prompt": "noise", "response_format": "url", "size": "512x512", "num_inference_steps": 2}
    with as_(keyed, "dave") as victim, as_(keyed, "bob") as flooder:
        kept = victim.post("/v1/images/generations", json=body).json()["data"][0]["url"]
        flood = []
        for _ in range(3):
            r = flooder.post("/v1/images/generations", json={**body, "n": 3})
            flood += [item["url"] for item in r.json()["data"]]
        size = len(victim.get(kept).content)
        assert size * (len(flood) + 1) > 1024 * 1024  # together they are over the store's bytes
        assert victim.get(kept).status_code == 200
        assert flooder.get(flood[0]).status_code == 404  # the flooder's oldest went instead
        assert flooder.get(flood[-1]).status_code == 200


def test_keys_never_show_in_the_settings_repr_or_dump(tmp_path):
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(KEYS_FILE)
    settings = tiny_settings(tmp_path, api_keys=["plain-key-0123456789"], api_keys_file=keys_file,
                             files_secret="files-secret-0123456789")
    shown = repr(settings) + str(settings.model_dump()) + settings.model_dump_json() + repr(settings.accepted_keys)
    for secret in ("plain-key-0123456789", "files-secret-0123456789", *KEYS.values()):
        assert secret not in shown
    assert {key.caller.id for key in settings.accepted_keys} >= {"alice", "bob", "carol"}

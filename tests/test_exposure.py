"""A server reachable from the network, attacked as a web page or a scraper would, over real HTTP:
cross-site requests, DNS rebinding (the Host allowlist), the warning an open server gives at
start, and /metrics behind its own key."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LiveServer, tiny_settings, wait_until
from tests.fakes import FakeEngine

EVIL = "https://evil.example"
EDIT_FORM = {"prompt": "make it night", "num_inference_steps": "2", "size": "256x256", "add_overlay": "false"}
JOB = {"prompt": "a lighthouse", "num_inference_steps": 2, "aspect_ratio": "s1:1", "add_overlay": False}


def assert_error(r: httpx.Response, status: int, type_: str, code: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == (type_, code)
    return error


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 120, 40)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[LiveServer]:
    """A server as it starts by default: no keys, any Host, no other origin allowed."""
    server = LiveServer(tiny_settings(tmp_path_factory.mktemp("exposure")), FakeEngine).start()
    yield server
    server.stop()


def finished(live: LiveServer, job_id: str) -> bool:
    return httpx.get(f"{live.url}/v1/jobs/{job_id}", timeout=30).json()["status"] == "succeeded"


# -- cross-site requests ----------------------------------------------------------------------


def test_a_cross_site_multipart_edit_is_refused_and_runs_nothing(live):
    # What any page the user visits can send without asking the server first: a form POST.
    assert live.hook is not None and live.settings is not None
    runs_before = len(live.hook.specs)
    form = {**EDIT_FORM, "save_to_file": "true"}
    for path in ("/v1/jobs/edit", "/edit", "/v1/images/edits"):
        for sender in ({"Origin": EVIL}, {"Referer": f"{EVIL}/cats.html?x=1"}, {"Origin": "null"}):
            r = httpx.post(f"{live.url}{path}", data=form, files=[("image", ("a.png", png(), "image/png"))],
                           headers=sender, timeout=30)
            error = assert_error(r, 403, "permission_error", "cross_origin_request")
            assert "QWEN_IMAGE_ALLOWED_ORIGINS" in error["message"]

    # The same page's own requests (the web playground), and requests no page sent, work.
    for sender in ({"Origin": live.url}, {"Referer": f"{live.url}/"}, {}):
        created = httpx.post(f"{live.url}/v1/jobs/edit", data=EDIT_FORM, headers=sender,
                             files=[("image", ("a.png", png(), "image/png"))], timeout=30)
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        wait_until(lambda job_id=job_id: finished(live, job_id), 30, "the edit job")
    # Only the three allowed jobs reached the engine; the refused ones saved no file either.
    assert len(live.hook.specs) - runs_before == 3
    assert not list(live.settings.output_dir.glob("*.png"))


def test_a_cross_site_page_cannot_cancel_a_job(live):
    created = httpx.post(f"{live.url}/v1/jobs", json=JOB, timeout=30)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    refused = httpx.delete(f"{live.url}/v1/jobs/{job_id}", headers={"Origin": EVIL}, timeout=30)
    assert_error(refused, 403, "permission_error", "cross_origin_request")
    wait_until(lambda: finished(live, job_id), 30, "the job to succeed, not be cancelled")


def test_the_same_site_behind_a_tls_proxy_is_its_own_origin(live):
    # A proxy terminating TLS passes the public Host on; the page's origin is https on port 443.
    headers = {"Host": "images.example.org", "Origin": "https://images.example.org"}
    assert httpx.post(f"{live.url}/v1/jobs", json=JOB, headers=headers, timeout=30).status_code == 202
    headers["Origin"] = "https://images.example.org:8443"  # another port is another origin
    assert httpx.post(f"{live.url}/v1/jobs", json=JOB, headers=headers, timeout=30).status_code == 403


def test_listed_origins_may_send_requests(server):
    live = server(engine=FakeEngine, allowed_origins="https://app.example, http://10.0.0.5:3000")
    with live.client() as c:
        for origin in ("https://app.example", "https://APP.example:443", "http://10.0.0.5:3000"):
            assert c.post("/v1/jobs", json=JOB, headers={"Origin": origin}).status_code == 202, origin
        for origin in (EVIL, "http://app.example", "http://10.0.0.5:3001"):
            assert c.post("/v1/jobs", json=JOB, headers={"Origin": origin}).status_code == 403, origin
        assert c.get("/info", headers={"Origin": EVIL}).status_code == 200  # reading is not refused
    anyone = server(engine=FakeEngine, allowed_origins="*")
    with anyone.client() as c:
        assert c.post("/v1/jobs", json=JOB, headers={"Origin": EVIL}).status_code == 202


# -- DNS rebinding: the Host allowlist ----------------------------------------------------------


def test_a_request_for_another_host_name_is_refused(server, live):
    # DNS rebinding: evil.example now resolves to the server, so the attacker's page is
    # same-origin with it, and its requests name evil.example in Host.
    port = urlsplit(live.url).port
    assert httpx.get(f"{live.url}/info", headers={"Host": f"evil.example:{port}"}).status_code == 200  # default: any

    guarded = server(engine=FakeEngine, allowed_hosts="localhost, 127.0.0.1")
    port = urlsplit(guarded.url).port
    rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
    with guarded.client() as c:
        for method, path in (("GET", "/info"), ("GET", "/health"), ("POST", "/v1/jobs")):
            r = c.request(method, path, json=JOB if method == "POST" else None, headers=rebound)
            error = assert_error(r, 400, "invalid_request_error", "host_not_allowed")
            assert "QWEN_IMAGE_ALLOWED_HOSTS" in error["message"]
        assert_error(c.get("/info", headers={"Host": "evil.example"}), 400, "invalid_request_error",
                     "host_not_allowed")
        assert c.get("/info").status_code == 200  # 127.0.0.1:<port>
        assert c.get("/info", headers={"Host": f"localhost:{port}"}).status_code == 200
        assert c.post("/v1/jobs", json=JOB, headers={"Origin": guarded.url}).status_code == 202


# -- an open server says so ---------------------------------------------------------------------


def open_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "the server is open" in r.getMessage()]


def test_an_open_server_says_so_once_at_start(server, caplog):
    caplog.set_level(logging.WARNING)
    server(engine=FakeEngine, host="0.0.0.0", port=5123)
    [line] = open_warnings(caplog)
    assert "0.0.0.0:5123" in line and "QWEN_IMAGE_API_KEYS" in line
    caplog.clear()
    server(engine=FakeEngine, host="0.0.0.0", api_keys="a-key-of-some-length")
    server(engine=FakeEngine, host="127.0.0.1")
    assert open_warnings(caplog) == []


# -- /metrics behind its own key ----------------------------------------------------------------


def test_metrics_need_their_own_key_when_one_is_set(server, caplog):
    caplog.set_level(logging.DEBUG)
    api_key, metrics_key = "api-key-5d1c0e9a", "metrics-key-93be7f20"
    live = server(engine=FakeEngine, api_keys=api_key, metrics_key=metrics_key, log_level="debug")
    with live.client() as c:
        missing = c.get("/metrics")
        assert_error(missing, 401, "authentication_error", "missing_metrics_key")
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        for wrong in (f"Bearer {metrics_key}x", f"Bearer {api_key}"):  # an API key does not open it
            assert_error(c.get("/metrics", headers={"Authorization": wrong}), 401, "authentication_error",
                         "invalid_metrics_key")
        assert c.get("/info", headers={"Authorization": f"Bearer {metrics_key}"}).status_code == 401  # nor vice versa
        for path in ("/health", "/ready"):
            assert c.get(path).status_code == 200, path

        scraped = c.get("/metrics", headers={"Authorization": f"Bearer {metrics_key}"})
        assert scraped.status_code == 200, scraped.text
    families = {f.name: f for f in text_string_to_metric_families(scraped.text)}
    refused = [s for s in families["qwen_image_http_requests"].samples
               if s.name == "qwen_image_http_requests_total" and s.labels["status"] == "401"]
    assert sum(s.value for s in refused) >= 4  # the refused scrapes are counted like any request
    assert metrics_key not in caplog.text and api_key not in caplog.text
    assert metrics_key not in repr(live.settings) + str(live.settings.model_dump())  # a secret


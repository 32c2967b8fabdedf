"""Webhooks over real sockets: a receiver of the test's own takes them as any client's server
would, verifies them with the `standardwebhooks` library, refuses some, goes down; the server
retries, survives a kill between tries, and calls no host it may not."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from standardwebhooks import Webhook, WebhookVerificationError

from qwen_image_server.cli import main
from tests.conftest import LiveServer, hold_engine, wait_until
from tests.fakes import FakeEngine

SECRET = "whsec_" + base64.b64encode(b"a receiver's shared secret, 32 b").decode()
FAST = {"num_inference_steps": 2, "add_overlay": False}
# The loopback receiver is allowed only because the server lists it, as an operator would.
ALLOW_RECEIVER = {"webhook_allowed_hosts": ["127.0.0.1"], "webhook_backoff_s": 0.05, "webhook_timeout_s": 5}


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int

    def verified(self, secret: str = SECRET) -> dict:
        """The event, once its signature checks out (raises otherwise)."""
        return Webhook(secret).verify(self.body, self.headers)


class Receiver:
    """An HTTP server of the test's own on a free loopback port: each POST is kept, and answered
    with the next status of `answers`, then `default`."""

    def __init__(self) -> None:
        self.answers: deque[int] = deque()
        self.default = 200
        self.got: list[Received] = []
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with lock:
                    status = receiver.answers.popleft() if receiver.answers else receiver.default
                    receiver.got.append(Received(self.path, dict(self.headers.items()), body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook-receiver", daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def to(self, path: str) -> list[Received]:
        return [r for r in self.got if r.path == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def hooked(tmp_path_factory) -> Iterator[LiveServer]:
    """A server on the fake engine that may call the loopback receiver, with short backoffs."""
    from tests.conftest import tiny_settings

    settings = tiny_settings(tmp_path_factory.mktemp("webhooks"), webhook_secret=SECRET, **ALLOW_RECEIVER)
    server = LiveServer(settings, FakeEngine).start()
    yield server
    server.stop()


def deliveries(live: LiveServer) -> dict[str, float]:
    """`qwen_image_webhook_deliveries_total` by outcome, as /metrics shows it."""
    text = httpx.get(f"{live.url}/metrics", timeout=30).text
    return {s.labels["outcome"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "qwen_image_webhook_deliveries_total"}


def job_status(live_url: str, job_id: str) -> dict:
    return httpx.get(f"{live_url}/v1/jobs/{job_id}", timeout=30).json()


def test_a_refused_delivery_is_tried_again_with_the_same_id_until_accepted(hooked, receiver):
    before = deliveries(hooked)
    receiver.answers.extend([500, 500])
    created = httpx.post(f"{hooked.url}/v1/jobs", json={"prompt": "a kite", "webhook_url": receiver.url(), **FAST},
                         timeout=30)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    wait_until(lambda: len(receiver.got) >= 3, 30, "the third try")

    tries = receiver.got
    assert [r.answered for r in tries] == [500, 500, 200]
    assert len({r.headers["webhook-id"] for r in tries}) == 1  # receivers drop repeats by it
    assert all(r.headers["webhook-id"].startswith("evt_") for r in tries)
    events = [r.verified() for r in tries]  # each try signed, with a fresh timestamp
    assert events[0] == events[1] == events[2]
    event = events[2]
    assert event["id"] == tries[2].headers["webhook-id"]
    assert (event["object"], event["type"]) == ("event", "job.succeeded")
    assert isinstance(event["created_at"], int)
    # The job's status, as GET /v1/jobs/{id} answers it; its image downloads from the link.
    assert event["data"] == job_status(hooked.url, job_id)
    assert event["data"]["status"] == "succeeded"
    image = httpx.get(event["data"]["image_url"], timeout=30)
    assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (512, 512)
    # A bad signature does not verify: the receiver's check means something.
    with pytest.raises(WebhookVerificationError, match="signature"):
        Webhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(tries[2].body, tries[2].headers)

    wait_until(lambda: deliveries(hooked)["delivered"] == before["delivered"] + 1, 10, "the delivery to be counted")
    after = deliveries(hooked)
    assert after["retried"] - before["retried"] == 2 and after["given_up"] == before["given_up"]


def test_a_receiver_answering_410_gone_gets_no_more_tries(hooked, receiver):
    before = deliveries(hooked)
    receiver.default = 410
    created = httpx.post(f"{hooked.url}/v1/jobs", json={"prompt": "a kite", "webhook_url": receiver.url(), **FAST},
                         timeout=30)
    assert created.status_code == 202, created.text
    wait_until(lambda: deliveries(hooked)["given_up"] == before["given_up"] + 1, 30, "the delivery to be given up")
    assert [r.answered for r in receiver.got] == [410]
    assert deliveries(hooked)["retried"] == before["retried"]


def test_failed_cancelled_and_edit_jobs_are_announced_too(hooked, receiver):
    hook = hooked.hook
    assert hook is not None
    url = hooked.url
    hook.fail_next(RuntimeError("the model broke"))  # at the first job's first step
    with hold_engine(hooked):
        running = httpx.post(f"{url}/v1/jobs", timeout=30, json={
            "prompt": "fails", "webhook_url": receiver.url("/failed"), **FAST}).json()
        hooked.wait_running(what="the first job to run")
        queued = httpx.post(f"{url}/v1/jobs", timeout=30, json={
            "prompt": "cancelled", "webhook_url": receiver.url("/cancelled"), "seed": 1, "aspect_ratio": "1:1",
            **FAST}).json()
        assert httpx.delete(f"{url}/v1/jobs/{queued['id']}", timeout=30).json()["status"] == "cancelled"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 120, 40)).save(buf, "PNG")
    edit = httpx.post(f"{url}/v1/jobs/edit", timeout=30, files=[("image", ("a.png", buf.getvalue(), "image/png"))],
                      data={"prompt": "make it night", "size": "256x256", "webhook_url": receiver.url("/edit"),
                            "num_inference_steps": "2", "add_overlay": "false"})
    assert edit.status_code == 202, edit.text
    wait_until(lambda: all(receiver.to(p) for p in ("/failed", "/cancelled", "/edit")), 30, "three webhooks")

    failed, cancelled, edited = (receiver.to(p)[0].verified() for p in ("/failed", "/cancelled", "/edit"))
    assert failed["type"] == "job.failed" and failed["data"]["id"] == running["id"]
    assert failed["data"]["error"]["type"] == "inference_error"
    assert cancelled["type"] == "job.cancelled" and cancelled["data"]["id"] == queued["id"]
    assert edited["type"] == "job.succeeded" and edited["data"] == job_status(url, edit.json()["id"])
    assert len({failed["id"], cancelled["id"], edited["id"]}) == 3


@pytest.mark.parametrize("target", [
    "http://127.0.0.1:9/hook", "http://10.1.2.3/hook", "http://169.254.169.254/latest/meta-data/",
    "http://[::1]:8080/hook", "http://localhost:8080/hook", "http://[::ffff:127.0.0.1]/hook",
    "http://0.0.0.0:80/", "http://192.168.1.1/", "http://[fd00::1]/"])
def test_a_webhook_to_a_host_that_is_not_public_is_400_and_runs_nothing(fake_server, target):
    hook = fake_server.hook
    assert hook is not None
    runs = len(hook.specs)
    r = httpx.post(f"{fake_server.url}/v1/jobs", json={"prompt": "a kite", "webhook_url": target, **FAST}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("webhook_url", "webhook_url_not_allowed")
    assert "QWEN_IMAGE_WEBHOOK_ALLOWED_HOSTS" in error["message"]
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "PNG")
    r = httpx.post(f"{fake_server.url}/v1/jobs/edit", files=[("image", ("a.png", buf.getvalue(), "image/png"))],
                   data={"prompt": "make it night", "webhook_url": target}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "webhook_url", r.text
    assert len(hook.specs) == runs


@pytest.mark.parametrize("target", ["ftp://example.com/hook", "not a url", "https://user:pw@example.com/hook"])
def test_a_webhook_url_that_is_not_an_http_url_is_400_naming_it(fake_server, target):
    r = httpx.post(f"{fake_server.url}/v1/jobs", json={"prompt": "a kite", "webhook_url": target, **FAST}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "webhook_url", r.text


def test_only_job_routes_take_a_webhook_url(fake_server):
    doc = httpx.get(f"{fake_server.url}/openapi.json", timeout=30).json()

    def fields(path: str) -> set[str]:
        content = doc["paths"][path]["post"]["requestBody"]["content"]
        found: set[str] = set()
        for media in content.values():
            schema = media["schema"]
            if "$ref" in schema:
                schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
            found |= set(schema["properties"])
        return found

    assert "webhook_url" in fields("/v1/jobs") and "webhook_url" in fields("/v1/jobs/edit")
    # Synchronous routes answer with the image: there is nothing to announce.
    assert "webhook_url" not in fields("/generate") | fields("/edit")


def test_the_operator_default_gets_the_jobs_that_name_none(server, receiver, tmp_path):
    # Listed by name: whatever localhost resolves to (::1, 127.0.0.1) may be called.
    live = server(engine=FakeEngine, webhook_url=f"http://localhost:{receiver.port}/default",
                  webhook_allowed_hosts=["localhost"], webhook_backoff_s=0.05)
    created = httpx.post(f"{live.url}/v1/jobs", json={"prompt": "a kite", **FAST}, timeout=30).json()
    own = httpx.post(f"{live.url}/v1/jobs", timeout=30, json={
        "prompt": "a kite", "webhook_url": f"http://localhost:{receiver.port}/own", **FAST}).json()
    wait_until(lambda: receiver.to("/default") and receiver.to("/own"), 30, "both webhooks")
    # No QWEN_IMAGE_WEBHOOK_SECRET: the server made one, kept in its data folder for its user only.
    secret_file = tmp_path / "data" / "webhook-secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    secret = secret_file.read_text().strip()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    default, named = receiver.to("/default")[0].verified(secret), receiver.to("/own")[0].verified(secret)
    assert default["data"] == job_status(live.url, created["id"])
    assert named["data"] == job_status(live.url, own["id"])
    assert len(receiver.got) == 2  # the job that named its own URL went there only


def test_a_delivery_survives_a_kill_of_the_server_between_tries(spawn, receiver, tmp_path: Path):
    receiver.default = 503  # down
    env = {"QWEN_IMAGE_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1", "QWEN_IMAGE_WEBHOOK_BACKOFF_S": "0.5",
           "QWEN_IMAGE_WEBHOOK_TIMEOUT_S": "2"}
    first = spawn(**env).wait_ready()
    created = httpx.post(f"{first.url}/v1/jobs", json={"prompt": "a kite", "webhook_url": receiver.url(), **FAST},
                         timeout=30)
    assert created.status_code == 202, created.text
    wait_until(lambda: len(receiver.got) >= 2, 60, "two refused tries")
    os.killpg(first.proc.pid, signal.SIGKILL)  # the front and its engine, at once
    first.proc.wait(30)
    first_log = first.output()
    refused = len(receiver.got)
    receiver.default = 200  # the receiver is back

    second = spawn(**env)
    wait_until(lambda: any(r.answered == 200 for r in receiver.got), 120, "the delivery after the restart")
    # Made in the data folder (the default, ./data) by the first server, and used by the second.
    secret = (tmp_path / "data" / "webhook-secret").read_text().strip()
    tries = receiver.got
    assert all(r.answered == 503 for r in tries[:refused]) and tries[refused].answered == 200
    assert len({r.headers["webhook-id"] for r in tries}) == 1
    event = tries[refused].verified(secret)
    assert event["type"] == "job.succeeded" and event["data"]["id"] == created.json()["id"]
    assert "resuming 1 webhook delivery" in second.output()
    # The server says where its secret is, never what it is.
    assert "webhook-secret" in first_log and secret not in first_log + second.output()
    assert json.loads(tries[refused].body) == event
    os.killpg(second.proc.pid, signal.SIGKILL)  # its model may still be loading: no drain to wait for
    second.proc.wait(30)


def test_a_malformed_secret_stops_the_start_without_being_echoed(monkeypatch, capsys):
    short = "whsec_" + base64.b64encode(b"sixteen byte key").decode()
    monkeypatch.setenv("QWEN_IMAGE_WEBHOOK_SECRET", short)
    monkeypatch.setenv("QWEN_IMAGE_MAX_QUEUE", "none")  # so that no server starts here, whatever the code
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "QWEN_IMAGE_WEBHOOK_SECRET" in err and "24 to 64 bytes" in err
    assert short not in err and short.removeprefix("whsec_") not in err

"""Slow clients cannot take the front down: a client gets `request_read_timeout_s` to send its
request line and headers, and as long again for its body; connections beyond `max_connections` are
closed at once. Attacked over real sockets, on both of uvicorn's HTTP parsers (h11, which a plain
install uses, and httptools, which uvicorn prefers where it is installed).

The server runs in this process (LiveServer), so this process holds both ends of every socket.
"""

from __future__ import annotations

import io
import json
import resource
import selectors
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from httpx_sse import connect_sse
from PIL import Image

from tests.conftest import LiveServer, hold_engine, tiny_settings, wait_until
from tests.fakes import FakeEngine

DEADLINE = 1.5  # s: request_read_timeout_s of the servers here
SLOW = 1500  # slowloris sockets
LATE = 10.0  # s: how long after the deadline a connection may still be open on a loaded machine
FAST = {"num_inference_steps": 2, "add_overlay": False, "width": 256, "height": 256}


@pytest.fixture(scope="module")
def descriptors() -> Iterator[None]:
    """Room for the slow sockets in this process: both their ends, and the server's own files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * SLOW + 1024
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"the hard limit on open files is {hard}; this test needs {need} (ulimit -Hn)")
    raised = max(soft, 4 * need) if hard == resource.RLIM_INFINITY else hard  # as the server does at start
    resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module", params=["h11", "httptools"])
def live(request, descriptors, tmp_path_factory) -> Iterator[LiveServer]:
    """A server on the fake engine with a short read deadline and the default connection cap (a
    share of the open-file limit just raised), on one HTTP parser."""
    if request.param == "httptools":
        pytest.importorskip("httptools", reason="uvicorn's httptools parser is not installed")
    settings = tiny_settings(tmp_path_factory.mktemp("slow"), request_read_timeout_s=DEADLINE)
    server = LiveServer(settings, FakeEngine, http=request.param).start()
    yield server
    server.stop()


def address(live: LiveServer) -> tuple[str, int]:
    host, port = live.url.removeprefix("http://").split(":")
    return host, int(port)


class Trickler:
    """Sockets that each send one more byte of `message` every `every` s, and when the server closed
    each of them (EOF or reset), seen by reading them."""

    def __init__(self, message: bytes, every: float = 1.0) -> None:
        self.message = message
        self.every = every
        self.opened: dict[socket.socket, float] = {}
        self.sent: dict[socket.socket, int] = {}
        self.closed: dict[socket.socket, float] = {}
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trickler", daemon=True)

    def connect(self, target: tuple[str, int], count: int) -> None:
        for _ in range(count):
            sock = socket.create_connection(target, timeout=10)
            self.opened[sock] = time.monotonic()
            sock.setblocking(False)
            self._send_next(sock)
            self._selector.register(sock, selectors.EVENT_READ)

    def start(self) -> Trickler:
        self._thread.start()
        return self

    def open_count(self) -> int:
        return len(self.opened) - len(self.closed)

    def _send_next(self, sock: socket.socket) -> None:
        sent = self.sent.get(sock, 0)
        if sent < len(self.message):
            try:
                sock.send(self.message[sent:sent + 1])
                self.sent[sock] = sent + 1
            except OSError:  # reset: the read below sees it closed
                pass

    def _run(self) -> None:
        next_byte = time.monotonic() + self.every
        while not self._stop.is_set() and self.open_count():
            for key, _ in self._selector.select(timeout=0.05):
                sock = key.fileobj
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.closed[sock] = time.monotonic()
                    self._selector.unregister(sock)
            if time.monotonic() >= next_byte:
                next_byte += self.every
                for sock in self.opened:
                    if sock not in self.closed:
                        self._send_next(sock)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._selector.close()
        for sock in self.opened:
            sock.close()


def test_slowloris_sockets_are_closed_at_the_deadline_while_health_and_requests_are_served(live):
    slow = Trickler(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", every=1.0)
    try:
        slow.connect(address(live), SLOW)
        slow.start()
        health: list[float] = []
        generated = 0
        with httpx.Client(base_url=live.url, timeout=10) as client:
            deadline = max(slow.opened.values()) + DEADLINE + LATE
            while slow.open_count() and time.monotonic() < deadline:
                # A new connection each time: the server must still accept and answer.
                start = time.monotonic()
                r = httpx.get(f"{live.url}/health", timeout=10)
                health.append(time.monotonic() - start)
                assert r.status_code == 200 and r.json()["status"] == "healthy"
                if len(health) % 5 == 1:
                    image = client.post("/generate", json={"prompt": "still served", **FAST})
                    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
                    generated += 1
        still_open = slow.open_count()
        lived = [slow.closed[s] - slow.opened[s] for s in slow.closed]
    finally:
        slow.close()
    assert still_open == 0, f"{still_open} of {SLOW} slow sockets still open {DEADLINE + LATE}s after the last opened"
    # Each lived its deadline (a byte a second kept none alive longer), and was not cut early.
    assert min(lived) >= DEADLINE - 0.1 and max(lived) <= DEADLINE + LATE, (min(lived), max(lived))
    assert len(health) >= 5 and generated >= 1, (health, generated)
    assert max(health) < 1.0, sorted(health)[-5:]


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """A whole response of a connection the server closes after it."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


def trickle_until_answered(sock: socket.socket, rest: bytes, every: float = 0.25) -> float:
    """Send `rest` a byte every `every` s until the server answers or closes; when that was. Fails
    once the deadline is well past."""
    sock.settimeout(every)
    give_up = time.monotonic() + DEADLINE + LATE
    for byte in rest:
        if time.monotonic() > give_up:
            raise AssertionError(f"the server still waits for the trickled request after {DEADLINE + LATE}s")
        try:
            sock.recv(1, socket.MSG_PEEK)  # returns with an answer, or b"" once closed
            return time.monotonic()
        except TimeoutError:
            pass
        except OSError:  # reset
            return time.monotonic()
        try:
            sock.send(bytes([byte]))
        except OSError:
            return time.monotonic()
    raise AssertionError("the server waited for the whole trickled request")


def test_a_trickled_body_gets_408_in_the_error_shape_and_the_connection_closes(live):
    body = json.dumps({"prompt": "a trickled prompt " * 20, **FAST}).encode()
    sock = socket.create_connection(address(live), timeout=10)
    with sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
        headers_sent = time.monotonic()
        answered = trickle_until_answered(sock, body[10:])
        sock.settimeout(10)
        status, headers, payload = read_response(sock)
    assert DEADLINE - 0.1 <= answered - headers_sent <= DEADLINE + LATE
    assert status == 408 and headers["connection"] == "close"
    error = json.loads(payload)["error"]
    assert (error["type"], error["code"]) == ("request_timeout", "body_timeout") and "1.5 s" in error["message"]
    assert httpx.get(f"{live.url}/health").status_code == 200


def test_the_next_request_on_a_kept_alive_connection_gets_the_deadline_from_its_first_byte(live):
    sock = socket.create_connection(address(live), timeout=10)
    with sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first
        started = time.monotonic()
        closed = trickle_until_answered(sock, b"GET /health HTTP/1.1\r\nHost: x\r\n" * 10)
        sock.settimeout(10)
        assert sock.recv(65536) == b""  # closed, not answered
    assert DEADLINE - 0.1 <= closed - started <= DEADLINE + LATE


def test_a_slow_upload_within_the_deadline_and_streams_longer_than_it_are_served(live):
    noise = io.BytesIO()
    Image.effect_noise((700, 700), 80).convert("RGB").save(noise, "PNG")
    upload = httpx.Request("POST", f"{live.url}/v1/images/edits", data={"prompt": "make it night"},
                           files=[("image", ("noise.png", noise.getvalue()))])
    content = upload.read()
    assert len(content) > 1_000_000

    def slowly() -> Iterator[bytes]:
        # About two thirds of the deadline to send it all.
        pieces = 10
        size = -(-len(content) // pieces)
        for i in range(pieces):
            yield content[i * size:(i + 1) * size]
            time.sleep(DEADLINE * 0.66 / pieces)

    headers = {"Content-Type": upload.headers["Content-Type"], "Content-Length": str(len(content))}
    started = time.monotonic()
    edited = httpx.post(upload.url, content=slowly(), headers=headers, timeout=30)
    assert edited.status_code == 200, edited.text
    assert time.monotonic() - started >= DEADLINE * 0.6  # it was slow

    # The app's turn is not the client's: a job's SSE stream and a /generate that wait on a held
    # engine for longer than the deadline both end normally.
    with hold_engine(live) as hook, httpx.Client(base_url=live.url, timeout=30) as client:
        job = client.post("/v1/jobs", json={"prompt": "held", **FAST}).json()
        with connect_sse(client, "GET", f"/v1/jobs/{job['id']}/events") as source:
            events = source.iter_sse()
            assert next(events).event in ("queued", "started")
            results: list[httpx.Response] = []
            waiting = threading.Thread(target=lambda: results.append(
                httpx.post(f"{live.url}/generate", json={"prompt": "also held", **FAST}, timeout=30)))
            waiting.start()
            # Past the deadline with the stream and the request open, waiting on the engine.
            time.sleep(DEADLINE + 0.5)
            hook.release()
            names = [event.event for event in events]
        waiting.join(30)
    assert names[-1] == "succeeded", names
    assert results and results[0].status_code == 200 and results[0].headers["content-type"] == "image/png"


def test_connections_beyond_the_cap_are_closed_at_once_and_the_server_recovers(tmp_path):
    cap = 20
    settings = tiny_settings(tmp_path, request_read_timeout_s=DEADLINE, max_connections=cap)
    live = LiveServer(settings, FakeEngine).start()
    try:
        wait_until(lambda: not live.server.server_state.connections, 10, "the readiness probes' connections to close")
        idle = Trickler(b"GET /health HTTP/1.1\r\n", every=10.0)
        try:
            idle.connect(address(live), cap + 10)
            idle.start()
            wait_until(lambda: len(idle.closed) >= 10, 1.0, "the connections beyond the cap to be closed")
            early = [s for s in idle.closed if idle.closed[s] - idle.opened[s] < DEADLINE / 2]
            assert len(early) == 10 and idle.open_count() == cap
            # Once the deadline frees the held ones, the server answers again.
            wait_until(lambda: idle.open_count() == 0, DEADLINE + LATE, "the held connections to be closed")
        finally:
            idle.close()
        assert httpx.get(f"{live.url}/health").status_code == 200
    finally:
        live.stop()

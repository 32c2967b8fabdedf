"""An engine process that hangs or breaks the pipe protocol, over a real socket, on the tiny model.

* A batch that hangs: past its deadline (QWEN_IMAGE_BATCH_TIMEOUT_S) the engine is killed and
  restarted while /ready says why, the job is retried once on the fresh engine, a job that hangs
  there too fails with a clear 500, and the next request succeeds.
* A message the front cannot read (another version of the code, say): the engine is killed as
  lost, so the rest of that batch can never be taken for the next request's result.

One front with one engine process is shared by the module; `tests/engine_loaders.py` holds the
engine's denoising steps (its gate file) for as long as a test wants, which is a hang as far as
the front can tell, and garbles the pipe for a prompt that asks.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from qwen_image_server.api.app import create_app
from qwen_image_server.engine.process import engine_factories
from tests.conftest import LiveServer, tiny_settings, wait_until
from tests.engine_loaders import GARBLE, GatedLoader
from tests.test_metrics import scrape, value

pytestmark = pytest.mark.xdist_group("engine-hang")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = {"num_inference_steps": 2, "add_overlay": False, "aspect_ratio": "s1:1"}
# Well above a small image's batch (SMALL: under a second; 3.6 s on a test machine running five
# times as many processes as it has cores), below a test's patience: a hang costs two of them.
TIMEOUT_S = 8.0
SMALL = {"size": "256x256", "num_inference_steps": 1}


def small_image(c: httpx.Client, prompt: str, seed: int) -> httpx.Response:
    return c.post("/v1/images/generations", json={"prompt": prompt, "seed": seed, **SMALL}, timeout=180)


def png_of(answer: httpx.Response) -> bytes:
    assert answer.status_code == 200, answer.text
    return base64.b64decode(answer.json()["data"][0]["b64_json"])


@dataclass
class Front:
    live: LiveServer
    gate: Path  # while it exists, every denoising step waits in the engine

    @property
    def url(self) -> str:
        return self.live.url

    def engine(self) -> dict:
        return httpx.get(f"{self.url}/info", timeout=30).json()["engines"][0]

    def held_in(self) -> set[str]:
        """The engine processes whose step waits (or waited until it was killed) at the gate."""
        return {path.name.rsplit("-", 1)[1] for path in self.gate.parent.glob(f"{self.gate.name}.held-*")}

    def wait_serving(self) -> None:
        wait_until(lambda: self.engine()["state"] in ("idle", "busy"), 180, "the engine to serve", interval=0.2)


@pytest.fixture(scope="module")
def front(tmp_path_factory) -> Iterator[Front]:
    tmp = tmp_path_factory.mktemp("engine-hang")
    gate = tmp / "gate"
    settings = tiny_settings(tmp, batch_timeout_s=TIMEOUT_S, engine_restart_backoff_s=0.05)
    app = create_app(settings, engines=engine_factories(settings, [None], GatedLoader(gate)))
    live = LiveServer(app).start()
    yield Front(live, gate)
    gate.unlink(missing_ok=True)
    live.stop()


def test_a_hung_engine_is_killed_the_job_retried_once_and_the_server_recovers(front):
    front.wait_serving()
    before = front.engine()
    with httpx.Client(base_url=front.url, timeout=30) as c:
        front.gate.write_text("")  # every step of every engine waits: the batch hangs
        try:
            with ThreadPoolExecutor(1) as pool:
                hung = pool.submit(httpx.post, f"{front.url}/generate", json={"prompt": "hangs", **FAST},
                                   timeout=180)
                # While no engine serves, /ready says why, and /health stays up with the reason.
                reason = "engine restarting after a hung batch"

                def restarting() -> bool:
                    ready, health = c.get("/ready"), c.get("/health")
                    return ((ready.status_code, ready.json()["reason"], health.status_code, health.json()["reason"])
                            == (503, reason, 200, reason))

                wait_until(restarting, 60, "/ready and /health to name the hang")
                answer = hung.result(180)
            # It hung in two engine processes: the one it started in, then the fresh one it was retried in.
            held = front.held_in()
            assert len(held) == 2 and str(before["pid"]) in held, held
        finally:
            front.gate.unlink(missing_ok=True)
        assert answer.status_code == 500, answer.text
        error = answer.json()["error"]
        assert (error["type"], error["code"]) == ("inference_error", "engine_timeout")
        assert f"hanging past its {TIMEOUT_S:.1f} s deadline" in error["message"]

        assert png_of(small_image(c, "a cat", 1)).startswith(PNG_MAGIC)
        assert c.get("/ready").json() == {"ready": True, "reason": None}
        assert c.get("/health").json()["reason"] is None
        after = front.engine()
        assert after["restarts"] == before["restarts"] + 2 and str(after["pid"]) not in held
        m = scrape(c)
    assert value(m, "qwen_image_engine_timeouts_total", engine="0") == 2


def test_an_engine_that_sends_what_the_front_cannot_read_is_killed_and_leaks_nothing(front):
    front.wait_serving()
    before = front.engine()
    with httpx.Client(base_url=front.url, timeout=180) as c:
        expected = png_of(small_image(c, "a cat", 7))
        # At its first step the engine sends a message the front cannot read, then goes on with
        # the batch: were it kept, its image would be read as the next request's answer.
        garbled = small_image(c, f"{GARBLE} please", 8)
        assert garbled.status_code == 500 and garbled.json()["error"]["type"] == "inference_error"
        assert png_of(small_image(c, "a cat", 7)) == expected
        # Its engine was killed, the job retried once on a fresh one, which was killed too.
        assert front.engine()["restarts"] == before["restarts"] + 2
        health = c.get("/health").json()
        assert health["status"] == "healthy" and health["reason"] is None
